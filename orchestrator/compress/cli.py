"""`trainctl compress CHECKPOINT --passes PASSES.yaml`: the passes on an existing checkpoint, locally."""

from __future__ import annotations

from pathlib import Path

from ..errors import SpecError
from ..explain import kind_of
from ..importing import importable_from
from ..runtime.checkpoint import MANIFEST
from ..spec import parse_spec, read_yaml


def _read_yaml(path: str, what: str) -> dict:
    doc = read_yaml(path, what)
    if not isinstance(doc, dict):
        fields = "passes, gate, eval, or a whole job spec" if what == "passes" else "name, entrypoint, ..."
        raise SpecError(f"{path}: a {what} file must be a mapping of fields ({fields}); "
                        f"{'it is empty' if doc is None else 'it holds ' + kind_of(doc)}")
    return doc


def build_spec(passes_file: str, job_file: str | None, overrides: list[str] | None, base: Path | None = None):
    """The job spec to compress with: PASSES.yaml is either a whole job spec with post_training, or
    the post_training mapping (top level or under `post_training:`) for the job spec in --job."""
    doc = _read_yaml(passes_file, "passes")
    if "entrypoint" in doc:
        job, source = doc, passes_file
        if "post_training" not in job:
            raise SpecError(f"{passes_file}: this job spec has no post_training; add post_training: {{passes: [...]}}")
    else:
        if job_file is None:
            raise SpecError(f"{passes_file}: holds only passes; give the job spec the checkpoint came from "
                            "with --job JOB.yaml (for its entrypoint, config and data)")
        job = _read_yaml(job_file, "job")
        job["post_training"] = doc.get("post_training", doc)
        source = f"{job_file} + {passes_file}"
    spec = parse_spec(job, source, overrides)
    base = Path(base or Path.cwd())
    spec.working_dir = str((base / spec.working_dir).resolve())
    for split in spec.data.values():
        if "://" not in split.path:
            split.path = str((base / split.path).resolve())
    return spec


def check(spec) -> None:
    from ..data.manifest import DatasetError
    from .checks import check_post_training
    from .data import open_split

    check_post_training(spec, spec.working_dir)
    try:
        for name in spec.data:
            open_split(spec, name)
    except DatasetError as exc:
        raise SpecError(f"data: {exc}") from None


def compress_checkpoint(checkpoint: str, passes_file: str, job_file: str | None = None, out: str | None = None,
                        threads: int | None = None, overrides: list[str] | None = None, log=print) -> dict:
    from .pipeline import run_pipeline

    ckpt = Path(checkpoint)
    if not (ckpt / "tensors").is_dir() or not (ckpt / MANIFEST).is_file():
        missing = "tensors/" if not (ckpt / "tensors").is_dir() else MANIFEST
        raise SpecError(f"{checkpoint}: not a trainctl checkpoint directory (no {missing}); "
                        "give a runs/<job>/checkpoint_N directory")
    spec = build_spec(passes_file, job_file, overrides)
    check(spec)
    output = Path(out or spec.post_training.output or ckpt.parent / "post_training")
    with importable_from(spec.working_dir):
        return run_pipeline(spec, ckpt, output, threads=threads, job_id=None, log=log)
