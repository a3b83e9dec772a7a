"""A script job that fails: a line on stdout, one on stderr, exit code 3."""

import os
import sys

print(f"attempt {os.environ['TORCHELASTIC_RESTART_COUNT']}: about to fail", flush=True)
print("RuntimeError: the data ran out", file=sys.stderr, flush=True)
sys.exit(3)
