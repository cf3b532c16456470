"""Compute time inside the actors, per method, so that an iteration's wall time splits into work and overhead.

A phase's wall time in the driver (``time_<phase>_s``) is the actors' work plus Ray's scheduling, the
serialisation of arguments and answers, and waiting. Each actor method marked :func:`timed` adds its own
run time to the actor; ``Driver.iteration`` collects it (``pop_compute_s``) and logs ``compute_<phase>_s``,
so the overhead is the difference (``bench/iteration_bench.py``).
"""

from __future__ import annotations

import functools
import time

import ray

# which iteration phase each timed actor method belongs to
PHASE_OF = {"generate": "rollout", "reward_step": "reward", "score": "score", "policy_step": "policy",
            "state_dict": "sync", "broadcast_weights": "sync", "update_weights": "sync", "receive_weights": "sync",
            "update_pi_old": "sync", "receive_pi_old": "sync"}


def timed(fn):
    """Add the method's run time to its actor's ``_compute_s[name]`` (a timed method called from another is
    counted once, in the outer one)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if self.__dict__.get("_timing"):
            return fn(self, *args, **kwargs)
        self._timing, t0 = True, time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            self._timing = False
            clock = self.__dict__.setdefault("_compute_s", {})
            clock[fn.__name__] = clock.get(fn.__name__, 0.0) + time.perf_counter() - t0

    return wrapper


class ComputeClock:
    """The actor side: ``pop_compute_s()`` answers the time per method since the last call, and resets it."""

    def pop_compute_s(self) -> dict[str, float]:
        return self.__dict__.pop("_compute_s", {})


def phase_compute(senders: list[dict[str, float]], receivers: list[dict[str, float]]) -> dict[str, float]:
    """Each phase's compute time from the actors' clocks: the slowest actor's, since actors of a phase run in
    parallel; the weight sync is the sender's (the policy learners) then the slowest receiver's."""
    out: dict[str, float] = {}
    for group in (senders, receivers):
        best: dict[str, float] = {}
        for clock in group:
            per_phase: dict[str, float] = {}
            for method, s in clock.items():
                phase = PHASE_OF.get(method)
                if phase is not None:
                    per_phase[phase] = per_phase.get(phase, 0.0) + s
            for phase, s in per_phase.items():
                best[phase] = max(best.get(phase, 0.0), s)
        for phase, s in best.items():
            out[phase] = out.get(phase, 0.0) + s if phase == "sync" else max(out.get(phase, 0.0), s)
    return out


def collect_compute(senders: list, receivers: list) -> dict[str, float]:
    """:func:`phase_compute` of the actors' clocks (``senders``: the policy learners; ``receivers``: the other
    actors), each clock popped; a dead actor counts as idle (the phase that needs it replaces it or says so)."""
    clocks = []
    for ref in [a.pop_compute_s.remote() for a in senders + receivers]:
        try:
            clocks.append(ray.get(ref))
        except ray.exceptions.RayActorError:
            clocks.append({})
    return phase_compute(clocks[: len(senders)], clocks[len(senders) :])
