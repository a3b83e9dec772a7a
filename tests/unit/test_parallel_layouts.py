"""Mesh sizes, pipeline splits and their errors: checked before anything is reserved."""

from __future__ import annotations

import pytest
import torch

from examples.gpt.train import build_model
from strategies import StrategyConfigError, get_strategy_class
from strategies.base import Layout
from strategies.hybrid import ParallelDims
from strategies.stages import keep_only, stage_units, units


def gpt(layers=2):
    with torch.device("meta"):
        return build_model({"layers": layers, "dim": 64, "heads": 4})


def check(name: str, world: int, model=None, **options):
    cls = get_strategy_class(name)
    opts = cls.parse_options(options)
    cls.validate(Layout(world), opts)
    if model is not None:
        cls.check_model(model, Layout(world), opts)
    return opts


def test_parallel_dims_fill_the_free_dimension_and_reject_what_does_not_divide():
    assert ParallelDims.resolve(8, pp=2, dp=-1, tp=2) == ParallelDims(pp=2, dp=2, tp=2)
    with pytest.raises(StrategyConfigError, match="world size 6 is not divisible by the mesh"):
        ParallelDims.resolve(6, pp=1, dp=-1, tp=4)
    with pytest.raises(StrategyConfigError, match="has 4 ranks but the job has 2 workers"):
        ParallelDims.resolve(2, pp=2, dp=1, tp=2)
    with pytest.raises(StrategyConfigError, match="only one mesh dimension may be -1"):
        ParallelDims.resolve(4, pp=-1, dp=-1, tp=1)
    with pytest.raises(StrategyConfigError, match="must be ≥ 1"):
        ParallelDims.resolve(4, pp=0, dp=-1, tp=1)


def test_units_and_stages_of_the_gpt_example():
    model = gpt(layers=4)
    assert units(model) == ["tok", "pos", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "ln", "head"]
    assert stage_units(model, None, 2) == [["tok", "pos", "blocks.0", "blocks.1"], ["blocks.2", "blocks.3", "ln", "head"]]
    assert stage_units(model, ["blocks.3"], 2)[1] == ["blocks.3", "ln", "head"]


def test_a_stage_keeps_whole_model_parameter_names():
    model = gpt()
    keep_only(model, {"blocks.1", "ln", "head"})
    names = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "") for n, _ in model.named_parameters()}
    assert names == {"blocks.1", "ln", "head"}
    assert model.tok is None and model.blocks[0] is None


def test_a_shallow_stage_view_shares_parameters_and_leaves_the_model_whole():
    model = gpt()
    view = keep_only(model, {"tok", "pos", "blocks.0"}, copy_modules=True)
    assert model.blocks[1] is not None and model.head is not None  # untouched
    assert view.blocks[1] is None and view.head is None
    assert view.blocks[0] is model.blocks[0]


def test_split_point_that_does_not_exist_is_named():
    with pytest.raises(StrategyConfigError, match="split point 'blocks.9' is not a module of the model"):
        check("pipeline", 2, gpt(), split_points=["blocks.9"])


def test_split_points_must_match_the_number_of_stages():
    with pytest.raises(StrategyConfigError, match="2 split points make 3 pipeline stages, but the layout has 2"):
        check("pipeline", 2, gpt(), split_points=["blocks.0", "blocks.1"])
    with pytest.raises(StrategyConfigError, match="cannot make 4 pipeline stages"):
        check("pipeline", 2, gpt(), schedule="interleaved_1f1b")


def test_schedule_options_are_checked():
    with pytest.raises(StrategyConfigError, match="schedule 'zigzag' is not one of"):
        check("pipeline", 2, schedule="zigzag")
    with pytest.raises(StrategyConfigError, match="at least as many microbatches as pipeline stages"):
        check("pipeline", 4, schedule="1f1b", microbatches=2)
    with pytest.raises(StrategyConfigError, match="unknown option 'stages'"):
        check("pipeline", 2, stages=2)


def test_hybrid_mesh_must_fit_the_world_size():
    with pytest.raises(StrategyConfigError, match="has 8 ranks but the job has 4 workers"):
        check("hybrid", 4, dp=2, tp=2, pp=2)
    check("hybrid", 8, gpt(), dp=2, tp=2, pp=2)


def test_hybrid_tensor_plan_is_checked_against_the_model():
    with pytest.raises(StrategyConfigError, match="does not have"):
        check("hybrid", 4, gpt(), tp=2, plan="tests.multiprocess.test_strategies_gpt:bad_plan")
    with pytest.raises(StrategyConfigError, match="do not split over 8"):
        check("hybrid", 8, gpt(), tp=8)


def test_tensor_parallel_groups_are_colocated():
    cls = get_strategy_class("hybrid")
    assert cls.colocated_ranks(cls.parse_options({"tp": 2})) == 2
    assert get_strategy_class("ddp").colocated_ranks(None) == 1


def test_colocated_groups_become_one_bundle_each():
    from cluster.gang import bundles

    assert bundles(4, 1, 0, colocate=2) == [{"CPU": 2}, {"CPU": 2}]
    assert bundles(4, 1, 0.5, colocate=4) == [{"CPU": 4, "GPU": 2.0}]


def test_a_colocated_job_is_scheduled_as_groups_and_says_so():
    from orchestrator.control.planning import demand_of
    from orchestrator.spec import JobSpec

    spec = JobSpec(name="h", entrypoint="m:f", resources={"workers": 4, "cpus_per_worker": 1, "colocate": 2})
    demand = demand_of(spec)
    assert (demand.workers, demand.cpus) == (2, 2)
    assert demand.describe() == "2 groups of 2 workers on one node x (2 CPU, pack)"


def test_the_tensor_strategy_keeps_its_whole_group_on_one_node():
    """`tensor` splits every layer over all the ranks: the client reserves them as one
    bundle (resources.colocate = workers), so a `spread` placement cannot scatter them."""
    from orchestrator.client.api import resolve
    from orchestrator.control.planning import demand_of
    from orchestrator.spec import JobSpec

    from ..helpers import REPO

    tensor, hybrid, ddp = (get_strategy_class(n) for n in ("tensor", "hybrid", "ddp"))
    assert tensor.colocated_group(Layout(4), tensor.parse_options({})) == 4
    assert hybrid.colocated_group(Layout(8), hybrid.parse_options({"tp": 2})) == 2
    assert ddp.colocated_group(Layout(4), ddp.parse_options({})) == 1
    spec = resolve(JobSpec(name="t", entrypoint="examples.gpt.train:train", working_dir=str(REPO),
                           config={"layers": 2, "dim": 64, "heads": 4}, strategy={"name": "tensor"},
                           resources={"workers": 2, "cpus_per_worker": 1, "placement": "spread"}))
    assert spec.resources.colocate == 2
    demand = demand_of(spec)
    assert demand.workers == 1 and "of 2 workers on one node" in demand.describe()


def test_the_tensor_example_does_not_ask_to_spread_its_ranks():
    import yaml

    from ..helpers import REPO

    resources = yaml.safe_load((REPO / "examples/gpt/tensor.yaml").read_text())["resources"]
    assert resources.get("placement", "pack") != "spread"
