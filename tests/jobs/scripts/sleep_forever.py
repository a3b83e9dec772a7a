"""A script job that never ends and starts a helper process of its own (as a DataLoader does)."""

import subprocess
import sys
import time

helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
print(f"started helper {helper.pid}", flush=True)
while True:
    time.sleep(1)
