"""The digits example's optional ReduceLROnPlateau (torch's own, config lr_plateau_patience): run
in-process on one rank (a real TrainContext, no cluster), its state saved and restored with
the checkpoint."""

from __future__ import annotations

import pytest

from orchestrator.runtime.checkpoint import CheckpointStore
from orchestrator.runtime.context import TrainContext
from orchestrator.spec import DataSpec
from strategies import WorkerEnv, get_strategy_class

from ..compress_helpers import digits_data

pytestmark = pytest.mark.timeout(240)


class Collected:
    def __init__(self):
        self.events, self.sources = [], []

    def emit(self, kind, payload):
        self.events.append((kind, payload))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return digits_data(tmp_path_factory.mktemp("digits"))


def _train(paths, store: CheckpointStore, config: dict) -> list[dict]:
    from examples.digits.train import train

    data = {"train": DataSpec(path=paths["train"], batch_size=64, shuffle=True),
            "eval": DataSpec(path=paths["eval"], batch_size=512, drop_last=False)}
    strategy_cls = get_strategy_class("ddp")
    strategy = strategy_cls(strategy_cls.parse_options({}))
    strategy.env = env = WorkerEnv(rank=0, world_size=1)  # one process: no process group to set up
    reporter = Collected()
    ctx = TrainContext(env, strategy, job_id="digits", config=config,
                       reporter=reporter, checkpoints=store, resume_from=store.latest(), data=data)
    train(ctx)
    return [p for kind, p in reporter.events if kind == "metrics" and "accuracy" in p]


def test_the_lr_halves_on_a_plateau_and_the_scheduler_resumes_from_the_checkpoint(paths, tmp_path):
    store = CheckpointStore(tmp_path / "runs", keep=5)
    # lr 2.0 diverges at once: accuracy stalls, so patience 0 halves the lr after every bad epoch
    config = {"epochs": 3, "hidden": 16, "lr": 2.0, "lr_plateau_patience": 0}
    evals = _train(paths, store, config)
    lrs = [e["lr"] for e in evals]
    assert lrs[0] <= 2.0 and all(b in (a, a / 2) for a, b in zip(lrs, lrs[1:], strict=False))
    assert min(lrs) < 2.0  # it did reduce
    saved = store.latest()
    resumed = _train(paths, store, {**config, "epochs": 4})  # one more epoch, from the checkpoint
    assert [e["epoch"] for e in resumed] == [3]
    assert resumed[0]["lr"] in (lrs[-1], lrs[-1] / 2)  # the scheduler's lr and state came back
    assert saved.index < store.latest().index


def test_without_the_option_the_lr_stays(paths, tmp_path):
    evals = _train(paths, CheckpointStore(tmp_path / "runs"), {"epochs": 2, "hidden": 16, "lr": 0.1})
    assert [e["lr"] for e in evals] == [0.1, 0.1]
