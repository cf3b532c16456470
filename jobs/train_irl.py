"""`ray job submit --address ... --runtime-env cluster/runtime_env.yaml -- python jobs/train_irl.py --config FILE`.

The online IRL loop (the same as `dense-irl train`). Inside a Ray job, RAY_ADDRESS points at the
cluster and the driver attaches to it; run directly, it starts a local Ray.
"""

import sys

from dense_irl.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
