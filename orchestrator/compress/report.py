"""report.json, report.md (one table) and report.png (metric vs size and latency)."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _config(row: dict) -> str:
    cfg = {k: v for k, v in (row.get("config") or {}).items() if k != "method" and v not in (None, [], {})}
    return ", ".join(f"{k}={v}" for k, v in cfg.items()) or "-"


def markdown(report: dict) -> str:
    metric = report.get("metric") or "metric"
    m = report["machine"]
    lines = [
        f"# Post-training report: {report.get('job') or report['checkpoint']}",
        "",
        f"Checkpoint `{report['checkpoint']}`; gate: {report['gate_text']}. Drop, size ratio and speedup "
        "are against the trained model (first row); p50 is one forward pass at batch 1, and each "
        "speedup is timed in interleaved rounds with the trained model and the pass's input.",
        "",
        f"| pass | config | {metric} | drop | size | size ratio | nonzero % | p50 (ms) | speedup | kept? |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        kept = "baseline" if row["kept"] is None else (f"yes: {row['reason']}" if row["kept"] else f"no: {row['reason']}")
        size = row["size_bytes"] and row["size_bytes"] / 1024
        nonzero = row["nonzero"] and row["nonzero"] * 100
        p50 = row["p50_s"] and row["p50_s"] * 1e3
        lines.append(
            f"| {row['pass']} | {_config(row)} | {_fmt(row['metric'], '.4f')} | {_fmt(row['drop'], '+.4f')} "
            f"| {_fmt(size, '.1f', ' KiB')} | {_fmt(row['size_ratio'], '.3f')} | {_fmt(nonzero, '.1f')} "
            f"| {_fmt(p50, '.3f')} | {_fmt(row['speedup'], '.2f', 'x')} | {kept} |")
    final = report["final"]
    timed = [r for r in report["rows"][1:] if r["speedup"] is not None]
    faster = [f"{r['pass']} {r['speedup']:.2f}x" for r in timed if round(r["speedup"], 2) >= 1.05]
    slower = [f"{r['pass']} {r['speedup']:.2f}x" for r in timed if round(r["speedup"], 2) < 1.05]
    lines += [
        "",
        f"Measured on this machine at batch 1: faster than the trained model: {', '.join(faster) or 'none'}; "
        f"not faster: {', '.join(slower) or 'none'}.",
    ]
    lines += [
        "",
        f"Final model: `{final['path']}` ({', '.join(final['passes']) or 'no pass kept: the trained model'}); "
        f"load it with `orchestrator.compress.load_compressed(path)`.",
        "",
        f"Throughput at batch {report['rows'][0]['throughput_batch']}: " + ", ".join(
            f"{r['pass']} {r['throughput_per_s']:.0f}/s" for r in report["rows"] if r["throughput_per_s"]) + ".",
        "",
        f"Machine: {m['cpu']} ({m['machine']}, {m['cores']} cores; flags: {', '.join(m['flags']) or 'none of note'}), "
        f"{report['rows'][0]['threads']} torch threads, quantized engine {m['quantized_engine']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
    ]
    notes = [f"- {r['pass']}: {r['note']}" for r in report["rows"] if r.get("note")]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["size_bytes"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label, scale in ((axes[0], "size_bytes", "size on disk (KiB)", 1 / 1024),
                                  (axes[1], "p50_s", "p50 latency at batch 1 (ms)", 1e3)):
        for r in rows:
            y = r.get("metric") if r.get("metric") is not None else 0.0
            style = {None: ("s", "tab:blue"), True: ("o", "tab:green"), False: ("x", "tab:red")}[r["kept"]]
            ax.scatter(r[key] * scale, y, marker=style[0], color=style[1], s=50)
            ax.annotate(r["pass"], (r[key] * scale, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(report.get("metric") or "metric")
        ax.grid(alpha=0.3)
    fig.suptitle("post-training passes (square: trained, circle: kept, x: rejected)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(report: dict, directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / "report.json", "md": directory / "report.md", "png": directory / "report.png"}
    if not chart(report, paths["png"]):
        paths.pop("png")
    report["files"] = {k: str(v) for k, v in paths.items()}
    paths["md"].write_text(markdown(report))
    paths["json"].write_text(json.dumps(report, indent=2, default=str))
    return report["files"]
