"""Post-training passes on the digits classifier and the GPT example: every pass alone, and combined.

    .venv/bin/python benchmarks/compress.py [--threads 1] [--models digits,digits-1024,gpt] [--pipelines ...]

Trains each model in this process (digits: the example's MLP, hidden 2048, 15 epochs; digits-H: the
same with hidden H; gpt: the example's GPT, 2 layers, dim 128, 200 steps), saves it as a job
checkpoint, then runs each pipeline with `orchestrator.compress.run_pipeline`. Prints one table per
model (metric, size, p50 at batch 1, speedup, kept?) and the goals; the full reports are written
under runs/bench-compress/. Every number is measured on this machine, nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STRUCTURED = {"prune": {"method": "l1_structured", "amount": 0.3, "finetune": {"steps": 100, "lr": 1e-3}}}
UNSTRUCTURED = {"prune": {"method": "l1_unstructured", "amount": 0.5}}
PIPELINES = {
    "l1_unstructured 0.5": [UNSTRUCTURED],
    "l1_structured 0.3 + fine-tune": [STRUCTURED],
    "dynamic_int8": [{"quantize": {"method": "dynamic_int8"}}],
    "static_int8 (PT2E, inductor)": [{"quantize": {"method": "static_int8", "calibration_batches": 8}}],
    "weight_only_int8 (torchao)": [{"quantize": {"method": "weight_only_int8"}}],
    "weight_only_int4 (torchao)": [{"quantize": {"method": "weight_only_int4"}}],
    "structured 0.3 + ft -> dynamic_int8": [STRUCTURED, {"quantize": {"method": "dynamic_int8"}}],
    "unstructured 0.5 -> dynamic_int8": [UNSTRUCTURED, {"quantize": {"method": "dynamic_int8"}}],
}


def save_checkpoint(model, directory: Path) -> Path:
    from strategies.base import Strategy

    ckpt = directory / "checkpoint_000001"
    ckpt.mkdir(parents=True, exist_ok=True)
    Strategy().save_checkpoint({"model": model}, ckpt)
    (ckpt / "manifest.json").write_text(json.dumps({"index": 1, "step": 1}))
    return ckpt


def shard(work: Path, ref: str, name: str) -> str:
    from orchestrator.data.writer import shard_dataset

    out = work / name
    if not (out / "manifest.json").exists():
        shard_dataset([ref], str(out))
    return str(out)


def train_digits(work: Path, hidden: int) -> tuple[dict, Path]:
    import torch

    from examples.digits.data import _split
    from examples.digits.hooks import build_model

    torch.manual_seed(0)
    model = build_model({"hidden": hidden})
    X, _, y, _ = _split()
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1 if hidden <= 256 else 0.05, momentum=0.9)
    for _ in range(15):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    job = {
        "name": f"digits-{hidden}", "entrypoint": "examples.digits.train:train", "working_dir": str(ROOT),
        "config": {"hidden": hidden},
        "data": {"train": {"path": shard(work, "examples.digits.data:digits_train", "digits-train"),
                           "batch_size": 32, "shuffle": True},
                 "eval": {"path": shard(work, "examples.digits.data:digits_eval", "digits-eval"),
                          "batch_size": 512, "drop_last": False}},
        "hooks": "examples.digits.hooks", "eval": {"latency_iters": 300, "throughput_batch": 64},
    }
    return job, save_checkpoint(model, work / f"digits-{hidden}")


def train_gpt(work: Path, steps: int) -> tuple[dict, Path]:
    import torch

    from examples.gpt.hooks import build_model, loss
    from orchestrator.compress.data import endless
    from orchestrator.spec import parse_spec

    config = {"layers": 2, "heads": 4, "dim": 128}
    data = {"train": {"path": shard(work, "examples.gpt.data:gpt_train", "gpt-train"), "batch_size": 16,
                      "shuffle": True},
            "eval": {"path": shard(work, "examples.gpt.data:gpt_eval", "gpt-eval"), "batch_size": 64,
                     "drop_last": False}}
    torch.manual_seed(0)
    model = build_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    spec = parse_spec({"name": "gpt", "entrypoint": "examples.gpt.train:train", "data": data})
    for _, batch in zip(range(steps), endless(spec, "train"), strict=False):
        opt.zero_grad()
        loss(model, batch).backward()
        opt.step()
    job = {"name": "gpt", "entrypoint": "examples.gpt.train:train", "working_dir": str(ROOT), "config": config,
           "data": data, "hooks": "examples.gpt.hooks",
           "eval": {"max_batches": 16, "latency_iters": 100, "throughput_batch": 16}}
    return job, save_checkpoint(model.eval(), work / "gpt")


def run(job: dict, ckpt: Path, passes: list, out: Path, threads: int) -> dict:
    from orchestrator.compress import run_pipeline
    from orchestrator.spec import parse_spec

    base = {k: v for k, v in job.items() if k not in ("hooks", "eval")}
    spec = parse_spec({**base, "post_training": {
        "passes": passes, "hooks": job["hooks"], "eval": {**job["eval"], "threads": threads},
        "gate": {"metric": "accuracy", "max_drop": 0.01}}})
    run_pipeline(spec, ckpt, out, threads=threads, log=lambda _line: None)
    return json.loads((out / "report.json").read_text())


def table(name: str, results: dict) -> list[str]:
    lines = [f"### {name}", "", "| pipeline | pass | accuracy | drop (points) | size (KiB) | size ratio | "
             "p50 batch 1 (ms) | speedup | throughput (samples/s) | kept? |", "|---|---|---|---|---|---|---|---|---|---|"]
    baseline_done = False
    for pipeline, report in results.items():
        if isinstance(report, str):
            lines.append(f"| {pipeline} | failed: {report} | | | | | | | | |")
            continue
        for r in report["rows"]:
            if r["kept"] is None:
                if baseline_done:
                    continue
                baseline_done = True
            kept = "baseline" if r["kept"] is None else ("yes: " if r["kept"] else "no: ") + r["reason"]
            lines.append(
                f"| {'trained' if r['kept'] is None else pipeline} | {r['pass']} | {r['metric']:.4f} | "
                f"{(r['drop'] or 0) * 100:+.2f} | {r['size_bytes'] / 1024:.1f} | {r['size_ratio']:.3f} | "
                f"{r['p50_s'] * 1e3:.3f} | {r['speedup']:.2f}x | {r['throughput_per_s']:.0f} | {kept} |")
    return lines


def goals(results: dict) -> list[str]:
    out = []
    for model, res in results.items():
        if not model.startswith("digits"):
            continue
        dyn = res.get("dynamic_int8")
        if isinstance(dyn, dict):
            r = dyn["rows"][1]
            ok = r["speedup"] >= 2 and r["size_ratio"] <= 0.3 and r["drop"] <= 0.01
            out.append(f"- {model} dynamic_int8: speedup {r['speedup']:.2f}x (goal >= 2x), size {r['size_ratio']:.3f}x "
                       f"(goal <= 0.3x), drop {r['drop'] * 100:+.2f} points (goal <= 1): {'met' if ok else 'NOT met'}")
        st = res.get("l1_structured 0.3 + fine-tune")
        if isinstance(st, dict):
            r = st["rows"][1]
            ok = r["speedup"] >= 1.3 and r["drop"] <= 0.01
            out.append(f"- {model} l1_structured 0.3 + fine-tune: speedup {r['speedup']:.2f}x (goal >= 1.3x), "
                       f"drop {r['drop'] * 100:+.2f} points (goal <= 1): {'met' if ok else 'NOT met'}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="digits,digits-128,digits-1024,gpt",
                        help="digits (the example, hidden 2048), digits-H (hidden H), gpt")
    parser.add_argument("--pipelines", default=None, help="comma-separated subset of the pipeline names")
    parser.add_argument("--gpt-steps", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-compress"))
    args = parser.parse_args()

    import torch

    from examples.digits.train import HIDDEN
    from orchestrator.compress.machine import facts

    torch.set_num_threads(args.threads)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    wanted = [p for p in PIPELINES if args.pipelines is None or p in args.pipelines.split(",")]
    results: dict[str, dict] = {}
    for model in args.models.split(","):
        started = time.time()
        if model == "gpt":
            job, ckpt = train_gpt(work, args.gpt_steps)
        else:  # digits (the example's width) or digits-H (hidden H)
            job, ckpt = train_digits(work, int(model.partition("-")[2] or HIDDEN))
        print(f"[{model}] trained in {time.time() - started:.0f}s", flush=True)
        results[model] = {}
        for i, name in enumerate(wanted):
            t0 = time.time()
            try:
                results[model][name] = run(job, ckpt, PIPELINES[name], work / model / f"p{i}", args.threads)
            except Exception as exc:  # a pass this model cannot take (e.g. export of its forward)
                results[model][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            print(f"[{model}] {name}: {time.time() - t0:.0f}s", flush=True)
    m = facts()
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, flags {', '.join(m['flags'])}; torch threads "
             f"{args.threads}; quantized engine {m['quantized_engine']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""]
    for model, res in results.items():
        lines += table(model, res) + [""]
    lines += ["Goals:", *goals(results)]
    text = "\n".join(lines)
    (work / "results.md").write_text(text + "\n")
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
