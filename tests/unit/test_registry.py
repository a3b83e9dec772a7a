"""strategies/registry.py and Strategy.parse_options."""

from __future__ import annotations

import sys
import textwrap
import uuid
from dataclasses import dataclass

import pytest

from strategies import registry
from strategies.base import Strategy, StrategyConfigError
from strategies.registry import (
    UnknownStrategyError,
    available_strategies,
    get_strategy_class,
    register,
)


@pytest.fixture
def clean_registry(monkeypatch):
    """Registrations made by a test do not leak into the others."""
    monkeypatch.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A fresh importable module under tmp_path: returns its name."""
    name = f"my_plugins_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """\
        from dataclasses import dataclass

        from strategies.base import Strategy


        class MyStrategy(Strategy):
            name = "mine"

            @dataclass
            class Options:
                ratio: float = 0.5
                tag: str = "t"


        class NotAStrategy:
            pass


        def not_a_class():
            return MyStrategy
        """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_ddp_resolves():
    from strategies.ddp import DDPStrategy

    cls = get_strategy_class("ddp")
    assert cls is DDPStrategy
    assert issubclass(cls, Strategy) and cls.name == "ddp"
    assert "ddp" in available_strategies()


def test_unknown_name_lists_available_names():
    with pytest.raises(UnknownStrategyError) as info:
        get_strategy_class("dpp")
    message = str(info.value)
    assert "'dpp'" in message
    for name in available_strategies():
        assert name in message
    assert "ddp" in message
    assert "pkg.module:Class" in message
    assert not message.startswith(('"', "'"))  # not KeyError's quoted repr
    assert isinstance(info.value, KeyError) and isinstance(info.value, StrategyConfigError)


def test_import_path_resolves(plugin_module):
    cls = get_strategy_class(f"{plugin_module}:MyStrategy")
    assert cls.__name__ == "MyStrategy" and issubclass(cls, Strategy)
    assert cls.__module__ == plugin_module


def test_import_path_to_non_strategy_class(plugin_module):
    for attr in ("NotAStrategy", "not_a_class"):
        with pytest.raises(UnknownStrategyError) as info:
            get_strategy_class(f"{plugin_module}:{attr}")
        assert "not a subclass of strategies.Strategy" in str(info.value)
        assert attr in str(info.value)


def test_import_path_missing_attribute(plugin_module):
    with pytest.raises(UnknownStrategyError) as info:
        get_strategy_class(f"{plugin_module}:Nope")
    assert "Nope" in str(info.value) and plugin_module in str(info.value)


def test_import_path_missing_module():
    with pytest.raises(UnknownStrategyError) as info:
        get_strategy_class("no_such_pkg_for_trainctl_tests.mod:Thing")
    assert "no_such_pkg_for_trainctl_tests.mod" in str(info.value)


def test_register_decorator(clean_registry):
    name = f"custom-{uuid.uuid4().hex[:6]}"
    assert name not in available_strategies()

    @register(name)
    class Custom(Strategy):
        pass

    assert Custom.name == name
    assert get_strategy_class(name) is Custom
    assert name in available_strategies()


def test_registration_is_undone_between_tests():
    assert not any(n.startswith("custom-") for n in available_strategies())


# ---- parse_options --------------------------------------------------------------------------


def test_parse_options_defaults_and_values():
    from strategies.ddp import DDPStrategy

    default = DDPStrategy.parse_options(None)
    assert default.backend == "auto" and default.find_unused_parameters is False
    opts = DDPStrategy.parse_options({"timeout_s": 5, "find_unused_parameters": True})
    assert opts.timeout_s == 5.0 and opts.find_unused_parameters is True
    assert isinstance(opts, DDPStrategy.Options)


def test_parse_options_rejects_unknown_and_lists_known():
    from strategies.ddp import DDPStrategy

    with pytest.raises(StrategyConfigError) as info:
        DDPStrategy.parse_options({"bucket_size": 3})
    message = str(info.value)
    assert "'bucket_size'" in message and "'ddp'" in message
    for known in (
        "backend",
        "timeout_s",
        "find_unused_parameters",
        "bucket_cap_mb",
        "static_graph",
    ):
        assert known in message


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("timeout_s", "soon"),
        ("find_unused_parameters", "maybe"),
        ("bucket_cap_mb", [1]),
        ("backend", 3),
    ],
)
def test_parse_options_rejects_wrong_types(option, value):
    from strategies.ddp import DDPStrategy

    with pytest.raises(StrategyConfigError) as info:
        DDPStrategy.parse_options({option: value})
    message = str(info.value)
    assert option in message and repr(value) in message
    assert "\n" not in message


def test_parse_options_custom_strategy(plugin_module):
    cls = get_strategy_class(f"{plugin_module}:MyStrategy")
    assert cls.parse_options({"ratio": 0.25}).ratio == 0.25
    with pytest.raises(StrategyConfigError) as info:
        cls.parse_options({"ration": 1})
    assert "ratio" in str(info.value) and "tag" in str(info.value)


def test_strategy_without_options():
    class Plain(Strategy):
        name = "plain"

    assert Plain.parse_options({}) is not None
    with pytest.raises(StrategyConfigError) as info:
        Plain.parse_options({"x": 1})
    assert "known options: none" in str(info.value)


def test_options_become_the_strategy_options():
    @dataclass
    class Opts:
        depth: int = 2

    class WithOpts(Strategy):
        name = "withopts"
        Options = Opts

    strategy = WithOpts(WithOpts.parse_options({"depth": 4}))
    assert strategy.options.depth == 4
    assert WithOpts().options.depth == 2


def test_builtin_names_are_pinned_to_their_classes():
    """The names users write in `strategy.name` are public: each stays bound to its class and the
    class knows its own name (a rename or a typo in the table fails here, not in a user's job)."""
    from strategies.ddp import DDPStrategy
    from strategies.fsdp import FSDPStrategy
    from strategies.hybrid import HybridStrategy
    from strategies.pipeline import PipelineStrategy
    from strategies.tensor import TensorParallelStrategy

    expected = {"ddp": DDPStrategy, "fsdp": FSDPStrategy, "tensor": TensorParallelStrategy,
                "pipeline": PipelineStrategy, "hybrid": HybridStrategy}
    for name, cls in expected.items():
        assert get_strategy_class(name) is cls and cls.name == name
    for name, cls_name in (("deepspeed", "DeepSpeedStrategy"), ("horovod", "HorovodStrategy")):
        cls = get_strategy_class(name)  # the optional libraries are imported lazily, inside
        assert cls.__name__ == cls_name and cls.name == name
    assert {"ddp", "fsdp", "tensor", "pipeline", "hybrid", "deepspeed", "horovod"} <= set(available_strategies())


def test_module_attr_references_load_or_say_why():
    from strategies.refs import RefError, load_ref

    assert load_ref("strategies.ddp:DDPStrategy.name") == "ddp"  # dotted attributes
    for ref, why in (("strategies.ddp", "not of the form"), ("no_such_mod:x", "cannot import module"),
                     ("strategies.ddp:Nope", "has no 'Nope'"), (":x", "not of the form")):
        with pytest.raises(RefError, match=why):
            load_ref(ref)


def test_an_options_old_name_still_works_with_one_deprecation_line():
    """DeepSpeed's `micro_batches` is `microbatches` now, as in pipeline and hybrid."""
    cls = get_strategy_class("deepspeed")
    with pytest.warns(FutureWarning, match="micro_batches of strategy 'deepspeed' is deprecated: call it microbatches"):
        options = cls.parse_options({"pipeline_stages": 2, "micro_batches": 4})
    assert options.microbatches == 4
    assert cls.parse_options({"pipeline_stages": 2, "microbatches": 3}).microbatches == 3


def test_every_process_group_strategy_shares_one_base_for_backend_and_timeout():
    from strategies.base import ProcessGroupOptions, ProcessGroupStrategy

    for name in ("ddp", "fsdp", "tensor", "pipeline", "hybrid"):
        cls = get_strategy_class(name)
        assert issubclass(cls, ProcessGroupStrategy) and issubclass(cls.Options, ProcessGroupOptions), name
        options = cls.parse_options({"backend": "gloo", "timeout_s": 60})
        assert (options.backend, options.timeout_s) == ("gloo", 60)
        assert cls.parse_options({}).timeout_s == ProcessGroupOptions.timeout_s
