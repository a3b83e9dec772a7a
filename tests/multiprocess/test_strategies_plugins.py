"""The GPT example under DeepSpeed (ZeRO 1, 2, 3, ZeRO-3 with CPU offload, the pipeline
engine) and Horovod on 2 real gloo ranks, against the single-process reference. Nothing
is mocked: the real libraries reduce the gradients, partition the state and checkpoint.

Tolerance (1e-4 absolute on losses going 5.7 -> 2.9): every layout computes the same
fp32 math and differs only in the order floating-point sums are taken (gradients
reduced over 2 ranks, or over 4 pipeline micro-batches, instead of summed in one
batch; ZeRO's flat buffers), about 1e-7 relative per step, which Adam's normalisation
amplifies a little over 20 steps. Observed here: at most ~5e-7 (see the printed max
|delta|). One training step moves the loss by ~0.05, so 1e-4 still catches any real
divergence (a wrong gradient scale, a skipped or doubled step, a stale replica).
bf16 rounds every activation to 8 mantissa bits (~0.4 %), so it gets 0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing as mp

from examples.gpt.data import corpus, sequences
from orchestrator.data.writer import shard_dataset
from strategies import StrategyConfigError, get_strategy_class
from strategies.base import Layout

from .. import gpt_ranks, plugin_ranks
from ..gpt_ranks import STEPS, dataset, local_bytes, loss_of, make_model
from ..helpers import REPO

pytestmark = pytest.mark.timeout(600)  # the first DeepSpeed start compiles one C++ op (~1 min, then cached)
TOL = 1e-4


def _require(module: str) -> None:
    """CI installs both extras (make setup), so there a missing one fails; elsewhere it skips."""
    if os.environ.get("CI"):
        __import__(module)
    else:
        pytest.importorskip(module, reason=f"{module} is not installed (make setup installs it)")


needs_deepspeed = pytest.mark.usefixtures("_deepspeed")
needs_horovod = pytest.mark.usefixtures("_horovod")


@pytest.fixture(scope="module")
def _deepspeed():
    _require("deepspeed")


@pytest.fixture(scope="module")
def _horovod():
    _require("horovod.torch")


# name -> (strategy, options)
LAYOUTS = {
    "ddp": ("ddp", {}),
    "zero1": ("deepspeed", {"zero_stage": 1}),
    "zero2": ("deepspeed", {"zero_stage": 2}),
    "zero3": ("deepspeed", {"zero_stage": 3}),
    "zero3_offload": ("deepspeed", {"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"}),
    "pipeline": ("deepspeed", {"pipeline_stages": 2, "microbatches": 4}),
    "horovod": ("horovod", {}),
}


@pytest.fixture(scope="module")
def gpt_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    import pyarrow as pa

    table = sequences(corpus(200_000), seq=32)
    with pa.OSFile(str(root / "src.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    shard_dataset([str(root / "src.arrow")], str(root / "ds"), rows_per_shard=1000)
    return str(root / "ds")


def _reference(gpt_data, shares: int) -> dict:
    """One process; each step's batch is every data-parallel share's batch, concatenated."""
    torch.set_num_threads(1)
    its = [iter(dataset(gpt_data, r, shares)) for r in range(shares)]
    model = make_model(32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(STEPS + 2):
        loss = loss_of(model, torch.cat([next(s)["tokens"] for s in its]).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "bytes": local_bytes(model)}


@pytest.fixture(scope="module")
def reference(gpt_data):
    return _reference(gpt_data, 2)


@pytest.fixture(scope="module")
def reference_one_replica(gpt_data):
    """The pipeline's 2 ranks hold halves of one replica and read the same batches."""
    return _reference(gpt_data, 1)


def run(name: str, data: str, out, steps: int = STEPS, resume=None, options: dict | None = None) -> dict:
    strategy, opts = LAYOUTS[name]
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(plugin_ranks.run_rank, nprocs=2, start_method="spawn", join=True,
                       args=(2, gpt_ranks.free_port(), strategy, options or opts, data, str(out), steps,
                             str(resume) if resume else None))
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(2)}


@pytest.fixture(scope="module")
def runs(gpt_data, tmp_path_factory, _deepspeed, _horovod):
    """Every layout trains 20 steps once; the tests below read the results."""
    out = {}
    for name in LAYOUTS:
        d = tmp_path_factory.mktemp(name)
        out[name] = (run(name, gpt_data, d), d)
    return out


def _max_delta(losses, reference_losses) -> float:
    assert len(losses) == STEPS
    return max(abs(a - b) for a, b in zip(losses, reference_losses[:STEPS], strict=True))


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload", "horovod"])
def test_first_20_losses_match_the_single_process_reference(runs, reference, name):
    result = runs[name][0]
    assert result[0]["losses"] == result[1]["losses"]  # the reported loss is the global mean
    delta = _max_delta(result[0]["losses"], reference["losses"])
    print(f"{name}: max |loss - reference| over {STEPS} steps = {delta:.2e}")
    assert delta < TOL
    assert result[0]["losses"][-1] < result[0]["losses"][0] - 0.5  # and it does learn


def test_deepspeed_pipeline_matches_the_one_replica_reference(runs, reference_one_replica):
    """PipelineModule over GPT.pipeline_layers() (embeddings + block 0 | block 1 + head),
    each batch of 8 split into 4 micro-batches, ZeRO-1 over the data-parallel size of 1."""
    result = runs["pipeline"][0]
    delta = _max_delta(result[0]["losses"], reference_one_replica["losses"])
    print(f"pipeline: max |loss - reference| over {STEPS} steps = {delta:.2e}")
    assert delta < TOL
    # each stage holds only its layers: both together are the whole model, neither is
    whole = reference_one_replica["bytes"]
    assert result[0]["bytes"]["params"] + result[1]["bytes"]["params"] == whole
    assert max(result[r]["bytes"]["params"] for r in range(2)) < 0.6 * whole


def test_zero3_holds_at_most_055_of_ddps_parameter_bytes_per_rank(runs):
    ddp = runs["ddp"][0][0]["bytes"]["params"]
    for name in ("zero3", "zero3_offload"):
        zero3 = max(runs[name][0][r]["bytes"]["params"] for r in range(2))
        print(f"per-rank parameter bytes: {name} {zero3}, ddp {ddp}, ratio {zero3 / ddp:.3f}; "
              f"{name} total with fp32 master and Adam state {runs[name][0][0]['bytes']['total']}")
        assert zero3 <= 0.55 * ddp, (zero3, ddp)
    # ZeRO-1/2 keep whole parameters; their optimizer state is what they split
    zero2 = runs["zero2"][0][0]["bytes"]
    assert zero2["params"] == ddp and zero2["optimizer"] <= 0.55 * 2 * ddp


def test_deepspeed_checkpoints_are_deepspeeds_own_sharded_files(runs):
    files = {p.name for p in (runs["zero3"][1] / "ckpt" / "deepspeed" / "state").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= files
    assert (runs["zero3"][1] / "ckpt" / "extra.pt").exists()
    pipe = {p.name for p in (runs["pipeline"][1] / "ckpt" / "deepspeed" / "state").iterdir()}
    assert {"layer_00-model_states.pt", "layer_03-model_states.pt"} <= pipe  # each stage its layers


@pytest.mark.parametrize("name", ["zero3", "pipeline", "horovod"])
def test_resuming_from_the_checkpoint_continues_the_reference(runs, reference, reference_one_replica,
                                                              gpt_data, tmp_path, name):
    """Fresh ranks load step 20's checkpoint and take step 21: its loss is the reference's."""
    result = run(name, gpt_data, tmp_path, steps=1, resume=runs[name][1] / "ckpt")
    expected = (reference_one_replica if name == "pipeline" else reference)["losses"][STEPS]
    assert abs(result[0]["losses"][0] - expected) < TOL, (result[0]["losses"][0], expected)


@pytest.mark.parametrize("resumed", ["ddp", "horovod"])
def test_other_strategies_start_from_a_deepspeed_checkpoints_weights(runs, gpt_data, tmp_path, resumed):
    """The whole weights a deepspeed job saves beside its own files load into other
    strategies' jobs; its optimizer state is DeepSpeed's own, so theirs starts fresh."""
    expected = _fresh_adam_steps(runs["zero3"][1] / "ckpt", gpt_data, 2)
    result = run(resumed, gpt_data, tmp_path, steps=2, resume=runs["zero3"][1] / "ckpt")
    assert result[0]["losses"] == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("saved, resumed", [("ddp", "horovod"), ("horovod", "ddp")])
def test_horovod_and_ddp_resume_from_each_others_checkpoints(runs, reference, gpt_data, tmp_path, saved, resumed):
    """Both write the same files: the weights and the Adam state carry across, so steps 21
    and 22 (the second one moved by the restored optimizer state) are the reference's."""
    result = run(resumed, gpt_data, tmp_path, steps=2, resume=runs[saved][1] / "ckpt")
    assert result[0]["losses"] == pytest.approx(reference["losses"][STEPS:STEPS + 2], abs=TOL)


@needs_deepspeed
def test_bf16_on_cpu_trains_close_to_the_fp32_reference(gpt_data, reference, tmp_path):
    result = run("zero2", gpt_data, tmp_path, options={"zero_stage": 2, "bf16": True})
    delta = _max_delta(result[0]["losses"], reference["losses"])
    print(f"zero2 bf16: max |loss - reference| = {delta:.2e}")
    assert delta < 0.1


def _check(strategy: str, options: dict, workers: int = 2, gpus: float = 0):
    cls = get_strategy_class(strategy)
    cls.validate(Layout(workers, gpus_per_worker=gpus), cls.parse_options(options))


@needs_deepspeed
@pytest.mark.parametrize("options, message", [
    ({"zero_stag": 2}, "unknown option 'zero_stag' for strategy 'deepspeed'"),
    ({"zero_stage": 4}, "zero_stage must be 0, 1, 2 or 3, not 4"),
    ({"zero_stage": 2, "offload_param": "cpu"}, "offload_param needs zero_stage 3"),
    ({"offload_optimizer": "cpu"}, "offload_optimizer needs zero_stage 1, 2 or 3"),
    ({"zero_stage": 3, "offload_param": "disk"}, "offload_param must be 'cpu' or null"),
    ({"pipeline_stages": 2, "zero_stage": 2}, "pipeline engine supports ZeRO stage 0 or 1 only"),
    ({"pipeline_stages": 3}, "pipeline_stages 3 does not divide the world size 2"),
    ({"microbatches": 4}, "microbatches is for pipelines"),
    ({"pipeline_stages": 2, "gradient_accumulation_steps": 2}, "set microbatches instead"),
    ({"fp16": True}, "fp16 needs a GPU"),
    ({"bf16": True, "config": {"fp16": {"enabled": True}}}, "choose one of bf16 and fp16"),
    ({"zero_stage": 1, "config": {"zero_optimization": {"offload_param": {"device": "cpu"}}}},
     r"offload_param needs zero_stage 3 \(got zero_stage 1\)"),  # the raw config is checked merged
    ({"gradient_clipping": -1.0}, "gradient_clipping must be >= 0"),
    ({"zero_stage": "two"}, "option 'zero_stage' of strategy 'deepspeed'"),
])
def test_bad_deepspeed_options_are_rejected_in_one_line(options, message):
    with pytest.raises(StrategyConfigError, match=message) as err:
        _check("deepspeed", options)
    assert "\n" not in str(err.value)


@needs_deepspeed
def test_good_deepspeed_options_pass_and_map_to_a_deepspeed_config():
    _check("deepspeed", {"fp16": True, "zero_stage": 3, "offload_param": "cpu"}, gpus=1)
    cls = get_strategy_class("deepspeed")
    options = cls.parse_options({"zero_stage": 3, "offload_optimizer": "cpu", "gradient_accumulation_steps": 4,
                                 "gradient_clipping": 1.0, "bf16": True,
                                 "config": {"zero_optimization": {"overlap_comm": True}}})
    config = cls.deepspeed_config(options, Layout(2))
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True,
                                           "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert config["gradient_accumulation_steps"] == 4 and config["gradient_clipping"] == 1.0
    assert config["bf16"] == {"enabled": True}
    pipe = cls.deepspeed_config(cls.parse_options({"pipeline_stages": 2}), Layout(4))
    assert pipe["zero_optimization"]["stage"] == 1 and pipe["gradient_accumulation_steps"] == 4


@needs_horovod
@pytest.mark.parametrize("options, message", [
    ({"op": "adasum"}, "op must be one of average, sum"),
    ({"backward_passes_per_step": 0}, "backward_passes_per_step must be at least 1"),
    ({"fp16_compresion": True}, "unknown option 'fp16_compresion' for strategy 'horovod'"),
])
def test_bad_horovod_options_are_rejected_in_one_line(options, message):
    with pytest.raises(StrategyConfigError, match=message):
        _check("horovod", options)


def test_a_job_spec_with_bad_options_is_rejected_before_reserving(tmp_path):
    from orchestrator.client.api import resolve
    from orchestrator.errors import SpecError
    from orchestrator.spec import JobSpec

    from ..helpers import job_spec

    _require("deepspeed")
    spec = JobSpec.model_validate(job_spec("bad", "examples.gpt.train:train", tmp_path, strategy={
        "name": "deepspeed", "options": {"zero_stage": 1, "offload_param": "cpu"}}))
    with pytest.raises(SpecError, match="^strategy: offload_param needs zero_stage 3"):
        resolve(spec)


@pytest.mark.parametrize("strategy, hint", [("deepspeed", "pip install 'trainctl\\[deepspeed\\]'"),
                                            ("horovod", "cluster/deploy/build_horovod.sh")])
def test_without_the_library_choosing_the_strategy_gives_an_install_hint(strategy, hint):
    """A fresh interpreter in which the library cannot be imported."""
    code = (f"import sys; sys.modules['{strategy}'] = None\n"
            "from strategies import get_strategy_class, StrategyConfigError\n"
            "from strategies.base import Layout\n"
            f"cls = get_strategy_class('{strategy}')\n"
            "try:\n    cls.validate(Layout(2), cls.parse_options({}))\n"
            "except StrategyConfigError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and "needs" in lines[0]
    import re

    assert re.search(hint, lines[0])


def test_slot_plan_matches_horovods_own_host_assignment():
    """Our plan for (node, local rank) members equals horovodrun's for the same hosts."""
    _require("horovod.torch")
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    from strategies.horovod import slot_plan

    members = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]  # 2 + 2 + 1 ranks on 3 nodes
    ours = slot_plan(members)
    theirs = get_host_assignments(parse_hosts("node0:2,node1:2,node2:1"), 5)
    assert ours == [vars(s) for s in theirs]


def _batches_after(gpt_data, shares: int, steps: int):
    """Each step's batch (every data-parallel share's, concatenated) after the first `steps`."""
    its = [iter(dataset(gpt_data, r, shares)) for r in range(shares)]
    for _ in range(steps):
        for s in its:
            next(s)
    while True:
        yield torch.cat([next(s)["tokens"] for s in its]).long()


@contextmanager
def _model_on_one_process(checkpoint):
    """The GPT example loaded from `checkpoint` by a plain DDP process (world size 1)."""
    from strategies import WorkerEnv

    cls = get_strategy_class("ddp")
    strategy = cls(cls.parse_options({}))
    strategy.setup(WorkerEnv(rank=0, world_size=1, master_port=gpt_ranks.free_port()))
    try:
        model, _ = strategy.prepare(make_model(32))
        state = strategy.load_checkpoint(checkpoint, {"model": model})
        assert state["step"] == STEPS
        yield model
    finally:
        strategy.teardown()


@pytest.mark.parametrize("name", ["zero3", "pipeline"])
def test_deepspeed_checkpoint_weights_load_under_ddp_on_one_process(runs, reference, reference_one_replica,
                                                                     gpt_data, name):
    """Beside DeepSpeed's files, the whole weights are saved under the model's own names
    (ZeRO-3 gathered, each pipeline stage its layers), as the other strategies save them:
    one plain process loads them, and its loss on batch 21 is the reference's."""
    shares = 1 if name == "pipeline" else 2
    expected = (reference_one_replica if name == "pipeline" else reference)["losses"][STEPS]
    with _model_on_one_process(runs[name][1] / "ckpt") as model, torch.no_grad():
        assert abs(loss_of(model, next(_batches_after(gpt_data, shares, STEPS))).item() - expected) < TOL


def _fresh_adam_steps(checkpoint, gpt_data, shares: int) -> list[float]:
    """Losses of steps 21 and 22 in one plain process: the checkpoint's weights, a fresh AdamW."""
    with _model_on_one_process(checkpoint) as model:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _, tokens in zip(range(2), _batches_after(gpt_data, shares, STEPS), strict=False):
            loss = loss_of(model, tokens)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload", "pipeline"])
def test_deepspeed_starts_from_another_strategys_checkpoint(runs, reference, gpt_data, tmp_path, name):
    """A ddp checkpoint's weights go into DeepSpeed's engine (ZeRO-3: into its partitions; a
    pipeline stage: its layers) and its fp32 master copy; the optimizer starts fresh. Steps 21
    and 22 are those of one plain process that loads the same weights into a fresh AdamW."""
    shares = 1 if name == "pipeline" else 2  # the pipeline's ranks read the same batches
    expected = _fresh_adam_steps(runs["ddp"][1] / "ckpt", gpt_data, shares)
    if shares == 2:
        assert expected[0] == pytest.approx(reference["losses"][STEPS], abs=TOL)
    result = run(name, gpt_data, tmp_path, steps=2, resume=runs["ddp"][1] / "ckpt")
    assert result[0]["losses"] == pytest.approx(expected, abs=TOL)


@needs_deepspeed
def test_a_deepspeed_pipeline_needs_the_models_layers_before_reserving(tmp_path):
    cls = get_strategy_class("deepspeed")
    options = cls.parse_options({"pipeline_stages": 2})
    with pytest.raises(StrategyConfigError, match="Sequential has no pipeline_layers"):
        cls.check_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), Layout(2), options)
    cls.check_model(make_model(32, meta=True), Layout(2), options)  # embeddings, 2 blocks, head: 4 layers
    with pytest.raises(StrategyConfigError, match="4 pipeline layers cannot fill 8 stages"):
        cls.check_model(make_model(32, meta=True), Layout(8), cls.parse_options({"pipeline_stages": 8}))


def _reference_accumulating(gpt_data, passes: int, clip: float | None, calls: int) -> list[float]:
    """One process; an optimizer step every `passes` calls, on the mean gradient of those
    calls' global batches (each call: rank 0's batch + rank 1's), clipped to norm `clip`.
    Returns every call's loss, as the ranks report them (weights of the last step)."""
    torch.set_num_threads(1)
    its = [iter(dataset(gpt_data, r, 2)) for r in range(2)]
    model = make_model(32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for call in range(calls):
        if call % passes == 0:
            optimizer.zero_grad()
        loss = loss_of(model, torch.cat([next(s)["tokens"] for s in its]).long())
        (loss / passes).backward()
        losses.append(loss.item())
        if call % passes == passes - 1:
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
    return losses


@pytest.mark.parametrize("strategy, options, clip", [
    ("deepspeed", {"zero_stage": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5}, 0.5),
    ("horovod", {"backward_passes_per_step": 2}, None),
])
def test_accumulation_and_clipping_options_do_what_they_say(gpt_data, tmp_path, strategy, options, clip):
    """gradient_accumulation_steps / backward_passes_per_step 2: a step every 2 calls on the
    mean gradient (DeepSpeed also clips the global norm): the same losses as one process."""
    _require("deepspeed" if strategy == "deepspeed" else "horovod.torch")
    result = run("zero2" if strategy == "deepspeed" else "horovod", gpt_data, tmp_path, options=options)
    expected = _reference_accumulating(gpt_data, 2, clip, STEPS)
    delta = max(abs(a - b) for a, b in zip(result[0]["losses"], expected, strict=True))
    print(f"{strategy} {options}: max |loss - reference| = {delta:.2e}")
    assert delta < TOL
    assert result[0]["losses"][0] == pytest.approx(expected[0]) and result[0]["losses"][1] != result[0]["losses"][2]


@needs_horovod
def test_horovod_fp16_compression_trains_close_to_the_reference(gpt_data, reference, tmp_path):
    result = run("horovod", gpt_data, tmp_path, options={"fp16_compression": True})
    delta = _max_delta(result[0]["losses"], reference["losses"])
    print(f"horovod fp16 compression: max |loss - reference| = {delta:.2e}")
    # gradients cross the wire as fp16 (~5e-4 relative rounding), which Adam's per-parameter
    # normalisation mostly cancels: observed ~5e-6; 1e-3 is still 50x below one step's change
    assert delta < 1e-3
    assert result[0]["losses"] == result[1]["losses"]


@pytest.mark.parametrize("path", ["examples/gpt/deepspeed.yaml", "examples/gpt/deepspeed-zero3-offload.yaml",
                                  "examples/gpt/deepspeed-pipeline.yaml", "examples/gpt/horovod.yaml",
                                  "examples/digits/deepspeed.yaml", "examples/digits/deepspeed-zero3-offload.yaml",
                                  "examples/digits/horovod.yaml"])
def test_example_jobs_pass_the_strategy_checks(path):
    """The checks `trainctl run` makes before reserving (options, layout, the model's layers)."""
    from orchestrator.client.api import _check_strategy
    from orchestrator.spec import load_spec

    spec = load_spec(REPO / path)
    _require("deepspeed" if spec.strategy.name == "deepspeed" else "horovod.torch")
    _check_strategy(spec, REPO)
