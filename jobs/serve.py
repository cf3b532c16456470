"""`ray job submit ... -- python jobs/serve.py --reward-model PATH [--host 0.0.0.0 --token T ...]`.

Serves a reward-model checkpoint over HTTP on the cluster (the same as `dense-irl serve`): the Ray Serve
app of `dense_irl.serving.app`, until the job is stopped. `ray job stop` sends SIGTERM; it is turned into
the Ctrl-C path, which shuts Serve down (Serve apps otherwise outlive the job that deployed them).
"""

import signal
import sys

from dense_irl.cli import main


def _stop(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    sys.exit(main(["serve", *sys.argv[1:]]))
