"""One sweep's decisions, made on every controller tick from its trials' job states.

`SweepDriver.tick(jobs)` reads what the trials' jobs report, tells Optuna (intermediate values
at rungs, final values, pruned and failed trials), asks Optuna for new trials while fewer than
`max_concurrent` are unfinished, and returns what the controller must do (submit a trial's
job, stop a pruned one, cancel the rest when the sweep ends). It never touches Ray, so it is
tested with fake job states; the study may live in any Optuna storage.

A trial's job counts as unfinished while it is queued, running, restarting or preempted
(PREEMPTING, then QUEUED again: it resumes from its checkpoint).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..control.states import JobState
from ..errors import SpecError
from .post import post_job_doc, post_job_name
from .record import (
    Action,
    CancelTrial,
    PostTrainingRecord,
    StopTrial,
    SubmitPostTraining,
    SubmitTrial,
    SweepRecord,
    SweepState,
    TrialJob,
    TrialRecord,
)
from .space import distributions, grid, trial_count, trial_doc
from .spec import SweepSpec

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# A sweep fails when at least this many trials failed the same way and they are most of the
# trials that ended (a broken base job or space); fewer, or different causes, are bad luck.
SAME_FAILURE_MIN = 3


def make_study(sweep: SweepSpec, storage: Any, study_name: str) -> optuna.Study:
    """The sweep's Optuna study (created, or loaded after a restart): its sampler and pruner."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sweep.search == "grid":
        sampler = _grid_sampler(grid(sweep), sweep.seed)
    elif sweep.search == "random":
        sampler = optuna.samplers.RandomSampler(seed=sweep.seed)
    else:  # trials run side by side: constant_liar keeps TPE from sampling the same point for each
        sampler = optuna.samplers.TPESampler(seed=sweep.seed, constant_liar=True,
                                             n_startup_trials=max(2, min(10, trial_count(sweep) // 3)))
    stop = sweep.early_stopping
    pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    if stop is not None and stop.method == "asha":
        pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=stop.min_resource,
                                                        reduction_factor=stop.reduction_factor)
    elif stop is not None:
        pruner = optuna.pruners.HyperbandPruner(min_resource=stop.min_resource, max_resource=stop.max_resource,
                                                reduction_factor=stop.reduction_factor)
    return optuna.create_study(storage=storage, study_name=study_name, sampler=sampler, pruner=pruner,
                               direction="maximize" if sweep.objective.mode == "max" else "minimize",
                               load_if_exists=True)


def _grid_sampler(search_space: dict, seed: int):
    """Optuna's GridSampler without its `study.stop()` once the grid is used up: that works only
    inside study.optimize (ask-and-tell raises); the driver stops after trial_count() itself."""
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            return None

    return AskTellGridSampler(search_space, seed=seed)


def failure_signature(error: str | None) -> str:
    """A failure's cause without what differs between trials (numbers, ids, paths)."""
    first = (error or "unknown error").strip().splitlines()[0] if (error or "").strip() else "unknown error"
    first = re.sub(r"(/[\w.@+-]+)+", "PATH", first)
    return re.sub(r"\b[0-9a-f]{6,}\b|\d+(\.\d+)?", "N", first)


def same_failure(trials: list[TrialRecord]) -> tuple[str, int, int] | None:
    """(cause, how many, of how many ended) when most ended trials failed the same way."""
    ended = [t for t in trials if t.done and t.state != JobState.CANCELLED.value]
    causes = Counter(failure_signature(t.error) for t in ended if t.state == JobState.FAILED.value)
    if not causes:
        return None
    cause, count = causes.most_common(1)[0]
    if count >= SAME_FAILURE_MIN and count * 2 > len(ended):
        return cause, count, len(ended)
    return None


class SweepDriver:
    def __init__(self, record: SweepRecord, study: optuna.Study):
        self.record = record
        self.spec = SweepSpec.model_validate(record.spec)
        self.study = study
        self.total = trial_count(self.spec)
        self._distributions = distributions(self.spec)
        self._forget_unrecorded()

    # ---- the controller's calls ------------------------------------------------------------
    def tick(self, jobs: dict[str, TrialJob], now: float | None = None) -> list[Action]:
        """`jobs`: this sweep's trials' jobs by job name (a trial not there has no job yet)."""
        now = time.time() if now is None else now
        if self.record.state.terminal:
            return []
        actions: list[Action] = []
        for trial in self.record.trials:
            if not trial.done:
                actions += self._follow(trial, jobs.get(trial.name))
        failing = same_failure(self.record.trials)
        if failing is not None:
            cause, count, ended = failing
            return actions + self._end(SweepState.FAILED, f"{count} of {ended} trials failed the same way: {cause}", now)
        actions += self._ask_new()
        if len(self.record.trials) >= self.total and all(t.done for t in self.record.trials):
            if self.record.best is None:
                self._end(SweepState.FAILED, "no trial completed with a value of the objective", now)
            elif self.spec.post_training is None:
                self._end(SweepState.SUCCEEDED, "", now)
            else:
                actions += self._post_train(jobs.get(self.post_name), now)
        return actions

    @property
    def post_name(self) -> str:
        """The post-training job's name (see sweep/post.py)."""
        return post_job_name(self.record.id)

    def post_training_submitted(self, job_id: str) -> None:
        post = self.record.post_training
        post.job_id, post.state = job_id, JobState.QUEUED.value

    def submitted(self, number: int, job_id: str) -> None:
        trial = self.record.trial(number)
        trial.job_id, trial.state = job_id, JobState.QUEUED.value

    def cancel(self, note: str = "sweep cancelled") -> list[Action]:
        if self.record.state.terminal:
            return []
        return self._end(SweepState.CANCELLED, note, time.time())

    # ---- trials ----------------------------------------------------------------------------
    def _follow(self, trial: TrialRecord, job: TrialJob | None) -> list[Action]:
        if job is None:
            if trial.job_id is None:  # asked for, but the controller did not create the job (yet)
                return [SubmitTrial(self.record.id, trial.number, self._spec_of(trial))]
            self._tell(trial, "FAILED", error="its job disappeared from the job table")
            return []
        trial.job_id = trial.job_id or job.job_id  # created just before a controller restart
        trial.state, trial.steps, trial.total_steps = job.state.value, job.step, job.total_steps
        trial.started_at = trial.started_at or job.started_at
        trial.checkpoint = job.checkpoint or trial.checkpoint
        trial.best_checkpoint = job.best_checkpoint or trial.best_checkpoint
        actions: list[Action] = []
        value = self._objective(job)
        resource = self._resource(job)
        if value is not None:
            trial.best = value if trial.best is None else (max if self.spec.objective.mode == "max" else min)(trial.best, value)
            trial.value = value
        if value is not None and resource is not None and resource > trial.reported:
            # also for a trial that just ended: should_prune records its value at the rungs it
            # passed, which later trials are measured against
            optuna_trial = self._optuna_trial(trial)
            optuna_trial.report(value, resource)
            trial.reported = resource
            prune = optuna_trial.should_prune()
            if prune and job.state is JobState.RUNNING and trial.pruned_at is None:
                trial.pruned_at = resource
                trial.note = (f"pruned by sweep {self.record.id} at {self._unit()} {resource}: "
                              f"{self.spec.objective.metric} {value:.4g} is not among the best at that rung")
                log.info("sweep %s: %s: %s", self.record.id, trial.name, trial.note)
        if trial.pruned_at is not None and job.state is JobState.RUNNING:
            # asked again until it ends: the request is idempotent, and one lost to a controller
            # restart would leave a pruned trial running
            actions.append(StopTrial(job.job_id, trial.note))
        if job.state.terminal:
            trial.ended_at = job.ended_at
            if job.state is JobState.SUCCEEDED:
                if trial.value is None:
                    self._tell(trial, "FAILED", error=f"the job never reported {self.spec.objective.metric!r}")
                else:
                    self._tell(trial, "SUCCEEDED")
            else:
                self._tell(trial, job.state.value, error=job.error)
        return actions

    def _post_train(self, job: TrialJob | None, now: float) -> list[Action]:
        """The sweep's post_training, once every trial ended: one job on the best trial's checkpoint;
        the sweep ends with it (FAILED if the passes failed, as a job with post_training does)."""
        post = self.record.post_training
        if post is None:
            best = self.record.trial(self.record.best)
            wanted = best.best_checkpoint if self.spec.post_training.checkpoint == "best" else None
            checkpoint = wanted or best.checkpoint
            if checkpoint is None:
                self._end(SweepState.FAILED, f"post_training: the best trial {best.name} committed no checkpoint "
                          "to compress; save one with ctx.report(..., checkpoint=...)", now)
                return []
            post = self.record.post_training = PostTrainingRecord(name=self.post_name, trial=best.number,
                                                                  checkpoint=checkpoint)
            log.info("sweep %s: post-training %s's checkpoint %s", self.record.id, best.name, checkpoint)
        if job is None:
            if post.job_id is None:  # not created yet (or just before a controller restart)
                best = self.record.trial(post.trial)
                spec = post_job_doc(self.record.base, best.params, post.name,
                                    self.spec.post_training.model_dump(mode="json"), post.checkpoint,
                                    f"sweep {self.record.name}")
                return [SubmitPostTraining(self.record.id, spec)]
            post.state, post.error = JobState.FAILED.value, "its job disappeared from the job table"
            self._end(SweepState.FAILED, f"post_training: {post.error}", now)
            return []
        post.job_id = post.job_id or job.job_id
        post.state = job.state.value
        if job.state.terminal:
            post.report, post.error = job.post_training, job.error
            if job.state is JobState.SUCCEEDED:
                kept = ", ".join((post.report or {}).get("kept") or []) or "no pass"
                self._end(SweepState.SUCCEEDED, f"post-training kept {kept}", now)
            else:
                self._end(SweepState.FAILED, f"post_training job {job.job_id} {job.state.value}"
                          f"{': ' + job.error if job.error else ''}", now)
        return []

    def _tell(self, trial: TrialRecord, state: str, error: str | None = None) -> None:
        from optuna.trial import TrialState

        trial.state, trial.error, trial.done = state, error or trial.error, True
        if state == JobState.SUCCEEDED.value:
            self.study.tell(trial.number, trial.value, skip_if_finished=True)
        elif state == JobState.STOPPED.value:
            self.study.tell(trial.number, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        self._update_best()

    def _ask_new(self) -> list[Action]:
        actions: list[Action] = []
        while len(self.record.trials) < self.total and self._unfinished() < self.spec.max_concurrent:
            asked = self.study.ask(self._distributions)
            trial = TrialRecord(number=asked.number, trial_id=asked._trial_id,  # Trial(study, id) reopens it
                                name=f"{self.record.id}-t{asked.number}", params=dict(asked.params))
            self.record.trials.append(trial)
            try:
                spec = self._spec_of(trial)
            except SpecError as exc:  # a value the job spec rejects (space checks cover the extremes only)
                self._tell(trial, JobState.FAILED.value, error=str(exc))
                continue
            actions.append(SubmitTrial(self.record.id, trial.number, spec))
        return actions

    def _end(self, state: SweepState, note: str, now: float) -> list[Action]:
        self.record.state, self.record.note, self.record.ended_at = state, note, now
        log.info("sweep %s: %s%s", self.record.id, state.value, f" ({note})" if note else "")
        actions: list[Action] = []
        for trial in self.record.trials:
            if trial.done:
                continue
            if trial.job_id is not None:
                actions.append(CancelTrial(trial.job_id, f"sweep {self.record.id} {state.value.lower()}"))
            self._tell(trial, JobState.CANCELLED.value, error=note or None)
        post = self.record.post_training
        if post is not None and post.job_id is not None and not JobState(post.state).terminal:
            actions.append(CancelTrial(post.job_id, f"sweep {self.record.id} {state.value.lower()}"))
            post.state = JobState.CANCELLED.value
        return actions

    # ---- helpers ---------------------------------------------------------------------------
    def _spec_of(self, trial: TrialRecord) -> dict:
        return trial_doc(self.record.base, trial.params, trial.name, f"sweep {self.record.name}")

    def _unfinished(self) -> int:
        return sum(not t.done for t in self.record.trials)

    def _objective(self, job: TrialJob) -> float | None:
        value = job.metrics.get(self.spec.objective.metric)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            return None
        return float(value)

    def _unit(self) -> str:
        return self.spec.early_stopping.unit.removesuffix("s") if self.spec.early_stopping else "step"

    def _resource(self, job: TrialJob) -> int | None:
        """Where the trial is, in rung units: its step, or epochs completed."""
        if self.spec.early_stopping is not None and self.spec.early_stopping.unit == "epochs":
            epoch = job.metrics.get("epoch")
            return int(epoch) + 1 if isinstance(epoch, int | float) and not isinstance(epoch, bool) else None
        step = job.metrics.get("step", job.step)
        return int(step) if isinstance(step, int | float) else None

    def _optuna_trial(self, trial: TrialRecord) -> optuna.Trial:
        import optuna

        return optuna.Trial(self.study, trial.trial_id)

    def _update_best(self) -> None:
        done = [t for t in self.record.trials if t.state == JobState.SUCCEEDED.value and t.value is not None]
        if done:
            pick = max if self.spec.objective.mode == "max" else min
            self.record.best = pick(done, key=lambda t: t.value).number

    def _forget_unrecorded(self) -> None:
        """A trial Optuna handed out just before a controller restart, never recorded: failed,
        so it counts nowhere and the sampler does not wait on it."""
        from optuna.trial import TrialState

        known = {t.number for t in self.record.trials}
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            if frozen.number not in known:
                self.study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
