"""A job function for the warm-start cluster test: what its rank process sees."""

import json
import os
from pathlib import Path

MARK = None  # set by every job that runs here: a later job's rank must not find it set


def probe(ctx):
    global MARK
    seen = {"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "file": __file__,
            "env": os.environ.get("WARM_VAR"), "mark_before": MARK}
    MARK = ctx.job_id
    Path(ctx.config["out"]).write_text(json.dumps(seen))
    ctx.report({"step": 1, "loss": 1.0})
