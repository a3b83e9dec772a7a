"""Sweeps without Ray: the sweep file and its one-line errors, the search space, and the
driver's decisions on fake trial job states (Optuna's real samplers, pruners and storages)."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.control.states import JobState
from orchestrator.errors import SpecError
from orchestrator.sweep.driver import SweepDriver, failure_signature, make_study
from orchestrator.sweep.record import (
    CancelTrial,
    StopTrial,
    SubmitTrial,
    SweepRecord,
    SweepState,
    TrialJob,
)
from orchestrator.sweep.service import SweepService
from orchestrator.sweep.space import check_space, grid_size, trial_doc
from orchestrator.sweep.spec import parse_sweep

pytestmark = pytest.mark.timeout(60)

BASE = {"name": "base", "entrypoint": "examples.digits.train:train", "config": {"epochs": 2},
        "resources": {"workers": 1}, "data": {"train": {"path": "/data/digits-train"}}}


def sweep_doc(**fields) -> dict:
    doc = {"name": "sw", "base": BASE, "objective": {"metric": "accuracy", "mode": "max"},
           "parameters": {"config.lr": {"choice": [0.1, 0.01]}, "config.hidden": {"int": [16, 48], "step": 16}},
           "search": "grid", "max_concurrent": 6}
    doc.update(fields)
    return doc


def make_driver(storage=None, **fields) -> SweepDriver:
    spec = parse_sweep(sweep_doc(**fields))
    record = SweepRecord(id="sw-abc123", name="sw", spec=spec.model_dump(mode="json"), base=dict(BASE),
                         study="trainctl-sw-abc123", created_at=0.0)
    return SweepDriver(record, make_study(spec, storage, record.study))


def job(name: str, state: JobState, **fields) -> TrialJob:
    return TrialJob(name=name, job_id=f"id-{name}", state=state, **fields)


def submit_all(driver: SweepDriver, actions) -> dict[str, TrialJob]:
    """The controller's part: every SubmitTrial becomes a queued job."""
    jobs = {}
    for action in actions:
        assert isinstance(action, SubmitTrial)
        name = action.spec["name"]
        driver.submitted(action.number, f"id-{name}")
        jobs[name] = job(name, JobState.QUEUED)
    return jobs


# ---- the sweep file -------------------------------------------------------------------

@pytest.mark.parametrize("parameters, search, message", [
    ({"config.lr": {"loguniform": [0, 0.1]}}, "tpe", "parameters.config.lr: loguniform: a log scale needs low > 0"),
    ({"config.lr": {"normal": [0, 1]}}, "tpe", "parameters.config.lr: a parameter is one of choice, uniform"),
    ({"config.lr": {"uniform": [0.1, 0.01]}}, "tpe", "uniform: low (0.1) must be less than high (0.01)"),
    ({"config.lr": {"uniform": [0.01, 0.1]}}, "grid", "parameters.config.lr: a grid needs finite values"),
    ({"config.w": {"int": [16, 128, "step 0"]}}, "tpe", "int: step must be positive"),
    ({"config.w": {"choice": [[1, 2]]}}, "tpe", "choice: values are numbers, text"),
    ({"name": {"choice": ["a", "b"]}}, "tpe", "parameters.name: the sweep sets a trial's name"),
    ({"config..lr": {"choice": [1]}}, "tpe", "'config..lr' is not a dotted field path"),
])
def test_a_bad_parameter_is_one_line_naming_it(parameters, search, message):
    with pytest.raises(SpecError) as err:
        parse_sweep(sweep_doc(parameters=parameters, search=search, trials=4), "sweep.yaml")
    assert message in str(err.value) and str(err.value).startswith("sweep.yaml: ")
    assert "\n" not in str(err.value)


def test_other_sweep_fields_are_checked_with_the_job_specs_words():
    with pytest.raises(SpecError, match="sweep.yaml: trials: required for search tpe"):
        parse_sweep(sweep_doc(search="tpe"), "sweep.yaml")
    with pytest.raises(SpecError, match=r"sweep.yaml: max_concurrent: 0 is out of range; it must be at least 1"):
        parse_sweep(sweep_doc(max_concurrent=0), "sweep.yaml")
    with pytest.raises(SpecError, match="sweep.yaml: early_stopping.max_resource: hyperband needs"):
        parse_sweep(sweep_doc(early_stopping={"method": "hyperband"}), "sweep.yaml")
    with pytest.raises(SpecError, match="sweep.yaml: objective.mode: 'up' is not one of max or min"):
        parse_sweep(sweep_doc(objective={"metric": "accuracy", "mode": "up"}), "sweep.yaml")


def test_the_issues_int_step_form_is_read():
    spec = parse_sweep(sweep_doc(parameters={"data.train.batch_size": {"int": [16, 128, "step 16"]}}))
    assert grid_size(spec) == 8


def test_a_value_the_job_spec_rejects_fails_at_submit_naming_the_parameter():
    spec = parse_sweep(sweep_doc(parameters={"resources.workers": {"int": [0, 2]}}))
    with pytest.raises(SpecError) as err:
        check_space(spec, dict(BASE), "sweep.yaml")
    assert str(err.value).startswith("sweep.yaml: parameters.resources.workers = 0: 0 is out of range")


def test_a_trial_is_the_base_job_with_its_values():
    doc = trial_doc(dict(BASE), {"config.lr": 0.5, "data.train.batch_size": 64}, "sw-abc123-t3")
    assert doc["name"] == "sw-abc123-t3" and doc["config"] == {"epochs": 2, "lr": 0.5}
    assert doc["data"]["train"]["batch_size"] == 64 and BASE["config"] == {"epochs": 2}


# ---- the driver ------------------------------------------------------------------------

def test_a_grid_of_six_runs_every_combination_once_and_ends_with_the_best():
    driver = make_driver()
    actions = driver.tick({})
    assert len(actions) == 6 and driver.total == 6
    combos = {(a.spec["config"]["lr"], a.spec["config"]["hidden"]) for a in actions}
    assert combos == set(itertools.product([0.1, 0.01], [16, 32, 48]))
    jobs = submit_all(driver, actions)
    assert driver.tick(jobs) == []  # queued trials are unfinished: nothing new
    for i, name in enumerate(sorted(jobs)):
        jobs[name] = job(name, JobState.SUCCEEDED, metrics={"accuracy": 0.5 + i / 100, "step": 10})
    assert driver.tick(jobs) == []
    assert driver.record.state is SweepState.SUCCEEDED
    assert driver.record.trial(driver.record.best).name == sorted(jobs)[-1]
    assert driver.study.best_value == pytest.approx(0.55)


def asha_driver(storage=None):
    return make_driver(storage, search="random", trials=3, max_concurrent=2,
                       parameters={"config.lr": {"loguniform": [1e-4, 1e-1]}},
                       early_stopping={"method": "asha", "unit": "epochs", "min_resource": 1, "reduction_factor": 2})


def test_a_trial_behind_at_a_rung_is_stopped_and_its_slot_refilled():
    driver = asha_driver()
    jobs = submit_all(driver, driver.tick({}))
    good, bad = sorted(jobs)
    jobs[good] = job(good, JobState.RUNNING, metrics={"accuracy": 0.9, "epoch": 0, "step": 5})
    assert driver.tick(jobs) == []  # the first at the rung is promoted
    jobs[bad] = job(bad, JobState.RUNNING, metrics={"accuracy": 0.2, "epoch": 0, "step": 5})
    actions = driver.tick(jobs)
    assert actions == [StopTrial(f"id-{bad}", driver.record.trials[1].note)]
    assert "pruned by sweep sw-abc123 at epoch 1: accuracy 0.2" in actions[0].note
    assert driver.tick(jobs) == actions  # asked again until it ends (the supervisor ignores repeats)
    jobs[bad] = job(bad, JobState.STOPPED, metrics={"accuracy": 0.2, "epoch": 0, "step": 5})
    refill = driver.tick(jobs)
    assert [type(a) for a in refill] == [SubmitTrial]  # the freed slot takes the third trial
    assert driver.record.trials[1].state == "STOPPED" and driver.record.trials[1].done
    from optuna.trial import TrialState

    assert driver.study.trials[1].state is TrialState.PRUNED


def test_preempted_and_requeued_trials_are_still_running():
    driver = asha_driver()
    jobs = submit_all(driver, driver.tick({}))
    first = sorted(jobs)[0]
    for state in (JobState.RUNNING, JobState.PREEMPTING, JobState.QUEUED, JobState.RESTARTING):
        jobs[first] = job(first, state, metrics={"accuracy": 0.5, "epoch": 0})
        assert driver.tick(jobs) == [] and not driver.record.trials[0].done
    assert len(driver.record.trials) == 2  # max_concurrent: no third trial while these run


def test_a_few_failures_do_not_end_the_sweep():
    driver = make_driver()
    jobs = submit_all(driver, driver.tick({}))
    names = sorted(jobs)
    jobs[names[0]] = job(names[0], JobState.FAILED, error="RuntimeError: rank 0 ran out of memory at step 12")
    jobs[names[1]] = job(names[1], JobState.FAILED, error="RuntimeError: rank 1 ran out of memory at step 40")
    for name in names[2:]:
        jobs[name] = job(name, JobState.SUCCEEDED, metrics={"accuracy": 0.8})
    driver.tick(jobs)
    assert driver.record.state is SweepState.SUCCEEDED  # 2 of 6 failed


def test_most_trials_failing_the_same_way_end_the_sweep_and_cancel_the_rest():
    driver = make_driver()
    jobs = submit_all(driver, driver.tick({}))
    names = sorted(jobs)
    for i, name in enumerate(names[:3]):
        jobs[name] = job(name, JobState.FAILED, error=f"ImportError: no module named mod{i} (/tmp/x{i}/a.py)")
    actions = driver.tick(jobs)
    assert driver.record.state is SweepState.FAILED
    assert "3 of 3 trials failed the same way: ImportError" in driver.record.note
    assert sorted(a.job_id for a in actions) == sorted(f"id-{n}" for n in names[3:])
    assert all(isinstance(a, CancelTrial) for a in actions)
    assert failure_signature("x at step 12 in /a/b.py") == failure_signature("x at step 7 in /c/d.py")


def test_a_succeeded_trial_that_never_reported_the_metric_is_a_failure():
    driver = make_driver(parameters={"config.lr": {"choice": [0.1]}})
    jobs = submit_all(driver, driver.tick({}))
    (name,) = jobs
    jobs[name] = job(name, JobState.SUCCEEDED, metrics={"loss": 0.1})
    driver.tick(jobs)
    assert driver.record.trials[0].error == "the job never reported 'accuracy'"
    assert driver.record.state is SweepState.FAILED


def test_a_sweep_resumes_from_the_store_after_a_controller_restart(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    service = SweepService(url)
    spec = parse_sweep(sweep_doc(search="tpe", trials=4, max_concurrent=2)).model_dump(mode="json")
    record = service.create(spec, dict(BASE), None)
    actions = service.tick({})
    assert len(actions) == 2
    service.submitted(record.id, actions[0].number, "id-a")  # the second job was never created
    first = actions[0].spec["name"]
    service.close()

    again = SweepService(url)  # a new controller on the same database
    assert again.trial_names() == {a.spec["name"] for a in actions} | {f"{record.id}-post"}
    jobs = {first: job(first, JobState.SUCCEEDED, metrics={"accuracy": 0.7})}
    resumed = again.tick(jobs)
    # the lost submission is made again under the same name; one more trial fills the freed slot
    assert [a.spec["name"] for a in resumed] == [actions[1].spec["name"], f"{record.id}-t2"]
    assert again.find("sw").trial(actions[0].number).value == 0.7
    assert again.status(record.id)["trials"][0]["state"] == "SUCCEEDED"
    record2, cancels = again.cancel(record.id)
    assert record2.state is SweepState.CANCELLED and cancels == []  # no job of theirs was created yet
    with pytest.raises(Exception, match="already ended"):
        again.cancel("sw")
    again.close()


def test_the_chart_is_a_png_of_the_finished_trials(tmp_path):
    from orchestrator.sweep.chart import study_copy, write_chart

    service = SweepService(f"sqlite:///{tmp_path / 'jobs.db'}")
    spec = parse_sweep(sweep_doc()).model_dump(mode="json")
    record = service.create(spec, dict(BASE), None)
    actions = service.tick({})
    jobs = {}
    for i, a in enumerate(actions):
        name = a.spec["name"]
        service.submitted(record.id, a.number, f"id-{name}")
        jobs[name] = job(name, JobState.SUCCEEDED if i else JobState.STOPPED, metrics={"accuracy": 0.5 + i / 10, "step": 3})
    service.tick(jobs)
    status = service.status(record.id)
    copy = study_copy(status)
    assert [t.state.name for t in copy.trials].count("COMPLETE") == 5
    path = write_chart(status, tmp_path / "out" / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    service.close()


@pytest.mark.timeout(180)
def test_a_sweep_with_mlflow_has_a_parent_run_that_ends_with_its_best(tmp_path):
    from ..mlflow_server import mlflow_bin, mlflow_server

    if mlflow_bin() is None:
        pytest.skip("mlflow is not installed (pip install 'trainctl[tracking]')")
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep.tracking import close_parent_run, open_parent_run

    with mlflow_server() as uri:
        base = {**BASE, "tracking": {"mlflow": {"uri": uri, "experiment": "sweeps"}}}
        spec = parse_sweep(sweep_doc(base=base, post_training={**POST, "checkpoint": "last"}))
        run_id = open_parent_run(base, spec.model_dump(mode="json"))
        assert base["tracking"]["mlflow"]["parent_run_id"] == run_id  # what every trial gets
        assert trial_doc(base, {"config.lr": 0.1}, "sw-t0")["tracking"]["mlflow"]["parent_run_id"] == run_id
        service = SweepService(f"sqlite:///{tmp_path / 'jobs.db'}")
        record = service.create(spec.model_dump(mode="json"), base, None)
        jobs = {}
        for i, a in enumerate(service.tick({})):
            name = a.spec["name"]
            service.submitted(record.id, a.number, f"id-{name}")
            jobs[name] = job(name, JobState.SUCCEEDED, metrics={"accuracy": 0.5 + i / 10}, checkpoint=f"/ckpt/{i}")
        (post,) = service.tick(jobs)  # the sweep's post_training: its report goes to the parent run too
        service.submitted(record.id, None, "id-post")
        files = {"md": tmp_path / "report.md", "json": tmp_path / "report.json"}
        for path in files.values():
            path.write_text("{}")
        jobs[post.spec["name"]] = job(post.spec["name"], JobState.SUCCEEDED, post_training={
            "report": str(files["md"]), "kept": [], "files": {k: str(v) for k, v in files.items()}})
        service.tick(jobs)
        assert record.state is SweepState.SUCCEEDED
        mlflow = MlflowClient(uri)
        assert sorted(a.path for a in mlflow.list_artifacts(run_id, "post_training")) == \
            ["post_training/report.json", "post_training/report.md"]
        run = mlflow.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["best_accuracy"] == pytest.approx(1.0)
        assert run.data.tags["trainctl.best_checkpoint"] == "/ckpt/5"
        assert run.data.params["objective"] == "accuracy (max)"
        assert run.data.tags["trainctl.post_training_job"] == "id-post"
        service.close()
    close_parent_run(record)  # the server is gone: logged, never raised


@pytest.mark.timeout(120)
def test_bad_sweep_files_fail_before_any_connection_with_one_line_and_exit_2(tmp_path):
    import yaml

    from ..helpers import REPO, trainctl

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**BASE, "data": {}, "working_dir": str(REPO)}))
    cases = {
        "typo.yaml": ({"searchh": "grid"}, "typo.yaml: searchh: unknown field; remove it or use one of: base,"),
        "nobase.yaml": ({"base": "missing.yaml"}, "missing.yaml: no such job file"),
        "workers.yaml": ({"base": "job.yaml", "parameters": {"resources.workers": {"int": [0, 2]}}},
                         "workers.yaml: parameters.resources.workers = 0: 0 is out of range; it must be at least 1"),
        # post_training on the sweep, checked against its base job as a job's would be
        "gate.yaml": ({"base": "job.yaml", "post_training": {**POST, "checkpoint": "last", "gate": {"metric": "accuracy"}}},
                      "gate.yaml: post_training.gate.metric needs the eval split 'eval', but data has no splits"),
    }
    for file, (fields, message) in cases.items():
        doc = sweep_doc(**{"base": "job.yaml", **fields})
        (tmp_path / file).write_text(yaml.safe_dump(doc))
        result = trainctl("sweep", str(tmp_path / file), "--address", "127.0.0.1:1", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines


def test_the_example_sweep_file_reads_and_the_api_is_orchestrator_sweep():
    import orchestrator
    from orchestrator.sweep.spec import load_sweep

    from ..helpers import REPO

    spec = load_sweep(REPO / "examples/digits/sweep.yaml")
    assert spec.search == "tpe" and spec.early_stopping.method == "asha" and len(spec.parameters) == 3
    assert callable(orchestrator.sweep) and "sweep" in orchestrator.__all__


# ---- post_training on a sweep (sweep/post.py) -----------------------------------------------

POST = {"hooks": "examples.digits.hooks", "passes": [{"quantize": {"method": "dynamic_int8"}}],
        "checkpoint": "best"}
KEEP_BEST = {**BASE, "checkpoint": {"keep_best": {"metric": "accuracy", "mode": "max"}}}


def post_driver(**fields):
    spec = parse_sweep(sweep_doc(**{"base": KEEP_BEST, "post_training": POST, **fields}))
    record = SweepRecord(id="sw-abc123", name="sw", spec=spec.model_dump(mode="json"),
                         base=trial_doc(KEEP_BEST, {}, "base"), study="trainctl-sw-abc123", created_at=0.0)
    return SweepDriver(record, make_study(spec, None, record.study))


def finish_trials(driver, jobs, checkpoints=True):
    for i, name in enumerate(sorted(jobs)):
        jobs[name] = job(name, JobState.SUCCEEDED, metrics={"accuracy": 0.5 + i / 100},
                         checkpoint=f"/runs/{name}/checkpoint_000009" if checkpoints else None,
                         best_checkpoint=f"/runs/{name}/checkpoint_000004" if checkpoints else None)
    return driver.tick(jobs)


def test_a_sweeps_post_training_is_one_job_on_the_best_trials_best_checkpoint_and_ends_the_sweep():
    from orchestrator.sweep.post import SKIP_TRAINING
    from orchestrator.sweep.record import SubmitPostTraining

    driver = post_driver()
    jobs = submit_all(driver, driver.tick({}))
    (action,) = finish_trials(driver, jobs)
    best = driver.record.trial(driver.record.best)
    assert isinstance(action, SubmitPostTraining) and driver.record.state is SweepState.RUNNING
    spec = action.spec  # the best trial's own spec (its config builds the model), training nothing
    assert spec["name"] == "sw-abc123-post" and spec["entrypoint"] == SKIP_TRAINING
    assert spec["config"]["lr"] == best.params["config.lr"] and spec["config"]["hidden"] == best.params["config.hidden"]
    assert spec["checkpoint"]["resume_from"] == f"/runs/{best.name}/checkpoint_000004"  # checkpoint: best
    assert spec["post_training"]["hooks"] == "examples.digits.hooks"
    assert [p["quantize"]["method"] for p in spec["post_training"]["passes"]] == ["dynamic_int8"]
    assert driver.tick(jobs) == [action]  # asked again until the controller created it
    driver.post_training_submitted("id-sw-abc123-post")
    jobs["sw-abc123-post"] = job("sw-abc123-post", JobState.POST_TRAINING)
    assert driver.tick(jobs) == [] and driver.record.post_training.state == "POST_TRAINING"
    report = {"report": "/runs/id-post/post_training/report.md", "kept": ["dynamic_int8"],
              "files": {"md": "/runs/id-post/post_training/report.md"}}
    jobs["sw-abc123-post"] = job("sw-abc123-post", JobState.SUCCEEDED, post_training=report)
    assert driver.tick(jobs) == []
    assert driver.record.state is SweepState.SUCCEEDED and driver.record.note == "post-training kept dynamic_int8"
    assert driver.record.post_training.report == report and driver.record.post_training.job_id == "id-sw-abc123-post"


def test_a_failed_post_training_job_fails_the_sweep_and_a_last_checkpoint_is_used_without_best():
    driver = post_driver(post_training={**POST, "checkpoint": "last"})
    jobs = submit_all(driver, driver.tick({}))
    (action,) = finish_trials(driver, jobs)
    best = driver.record.trial(driver.record.best)
    assert action.spec["checkpoint"]["resume_from"] == f"/runs/{best.name}/checkpoint_000009"
    driver.post_training_submitted("id-sw-abc123-post")
    jobs["sw-abc123-post"] = job("sw-abc123-post", JobState.FAILED, error="post_training failed: KeyError: 'net'")
    driver.tick(jobs)
    assert driver.record.state is SweepState.FAILED
    assert driver.record.note == "post_training job id-sw-abc123-post FAILED: post_training failed: KeyError: 'net'"
    assert driver.record.best == best.number  # the search itself still has its best trial


def test_a_best_trial_without_a_checkpoint_fails_the_sweep_in_one_line():
    driver = post_driver()
    jobs = submit_all(driver, driver.tick({}))
    assert finish_trials(driver, jobs, checkpoints=False) == []
    assert driver.record.state is SweepState.FAILED and driver.record.post_training is None
    assert driver.record.note.startswith("post_training: the best trial sw-abc123-t") and "no checkpoint" in driver.record.note


def test_cancelling_a_sweep_during_its_post_training_cancels_that_job(tmp_path):
    service = SweepService(f"sqlite:///{tmp_path / 'jobs.db'}")
    spec = parse_sweep(sweep_doc(base=KEEP_BEST, post_training=POST)).model_dump(mode="json")
    record = service.create(spec, trial_doc(KEEP_BEST, {}, "base"), None)
    jobs = {}
    for a in service.tick({}):
        service.submitted(record.id, a.number, f"id-{a.spec['name']}")
        jobs[a.spec["name"]] = job(a.spec["name"], JobState.SUCCEEDED, metrics={"accuracy": 0.5},
                                   checkpoint="/runs/c", best_checkpoint="/runs/b")
    (post,) = service.tick(jobs)
    assert service.trial_names() >= {post.spec["name"]}  # the controller shows the driver its job
    service.close()
    again = SweepService(service.url)  # a controller restart between the decision and the job
    assert [a.spec for a in again.tick(jobs)] == [post.spec]
    again.submitted(record.id, None, "id-post")
    jobs[post.spec["name"]] = job(post.spec["name"], JobState.POST_TRAINING)
    assert again.tick(jobs) == []
    cancelled, actions = again.cancel(record.id)
    assert cancelled.state is SweepState.CANCELLED and actions == [CancelTrial("id-post", f"sweep {record.id} cancelled")]
    assert again.status(record.id)["post_training"]["state"] == "CANCELLED"
    again.close()


def test_a_job_that_trains_nothing_compresses_the_checkpoint_it_started_from(tmp_path):
    """The post-training job's path through the attempt loop (control/jobrun.py, with the fake
    worker group of test_jobrun.py): skip_training returns at once, the passes get resume_from."""
    import asyncio

    from orchestrator.control.jobrun import JobRun, RankExit
    from orchestrator.runtime.checkpoint import CheckpointStore
    from orchestrator.spec import JobSpec
    from orchestrator.sweep.post import post_job_doc
    from tests.unit.test_jobrun import _states
    from tests.unit.test_jobrun_keras import PostTrainingCluster

    from ..helpers import job_record

    trial = CheckpointStore(tmp_path / "trial")  # the best trial's, committed by its own job
    trial.begin(7)
    trial.commit(7, {"step": 70, "metrics": {"accuracy": 0.9}})
    doc = post_job_doc(trial_doc(BASE, {}, "base"), {"config.lr": 0.1}, "sw-abc123-post",
                       {"hooks": "examples.digits.hooks", "passes": [{"quantize": {"method": "dynamic_int8"}}]},
                       str(tmp_path / "trial" / "checkpoint_000007"))
    cluster = PostTrainingCluster([[RankExit(value={})]])
    job = job_record("p-1", "STARTING", spec=JobSpec.model_validate(doc), checkpoint_root=str(tmp_path / "post"))
    run = JobRun(job, tmp_path / "logs" / "p-1.log", cluster)
    cluster.run = run
    asyncio.run(asyncio.wait_for(run.main(), 30))
    assert _states(run) == ["RUNNING", "POST_TRAINING", "SUCCEEDED"], run.error
    assert cluster.post_training_args[1] == str(tmp_path / "trial" / "checkpoint_000007")
    assert cluster.post_training_args[0]["config"]["lr"] == 0.1
    assert run.history[1].note == "1 passes on checkpoint 7"


@pytest.mark.parametrize("post_training, base_fields, message", [
    (POST, {}, "sweep spec: post_training.checkpoint: best needs checkpoint.keep_best"),
    ({"passes": POST["passes"]}, {},
     "sweep spec: post_training.hooks: module 'examples.digits.train' has no build_model(config)"),
    ({**POST, "checkpoint": "last"}, {"post_training": {**POST, "checkpoint": "last"}},
     "sweep spec: post_training is on the sweep and on its base job; give it once"),
])
def test_a_sweeps_post_training_is_checked_against_its_base_job_in_one_line(post_training, base_fields, message):
    from orchestrator.sweep.api import checked

    from ..helpers import REPO

    base = {**BASE, "data": {}, "working_dir": str(REPO), **base_fields}
    with pytest.raises(SpecError) as err:
        checked(sweep_doc(base=base, post_training=post_training))
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
