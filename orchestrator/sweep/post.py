"""`post_training:` on a sweep: once every trial ended, one more job runs the passes on the best
trial's checkpoint (its best with `post_training.checkpoint: best`, else its last).

That job, `<sweep id>-post`, is the best trial's own spec (its config builds the model) with the
sweep's post_training, starting from that checkpoint (`checkpoint.resume_from`), and an entrypoint
that trains nothing. So the passes run as a job's do (control/jobrun.py): queued, in the state
POST_TRAINING on rank 0's worker, the report in the job's record and in its MLflow run.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..errors import SpecError
from ..spec import parse_spec
from .space import trial_doc
from .spec import SweepSpec

SKIP_TRAINING = f"{__name__}:skip_training"


def post_job_name(sweep_id: str) -> str:
    return f"{sweep_id}-post"


def skip_training(ctx) -> None:
    """The post-training job's entrypoint: its trial trained already; the passes follow."""


def post_job_doc(base: dict, params: dict, name: str, post_training: dict, checkpoint: str,
                 source: str = "sweep") -> dict:
    """The post-training job's spec: the trial `params` of `base`, compressing `checkpoint`."""
    doc = copy.deepcopy(base)
    # the passes build the model with the trial's own module (its hooks), not with skip_training's
    hooks = post_training.get("hooks") or doc["entrypoint"].partition(":")[0]
    doc["entrypoint"] = SKIP_TRAINING
    doc["early_stop"] = None
    # the sweep chose the checkpoint already: it is the one the job starts from, and saves no other
    doc["post_training"] = {**copy.deepcopy(post_training), "hooks": hooks, "checkpoint": "last"}
    doc["checkpoint"] = {**doc.get("checkpoint", {}), "resume_from": checkpoint}
    return trial_doc(doc, params, name, source)


def check_post_training(sweep: SweepSpec, base: dict, source: str, base_dir: Path | None = None) -> None:
    """The sweep's post_training fits its base job (as a job's would: an eval split for the gate,
    the hooks the passes need, checkpoint.keep_best for checkpoint: best); relative output paths
    are made absolute (in `sweep`). One SpecError line otherwise."""
    from ..client.api import resolve

    if sweep.post_training is None:
        return
    if base.get("post_training"):
        raise SpecError(f"{source}: post_training is on the sweep and on its base job; give it once: on the "
                        "sweep (the best trial's checkpoint only) or on the base job (every trial's)")
    probe = copy.deepcopy(base)
    probe["post_training"] = sweep.post_training.model_dump(mode="json")
    try:
        resolved = resolve(parse_spec(probe, source), base_dir)
    except SpecError as exc:  # resolve's own checks (hooks, platform) do not name the file
        message = str(exc)
        raise SpecError(message if message.startswith(f"{source}: ") else f"{source}: {message}") from None
    sweep.post_training.output = resolved.post_training.output
