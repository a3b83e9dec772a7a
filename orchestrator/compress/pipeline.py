"""Run a spec's post-training passes on a checkpoint: each measured, gated, kept or rejected."""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from . import prune, quantize
from .artifact import save_model, structure_of
from .checks import check_platform
from .data import endless, take
from .finetune import finetune
from .hooks import hooks_module, load_hooks, load_trained_model, to_inputs
from .machine import facts
from .measure import compare_latency, measure, slice_inputs
from .report import write


def _apply(p, model, hooks, spec, example: tuple) -> tuple[object, object, dict, str]:
    """Run pass `p` on `model` (a copy): (model to keep, exported program or None, info, note)."""
    o = p.options
    note = ""
    if p.prune is not None:
        tune = None
        if o.finetune:
            ft = o.finetune
            tune = lambda m: finetune(m, hooks, endless(spec, ft.split), ft.steps, ft.lr)  # noqa: E731
        if o.method == "l1_unstructured":
            info = prune.l1_unstructured(model, o.amount, o.ignore, finetune=tune)
            note = "zeros stored as a bit mask + non-zeros; dense kernels, so no speedup is expected"
        else:
            info = prune.l1_structured(model, o.amount, o.ignore, example, hooks=hooks, finetune=tune,
                                       round_to=o.round_to)
            note = f"parameters {info['params_before']:,} -> {info['params_after']:,}"
        return model, None, info, note
    if o.method == "dynamic_int8":
        return quantize.dynamic_int8(model), None, {"engine": quantize.engine()}, ""
    if o.method in ("weight_only_int8", "weight_only_int4"):
        if o.method == "weight_only_int4":
            note = "torchao's CPU int4 path stores the int4 values unpacked in int8"
        return quantize.weight_only(model, o.method, o.group_size), None, {}, note
    calibration = [to_inputs(hooks, b) for b in take(spec, "train", o.calibration_batches)]
    converted, program = quantize.static_int8(model, example, calibration)
    return converted, program, {"calibration_batches": len(calibration), "engine": "x86 inductor"}, note


RELEVANT = {"static_int8": {"calibration_batches", "compile"}, "weight_only_int4": {"group_size"}}


def _config(p) -> dict:
    """The pass's options that matter for its method (for the report and the recipe)."""
    config = p.options.model_dump(mode="json")
    if p.quantize is not None:
        config = {k: v for k, v in config.items() if k == "method" or k in RELEVANT.get(p.quantize.method, ())}
    return config


def _compiled(model):
    import torch

    return torch.compile(model)


def run_pipeline(spec, checkpoint: str | Path, output: str | Path, *, threads: int | None = None,
                 job_id: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Compress the model of `checkpoint` with `spec.post_training`; writes the report and the
    final model under `output`. Returns a summary (report paths, final model, kept passes)."""
    import torch

    post = spec.post_training
    started = time.time()
    check_platform(post)
    hooks = load_hooks(hooks_module(spec), spec.working_dir)
    threads = threads or post.eval.threads
    if threads:
        torch.set_num_threads(threads)
    output = Path(output)
    if (output / "passes").exists():
        shutil.rmtree(output / "passes")
    model = load_trained_model(hooks, spec.config, checkpoint, post.model_key)

    eval_split = post.eval.split if post.eval.split in spec.data else None
    eval_batches = take(spec, eval_split, post.eval.max_batches) if eval_split else []
    sample_split = eval_split or ("train" if "train" in spec.data else next(iter(spec.data), None))
    if sample_split is None:
        raise ValueError("post_training needs a data split (eval or train) to take example inputs from; add data.eval")
    sample = eval_batches[0] if eval_batches else take(spec, sample_split, 1)[0]
    inputs = to_inputs(hooks, sample)
    batch_n = post.eval.throughput_batch
    one, many, example = slice_inputs(inputs, 1), slice_inputs(inputs, batch_n), slice_inputs(inputs, 2)
    iters = post.eval.latency_iters

    def run_measure(m) -> dict:
        return measure(m, hooks, eval_batches, one, many, batch_n, iters)

    fresh = hooks.build_model(dict(spec.config))
    recipe = {"hooks": hooks.module, "config": spec.config, "structure": {}, "quantize": None, "passes": []}
    base_dir = output / "passes" / "0-trained"
    base_size = save_model(model, base_dir, recipe)
    base = run_measure(model)
    gate = post.gate
    metric = gate.metric or next(iter(base["metrics"]), None)
    sign = 1.0 if gate.higher_is_better else -1.0
    log(f"[post-training] trained model: {metric}={base['metrics'].get(metric)} size={base_size}B "
        f"p50={base['p50_s'] * 1e3:.3f}ms threads={base['threads']}")

    def row(name, config, m, size, kept, reason="", note="", path=""):
        value = m["metrics"].get(metric) if metric else None
        base_value = base["metrics"].get(metric) if metric else None
        drop = sign * (base_value - value) if value is not None and base_value is not None else None
        return {"pass": name, "config": config, "kept": kept, "reason": reason, "note": note, "path": str(path),
                "metric": value, "drop": drop, "metrics": m["metrics"], "size_bytes": size,
                "size_ratio": size / base_size, "nonzero": m["nonzero"], "weights": m["weights"],
                "p50_s": m["p50_s"], "p90_s": m["p90_s"], "speedup": base["p50_s"] / m["p50_s"],
                "throughput_batch": m["throughput_batch"], "throughput_per_s": m["throughput_per_s"],
                "threads": m["threads"]}

    rows = [row("trained", None, base, base_size, None, path=base_dir)]
    current, cur_size, cur_dir, cur_recipe = model, base_size, base_dir, recipe
    for i, p in enumerate(post.passes, 1):
        o = p.options
        config = _config(p)
        directory = output / "passes" / f"{i}-{p.label.split('(')[0]}"
        try:
            candidate, program, info, note = _apply(p, copy.deepcopy(current), hooks, spec, example)
        except Exception as exc:  # a pass this model cannot take: rejected, the pipeline goes on
            reason = f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            rows.append({"pass": p.label, "config": config, "kept": False, "reason": reason, "note": "",
                         "path": "", "metric": None, "drop": None, "metrics": {}, "size_bytes": None,
                         "size_ratio": None, "nonzero": None, "weights": None, "p50_s": None, "p90_s": None,
                         "speedup": None, "throughput_batch": batch_n, "throughput_per_s": None,
                         "threads": base["threads"]})
            log(f"[post-training] {p.label}: rejected: {reason}")
            continue
        cand_recipe = copy.deepcopy(cur_recipe)
        cand_recipe["passes"].append({"kind": p.kind, **config})
        if p.prune is not None:
            cand_recipe["structure"] = structure_of(candidate, fresh)
        else:
            cand_recipe["quantize"] = config
        size = save_model(candidate, directory, cand_recipe, program)
        compiled = p.quantize is not None and o.method == "static_int8" and o.compile
        m = run_measure(candidate)
        # latency: the trained model, this pass's input and its output, timed in interleaved rounds
        timed = [model, current, candidate] if current is not model else [model, candidate]
        if compiled:
            timed = [_compiled(t) for t in timed]
        lat = compare_latency(timed, one, iters)
        m["p50_s"], m["p90_s"] = lat[-1]["p50_s"], lat[-1]["p90_s"]
        trained_p50, input_p50 = lat[0]["p50_s"], lat[-2]["p50_s"]
        if compiled:
            note = (f"p50 and speedups with every model under torch.compile (inductor), which runs the int8 "
                    f"kernels: trained {trained_p50 * 1e3:.3f} ms compiled")
        if p.prune is not None and o.method == "l1_unstructured" and size > cur_size * (1 - gate.min_size_gain):
            note = "no size gain: too few zeros for the sparse encoding to pay off; dense kernels, no speedup"
        r = row(p.label, {**config, **info}, m, size, False, note=note, path=directory)
        r["speedup"], r["speedup_vs_input"] = trained_p50 / m["p50_s"], input_p50 / m["p50_s"]
        reasons = []
        if gate.metric and r["drop"] is not None and r["drop"] > gate.max_drop + 1e-12:
            reasons.append(f"{metric} drop {r['drop']:.4f} > max_drop {gate.max_drop:g}")
        smaller = size <= cur_size * (1 - gate.min_size_gain)
        faster = r["speedup_vs_input"] >= gate.min_speedup
        if not (smaller or faster):
            reasons.append(f"neither smaller ({size / cur_size:.2f}x size) nor faster "
                           f"({r['speedup_vs_input']:.2f}x p50) than its input")
        gains = [w for w, ok in (("smaller", smaller), ("faster", faster)) if ok]
        r["kept"], r["reason"] = not reasons, "; ".join(reasons) or " and ".join(gains)
        rows.append(r)
        log(f"[post-training] {p.label}: {metric}={r['metric']} size={size}B ({r['size_ratio']:.2f}x) "
            f"p50={m['p50_s'] * 1e3:.3f}ms ({r['speedup']:.2f}x) -> "
            + (f"kept ({r['reason']})" if r["kept"] else f"rejected: {r['reason']}"))
        if r["kept"]:
            current, cur_size, cur_dir, cur_recipe = candidate, size, directory, cand_recipe

    final_dir = output / "model"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    shutil.copytree(cur_dir, final_dir)
    kept = [r["pass"] for r in rows[1:] if r["kept"]]
    final = next(r for r in reversed(rows) if r["kept"] in (None, True))
    report = {
        "job": job_id, "checkpoint": str(checkpoint), "metric": metric,
        "gate": gate.model_dump(mode="json"),
        "gate_text": (f"{metric} may drop at most {gate.max_drop:g}" if gate.metric else "no metric gate")
        + f"; a pass must be {gate.min_size_gain:.0%} smaller or {gate.min_speedup:g}x faster than its input",
        "machine": facts(), "rows": rows, "seconds": time.time() - started,
        "final": {"path": str(final_dir), "passes": kept, "metric": final["metric"], "size_bytes": final["size_bytes"],
                  "size_ratio": final["size_ratio"], "speedup": final["speedup"]},
    }
    files = write(report, output)
    log(f"[post-training] report: {files['md']}; final model {final_dir} ({', '.join(kept) or 'no pass kept'})")
    return {"report": files, "final": report["final"], "kept": kept,
            "rejected": {r["pass"]: r["reason"] for r in rows[1:] if not r["kept"]}}
