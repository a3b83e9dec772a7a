"""The Strategy interface: how one rank's model, optimizer and collectives are wired.

A strategy runs inside a worker process and sees only a plain `WorkerEnv`
(no Ray), so it can be unit-tested with ordinary multi-process gloo ranks.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar


class StrategyConfigError(ValueError):
    """A strategy option or layout the strategy cannot run (reported before reserving)."""


@dataclass(frozen=True)
class Layout:
    """What the job asks for, as a strategy needs to see it before anything is reserved."""

    world_size: int
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1


@dataclass(frozen=True)
class WorkerEnv:
    """The torchrun-equivalent facts of one rank."""

    rank: int
    world_size: int
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    use_gpu: bool = False
    device_index: int = 0  # this rank's GPU among the node's visible ones

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> WorkerEnv:
        """Read RANK, WORLD_SIZE, ... as torchrun (and trainctl's workers) set them."""
        env = os.environ if environ is None else environ
        world_size = int(env.get("WORLD_SIZE", "1"))
        local_world_size = int(env.get("LOCAL_WORLD_SIZE", str(world_size)))
        return cls(
            rank=int(env.get("RANK", "0")),
            world_size=world_size,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            local_world_size=local_world_size,
            node_rank=int(env.get("NODE_RANK", env.get("GROUP_RANK", "0"))),
            num_nodes=int(env.get("NUM_NODES", "1")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            use_gpu=env.get("TRAINCTL_USE_GPU", "0") == "1",
            device_index=int(env.get("TRAINCTL_DEVICE_INDEX", env.get("LOCAL_RANK", "0"))),
        )

    @property
    def device(self) -> str:
        return f"cuda:{self.device_index}" if self.use_gpu else "cpu"


# ---- GPUs and the process group ------------------------------------------------------------
# Each decision is a pure function of the layout or the rank's facts, so the machines without
# a GPU that run the tests check every one of them.

# nccl for CUDA tensors and gloo for CPU ones: a rank's counters, the user's metrics and
# trainctl's own collectives are CPU tensors, which a pure nccl group cannot reduce.
GPU_BACKEND = "cpu:gloo,cuda:nccl"


def shares_gpus(gpus_per_worker: float) -> bool:
    """Whether ranks share GPUs: Ray hands out fractions of a GPU only below one."""
    return 0 < gpus_per_worker < 1


def gpu_layout_problem(layout: Layout, backend: str | None) -> str | None:
    """Why a layout cannot run under a strategy whose process-group backend option is
    `backend` (None: a strategy without one, whose GPU collectives are nccl), or None."""
    gpus = layout.gpus_per_worker
    if backend is not None and "nccl" in backend and not gpus:
        return (f"backend {backend!r} runs on GPUs, but resources.gpus_per_worker is 0; set "
                "resources.gpus_per_worker: 1, or strategy.options.backend: auto (gloo on CPU)")
    if shares_gpus(gpus) and (backend is None or backend == "auto" or "nccl" in backend):
        other = ", or strategy.options.backend: gloo (slow)" if backend is not None else ""
        return (f"resources.gpus_per_worker: {gpus:g} puts several ranks on one GPU, which nccl cannot "
                f"run (one GPU per rank); set resources.gpus_per_worker: 1{other}")
    return None


@dataclass(frozen=True)
class ProcessGroupPlan:
    """How a rank joins the job's torch.distributed group."""

    backend: str
    device_index: int | None  # the CUDA device the group is bound to (init's device_id), or None


def plan_process_group(backend: str, use_gpu: bool, device_index: int, world_size: int) -> ProcessGroupPlan:
    """The backend string and bound device for the `backend` option on this rank.

    auto and nccl on a GPU become cpu:gloo,cuda:nccl (a plain "nccl" would leave CPU tensors
    without a backend); auto on CPU is gloo; anything else is torch's to read. A GPU rank binds
    the group to its device (eager NCCL setup, and barrier() knows the device) except alone in
    its job, where binding makes NCCL fail to set up (DeepSpeed #8248 skips it there too)."""
    if backend in ("auto", "nccl"):
        if not use_gpu and backend == "nccl":
            raise StrategyConfigError("backend 'nccl' runs on GPUs and this rank has none; use backend: auto")
        backend = GPU_BACKEND if use_gpu else "gloo"
    bind = use_gpu and "nccl" in backend and world_size > 1
    return ProcessGroupPlan(backend, device_index if bind else None)


def cuda_device_problem(env: WorkerEnv, device_count: int, visible: str | None) -> str | None:
    """Why a GPU rank cannot use its device, or None. `device_count` is what torch sees,
    `visible` the CUDA_VISIBLE_DEVICES the rank was given.

    LOCAL_RANK must name the rank's own GPU: DeepSpeed and torchrun-style scripts use
    cuda:LOCAL_RANK. (Ranks sharing GPUs, fewer devices than local ranks, cannot have that.)"""
    where = f"rank {env.rank} (LOCAL_RANK {env.local_rank}, CUDA_VISIBLE_DEVICES={visible!r})"
    if device_count == 0:
        return (f"{where} was given a GPU but torch sees no CUDA device: install a CUDA build of torch "
                "on the GPU nodes, or set resources.gpus_per_worker: 0")
    if env.device_index >= device_count:
        return f"{where}: its GPU is cuda:{env.device_index} but torch sees only {device_count} device(s)"
    if env.local_rank != env.device_index and env.local_world_size <= device_count:
        return (f"{where}: its GPU is cuda:{env.device_index}, but DeepSpeed and torchrun-style code "
                f"would use cuda:{env.local_rank}, another rank's GPU")
    return None


def init_process_group(env: WorkerEnv, backend: str, timeout_s: float) -> None:
    """Join the job's process group at MASTER_ADDR/PORT: the one place every torch
    process-group strategy (and a custom one) goes through."""
    import datetime

    import torch
    import torch.distributed as dist

    plan = plan_process_group(backend, env.use_gpu, env.device_index, env.world_size)
    if env.use_gpu:
        torch.cuda.set_device(env.device_index)
    if dist.is_initialized():
        return
    dist.init_process_group(
        backend=plan.backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=None if plan.device_index is None else torch.device("cuda", plan.device_index),
    )


@dataclass
class NoOptions:
    """For strategies that take no options."""


class Strategy:
    """Base class for every strategy plugin.

    Subclasses set `name`, declare their options as a dataclass `Options`, and
    override `setup`, `prepare` and (for sharded strategies) the checkpoint hooks.
    """

    name: ClassVar[str] = "base"
    Options: ClassVar[type] = NoOptions
    # old option name -> its name now: accepted with a deprecation line (see parse_options)
    RENAMED_OPTIONS: ClassVar[dict[str, str]] = {}

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()
        self.env: WorkerEnv | None = None

    # ---- before anything is reserved -------------------------------------------
    @classmethod
    def parse_options(cls, raw: dict[str, Any] | None) -> Any:
        """Build the Options dataclass, naming any option that does not exist (an option's old
        name, from RENAMED_OPTIONS, still works, with one deprecation line)."""
        raw = dict(raw or {})
        for old, new in cls.RENAMED_OPTIONS.items():
            if old in raw:
                warnings.warn(f"strategy.options.{old} of strategy {cls.name!r} is deprecated: "
                              f"call it {new}", FutureWarning, stacklevel=2)
                raw.setdefault(new, raw.pop(old))
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(raw) - known)
        if unknown:
            hint = ", ".join(sorted(known)) or "none"
            raise StrategyConfigError(
                f"unknown option {unknown[0]!r} for strategy {cls.name!r} (known options: {hint})"
            )
        from pydantic import TypeAdapter, ValidationError

        try:  # pydantic checks the dataclass field types (e.g. a string where a float belongs)
            return TypeAdapter(cls.Options).validate_python(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise StrategyConfigError(
                f"option {where!r} of strategy {cls.name!r}: {err['msg']} (got {err.get('input')!r})"
            ) from None

    @classmethod
    def validate(cls, layout: Layout, options: Any) -> None:
        """Raise StrategyConfigError if this layout cannot run (e.g. mesh vs world size)."""
        if layout.world_size < 1:
            raise StrategyConfigError("a job needs at least one worker")
        # a strategy without a `backend` option has nccl GPU collectives (horovod, a custom one)
        problem = gpu_layout_problem(layout, getattr(options, "backend", None))
        if problem:
            raise StrategyConfigError(problem)

    @classmethod
    def colocated_ranks(cls, options: Any) -> int:
        """How many consecutive ranks must share a node (e.g. a tensor-parallel group);
        -1: every rank of the job (as -1 in a mesh size means 'the rest')."""
        return 1

    @classmethod
    def colocated_group(cls, layout: Layout, options: Any) -> int:
        """`colocated_ranks` for this layout: what the client sets resources.colocate from."""
        group = cls.colocated_ranks(options)
        return layout.world_size if group == -1 else group

    @classmethod
    def check_model(cls, model, layout: Layout, options: Any) -> None:
        """Raise StrategyConfigError if this model cannot run (a split point or plan entry that
        names a missing module). Called before reserving on a model built on the meta device,
        when the entrypoint's module has `build_model(config)`."""

    # ---- inside the worker --------------------------------------------------------
    def setup(self, env: WorkerEnv) -> None:
        self.env = env
        if env.use_gpu:
            import torch

            problem = cuda_device_problem(env, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
            if problem:
                raise RuntimeError(problem)
            torch.cuda.set_device(env.device_index)

    # Which share of the data this rank reads: ranks that hold pieces of one model
    # replica (tensor or pipeline parallel) must read the same batches.
    @property
    def data_parallel_rank(self) -> int:
        return self.env.rank if self.env else 0

    @property
    def data_parallel_size(self) -> int:
        return self.env.world_size if self.env else 1

    @property
    def device(self):
        import torch

        return torch.device(self.env.device if self.env else "cpu")

    def prepare(self, model, optimizer=None):
        return model, optimizer

    def backward(self, loss) -> None:
        loss.backward()

    def train_step(self, model, optimizer, inputs, targets, loss_fn):
        """One optimizer step on one batch: forward, `loss_fn(output, targets)`, backward, step.

        Returns the batch's loss, detached, on every rank. Strategies that cannot run a
        plain forward/backward (pipeline schedules, DeepSpeed's pipeline engine) override
        this, so a training function written with `ctx.train_step` runs under all of them."""
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        self.backward(loss)
        optimizer.step()
        return loss.detach()

    def unwrap(self, model):
        """The user's module inside whatever wrapper `prepare` put around it."""
        return getattr(model, "module", model)

    # ---- checkpoints ------------------------------------------------------------------
    # Modules and optimizers go through torch.distributed.checkpoint (each rank writes its
    # own shards, keyed by parameter name, so a checkpoint loads into any other layout:
    # saved under fsdp on 2 ranks, resumed under ddp on 1). Everything else in the state
    # (epoch, data positions, ...) is small and identical on every rank: rank 0 writes it.

    def save_checkpoint(self, state: dict[str, Any], directory: Path) -> None:
        import torch
        import torch.distributed.checkpoint as dcp

        modules, optimizers, rest = split_state(state)
        if modules:
            dcp.save(self._tensor_state(modules, optimizers), checkpoint_id=str(Path(directory) / "tensors"),
                     no_dist=not self._distributed())
        if self.env is None or self.env.rank == 0:
            torch.save(rest, Path(directory) / "extra.pt")

    def load_checkpoint(self, directory: Path, into: dict[str, Any] | None = None) -> dict[str, Any]:
        """Load a checkpoint; modules/optimizers given in `into` are loaded in place."""
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        result = torch.load(Path(directory) / "extra.pt", map_location="cpu", weights_only=True)
        modules, optimizers, _ = split_state(into or {})
        tensors = Path(directory) / "tensors"
        if modules and tensors.exists():
            loading = optimizers
            if optimizers and not _holds_optimizer_state(tensors):
                # e.g. the whole weights a deepspeed job saves beside its own sharded files
                if self.env is None or self.env.rank == 0:
                    print(f"[trainctl] {directory} holds weights but no optimizer state: the optimizer "
                          "starts fresh", flush=True)
                loading = {}
            target = self._tensor_state(modules, loading)
            dcp.load(target, checkpoint_id=str(tensors), no_dist=not self._distributed())
            set_state_dict(_container(modules), list(loading.values()),
                           model_state_dict=target["model"], optim_state_dict=target.get("optim", {}))
            result.update(modules)
            result.update(optimizers)
        return result

    def _tensor_state(self, modules: dict, optimizers: dict) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(_container(modules), list(optimizers.values()))
        return {"model": model_sd, "optim": optim_sd} if optimizers else {"model": model_sd}

    def _distributed(self) -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    # ---- collectives --------------------------------------------------------------
    def all_reduce(self, tensor, op: str = "sum"):
        import torch.distributed as dist

        if dist.is_initialized():
            reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            if op == "mean":
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
                tensor /= dist.get_world_size()
            else:
                dist.all_reduce(tensor, op=reduce_op[op])
        return tensor

    def broadcast(self, tensor, src: int = 0):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def teardown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            # Nobody closes its connections while another rank may still be reading from
            # them: gloo's threads abort the process when a peer vanishes mid-exchange.
            dist.barrier()
            dist.destroy_process_group()


@dataclass
class ProcessGroupOptions:
    """The options of every strategy whose collectives run over a torch process group."""

    backend: str = "auto"      # auto: gloo on CPU, cpu:gloo,cuda:nccl on GPU; or a torch backend string
    timeout_s: float = 600.0  # how long a collective waits for the other ranks (torch's NCCL default; not 30 min)


class ProcessGroupStrategy(Strategy):
    """A strategy that joins the job's torch.distributed process group in `setup`. Subclass
    its options (`class Options(ProcessGroupOptions)`) to add your own."""

    Options: ClassVar[type] = ProcessGroupOptions

    def setup(self, env: WorkerEnv) -> None:
        super().setup(env)
        init_process_group(env, self.options.backend, self.options.timeout_s)


def _holds_optimizer_state(tensors: Path) -> bool:
    import torch.distributed.checkpoint as dcp

    return any(key.startswith("optim.") for key in dcp.FileSystemReader(str(tensors)).read_metadata().state_dict_metadata)


def split_state(state: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(modules, optimizers, everything else) of a checkpoint state dict."""
    import torch

    modules = {k: v for k, v in state.items() if isinstance(v, torch.nn.Module)}
    optimizers = {k: v for k, v in state.items() if isinstance(v, torch.optim.Optimizer)}
    rest = {k: v for k, v in state.items() if k not in modules and k not in optimizers}
    return modules, optimizers, rest


def _container(modules: dict):
    """One module holding all of them, so parameter names are stable: '<key>.<fqn>'.

    Wrappers (DDP's `module.`, FSDP, compile) are seen through by torch's state_dict helpers."""
    import torch

    return torch.nn.ModuleDict(modules)


def local_state_bytes(model, optimizer=None) -> int:
    """Parameter + optimizer-state bytes this rank holds (only its shard of sharded tensors)."""
    import torch

    def nbytes(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    total = sum(nbytes(p) for p in model.parameters())
    for state in (optimizer.state.values() if optimizer is not None else []):
        total += sum(nbytes(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return total
