"""Functions the zygote tests (tests/multiprocess/test_zygote.py) run in forked rank processes."""

import os
import signal
import time

MARK = None  # a module-level global one job sets: the next job's fork must not see it


def where_am_i(name: str) -> dict:
    return {"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "env": os.environ.get(name),
            "pgid": os.getpgid(0)}


def set_mark(value: str) -> str | None:
    global MARK
    before, MARK = MARK, value
    return before


def read_mark() -> str | None:
    return MARK


def segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(10)


def raises() -> None:
    raise ValueError("bad input in the rank")


def sleeps() -> None:
    time.sleep(600)


def push_and_read(task) -> list:
    channel = task.supervisor  # the host relay the zygote's child put there
    pending = [channel.push(task.attempt, [("metric", 1.0, {"loss": 0.5})])]
    replies, rest = channel.replies(pending, wait=True)
    return replies


def cuda_sum() -> dict:
    import torch

    x = torch.ones(1024, device="cuda")
    return {"count": torch.cuda.device_count(), "sum": x.sum().item(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
