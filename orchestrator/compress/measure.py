"""Measure a model: eval metric, latency p50/p90 at batch 1, throughput at batch N, non-zeros."""

from __future__ import annotations

import time


def slice_inputs(inputs: tuple, n: int) -> tuple:
    """The first `n` samples of every tensor argument (repeated if the batch is smaller)."""
    import torch

    out = []
    for x in inputs:
        if torch.is_tensor(x) and x.dim() > 0:
            if x.shape[0] < n:
                x = x.repeat(-(-n // x.shape[0]), *([1] * (x.dim() - 1)))
            x = x[:n].contiguous()
        out.append(x)
    return tuple(out)


def evaluate(hooks, model, batches) -> dict[str, float]:
    import torch

    if hooks.evaluate is None or not batches:
        return {}
    model.eval()
    with torch.inference_mode():
        result = hooks.evaluate(model, batches)
    return {k: float(v) for k, v in dict(result).items()}


def latency(model, inputs: tuple, iters: int, warmup: int = 20) -> dict[str, float]:
    """p50/p90 seconds of one forward pass."""
    times = sorted(latency_samples(model, inputs, iters, warmup))
    return {"p50_s": times[len(times) // 2], "p90_s": times[min(len(times) - 1, int(len(times) * 0.9))]}


def compare_latency(models: list, inputs: tuple, iters: int, rounds: int = 5) -> list[dict[str, float]]:
    """p50/p90 of each model, timed in interleaved rounds (a, b, c, a, b, c, ...), so that
    whatever else the machine is doing weighs on every model alike and the ratios hold."""
    per_round = max(5, iters // rounds)
    pooled: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for i, model in enumerate(models):
            pooled[i] += latency_samples(model, inputs, per_round, warmup=5)
    out = []
    for times in pooled:
        times.sort()
        out.append({"p50_s": times[len(times) // 2], "p90_s": times[min(len(times) - 1, int(len(times) * 0.9))]})
    return out


def latency_samples(model, inputs: tuple, iters: int, warmup: int = 20) -> list[float]:
    import torch

    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(*inputs)
        for _ in range(iters):
            start = time.perf_counter()
            model(*inputs)
            times.append(time.perf_counter() - start)
    return times


def throughput(model, inputs: tuple, batch: int, min_seconds: float = 0.5, warmup: int = 3) -> float:
    """Samples per second at batch size `batch`."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            model(*inputs)
        n, start = 0, time.perf_counter()
        while True:
            model(*inputs)
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds and n >= 3:
                return n * batch / elapsed


def weight_tensors(model):
    """Each Linear/Conv/Embedding weight as a dense float tensor (quantized ones dequantized)."""
    import torch

    for module in model.modules():
        w = getattr(module, "weight", None)
        if callable(w) and not isinstance(w, torch.nn.Parameter):
            try:
                w = w()  # quantized modules expose weight() as a method
            except Exception:
                continue
        if not torch.is_tensor(w):
            continue
        if getattr(w, "is_quantized", False):
            w = w.dequantize()
        elif type(w) not in (torch.Tensor, torch.nn.Parameter) and hasattr(w, "dequantize"):
            w = w.dequantize()  # torchao's quantized tensor subclasses
        yield w.detach()


def nonzero_fraction(model) -> float | None:
    total = nonzero = 0
    for w in weight_tensors(model):
        total += w.numel()
        nonzero += int((w != 0).sum())
    return nonzero / total if total else None


def count_params(model) -> int:
    return sum(w.numel() for w in weight_tensors(model))


def measure(model, hooks, eval_batches: list, inputs_one: tuple, inputs_n: tuple, batch_n: int,
            iters: int) -> dict:
    import torch

    lat = latency(model, inputs_one, iters)
    return {
        "metrics": evaluate(hooks, model, eval_batches),
        "p50_s": lat["p50_s"], "p90_s": lat["p90_s"],
        "throughput_batch": batch_n, "throughput_per_s": throughput(model, inputs_n, batch_n),
        "nonzero": nonzero_fraction(model), "weights": count_params(model),
        "threads": torch.get_num_threads(),
    }
