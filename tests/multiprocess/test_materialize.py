"""A model built on the meta device gets its weights where each rank holds them.

Strategies shard or cut the meta model first and allocate only their part; the weights
come from each module's reset_parameters() under a per-module seed, so they are the same
under every layout. Real gloo ranks (spawned processes) check each strategy's parts
against one process's whole model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from strategies import StrategyConfigError, WorkerEnv, get_strategy_class
from strategies.base import local_state_bytes
from strategies.materialize import materialize, materialize_replica, on_meta

from .. import gpt_ranks
from ..gpt_ranks import exit_like_a_worker, make_model

pytestmark = pytest.mark.timeout(240)
SEQ = 33  # the position embedding's 33 rows do not split evenly over 2 ranks


def whole_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()
            for n, t in model.state_dict().items()}


def test_a_meta_model_gets_the_same_weights_from_the_same_seed_and_others_from_another():
    first, again = whole_state(make_model(SEQ)), whole_state(make_model(SEQ))
    assert first.keys() == again.keys() and all(torch.equal(first[n], again[n]) for n in first)
    torch.manual_seed(1)
    with torch.device("meta"):
        other = gpt_ranks.GPT(gpt_ranks.GPTConfig(seq=SEQ, **gpt_ranks.MODEL))
    other = whole_state(materialize(other, "cpu"))
    assert not torch.equal(first["blocks.0.attn.q.weight"], other["blocks.0.attn.q.weight"])
    # torch's own initialisation: LayerNorm ones and zeros, a Linear's weights within ±1/sqrt(in)
    assert torch.equal(first["ln.weight"], torch.ones(64)) and torch.equal(first["ln.bias"], torch.zeros(64))
    assert first["blocks.0.mlp.down.weight"].abs().max() <= 1 / 256 ** 0.5
    # each module draws from its own seed: blocks 0 and 1 are not the same draw
    assert not torch.equal(first["blocks.0.attn.q.weight"], first["blocks.1.attn.q.weight"])


def test_a_model_on_a_real_device_is_only_moved():
    model = nn.Linear(2, 3)
    before = model.weight.detach().clone()
    assert materialize(model, "cpu") is model and torch.equal(model.weight, before)


def test_a_meta_module_without_reset_parameters_is_named_in_one_line():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 3), Scale())
    with pytest.raises(StrategyConfigError, match=r"module '1' \(Scale\) .* no reset_parameters") as err:
        materialize(model, "cpu")
    assert "\n" not in str(err.value)


def test_a_replica_strategys_optimizer_follows_the_materialised_parameters():
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.0)
    model, optimizer = materialize_replica(model, optimizer, "cpu")
    assert not on_meta(model)
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    assert optimizer.param_groups[0]["lr"] == 0.5
    before = model.weight.detach().clone()
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert not torch.equal(model.weight, before)


# ---- each strategy allocates only its part, and the parts make the one-process model --------

LAYOUTS = {
    "fsdp": ("fsdp", {}, 2),
    "tensor": ("tensor", {}, 2),
    "pipeline": ("pipeline", {"schedule": "gpipe"}, 2),
    "hybrid_pp_tp": ("hybrid", {"pp": 2, "tp": 2, "dp": 1, "schedule": "gpipe"}, 4),
}


def held_rank(rank: int, world: int, port: int, strategy_name: str, options: dict, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    cls = get_strategy_class(strategy_name)
    strategy = cls(cls.parse_options(options))
    strategy.setup(WorkerEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                             master_port=port))
    model = make_model(SEQ, meta=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = strategy.prepare(model, optimizer)
    held = whole_state(model)
    torch.save(held, Path(out) / f"rank{rank}.pt")
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "bytes": local_state_bytes(model),
        "on_meta": on_meta(model),
        "optimizer_has_the_models_parameters": optimized == {id(p) for p in model.parameters()},
    }))
    strategy.teardown()
    exit_like_a_worker()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_rank_holds_its_part_of_the_one_process_weights(layout, tmp_path):
    strategy, options, world = LAYOUTS[layout]
    mp.start_processes(held_rank, args=(world, gpt_ranks.free_port(), strategy, options, str(tmp_path)),
                       nprocs=world, start_method="spawn", join=True)
    whole = whole_state(make_model(SEQ))
    whole_bytes = local_state_bytes(make_model(SEQ))
    for rank in range(world):
        facts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert not facts["on_meta"] and facts["optimizer_has_the_models_parameters"]
        held = torch.load(tmp_path / f"rank{rank}.pt")
        assert held, rank
        for name, tensor in held.items():  # gathered shards (full_tensor) equal the whole weights
            assert torch.equal(tensor, whole[name]), (rank, name)
        if layout != "tensor":  # tensor parallel keeps embeddings, norms and the head whole
            assert facts["bytes"] < 0.6 * whole_bytes, (rank, facts["bytes"], whole_bytes)
        else:
            assert facts["bytes"] < 0.8 * whole_bytes, (rank, facts["bytes"], whole_bytes)


def test_materialising_inside_a_meta_device_block_still_makes_real_weights():
    with torch.device("meta"):
        model = materialize(make_model(SEQ, meta=True), "cpu")
    assert not on_meta(model)
    assert torch.equal(whole_state(model)["head.weight"], whole_state(make_model(SEQ))["head.weight"])
