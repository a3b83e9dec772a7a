"""Can this machine run the asked-for passes? Checked before anything is reserved."""

from __future__ import annotations

import platform

from .optional import MissingDependency, require


class PlatformError(ValueError):
    pass


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def quantized_engines() -> list[str]:
    """The quantized kernels this torch build has (x86, fbgemm, qnnpack, onednn)."""
    import torch

    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def check_method(method: str) -> None:
    """Raise PlatformError (one line, with the fix) if `method` cannot run here."""
    engines = quantized_engines()
    try:
        if method == "l1_structured":
            require("torch_pruning")
        elif method == "dynamic_int8":
            if not engines:
                raise PlatformError("dynamic_int8: this torch build has no quantized engine "
                                    "(torch.backends.quantized.supported_engines is empty)")
        elif method == "static_int8":
            if not _x86() or "x86" not in engines:
                raise PlatformError(f"static_int8 uses the x86 inductor quantizer, which needs an x86 CPU and the "
                                    f"'x86' quantized engine (machine {platform.machine()}, engines "
                                    f"{', '.join(engines) or 'none'}); use dynamic_int8 or weight_only_int8")
            require("torchao.quantization.pt2e.quantize_pt2e")
        elif method in ("weight_only_int8", "weight_only_int4"):
            require("torchao.quantization")
    except MissingDependency as exc:
        raise PlatformError(f"{method}: {exc}") from None


def check_platform(post) -> None:
    """Every pass of a PostTrainingSpec can run on this machine (raises PlatformError naming the pass)."""
    for i, p in enumerate(post.passes):
        try:
            check_method(p.options.method)
        except PlatformError as exc:
            raise PlatformError(f"post_training.passes.{i}.{p.kind}.method: {exc}") from None


def check_post_training(spec, working_dir: str | None) -> None:
    """The passes can run on this platform and the hooks module has what they need; one
    SpecError line otherwise (before anything is reserved, or before `trainctl compress`)."""
    from ..errors import SpecError
    from .hooks import HooksError, check_hooks

    try:
        check_platform(spec.post_training)
        check_hooks(spec, working_dir)
    except (PlatformError, HooksError) as exc:
        raise SpecError(str(exc)) from None
