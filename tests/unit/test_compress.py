"""Post-training passes, in one process: pruning, quantization, the gate, the report, the loader."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from orchestrator.compress import load_compressed, prune, quantize, run_pipeline
from orchestrator.compress.artifact import save_model, structure_of
from orchestrator.compress.checks import PlatformError, check_method
from orchestrator.compress.measure import nonzero_fraction

from ..compress_helpers import digits_data, digits_spec, trained_checkpoint

pytestmark = pytest.mark.timeout(180)

# dynamic int8 tolerance: every output within 5 % of the output range of the fp32 model,
# and the same argmax on at least 98 % of inputs (int8 weights, per-batch int8 activations)
INT8_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    return {"root": root, "data": digits_data(root), "ckpt": trained_checkpoint(root)}


def mlp(width: int = 512) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10)).eval()


def recipe(model_cfg: dict | None = None) -> dict:
    return {"hooks": "examples.digits.hooks", "config": model_cfg or {"hidden": 128}, "structure": {},
            "quantize": None, "passes": []}


def test_structured_pruning_removes_neurons_and_shrinks_the_file(tmp_path):
    from examples.digits.hooks import build_model

    model = build_model({"hidden": 128}).eval()
    x = torch.randn(4, 64)
    dense_bytes = save_model(model, tmp_path / "dense", recipe())
    before = sum(p.numel() for p in model.parameters())
    info = prune.l1_structured(model, 0.3, [], (x,))
    after = sum(p.numel() for p in model.parameters())
    assert after == info["params_after"] < 0.6 * before  # two hidden layers lose 30 % of their neurons
    assert model[0].out_features == model[2].in_features < 128
    assert model[4].out_features == 10  # the output layer is never pruned
    r = {**recipe(), "structure": structure_of(model, build_model({"hidden": 128}))}
    pruned_bytes = save_model(model, tmp_path / "pruned", r)
    assert pruned_bytes < 0.6 * dense_bytes
    loaded = load_compressed(tmp_path / "pruned")
    assert torch.allclose(loaded(x), model(x))



def _kept_rows(pruned: torch.Tensor, original: torch.Tensor) -> list[int]:
    """Which rows of `original` the pruned weight kept, in order."""
    return [int((original == row).all(dim=1).nonzero()[0]) for row in pruned]


def test_structured_pruning_removes_whole_attention_heads_and_mlp_neurons(tmp_path):
    """The pruned GPT computes exactly what the original computes with the removed heads'
    values and the removed MLP neurons zeroed: whole heads went, the same ones from q, k, v."""
    import copy

    from examples.gpt import hooks as gpt_hooks
    from examples.gpt.model import GPT, GPTConfig
    from orchestrator.compress.hooks import load_hooks

    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=2, heads=4, dim=64)).eval()
    original = copy.deepcopy(model)
    x = torch.randint(0, 256, (3, 32))
    info = prune.l1_structured(model, 0.5, [], (x,), hooks=load_hooks("examples.gpt.hooks"))
    assert info["heads"] == "4 -> 2" and info["params_after"] < info["params_before"]

    head_dim = 16
    masked = copy.deepcopy(original)
    for block, before, after in zip(masked.blocks, original.blocks, model.blocks, strict=True):
        kept = {name: _kept_rows(getattr(after.attn, name).weight, getattr(before.attn, name).weight)
                for name in ("q", "k", "v")}
        heads = sorted({i // head_dim for i in kept["q"]})
        assert len(heads) == 2 and kept["q"] == kept["k"] == kept["v"]  # the same heads from q, k, v
        assert kept["q"] == [h * head_dim + d for h in heads for d in range(head_dim)]  # whole heads
        assert after.attn.proj.out_features == 64 and after.mlp.down.out_features == 64  # residual width kept
        with torch.no_grad():
            gone = torch.ones(64, dtype=torch.bool)
            gone[kept["v"]] = False
            block.attn.v.weight[gone] = 0
            block.attn.v.bias[gone] = 0
            neurons = _kept_rows(after.mlp.up.weight, before.mlp.up.weight)
            assert len(neurons) == 128  # half of 4 x 64
            gone = torch.ones(256, dtype=torch.bool)
            gone[neurons] = False
            block.mlp.up.weight[gone] = 0
            block.mlp.up.bias[gone] = 0
    assert torch.allclose(model(x), masked(x), atol=1e-5)
    assert gpt_hooks.attention_heads(model)[model.blocks[0].attn.q] == 2  # read back from the widths

    r = {"hooks": "examples.gpt.hooks", "config": {"layers": 2, "heads": 4, "dim": 64}, "quantize": None,
         "passes": [], "structure": structure_of(model, GPT(GPTConfig(layers=2, heads=4, dim=64)))}
    save_model(model, tmp_path / "pruned", r)
    assert torch.allclose(load_compressed(tmp_path / "pruned")(x), model(x))


@pytest.mark.parametrize("heads, amount, kept", [(4, 0.3, 3), (8, 0.3, 6), (12, 0.3, 8), (4, 0.9, 1), (1, 0.5, 1)])
def test_head_pruning_removes_the_nearest_whole_number_of_heads(heads, amount, kept):
    """amount x heads rounded, at least one head removed and one kept; a lone head stays whole."""
    from examples.gpt.model import GPT, GPTConfig
    from orchestrator.compress.hooks import load_hooks

    model = GPT(GPTConfig(layers=1, heads=heads, dim=8 * heads)).eval()
    x = torch.randint(0, 256, (2, 16))
    prune.l1_structured(model, amount, [], (x,), hooks=load_hooks("examples.gpt.hooks"))
    assert model.blocks[0].attn.q.out_features == model.blocks[0].attn.v.out_features == 8 * kept
    assert model(x).shape == (2, 16, 256)

@pytest.mark.parametrize("amount", [0.5, 0.8])
def test_unstructured_pruning_reaches_the_amount_and_stores_it_sparse(tmp_path, amount):
    model = mlp(256)
    dense_bytes = save_model(model, tmp_path / "dense", recipe())
    prune.l1_unstructured(model, amount, [])
    assert not any(hasattr(m, "weight_orig") for m in model.modules())  # made permanent
    assert nonzero_fraction(model) == pytest.approx(1 - amount, abs=1e-3)
    sparse_bytes = save_model(model, tmp_path / "sparse", recipe())
    # bit mask (1/32 of dense) + the non-zero values: honest size on disk
    assert sparse_bytes < (1 - amount + 0.06) * dense_bytes

    def build(_config):
        return mlp(256)

    loaded = load_compressed(tmp_path / "sparse", build_model=build)
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), model(x))


def test_fine_tuning_after_unstructured_pruning_keeps_the_zeros():
    model = mlp(128).train()
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))

    def tune(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        return 0.0

    before = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    prune.l1_unstructured(model, 0.6, [], finetune=tune)
    after = [m.weight for m in model if isinstance(m, nn.Linear)]
    assert nonzero_fraction(model) == pytest.approx(0.4, abs=1e-3)  # the masks held while it trained
    assert any(not torch.equal(a[a != 0], b[a != 0]) for a, b in zip(after, before, strict=True))  # it trained


def test_dynamic_int8_stays_close_to_fp32_and_is_under_a_third_of_the_size(tmp_path):
    model = mlp(512)
    x = torch.randn(256, 64)
    with torch.no_grad():
        ref = model(x)
    fp32_bytes = save_model(model, tmp_path / "fp32", recipe())
    q = quantize.dynamic_int8(mlp(512))
    with torch.no_grad():
        out = q(x)
    assert (out - ref).abs().max() <= INT8_TOLERANCE * (ref.max() - ref.min())
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.98
    int8_bytes = save_model(q, tmp_path / "int8", {**recipe(), "quantize": {"method": "dynamic_int8"}})
    assert int8_bytes <= 0.3 * fp32_bytes
    # the saved state dict needs no pickle: it loads with weights_only=True
    torch.load(tmp_path / "int8" / "model.pt", weights_only=True)
    loaded = load_compressed(tmp_path / "int8", build_model=lambda _c: mlp(512))
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_weight_only_int8_round_trips(tmp_path):
    pytest.importorskip("torchao")
    model = quantize.weight_only(mlp(256), "weight_only_int8", 32)
    x = torch.randn(8, 64)
    with torch.no_grad():
        out, ref = model(x), mlp(256)(x)
    assert (out - ref).abs().max() <= INT8_TOLERANCE * (ref.max() - ref.min())
    size = save_model(model, tmp_path / "w8", {**recipe(), "quantize": {"method": "weight_only_int8"}})
    assert size < 0.35 * save_model(mlp(256), tmp_path / "fp32", recipe())
    loaded = load_compressed(tmp_path / "w8", build_model=lambda _c: mlp(256))
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_static_int8_is_calibrated_and_saved_as_an_export_program(tmp_path):
    pytest.importorskip("torchao")
    try:
        check_method("static_int8")
    except PlatformError as exc:
        pytest.skip(str(exc))
    model = mlp(256)
    x = torch.randn(64, 64)
    converted, program = quantize.static_int8(model, (x[:2],), [(x,)])
    with torch.no_grad():
        ref, out = model(x), converted(x)
    assert (out - ref).abs().max() <= INT8_TOLERANCE * (ref.max() - ref.min())
    size = save_model(converted, tmp_path / "s8", {**recipe(), "quantize": {"method": "static_int8"}}, program)
    assert size < save_model(model, tmp_path / "fp32", recipe())  # int8 weights only, no fp32 copies
    loaded = load_compressed(tmp_path / "s8")
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_a_platform_without_quantized_engines_cannot_run_dynamic_int8(monkeypatch):
    from orchestrator.compress import checks

    monkeypatch.setattr(checks, "quantized_engines", lambda: [])
    with pytest.raises(PlatformError, match="no quantized engine"):
        check_method("dynamic_int8")


def test_the_gate_rejects_a_pass_that_drops_the_metric_too_far(work, tmp_path):
    spec = digits_spec(work["data"], [{"prune": {"method": "l1_unstructured", "amount": 0.99}}])
    out = run_pipeline(spec, work["ckpt"], tmp_path / "out", log=lambda _: None)
    assert out["kept"] == []
    assert "accuracy drop" in out["rejected"]["l1_unstructured(0.99)"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows"][1]["drop"] > 0.01 and report["rows"][1]["kept"] is False
    assert report["final"]["passes"] == []
    # the pipeline went on from the trained model: the final model is it
    final = load_compressed(tmp_path / "out" / "model")
    assert nonzero_fraction(final) > 0.99


def test_a_pipeline_writes_a_report_whose_files_agree(work, tmp_path):
    pytest.importorskip("torch_pruning")
    passes = [{"prune": {"method": "l1_structured", "amount": 0.3, "finetune": {"steps": 30, "lr": 0.001}}},
              {"quantize": {"method": "dynamic_int8"}}]
    spec = digits_spec(work["data"], passes)
    out = run_pipeline(spec, work["ckpt"], tmp_path / "out", log=lambda _: None)
    d = tmp_path / "out"
    for name in ("report.json", "report.md", "report.png"):
        assert (d / name).stat().st_size > 0
    report = json.loads((d / "report.json").read_text())
    md = (d / "report.md").read_text()
    assert [r["pass"] for r in report["rows"]] == ["trained", "l1_structured(0.3)", "dynamic_int8"]
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| pass")]
    assert len(table) == len(report["rows"])
    for row, line in zip(report["rows"], table, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["pass"]
        assert cells[2] == f"{row['metric']:.4f}"
        assert cells[5] == f"{row['size_ratio']:.3f}"
        assert cells[9].startswith({None: "baseline", True: "yes", False: "no"}[row["kept"]])
    assert report["rows"][0]["size_bytes"] == (d / "passes" / "0-trained" / "model.pt").stat().st_size
    m = report["machine"]
    assert m["cpu"] and m["versions"]["torch"] == torch.__version__ and "flags" in m
    # the final model is what the report says: same passes, same metric
    assert report["final"]["passes"] == out["kept"]
    final = load_compressed(d / "model")
    from examples.digits.hooks import evaluate
    from orchestrator.compress.data import take

    acc = evaluate(final, take(spec, "eval", None))["accuracy"]
    assert acc == pytest.approx(report["final"]["metric"])


def test_a_pass_that_cannot_apply_to_the_model_is_rejected_and_the_pipeline_goes_on(work, tmp_path):
    pytest.importorskip("torch_pruning")
    pytest.importorskip("torchao")
    # 30 % of 128 neurons leaves 89 inputs: not a multiple of int4's group size of 32
    passes = [{"prune": {"method": "l1_structured", "amount": 0.3}},
              {"quantize": {"method": "weight_only_int4", "group_size": 32}}]
    out = run_pipeline(digits_spec(work["data"], passes), work["ckpt"], tmp_path / "out", log=lambda _: None)
    assert out["kept"] == ["l1_structured(0.3)"]
    assert out["rejected"]["weight_only_int4"].startswith("failed: ")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| weight_only_int4 | group_size=32 | - |" in md
    # with round_to the pruned widths stay multiples of the group size, and int4 applies
    passes[0]["prune"]["round_to"] = 32
    out = run_pipeline(digits_spec(work["data"], passes, gate={"metric": "accuracy", "max_drop": 0.05}),
                       work["ckpt"], tmp_path / "out2", log=lambda _: None)
    assert "weight_only_int4" not in out["rejected"] or not out["rejected"]["weight_only_int4"].startswith("failed")
