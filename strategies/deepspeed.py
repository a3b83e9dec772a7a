"""DeepSpeed inside trainctl's workers: ZeRO stages 0-3, CPU offload, and DeepSpeed's
pipeline engine (PipelineModule) combined with ZeRO-1 data parallelism.

No `deepspeed` launcher, hostfile or ssh: every rank already has RANK, WORLD_SIZE,
MASTER_ADDR/PORT and LOCAL_RANK, so `deepspeed.init_distributed` joins the job's
process group directly and `deepspeed.initialize` wraps the user's model and optimizer.
The options map to a DeepSpeed config; `config` (a raw DeepSpeed config dict) is merged
last, and the merged result is what `validate` checks before anything is reserved.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Layout, Strategy, StrategyConfigError, WorkerEnv, init_process_group, split_state
from .materialize import materialize_replica, on_meta
from .optional import installed
from .registry import register

INSTALL_HINT = "the deepspeed strategy needs DeepSpeed: pip install 'trainctl[deepspeed]' (or pip install deepspeed)"
ENGINE_DIR = "deepspeed"  # inside the checkpoint directory trainctl gives
TAG = "state"             # DeepSpeed's checkpoint tag (one per trainctl checkpoint directory)
PORTABLE_DIR = "tensors"  # the whole weights in the other strategies' format (see save_checkpoint)
_KEYS = "__deepspeed_keys__"


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as exc:
        raise StrategyConfigError(f"{INSTALL_HINT} ({exc})") from None
    return deepspeed


def _merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _enabled(section: Any) -> bool:
    return bool(section.get("enabled", False)) if isinstance(section, dict) else bool(section)


def _offload_device(section: Any) -> str:
    return str(section.get("device", "none")) if isinstance(section, dict) else "none"


@register("deepspeed")
class DeepSpeedStrategy(Strategy):
    RENAMED_OPTIONS = {"micro_batches": "microbatches"}  # one spelling with pipeline and hybrid

    @dataclass
    class Options:
        zero_stage: int | None = None              # 0-3; default 0, or 1 under pipeline_stages
        offload_optimizer: str | None = None       # "cpu": optimizer state and step on the CPU (ZeRO 1-3)
        offload_param: str | None = None           # "cpu": parameters on the CPU (ZeRO 3 only)
        gradient_accumulation_steps: int = 1       # optimizer.step() steps every N calls
        gradient_clipping: float = 0.0             # max global grad norm (0: off)
        bf16: bool = False
        fp16: bool = False                         # GPU only
        pipeline_stages: int = 1                   # >1: DeepSpeed's PipelineModule over the model's pipeline_layers()
        microbatches: int | None = None            # pipeline: each batch is split into this many (default 2 x stages)
        partition_method: str = "parameters"       # pipeline: how layers are balanced over stages
        backend: str = "auto"                      # gloo on CPU, nccl on GPU
        timeout_s: float = 600.0  # as every process-group strategy (strategies/base.py ProcessGroupOptions)
        portable_weights: bool = True              # also save whole weights as the other strategies do
        config: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed config, merged last

    # ---- before anything is reserved -------------------------------------------
    @classmethod
    def deepspeed_config(cls, options, layout: Layout) -> dict[str, Any]:
        """The DeepSpeed config the options describe, `options.config` merged over it."""
        o = options
        stages = o.pipeline_stages
        zero: dict[str, Any] = {"stage": o.zero_stage if o.zero_stage is not None else (1 if stages > 1 else 0)}
        pin = bool(layout.gpus_per_worker)  # pinned host memory needs CUDA
        if o.offload_optimizer:
            zero["offload_optimizer"] = {"device": o.offload_optimizer, "pin_memory": pin}
        if o.offload_param:
            zero["offload_param"] = {"device": o.offload_param, "pin_memory": pin}
        config = {
            # the batch a rank hands to train_step is one micro-batch (split into `microbatches`
            # under a pipeline); DeepSpeed uses this number only for its own bookkeeping there
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": (o.microbatches or 2 * stages) if stages > 1 else o.gradient_accumulation_steps,
            "gradient_clipping": o.gradient_clipping,
            "zero_optimization": zero,
            "bf16": {"enabled": o.bf16},
            "fp16": {"enabled": o.fp16},
            "zero_allow_untested_optimizer": True,   # the user's own torch optimizer
            "zero_force_ds_cpu_optimizer": False,    # ...also under CPU offload (no DeepSpeedCPUAdam build needed)
            "steps_per_print": 2**31 - 1,            # trainctl reports progress
            "dump_state": False,
        }
        merged = _merge(config, o.config or {})
        if "train_batch_size" in (o.config or {}) and "train_micro_batch_size_per_gpu" not in o.config:
            del merged["train_micro_batch_size_per_gpu"]  # DeepSpeed derives it from the global batch
        return merged

    @classmethod
    def validate(cls, layout: Layout, options) -> None:
        super().validate(layout, options)
        if not installed("deepspeed"):
            raise StrategyConfigError(INSTALL_HINT)
        o = options
        for name in ("offload_optimizer", "offload_param"):
            if getattr(o, name) not in (None, "cpu"):
                raise StrategyConfigError(f"{name} must be 'cpu' or null, not {getattr(o, name)!r} "
                                          "(NVMe offload: set it in options.config)")
        if o.pipeline_stages < 1:
            raise StrategyConfigError(f"pipeline_stages must be at least 1, not {o.pipeline_stages}")
        if o.pipeline_stages > 1 and layout.world_size % o.pipeline_stages:
            raise StrategyConfigError(f"pipeline_stages {o.pipeline_stages} does not divide the world size "
                                      f"{layout.world_size}")
        if o.microbatches is not None and o.pipeline_stages == 1:
            raise StrategyConfigError("microbatches is for pipelines; set pipeline_stages > 1 "
                                      "(without a pipeline use gradient_accumulation_steps)")
        if o.microbatches is not None and o.microbatches < 1:
            raise StrategyConfigError(f"microbatches must be at least 1, not {o.microbatches}")
        if o.pipeline_stages > 1 and o.gradient_accumulation_steps != 1:
            raise StrategyConfigError("under pipeline_stages each batch is split into microbatches; "
                                      "set microbatches instead of gradient_accumulation_steps")
        if o.gradient_accumulation_steps < 1:
            raise StrategyConfigError(f"gradient_accumulation_steps must be at least 1, not "
                                      f"{o.gradient_accumulation_steps}")
        if o.gradient_clipping < 0:
            raise StrategyConfigError(f"gradient_clipping must be >= 0, not {o.gradient_clipping}")
        if not isinstance(o.config, dict):
            raise StrategyConfigError("options.config must be a DeepSpeed config mapping")

        config = cls.deepspeed_config(o, layout)
        zero = config.get("zero_optimization") or {}
        stage = zero.get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise StrategyConfigError(f"zero_stage must be 0, 1, 2 or 3, not {stage!r}")
        if _offload_device(zero.get("offload_param")) not in ("none", "") and stage != 3:
            raise StrategyConfigError(f"offload_param needs zero_stage 3 (got zero_stage {stage}): only "
                                      "ZeRO-3 partitions parameters")
        if _offload_device(zero.get("offload_optimizer")) not in ("none", "") and stage == 0:
            raise StrategyConfigError("offload_optimizer needs zero_stage 1, 2 or 3 (got 0)")
        if o.pipeline_stages > 1 and stage > 1:
            raise StrategyConfigError(f"DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only, "
                                      f"not zero_stage {stage} with pipeline_stages {o.pipeline_stages}")
        bf16, fp16 = _enabled(config.get("bf16")), _enabled(config.get("fp16"))
        if bf16 and fp16:
            raise StrategyConfigError("choose one of bf16 and fp16, not both")
        if fp16 and not layout.gpus_per_worker:
            raise StrategyConfigError("fp16 needs a GPU (gpus_per_worker > 0); on CPU DeepSpeed trains in fp32 "
                                      "or bf16")
        if config.get("gradient_accumulation_steps", 1) < 1:
            raise StrategyConfigError("gradient_accumulation_steps must be at least 1")

    @classmethod
    def check_model(cls, model, layout: Layout, options) -> None:
        """A pipeline needs the model's layers in order (before anything is reserved)."""
        if options.pipeline_stages > 1:
            cls._layers(model, options.pipeline_stages)

    @staticmethod
    def _layers(model, stages: int) -> list:
        layers_of = getattr(model, "pipeline_layers", None)
        if not callable(layers_of):
            raise StrategyConfigError(f"pipeline_stages needs the model to list its layers: "
                                      f"{type(model).__name__} has no pipeline_layers() method")
        layers = list(layers_of())
        if len(layers) < stages:
            raise StrategyConfigError(f"{len(layers)} pipeline layers cannot fill {stages} stages")
        return layers

    # ---- inside the worker --------------------------------------------------------
    def setup(self, env: WorkerEnv) -> None:
        super().setup(env)
        deepspeed = _import_deepspeed()
        import torch

        # DeepSpeed reads the torchrun variables itself (engine, ZeRO): make them this rank's
        os.environ.update({
            "RANK": str(env.rank), "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.local_world_size), "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
        })
        # trainctl's process group (cpu:gloo,cuda:nccl on a GPU, so CPU tensors reduce too);
        # DeepSpeed adopts a group that exists instead of making its own pure-nccl one
        init_process_group(env, self.options.backend, self.options.timeout_s)
        deepspeed.init_distributed(
            dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False, verbose=False,
            timeout=datetime.timedelta(seconds=self.options.timeout_s),
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank, world_size=env.world_size,
        )
        self.engine = None
        self._optimizer = None
        self._loss_fn = None

    @property
    def _stages(self) -> int:
        return self.options.pipeline_stages

    # Ranks of one pipeline read the same batches. DeepSpeed's PipeDataParallelTopology
    # lays ranks out as (pipe, data), so rank = stage * data_parallel_size + data rank.
    @property
    def data_parallel_size(self) -> int:
        return (self.env.world_size // self._stages) if self.env else 1

    @property
    def data_parallel_rank(self) -> int:
        return (self.env.rank % self.data_parallel_size) if self.env else 0

    def prepare(self, model, optimizer=None):
        deepspeed = _import_deepspeed()
        layout = Layout(self.env.world_size, gpus_per_worker=1 if self.env.use_gpu else 0)
        config = self.deepspeed_config(self.options, layout)
        if on_meta(model):
            # DeepSpeed's engine is built from real tensors: a meta-built model gets its
            # weights in host memory, and only what this rank keeps goes to the device below
            model, optimizer = materialize_replica(model, optimizer, "cpu")
        # the user's names (and dtypes) of every tensor, for the portable copy of the weights
        # (a pipeline stage's PipelineModule names its layers by index; bf16 casts them)
        self._names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
        self._dtypes = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
        if self._stages > 1:
            model = self._pipeline_module(model)  # moves only this stage's layers to the device
            if optimizer is not None:
                optimizer = _keep_params(optimizer, model)
        elif config["zero_optimization"].get("stage", 0) == 3:
            # partitioned one parameter at a time (the engine would move the whole model to the
            # device first); zero.Init leaves the cast to bf16/fp16 to whoever built the module
            dtype = _engine_dtype(config)
            for p in model.parameters():
                if dtype is not None and p.is_floating_point():
                    p.data = p.data.to(dtype)
            deepspeed.zero.Init(module=model, config_dict_or_path=config, dtype=dtype)
        else:
            model = model.to(self.device)
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config,
            model_parameters=None if optimizer is not None else [p for p in model.parameters() if p.requires_grad],
        )
        self.engine = engine
        self._optimizer = EngineOptimizer(engine) if ds_optimizer is not None else None
        dtype = _engine_dtype(config)
        if dtype is not None:
            # the engine casts the module to bf16/fp16 but not its inputs: float features would
            # meet bf16 weights in the first matmul (DeepSpeed's own fp16.auto_cast is fp16 only)
            engine.module.register_forward_pre_hook(_cast_floating_inputs(dtype), with_kwargs=True)
        return engine, self._optimizer

    def _pipeline_module(self, model):
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        layers = self._layers(model, self._stages)
        topology = PipeDataParallelTopology(num_pp=self._stages, num_dp=self.data_parallel_size)
        return PipelineModule(layers=layers, topology=topology, loss_fn=self._pipeline_loss,
                              partition_method=self.options.partition_method)

    def _pipeline_loss(self, outputs, targets):
        return self._loss_fn(outputs, targets)

    def backward(self, loss) -> None:
        if self.engine is None:
            loss.backward()
        elif self._stages > 1:
            raise RuntimeError("under pipeline_stages DeepSpeed runs forward and backward itself: "
                               "write the training step as ctx.train_step(model, optimizer, inputs, "
                               "targets, loss_fn)")
        else:
            self.engine.backward(loss)

    def train_step(self, model, optimizer, inputs, targets, loss_fn):
        """Non-pipeline: forward, engine.backward, engine.step (which steps the optimizer
        only at a gradient-accumulation boundary). Pipeline: the batch is split into
        `microbatches` and engine.train_batch runs DeepSpeed's 1F1B schedule over them."""
        engine = self.engine
        if self._stages == 1:
            loss = loss_fn(engine(inputs), targets)
            engine.backward(loss)
            engine.step()
            return loss.detach()
        self._loss_fn = loss_fn
        n = engine.gradient_accumulation_steps()
        if len(inputs) % n:
            raise ValueError(f"a batch of {len(inputs)} does not split into {n} pipeline micro-batches")
        micro = zip(inputs.chunk(n), targets.chunk(n), strict=True)
        engine.train_batch(data_iter=iter(micro))
        return engine.dp_group_loss.detach().reshape(())  # this rank's batch, on every stage

    def unwrap(self, model):
        return getattr(model, "module", model)

    # ---- checkpoints: DeepSpeed's own sharded format ------------------------------
    def _is_engine(self, value) -> bool:
        return self.engine is not None and (value is self.engine or value is self._optimizer)

    def save_checkpoint(self, state: dict[str, Any], directory: Path) -> None:
        """The engine (module, ZeRO partitions of optimizer state, each rank its own file)
        goes through engine.save_checkpoint into `directory/deepspeed`; everything else as
        the base strategy saves it (rank 0's extra.pt)."""
        engine_keys = [k for k, v in state.items() if self._is_engine(v)]
        others = {k: v for k, v in state.items() if k not in engine_keys}
        if engine_keys:
            self.engine.save_checkpoint(str(Path(directory) / ENGINE_DIR), tag=TAG, save_latest=False)
            other_modules, other_optimizers, _ = split_state(others)
            if self.options.portable_weights and not (other_modules or other_optimizers):
                module_key = next(k for k in engine_keys if state[k] is self.engine)
                self._save_portable_weights(module_key, Path(directory) / PORTABLE_DIR)
        super().save_checkpoint({**others, _KEYS: engine_keys}, directory)

    @contextlib.contextmanager
    def _whole_weights(self, modifier_rank: int | None = None):
        """The engine module's tensors under the user's names, whole for the block: ZeRO-3
        gathers its partitioned parameters (and, given modifier_rank, partitions again what
        that rank wrote); a pipeline stage has only its own layers."""
        module = self.engine.module
        named = {self._names[id(t)]: t for t in [*module.parameters(), *module.buffers()] if id(t) in self._names}
        partitioned = [t for t in named.values() if hasattr(t, "ds_tensor")]
        if not partitioned:
            yield named
            return
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(partitioned, modifier_rank=modifier_rank):
            yield named

    def _save_portable_weights(self, key: str, path: Path) -> None:
        """The model's whole weights under the user's parameter names, as the other
        strategies save them (torch.distributed.checkpoint, `<key>.<name>`), so that
        post-training passes and jobs under other strategies can read the checkpoint.

        Under bf16/fp16 a parameter's weights are DeepSpeed's fp32 master copy (ZeRO: its
        partitions gathered), not the module's low-precision rounding of it, so another
        strategy resumes at full precision; buffers go back to the dtype they were built in."""
        import torch.distributed.checkpoint as dcp

        with self._whole_weights() as named:
            tensors = {}
            for name, t in named.items():
                master = self._master_weights(t)
                tensors[f"{key}.{name}"] = (master if master is not None else t.detach().to(self._dtypes[name])).cpu()
            dcp.save({"model": tensors}, checkpoint_id=str(path))

    def _master_weights(self, tensor):
        """A parameter's whole fp32 master copy, or None where DeepSpeed keeps none (fp32
        without ZeRO, a frozen parameter, a buffer). Collective under ZeRO: all ranks call it."""
        import torch
        from deepspeed.utils import safe_get_full_fp32_param

        if not isinstance(tensor, torch.nn.Parameter) or self.engine.optimizer is None:
            return None
        return safe_get_full_fp32_param(tensor)

    def load_checkpoint(self, directory: Path, into: dict[str, Any] | None = None) -> dict[str, Any]:
        into = into or {}
        engine_keys = [k for k, v in into.items() if self._is_engine(v)]
        result = super().load_checkpoint(directory, {k: v for k, v in into.items() if k not in engine_keys})
        saved_keys = result.pop(_KEYS, None)
        if engine_keys:
            path = Path(directory) / ENGINE_DIR
            if saved_keys is not None and (path / TAG).exists():
                load_path, _ = self.engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                                           load_lr_scheduler_states=True)
                if load_path is None:
                    raise RuntimeError(f"DeepSpeed could not load its checkpoint from {path}")
            elif (Path(directory) / PORTABLE_DIR).exists():
                module_key = next(k for k in engine_keys if into[k] is self.engine)
                self._load_portable_weights(module_key, Path(directory) / PORTABLE_DIR)
            else:
                raise StrategyConfigError(f"checkpoint {directory} holds neither DeepSpeed's state nor model "
                                          f"tensors ({ENGINE_DIR}/ or {PORTABLE_DIR}/)")
            result.update({k: into[k] for k in engine_keys})
        return result

    def _load_portable_weights(self, key: str, path: Path) -> None:
        """Weights another strategy saved (torch.distributed.checkpoint, `<key>.<name>`) into
        the engine's module and DeepSpeed's fp32 master copy (the saved values, unrounded). The
        optimizer state is not carried: it would have to be cut into ZeRO's flat partitions."""
        import torch
        import torch.distributed.checkpoint as dcp
        from deepspeed.utils import safe_set_full_fp32_param

        with self._whole_weights(modifier_rank=0) as named, torch.no_grad():
            # in the dtypes the model was built in: a bf16 engine's master copy takes the saved
            # fp32 values themselves, its module their rounding
            target = {f"{key}.{name}": torch.empty(t.shape, dtype=self._dtypes[name]) for name, t in named.items()}
            dcp.load({"model": target}, checkpoint_id=str(path), no_dist=True)
            for name, t in named.items():
                t.copy_(target[f"{key}.{name}"])
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()
        with torch.no_grad():
            for name, t in named.items():
                if isinstance(t, torch.nn.Parameter):
                    safe_set_full_fp32_param(t, target[f"{key}.{name}"].float())
        if self.env.rank == 0:
            print(f"[trainctl] deepspeed: loaded the weights of {path.parent}, saved by another strategy; "
                  "the optimizer state starts fresh", flush=True)

    # ---- collectives through deepspeed.comm ----------------------------------------
    def all_reduce(self, tensor, op: str = "sum"):
        from deepspeed import comm

        if not comm.is_initialized():
            return tensor
        ops = {"sum": comm.ReduceOp.SUM, "mean": comm.ReduceOp.SUM, "max": comm.ReduceOp.MAX,
               "min": comm.ReduceOp.MIN}
        comm.all_reduce(tensor, op=ops[op])
        if op == "mean":
            tensor /= comm.get_world_size()
        return tensor

    def broadcast(self, tensor, src: int = 0):
        from deepspeed import comm

        if comm.is_initialized():
            comm.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        from deepspeed import comm

        if comm.is_initialized():
            comm.barrier()

    def teardown(self) -> None:
        self.engine = self._optimizer = None
        super().teardown()
        try:  # forget DeepSpeed's communication backend, so the process could join another group
            import deepspeed.comm.comm as ds_comm

            ds_comm.cdb = None
        except ImportError:
            pass

    # ---- what this rank holds -------------------------------------------------------
    def local_state_bytes(self, model=None, optimizer=None) -> dict[str, int]:
        """Bytes this rank holds: parameters (only its ZeRO-3 partition), DeepSpeed's fp32
        master partition, and optimizer state (only its ZeRO partition)."""
        import torch

        engine = self.engine

        def nbytes(t) -> int:
            return t.numel() * t.element_size()

        params = 0
        for p in engine.module.parameters():
            params += nbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else nbytes(p)
        zero = engine.optimizer
        master = 0
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            for t in getattr(zero, name, None) or []:
                master += nbytes(t)
        inner = getattr(zero, "optimizer", zero)
        optim = 0
        for st in getattr(inner, "state", {}).values():
            optim += sum(nbytes(v) for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
        return {"params": params, "master": master, "optimizer": optim, "total": params + master + optim}


def _engine_dtype(config: dict):
    """The dtype DeepSpeed casts the module to under this config (None: fp32)."""
    import torch

    if _enabled(config.get("bf16")):
        return torch.bfloat16
    if _enabled(config.get("fp16")):
        return torch.float16
    return None


def _cast_floating_inputs(dtype):
    """A forward pre-hook: floating tensors among the inputs in `dtype` (token ids stay ints)."""
    import torch
    from torch.utils._pytree import tree_map

    def cast(value):
        if torch.is_tensor(value) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        return value

    def hook(module, args, kwargs):
        return tree_map(cast, args), tree_map(cast, kwargs)

    return hook


def _keep_params(optimizer, model):
    """The same optimizer over only the parameters `model` (this pipeline stage) holds."""
    keep = {id(p) for p in model.parameters()}
    groups = []
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if id(p) in keep]
        if params:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    return type(optimizer)(groups)


class EngineOptimizer:
    """What `prepare` returns as the optimizer: `step()` is the engine's step, so a loop
    written as `ctx.backward(loss); optimizer.step()` runs DeepSpeed's step (gradient
    reduction, clipping, ZeRO update, accumulation boundaries). `zero_grad()` does nothing:
    the engine clears gradients after each boundary step, and clearing them in between
    would throw away accumulated micro-batches."""

    def __init__(self, engine):
        self.engine = engine

    def step(self, closure=None):
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    @property
    def param_groups(self):
        return self.engine.optimizer.param_groups

    @property
    def state(self):
        return getattr(self.engine.optimizer, "state", {})

    def state_dict(self):
        return self.engine.optimizer.state_dict()

    def load_state_dict(self, state):
        self.engine.optimizer.load_state_dict(state)

    def __repr__(self) -> str:
        return f"EngineOptimizer({type(self.engine.optimizer).__name__})"
