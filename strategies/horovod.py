"""Horovod inside trainctl's workers: real Horovod collectives over gloo (nccl on GPU when
Horovod was built with HOROVOD_GPU_OPERATIONS=NCCL), without horovodrun or ssh.

The rendezvous `horovodrun` would serve is served by the job itself: rank 0 starts
Horovod's own rendezvous HTTP server (the one `horovod.runner.gloo_run` uses) on its
node's address, and every rank learns its port and the job's slot plan (rank, local
rank, cross rank per node) through a TCPStore at MASTER_ADDR:MASTER_PORT, the address
trainctl's supervisor picked. Each rank then sets the HOROVOD_* variables horovodrun
would have set and calls `hvd.init()`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .base import Layout, Strategy, StrategyConfigError, WorkerEnv, split_state
from .optional import installed
from .registry import register

INSTALL_HINT = ("the horovod strategy needs Horovod built with PyTorch and gloo: "
                "cluster/deploy/build_horovod.sh .venv/bin/python (see README, Horovod)")
GPU_HINT = ("resources.gpus_per_worker > 0, but the installed Horovod was built without NCCL (CPU only); "
            "rebuild it with cluster/deploy/build_horovod.sh --gpu .venv/bin/python (needs CUDA and NCCL)")
_OPS = ("average", "sum")  # Adasum on CPU needs an MPI build of Horovod; this one is gloo


def _import_horovod():
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise StrategyConfigError(f"{INSTALL_HINT} ({exc})") from None
    return hvd


def nccl_built() -> bool:
    """Whether this Horovod reduces GPU tensors with NCCL (a CPU build would fail on them)."""
    return bool(_import_horovod().nccl_built())


@contextmanager
def _local_steps(optimizers):
    """torch.distributed.checkpoint creates an empty optimizer state with one zero-gradient
    step() (lr 0), then zero_grad(set_to_none=True). Under hvd.DistributedOptimizer that step
    would all-reduce, which rank 0 saving alone cannot do: here it stays a local step. Its
    zero_grad() takes no set_to_none (it always sets None, torch's default)."""
    with ExitStack() as stack:
        for optimizer in optimizers:
            if hasattr(optimizer, "skip_synchronize"):
                stack.enter_context(optimizer.skip_synchronize())
                optimizer.zero_grad = lambda set_to_none=True, _zero=optimizer.zero_grad: _zero()
                stack.callback(delattr, optimizer, "zero_grad")
        yield


def slot_plan(members: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Horovod's slot of every rank from (node_rank, local_rank) per rank, as
    horovod.runner.common.util.hosts.get_host_assignments lays them out: the cross
    group of local rank L is the nodes that have a local rank L, in node order."""
    size = len(members)
    local_size = {n: sum(1 for m, _ in members if m == n) for n, _ in members}
    nodes_with = {}
    for node, local in members:
        nodes_with.setdefault(local, set()).add(node)
    plan = []
    for rank, (node, local) in enumerate(members):
        cross = sorted(nodes_with[local])
        plan.append({"hostname": f"node{node}", "rank": rank, "local_rank": local,
                     "cross_rank": cross.index(node), "size": size,
                     "local_size": local_size[node], "cross_size": len(cross)})
    return plan


def interface_towards(address: str) -> str | None:
    """The name of this host's network interface that reaches `address` (lo for 127.0.0.1)."""
    import psutil

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))  # UDP: picks the route, sends nothing
        local = s.getsockname()[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name
    return None


class _Rendezvous:
    """Horovod's gloo rendezvous server (a RendezvousHTTPServer), bound to one address."""

    def __init__(self, address: str, plan: list[dict[str, Any]]):
        from horovod.runner.common.util.hosts import SlotInfo
        from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

        self.httpd = RendezvousHTTPServer((address, 0), RendezvousHandler, 0)
        self.httpd.init([SlotInfo(**slot) for slot in plan])
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="horovod-rendezvous", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@register("horovod")
class HorovodStrategy(Strategy):
    @dataclass
    class Options:
        fp16_compression: bool = False     # all-reduce gradients as fp16 (half the bytes)
        backward_passes_per_step: int = 1  # accumulate N backward passes locally per all-reduce and step
        op: str = "average"                # average | sum: how gradients are combined
        timeout_s: float = 600.0           # rendezvous and gloo timeouts
        cycle_time_ms: float | None = None         # horovodrun --cycle-time-ms (Horovod's default: 1)
        fusion_threshold_mb: float | None = None   # horovodrun --fusion-threshold-mb (default: 128)

    @classmethod
    def validate(cls, layout: Layout, options) -> None:
        super().validate(layout, options)
        if not installed("horovod.torch"):
            raise StrategyConfigError(INSTALL_HINT)
        if layout.gpus_per_worker and not nccl_built():
            raise StrategyConfigError(GPU_HINT)
        if options.op not in _OPS:
            raise StrategyConfigError(f"op must be one of {', '.join(_OPS)}, not {options.op!r}")
        for name in ("cycle_time_ms", "fusion_threshold_mb"):
            if (getattr(options, name) or 0) < 0:
                raise StrategyConfigError(f"{name} must be >= 0, not {getattr(options, name)}")
        if options.backward_passes_per_step < 1:
            raise StrategyConfigError(f"backward_passes_per_step must be at least 1, not "
                                      f"{options.backward_passes_per_step}")

    # ---- inside the worker --------------------------------------------------------
    def setup(self, env: WorkerEnv) -> None:
        super().setup(env)
        hvd = _import_horovod()
        if env.use_gpu and not nccl_built():  # this node's Horovod, which may not be the client's
            raise StrategyConfigError(GPU_HINT)
        import torch.distributed as dist

        self._server = None
        self._passes = 0
        timeout = timedelta(seconds=self.options.timeout_s)
        # the job's bootstrap store: one TCPStore at the address trainctl's supervisor picked
        self._store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                                    is_master=env.rank == 0, timeout=timeout, wait_for_workers=False)
        self._store.set(f"horovod/member/{env.rank}", json.dumps([env.node_rank, env.local_rank]))
        if env.rank == 0:
            keys = [f"horovod/member/{r}" for r in range(env.world_size)]
            self._store.wait(keys, timeout)
            plan = slot_plan([tuple(json.loads(self._store.get(k))) for k in keys])
            self._server = _Rendezvous(env.master_addr, plan)
            self._store.set("horovod/rendezvous", json.dumps({"port": self._server.port, "plan": plan}))
        self._store.wait(["horovod/rendezvous"], timeout)
        rendezvous = json.loads(self._store.get("horovod/rendezvous"))
        slot = rendezvous["plan"][env.rank]
        os.environ.update({
            "HOROVOD_GLOO_RENDEZVOUS_ADDR": env.master_addr,
            "HOROVOD_GLOO_RENDEZVOUS_PORT": str(rendezvous["port"]),
            "HOROVOD_CONTROLLER": "gloo",
            "HOROVOD_CPU_OPERATIONS": "gloo",
            "HOROVOD_GLOO_TIMEOUT_SECONDS": str(int(self.options.timeout_s)),
            "HOROVOD_HOSTNAME": slot["hostname"],
            "HOROVOD_RANK": str(slot["rank"]),
            "HOROVOD_SIZE": str(slot["size"]),
            "HOROVOD_LOCAL_RANK": str(slot["local_rank"]),
            "HOROVOD_LOCAL_SIZE": str(slot["local_size"]),
            "HOROVOD_CROSS_RANK": str(slot["cross_rank"]),
            "HOROVOD_CROSS_SIZE": str(slot["cross_size"]),
        })
        if self.options.cycle_time_ms is not None:
            os.environ["HOROVOD_CYCLE_TIME"] = str(self.options.cycle_time_ms)
        if self.options.fusion_threshold_mb is not None:
            os.environ["HOROVOD_FUSION_THRESHOLD"] = str(int(self.options.fusion_threshold_mb * 2**20))
        iface = interface_towards(env.master_addr)
        if iface:  # gloo's pairs use the interface that reaches rank 0's node (lo in tests)
            os.environ["HOROVOD_GLOO_IFACE"] = iface
        hvd.init()
        if hvd.rank() != env.rank or hvd.size() != env.world_size:
            raise RuntimeError(f"horovod ranked this worker {hvd.rank()}/{hvd.size()}, trainctl "
                               f"{env.rank}/{env.world_size}")

    def prepare(self, model, optimizer=None):
        from .materialize import materialize_replica

        hvd = _import_horovod()
        model, optimizer = materialize_replica(model, optimizer, self.device)  # a meta-built model gets its weights
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        if optimizer is not None:
            o = self.options
            self._sync_optimizer(optimizer)
            optimizer = hvd.DistributedOptimizer(
                optimizer, named_parameters=model.named_parameters(),
                compression=hvd.Compression.fp16 if o.fp16_compression else hvd.Compression.none,
                backward_passes_per_step=o.backward_passes_per_step,
                op={"average": hvd.Average, "sum": hvd.Sum}[o.op],
            )
        return model, optimizer

    def _sync_optimizer(self, optimizer) -> None:
        """Rank 0's optimizer state and settings on every rank.

        hvd.broadcast_optimizer_state first takes a real optimizer step with zero
        gradients when the state is empty (to create it): under AdamW that decays the
        weights and counts a step. A fresh optimizer has no state to send, so then only
        its settings (lr, betas, ...) are broadcast."""
        hvd = _import_horovod()
        if any(len(s) for s in optimizer.state.values()):
            hvd.broadcast_optimizer_state(optimizer, root_rank=0)
            return
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        for group, ours in zip(optimizer.param_groups, hvd.broadcast_object(settings, root_rank=0), strict=True):
            group.update(ours)

    def train_step(self, model, optimizer, inputs, targets, loss_fn):
        """Under backward_passes_per_step N, N calls make one step: gradients of N batches
        add up locally (each loss scaled by 1/N), then are all-reduced once and applied."""
        n = self.options.backward_passes_per_step
        if self._passes == 0:
            optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        (loss / n if n > 1 else loss).backward()
        self._passes += 1
        if self._passes == n:
            optimizer.step()
            self._passes = 0
        return loss.detach()

    # ---- checkpoints: from rank 0 (every rank holds the whole model) ------------------
    # The files every other strategy writes (tensors/ through torch.distributed.checkpoint,
    # extra.pt), written by rank 0 alone: post-training passes and jobs under any other
    # strategy read them, and a horovod job resumes from theirs.
    def _distributed(self) -> bool:
        return False  # the collectives are Horovod's: no torch.distributed group to save over

    def save_checkpoint(self, state: dict[str, Any], directory: Path) -> None:
        if self.env.rank == 0:
            with _local_steps(split_state(state)[1].values()):
                super().save_checkpoint(state, directory)

    def load_checkpoint(self, directory: Path, into: dict[str, Any] | None = None) -> dict[str, Any]:
        """Every rank reads the checkpoint; then rank 0's values are broadcast, so all
        ranks continue from exactly rank 0's state."""
        hvd = _import_horovod()
        modules, optimizers, _ = split_state(into or {})
        if (modules or optimizers) and not (Path(directory) / "tensors").exists():
            raise StrategyConfigError(f"checkpoint {directory} holds no model tensors (no tensors/ in it)")
        with _local_steps(optimizers.values()):
            result = super().load_checkpoint(directory, into)
        for module in modules.values():
            hvd.broadcast_parameters(self.unwrap(module).state_dict(), root_rank=0)
        for optimizer in optimizers.values():
            self._sync_optimizer(optimizer)  # also right when the checkpoint held no optimizer state
        return result

    # ---- collectives through Horovod ----------------------------------------------
    def all_reduce(self, tensor, op: str = "sum"):
        hvd = _import_horovod()
        ops = {"sum": hvd.Sum, "mean": hvd.Average, "max": hvd.Max, "min": hvd.Min}
        # A stable name lets Horovod's response cache skip the per-op negotiation with the
        # coordinator when the same collective repeats (unnamed ops get a fresh name each call).
        name = f"trainctl.all_reduce.{op}.{tuple(tensor.shape)}.{tensor.dtype}"
        return hvd.allreduce_(tensor, op=ops[op], name=name)

    def broadcast(self, tensor, src: int = 0):
        hvd = _import_horovod()
        return hvd.broadcast_(tensor, root_rank=src)

    def barrier(self) -> None:
        _import_horovod().barrier()

    def teardown(self) -> None:
        hvd = _import_horovod()
        hvd.barrier()  # nobody leaves while another rank still talks to rank 0's server
        hvd.shutdown()
        if self._server is not None:
            self._server.stop()
            self._server = None
        self._store = None
