"""Stopping the loop cleanly: SIGTERM or SIGINT (``ray job stop``, Kubernetes, systemd, Ctrl-C) lets the
current iteration finish, writes a checkpoint and exits 0; a second signal stops at once. A dead learner
actor stops the run with a message naming it and how to resume."""

from __future__ import annotations

import contextlib
import signal
import threading

import ray

from dense_irl.errors import ActorDiedError


class GracefulStop:
    """``with GracefulStop() as stop: ... if stop.requested: ...``. Handlers are installed only in the main
    thread (a Ray Tune trial runs elsewhere, and Tune stops trials itself); the old ones come back on exit."""

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second signal: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this iteration, then writing a checkpoint and stopping "
              "(send it again to stop at once)", flush=True)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def actor_names(drv) -> dict[str, str]:
    """Each of the driver's actors by its Ray actor id: ``policy learner rank 0``, ``rollout worker 1``..."""
    groups = (("policy learner rank", drv.policy), ("reward learner rank", drv.reward),
              ("rollout worker", drv.workers))
    return {a._actor_id.hex(): f"{name} {i}" for name, group in groups for i, a in enumerate(group)}


def actor_died(drv, e: ray.exceptions.RayActorError, latest) -> ActorDiedError:
    """The error a dead actor ends the run with: which actor, in which iteration, and how to resume."""
    name = actor_names(drv).get(getattr(e, "actor_id", None) or "", "an actor of the loop")
    first = (str(e).strip().splitlines() or [""])[0][:300]
    resume = (f"resume with --resume=auto: it continues from {latest} and draws the same next batch"
              if latest else "no checkpoint was written yet: start again (--resume=no)")
    with contextlib.suppress(Exception):  # the others are stopped; the placement group is freed
        drv.close(graceful=False)
    return ActorDiedError(f"the {name} died during iteration {drv.state['iteration'] + 1} ({first}); the run "
                          f"stopped. {resume}")
