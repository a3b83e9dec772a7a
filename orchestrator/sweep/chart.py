"""The sweep's PNG: Optuna's optimisation history above its parallel coordinates, drawn by
optuna.visualization.matplotlib from the trials `sweep status` returns (an in-memory copy of
the study: the client needs no access to the head's database)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from .space import distributions
from .spec import SweepSpec

_OPTUNA_STATE = {"SUCCEEDED": "COMPLETE", "STOPPED": "PRUNED", "FAILED": "FAIL", "CANCELLED": "FAIL"}


def study_copy(status: dict):
    import optuna
    from optuna.trial import TrialState, create_trial

    spec = SweepSpec.model_validate(status["spec"])
    dists = distributions(spec)
    study = optuna.create_study(direction="maximize" if spec.objective.mode == "max" else "minimize",
                                study_name=status["id"])
    for t in status["trials"]:
        state = _OPTUNA_STATE.get(t["state"])
        if state is None or (state == "COMPLETE" and t.get("value") is None):
            continue  # unfinished: not drawn yet
        study.add_trial(create_trial(
            state=TrialState[state], value=t["value"] if state == "COMPLETE" else None,
            params=t["params"], distributions={k: dists[k] for k in t["params"] if k in dists},
            intermediate_values={int(k): v for k, v in (t.get("intermediate") or {}).items()}))
    return study


def write_chart(status: dict, path: str | Path) -> Path | None:
    """The PNG at `path`; None when no trial has completed yet (nothing to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = study_copy(status)
    if not any(t.state.name == "COMPLETE" for t in study.trials):
        return None
    metric = status["spec"]["objective"]["metric"]
    panels = []
    for draw in (optuna_plots.plot_optimization_history, optuna_plots.plot_parallel_coordinate):
        with warnings.catch_warnings():  # "experimental" in every Optuna release so far
            warnings.simplefilter("ignore")
            ax = draw(study, target_name=metric)
        buffer = io.BytesIO()
        ax.figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        buffer.seek(0)
        panels.append(mpimg.imread(buffer, format="png"))
    height = sum(p.shape[0] for p in panels) / 100
    width = max(p.shape[1] for p in panels) / 100
    figure, axes = plt.subplots(len(panels), 1, figsize=(width, height))
    for ax, panel in zip(axes, panels, strict=True):
        ax.imshow(panel)
        ax.axis("off")
    figure.suptitle(f"sweep {status['id']}: {metric} ({status['spec']['objective']['mode']})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
