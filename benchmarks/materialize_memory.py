"""Peak host memory per rank while a strategy prepares a GPT: built whole on each rank (what
the example did before) vs. built on the meta device and materialised per shard / stage.

On CPU ranks (gloo) the "device" is host memory, so the peak resident set each rank gains
between "before the model is built" and "prepared" is the number a GPU would see.

    .venv/bin/python benchmarks/materialize_memory.py            # fsdp 2 ranks, hybrid pp2 x tp2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from examples.gpt.model import GPT, GPTConfig  # noqa: E402
from strategies import WorkerEnv, get_strategy_class  # noqa: E402
from strategies.base import local_state_bytes  # noqa: E402

MODEL = dict(vocab=256, seq=64, layers=8, heads=8, dim=512)  # ~25 M parameters, ~100 MB in fp32
LAYOUTS = {"fsdp": ("fsdp", {}, 2), "hybrid pp2 x tp2": ("hybrid", {"pp": 2, "tp": 2, "dp": 1}, 4)}


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rank_main(rank: int, world: int, port: int, strategy_name: str, options: dict, meta: bool, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    cls = get_strategy_class(strategy_name)
    strategy = cls(cls.parse_options(options))
    strategy.setup(WorkerEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world, master_port=port))
    strategy.barrier()
    before = _max_rss_bytes()
    torch.manual_seed(0)
    with torch.device("meta") if meta else nullcontext():
        model = GPT(GPTConfig(**MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = strategy.prepare(model, optimizer)
    peak_gain = _max_rss_bytes() - before
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"peak_gain": peak_gain, "held": local_state_bytes(model)}))
    strategy.teardown()
    sys.stdout.flush()
    os._exit(0)


def measure(strategy: str, options: dict, world: int, meta: bool) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(rank_main, args=(world, port, strategy, options, meta, out), nprocs=world,
                           start_method="spawn", join=True)
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    with torch.device("meta"):
        whole = sum(p.numel() * p.element_size() for p in GPT(GPTConfig(**MODEL)).parameters())
    print(f"GPT {MODEL}: whole parameters {whole / 2**20:.1f} MiB")
    for label, (strategy, options, world) in LAYOUTS.items():
        for meta in (False, True):
            ranks = measure(strategy, options, world, meta)
            built = "meta, materialised per shard" if meta else "whole on each rank"
            peaks = ", ".join(f"{r['peak_gain'] / 2**20:.1f}" for r in ranks)
            held = ", ".join(f"{r['held'] / 2**20:.1f}" for r in ranks)
            print(f"{label:18s} {built:30s} peak RSS gain per rank MiB: [{peaks}]  parameters held MiB: [{held}]")


if __name__ == "__main__":
    main()
