"""Running the scoring app as a process: ``dense-irl serve`` (:func:`serve_forever`) and
:func:`start_server` (Ray, Serve's HTTP proxy and the app of ``serving.app``), with a clean stop."""

from __future__ import annotations

import json
import os
import sys
import time

from ray import serve

from dense_irl.serving.app import APP_NAME, TOKEN_ENV, app_builder
from dense_irl.serving.schemas import ServeArgs


def exposure_warning(host: str, token: str | None) -> str | None:
    """The warning for a server reachable beyond this machine without a token (None when it is not)."""
    if host in ("127.0.0.1", "localhost", "::1") or token or os.environ.get(TOKEN_ENV):
        return None
    return (f"warning: serving on {host} without a token: anyone who can reach it can score and reload "
            "checkpoints; pass --token (or set DENSE_IRL_TOKEN)")


def start_server(args: dict | ServeArgs, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME) -> str:
    """Start Ray (if needed) and Serve's HTTP proxy on ``host:port``, deploy the app; returns its URL."""
    import ray

    app = app_builder(args)  # fail on a bad checkpoint path before starting anything
    warning = exposure_warning(host, (args.get("token") if isinstance(args, dict) else args.token))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if not ray.is_initialized():
        from dense_irl.logs import ray_init_kwargs

        ray.init(**ray_init_kwargs())
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_forever(args: dict | ServeArgs, host: str = "127.0.0.1", port: int = 8000) -> None:
    """``dense-irl serve``: deploy, print the URLs, run until SIGTERM or SIGINT (``ray job stop``, systemd,
    Kubernetes, Ctrl-C), then drain in-flight requests, shut Serve and Ray down and return (exit 0)."""
    import signal

    import ray

    url = start_server(args, host, port)  # a bad checkpoint or arg fails here, before anything is started
    try:
        # Ray's core worker aborts the process on SIGTERM (exit 134); Python's handlers, set after it started,
        # turn both signals into the one clean path below.
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, _interrupt)
        print(json.dumps({"url": url, "health": f"{url}/health", "docs": f"{url}/docs"}), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping: draining in-flight requests", file=sys.stderr, flush=True)
    finally:
        if ray.is_initialized():
            # Deleting the app first drains it: its replicas take no new requests and finish the ones they
            # hold (up to graceful_shutdown_timeout_s) while the HTTP proxy still carries their answers back;
            # serve.shutdown alone stops the proxy at once and drops them.
            serve.delete(APP_NAME)
            serve.shutdown()
            ray.shutdown()
