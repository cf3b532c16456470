"""`ray job submit ... -- python jobs/serve.py --reward-model PATH [--host 0.0.0.0 --token T ...]`.

Serves a reward-model checkpoint over HTTP on the cluster (the same as `dense-irl serve`): the Ray Serve
app of `dense_irl.serving.app`, until the job is stopped. `ray job stop` sends SIGTERM: in-flight requests
are drained, Serve is shut down (Serve apps otherwise outlive the job that deployed them) and the job
exits 0.
"""

import sys

from dense_irl.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
