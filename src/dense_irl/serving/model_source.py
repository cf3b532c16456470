"""The checkpoint every scoring replica should serve: a small Serve deployment that admin reloads publish to
and that the replicas poll (``serving/app.py``)."""

import time

from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class ModelSource:
    """The checkpoint every replica should serve after admin reloads: a path and a counter.

    Replicas poll it, reporting the counter value they serve, so an admin reload can wait until every
    replica heard from in the last ``window_s`` seconds serves the new checkpoint.
    """

    def __init__(self, path: str, window_s: float = 30.0):
        self.path, self.config_path, self.seq, self.window_s = path, path, 0, window_s
        self.replicas: dict[str, tuple[int, float]] = {}  # replica id -> (seq served, last poll)

    def get(self, replica: str | None = None, served: int = 0) -> tuple[str, int]:
        if replica is not None:
            self.replicas[replica] = (served, time.monotonic())
        return self.path, self.seq

    def progress(self, seq: int) -> tuple[int, int]:
        """(replicas serving ``seq`` or later, replicas still behind) among the recently seen."""
        now = time.monotonic()
        recent = [s for s, t in self.replicas.values() if now - t < self.window_s]
        return sum(s >= seq for s in recent), sum(s < seq for s in recent)

    def publish(self, path: str) -> tuple[str, int]:
        self.path, self.seq = path, self.seq + 1
        return self.path, self.seq

    def publish_config(self, path: str) -> tuple[str, int]:
        # Every replica reports the same user_config change; only the first moves the counter.
        if path != self.config_path:
            self.config_path = self.path = path
            self.seq += 1
        return self.path, self.seq
