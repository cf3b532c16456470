"""`ray job submit ... -- python jobs/evaluate.py localisation --reward-model PATH --data FILE.jsonl ...`.

Offline evaluation (the same as `dense-irl eval ...`): `localisation` or `bon`.
"""

import sys

from dense_irl.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
