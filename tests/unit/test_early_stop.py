"""Early stopping (control/early_stop.py) and best-checkpoint retention (runtime/checkpoint.py):
pure logic, no cluster."""

from __future__ import annotations

import math

import pytest

from orchestrator.control.early_stop import EarlyStopper, EarlyStopState
from orchestrator.runtime.checkpoint import CheckpointStore, best_checkpoint
from orchestrator.spec import EarlyStopSpec, MetricGoal

pytestmark = pytest.mark.timeout(30)


def _feed(stopper: EarlyStopper, values: list, start_step: int = 1, every: int = 10):
    """Reports of `values` at steps start_step, +every, ...; the first note, with its index."""
    for i, value in enumerate(values):
        note = stopper.observe({"step": start_step + i * every, "accuracy": value})
        if note:
            return i, note
    return None, None


def test_stops_after_patience_reports_without_improvement():
    stopper = EarlyStopper(EarlyStopSpec(metric="accuracy", mode="max", patience=2))
    i, note = _feed(stopper, [0.5, 0.7, 0.9, 0.85, 0.88, 0.99])
    assert i == 4  # two reports after the best (0.9 at step 21) did not beat it
    assert note == "early stopped at step 41 (best accuracy 0.9 at step 21)"


def test_reports_without_the_metric_do_not_count_towards_patience():
    stopper = EarlyStopper(EarlyStopSpec(metric="accuracy", patience=1))
    assert stopper.observe({"step": 1, "accuracy": 0.9}) is None
    for step in range(2, 50):
        assert stopper.observe({"step": step, "loss": 0.1}) is None  # per-step loss reports
    assert stopper.observe({"step": 50, "accuracy": 0.8}).startswith("early stopped at step 50")


def test_min_mode_and_min_delta():
    stopper = EarlyStopper(EarlyStopSpec(metric="loss", mode="min", patience=2, min_delta=0.05))
    assert stopper.observe({"step": 1, "loss": 1.0}) is None
    assert stopper.observe({"step": 2, "loss": 0.97}) is None  # better, but by less than min_delta
    note = stopper.observe({"step": 3, "loss": 0.96})
    assert note == "early stopped at step 3 (best loss 1 at step 1)"


def test_nan_never_improves_and_non_numbers_are_ignored():
    stopper = EarlyStopper(EarlyStopSpec(metric="accuracy", patience=2))
    assert stopper.observe({"step": 1, "accuracy": math.nan}) is None
    assert stopper.state.best is None
    assert stopper.observe({"step": 2, "accuracy": "n/a"}) is None
    assert stopper.observe({"step": 3, "accuracy": True}) is None
    assert stopper.observe({"step": 4, "accuracy": 0.5}) is None and stopper.state.best_step == 4
    assert stopper.observe({"step": 5, "accuracy": math.nan}) is None
    assert stopper.observe({"step": 6, "accuracy": math.nan}).startswith("early stopped at step 6")


def test_a_restart_redoing_steps_counts_each_step_once():
    """An attempt resumed from step 21's checkpoint reports steps 31.. again: not counted twice."""
    stopper = EarlyStopper(EarlyStopSpec(metric="accuracy", patience=3))
    _feed(stopper, [0.5, 0.9, 0.8, 0.8])  # steps 1, 11, 21, 31: two reports since the best
    saved = stopper.state.to_json()
    again = EarlyStopper(EarlyStopSpec(metric="accuracy", patience=3), EarlyStopState.from_json(saved))
    assert again.observe({"step": 31, "accuracy": 0.7}) is None  # redone: already counted
    assert again.observe({"step": 41, "accuracy": 0.7}).startswith("early stopped at step 41")


def test_once_fired_it_keeps_asking_for_the_end():
    """A supervisor that died between the decision and the end: its successor ends the job too."""
    stopper = EarlyStopper(EarlyStopSpec(metric="accuracy", patience=1))
    _, note = _feed(stopper, [0.9, 0.1])
    successor = EarlyStopper(stopper.spec, EarlyStopState.from_json(stopper.state.to_json()))
    assert successor.observe({"step": 5, "loss": 1.0}) == note


# ---- keep_best -----------------------------------------------------------------------------

def _commit(store: CheckpointStore, index: int, **metrics):
    store.begin(index)
    return store.commit(index, {"step": index * 10, "metrics": {"step": index * 10, **metrics}})


def test_prune_keeps_the_best_checkpoint_besides_the_newest(tmp_path):
    store = CheckpointStore(tmp_path, keep=2, keep_best=MetricGoal(metric="accuracy", mode="max"))
    for index, acc in enumerate([0.5, 0.9, 0.7, 0.6, 0.65], start=1):
        _commit(store, index, accuracy=acc)
    assert [c.index for c in store.committed()] == [2, 4, 5]
    assert store.best().index == 2 and store.best().manifest["metrics"]["accuracy"] == 0.9
    _commit(store, 6, accuracy=0.95)  # a new best: the old one goes
    assert [c.index for c in store.committed()] == [5, 6]


def test_without_keep_best_prune_keeps_only_the_newest(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for index, acc in enumerate([0.5, 0.9, 0.7, 0.6], start=1):
        _commit(store, index, accuracy=acc)
    assert [c.index for c in store.committed()] == [3, 4] and store.best() is None


def test_checkpoints_saved_without_the_metric_are_no_candidates(tmp_path):
    store = CheckpointStore(tmp_path, keep=1, keep_best=MetricGoal(metric="loss", mode="min"))
    _commit(store, 1, loss=0.3)
    _commit(store, 2)  # a report without the metric
    _commit(store, 3, loss=0.2)
    _commit(store, 4, loss=0.25)
    assert [c.index for c in store.committed()] == [3, 4]
    assert best_checkpoint(store.committed(), MetricGoal(metric="accuracy")) is None


def test_post_training_from_the_best_checkpoint_needs_keep_best():
    from orchestrator.errors import SpecError
    from orchestrator.spec import parse_spec

    doc = {"name": "j", "entrypoint": "m:f", "checkpoint": {"keep": 2},
           "post_training": {"passes": [{"quantize": {"method": "dynamic_int8"}}], "checkpoint": "best"}}
    with pytest.raises(SpecError) as err:
        parse_spec(doc, "job.yaml")
    assert str(err.value) == ("job.yaml: post_training.checkpoint: best needs checkpoint.keep_best (which metric "
                              "makes a checkpoint the best), e.g. checkpoint: {keep_best: {metric: accuracy, mode: max}}")
    doc["checkpoint"]["keep_best"] = {"metric": "accuracy"}
    assert parse_spec(doc).post_training.checkpoint == "best"
