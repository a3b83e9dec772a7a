"""orchestrator/spec.py: YAML <-> JobSpec, `--set` overrides, one-line errors, JSON Schema."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from orchestrator.errors import SpecError, UserError
from orchestrator.spec import (
    JobSpec,
    apply_overrides,
    json_schema,
    load_spec,
    parse_spec,
)

VALID_YAML = textwrap.dedent(
    """\
    name: digits-ddp
    entrypoint: examples.digits.train:train
    working_dir: .
    config: {epochs: 5, lr: 0.05}
    env: {SEED: 7}
    resources: {workers: 2, cpus_per_worker: 1, gpus_per_worker: 0, placement: spread}
    strategy: {name: ddp, options: {find_unused_parameters: true}}
    checkpoint: {storage: runs/, every_n_steps: 100, keep: 3}
    failure: {max_restarts: 3}
    priority: 5
    """
)

MINIMAL = {"name": "job", "entrypoint": "pkg.mod:train"}


def write(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def spec_error(doc=None, *, overrides=None, path=None) -> str:
    """The message of the SpecError raised for `doc` (or the file `path`); checks it is one line."""
    with pytest.raises(SpecError) as info:
        if path is not None:
            load_spec(path, overrides)
        else:
            parse_spec(doc, "job.yaml", overrides)
    message = str(info.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    assert message.strip() == message and message
    return message


# ---- loading a valid spec ---------------------------------------------------------------


def test_load_valid_yaml(tmp_path):
    spec = load_spec(write(tmp_path, VALID_YAML))
    assert spec.name == "digits-ddp"
    assert spec.entrypoint == "examples.digits.train:train"
    assert spec.config == {"epochs": 5, "lr": 0.05}
    assert spec.env == {"SEED": "7"}  # env values become strings
    assert spec.resources.workers == 2
    assert spec.resources.placement == "spread"
    assert spec.strategy.name == "ddp"
    assert spec.strategy.options == {"find_unused_parameters": True}
    assert spec.checkpoint.storage == "runs/"
    assert spec.checkpoint.every_n_steps == 100
    assert spec.failure.max_restarts == 3
    assert spec.priority == 5


def test_from_yaml_is_load_spec(tmp_path):
    path = write(tmp_path, VALID_YAML)
    assert JobSpec.from_yaml(path, ["priority=9"]) == load_spec(path, ["priority=9"])
    assert JobSpec.from_yaml(path).priority == 5


def test_defaults():
    spec = parse_spec(dict(MINIMAL))
    assert spec.working_dir == "."
    assert spec.config == {} and spec.env == {}
    assert spec.resources.workers == 1
    assert spec.resources.cpus_per_worker == 1
    assert spec.resources.gpus_per_worker == 0
    assert spec.resources.placement == "pack"
    assert spec.strategy.name == "ddp" and spec.strategy.options == {}
    assert spec.checkpoint.storage == "runs"
    assert spec.checkpoint.every_n_steps is None
    assert spec.checkpoint.keep == 3
    assert spec.failure.max_restarts == 3
    assert spec.failure.unschedulable == "queue"
    assert spec.priority == 0


def test_defaults_are_not_shared_between_specs():
    a = parse_spec(dict(MINIMAL))
    b = parse_spec(dict(MINIMAL))
    a.config["x"] = 1
    assert b.config == {}


# ---- --set overrides ---------------------------------------------------------------------


def test_overrides_keep_their_yaml_types(tmp_path):
    spec = load_spec(
        write(tmp_path, VALID_YAML),
        [
            "resources.workers=4",
            "strategy.options.find_unused_parameters=false",
            "strategy.options.static_graph=true",
            "config.layers=[64, 32]",
            "config.lr=0.5",
            "config.name=abc",
            "priority=-2",
        ],
    )
    assert spec.resources.workers == 4 and isinstance(spec.resources.workers, int)
    assert spec.strategy.options["find_unused_parameters"] is False
    assert spec.strategy.options["static_graph"] is True
    assert spec.config["layers"] == [64, 32]
    assert spec.config["lr"] == 0.5
    assert spec.config["name"] == "abc"
    assert spec.config["epochs"] == 5  # untouched siblings stay
    assert spec.priority == -2


def test_override_creates_nested_paths():
    spec = parse_spec(dict(MINIMAL), overrides=["config.model.encoder.depth=3", "env.TOKEN=abc"])
    assert spec.config == {"model": {"encoder": {"depth": 3}}}
    assert spec.env == {"TOKEN": "abc"}


def test_override_value_may_contain_equals_and_be_empty():
    spec = parse_spec(dict(MINIMAL), overrides=["env.OPTS=a=b", "config.empty="])
    assert spec.env["OPTS"] == "a=b"
    assert spec.config["empty"] == ""


def test_later_override_wins():
    spec = parse_spec(dict(MINIMAL), overrides=["resources.workers=2", "resources.workers=3"])
    assert spec.resources.workers == 3


def test_apply_overrides_on_plain_dict():
    doc = apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]", "d=true"])
    assert doc == {"a": {"b": 1, "c": [1, 2]}, "d": True}


@pytest.mark.parametrize(
    "bad", ["resources.workers", "=4", "1st=2", "resources..workers=2", "a b=1"]
)
def test_bad_override_form(bad):
    message = spec_error(dict(MINIMAL), overrides=[bad])
    assert bad in message
    assert "key.path=value" in message


def test_override_through_a_non_mapping():
    message = spec_error(dict(MINIMAL), overrides=["name.first=x"])
    assert "name.first" in message and "not a mapping" in message


def test_override_value_is_validated():
    message = spec_error(dict(MINIMAL), overrides=["resources.workers=0"])
    assert "resources.workers" in message


def test_overrides_do_not_modify_the_callers_document():
    doc = {**MINIMAL, "resources": {"workers": 2}}
    parse_spec(doc, overrides=["resources.workers=8"])
    assert doc["resources"] == {"workers": 2}


# ---- one-line errors naming the field ---------------------------------------------------------


def test_spec_error_is_a_user_error():
    with pytest.raises(UserError) as info:
        parse_spec({"entrypoint": "a:b"})
    assert info.value.exit_code == 2


def test_unknown_top_level_field_lists_known_fields():
    message = spec_error({**MINIMAL, "wrokers": 2})
    assert "wrokers" in message and "unknown field" in message
    for known in (
        "name",
        "entrypoint",
        "resources",
        "strategy",
        "checkpoint",
        "failure",
        "priority",
    ):
        assert known in message


def test_unknown_nested_field_lists_that_sections_fields():
    message = spec_error({**MINIMAL, "resources": {"workers": 2, "gpu": 1}})
    assert "resources.gpu" in message and "unknown field" in message
    for known in ("workers", "cpus_per_worker", "gpus_per_worker", "placement"):
        assert known in message
    assert "entrypoint" not in message  # the list is the section's, not the top level's


def test_unknown_field_in_other_sections():
    assert "checkpoint.every" in spec_error({**MINIMAL, "checkpoint": {"every": 3}})
    assert "failure.retries" in spec_error({**MINIMAL, "failure": {"retries": 3}})
    assert "strategy.nme" in spec_error({**MINIMAL, "strategy": {"nme": "ddp"}})


def test_unknown_field_from_override():
    message = spec_error(dict(MINIMAL), overrides=["resources.wrkers=2"])
    assert "resources.wrkers" in message and "workers" in message


@pytest.mark.parametrize(
    ("section", "value", "field"),
    [
        ("resources", {"workers": "two"}, "resources.workers"),
        ("resources", {"cpus_per_worker": [1]}, "resources.cpus_per_worker"),
        ("resources", {"placement": "everywhere"}, "resources.placement"),
        ("checkpoint", {"keep": "all"}, "checkpoint.keep"),
        ("failure", {"max_restarts": -1}, "failure.max_restarts"),
        ("priority", "high", "priority"),
        ("config", [1, 2], "config"),
        ("resources", 4, "resources"),
    ],
)
def test_wrong_type_names_field_and_value(section, value, field):
    message = spec_error({**MINIMAL, section: value})
    assert message.startswith("job.yaml: ")
    assert f" {field}: " in message


def test_workers_below_one():
    for workers in (0, -3):
        message = spec_error({**MINIMAL, "resources": {"workers": workers}})
        assert "resources.workers" in message and str(workers) in message


@pytest.mark.parametrize("missing", ["name", "entrypoint"])
def test_missing_required_field(missing):
    doc = dict(MINIMAL)
    del doc[missing]
    message = spec_error(doc)
    assert f"{missing}: required field is missing" in message


@pytest.mark.parametrize(
    "entrypoint",
    ["train", "pkg.mod.train", "pkg.mod:", ":train", "pkg/mod.py:train", "a:b:c", "1pkg:f"],
)
def test_bad_entrypoint_form(entrypoint):
    message = spec_error({**MINIMAL, "entrypoint": entrypoint})
    assert "entrypoint" in message and "module.path:function" in message


@pytest.mark.parametrize("entrypoint", ["train:main", "pkg.sub_mod:train_fn", "_p.m2:_f"])
def test_good_entrypoint_forms(entrypoint):
    assert parse_spec({**MINIMAL, "entrypoint": entrypoint}).entrypoint == entrypoint


def test_bad_name():
    message = spec_error({**MINIMAL, "name": "has space"})
    assert message.startswith("job.yaml: name: ")


def test_file_not_found(tmp_path):
    path = tmp_path / "missing.yaml"
    message = spec_error(path=path)
    assert str(path) in message and "no such job file" in message


def test_directory_is_not_a_job_file(tmp_path):
    assert "no such job file" in spec_error(path=tmp_path)


def test_invalid_yaml_names_the_line(tmp_path):
    text = "name: job\nentrypoint: pkg.mod:train\n  priority: 3\n"
    path = write(tmp_path, text)
    message = spec_error(path=path)
    assert str(path) in message
    assert "line 3" in message
    assert "YAML" in message


def test_invalid_yaml_indentation_deeper_down(tmp_path):
    text = "name: job\nentrypoint: a:b\nresources:\n  workers: 2\n   placement: pack\n"
    message = spec_error(path=write(tmp_path, text))
    assert "line 5" in message


def test_top_level_list_is_rejected(tmp_path):
    path = write(tmp_path, "- name: job\n- entrypoint: a:b\n")
    message = spec_error(path=path)
    assert str(path) in message and "mapping" in message


def test_empty_file_is_rejected(tmp_path):
    assert "mapping" in spec_error(path=write(tmp_path, ""))


def test_errors_in_file_name_the_file(tmp_path):
    path = write(tmp_path, VALID_YAML.replace("workers: 2", "workers: 0"))
    message = spec_error(path=path)
    assert message.startswith(f"{path}: resources.workers: ")


# ---- JSON Schema and round trip ---------------------------------------------------------------


def test_json_schema_has_top_level_properties():
    schema = json_schema()
    assert schema["type"] == "object"
    props = schema["properties"]
    for field in (
        "name",
        "entrypoint",
        "working_dir",
        "config",
        "env",
        "resources",
        "strategy",
        "checkpoint",
        "failure",
        "priority",
    ):
        assert field in props
    assert set(schema["required"]) == {"name", "entrypoint"}


def test_to_yaml_round_trip(tmp_path):
    original = load_spec(write(tmp_path, VALID_YAML), ["config.layers=[1, 2]"])
    text = original.to_yaml()
    assert isinstance(yaml.safe_load(text), dict)
    again = load_spec(write(tmp_path, text, "again.yaml"))
    assert again == original
    assert again.model_dump() == original.model_dump()


def test_to_yaml_round_trip_of_defaults(tmp_path):
    original = JobSpec(name="x", entrypoint="a:b")
    assert load_spec(write(tmp_path, original.to_yaml())) == original


def test_every_data_field_is_a_loader_argument():
    """ctx.dataset passes a data split's fields straight to ShardedDataset."""
    import inspect

    from orchestrator.data.loader import ShardedDataset
    from orchestrator.spec import DataSpec

    assert set(DataSpec.model_fields) <= set(inspect.signature(ShardedDataset).parameters)
