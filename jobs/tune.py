"""`ray job submit --address ... --runtime-env cluster/runtime_env.yaml -- python jobs/tune.py --search FILE`.

A Ray Tune search over the online IRL loop (the same as `dense-irl tune`); `--resume` continues an
interrupted search. Inside a Ray job, RAY_ADDRESS points at the cluster and the search attaches to it.
"""

import sys

from dense_irl.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
