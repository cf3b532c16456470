"""`ray job submit ... -- python jobs/train_reward.py --config offline_tiny [--key=value ...]`.

Offline IRL of the step reward model (the same as `dense-irl train-reward`).
"""

import sys

from dense_irl.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-reward", *sys.argv[1:]]))
