"""Shared fixtures. ``ray_session``: one local Ray for the whole test session (2 CPUs, no dashboard)."""

import os

# Set before anything imports ray or transformers: no auth token prompts, no hub lookups.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray started once per session (num_cpus=2, include_dashboard=False); shut down at the end."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()
