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
        "command",
        "queue",
        "preemptible",
        "early_stop",
        "tracking",
    ):
        assert field in props
    assert set(schema["required"]) == {"name"}  # and one of entrypoint or command


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


# ---- every wrong value said in words (no pydantic text, no regex) ------------------------------

PYDANTIC_TEXTS = ("Input should", "String should", "valid dictionary", "instance of", "Field required",
                  "after validation", "^[", "pattern '", "Value error")

PRUNE = {"method": "l1_unstructured", "amount": 0.5}


def post(**fields) -> dict:
    return {"post_training": {"passes": [{"prune": dict(PRUNE)}], **fields}}


def prune(**fields) -> dict:
    return {"post_training": {"passes": [{"prune": {**PRUNE, **fields}}]}}


@pytest.mark.parametrize(("patch", "expected"), [
    # a name that does not fit: what is allowed, how long, the offending value
    ({"name": "bad name!"}, ["name: 'bad name!' is not allowed", "1 to 63 letters, digits, '.', '_' or '-'",
                             "starting with a letter or digit"]),
    ({"name": "-starts-with-dash"}, ["name: '-starts-with-dash' is not allowed", "starting with a letter"]),
    ({"name": "x" * 70}, ["name: 'xxxx", "(70 characters) is not allowed", "1 to 63"]),
    ({"name": 123}, ["name: 123 is a number, not text", 'write it in quotes: "123"']),
    ({"name": True}, ["name: true is a boolean, not text", 'write it in quotes: "true"']),
    # enums (Literal)
    ({"resources": {"placement": "everywhere"}},
     ["resources.placement: 'everywhere' is not one of pack, spread, strict_spread or strict_pack"]),
    ({"failure": {"unschedulable": "wait"}}, ["failure.unschedulable: 'wait' is not one of queue or fail"]),
    ({"data": {"train": {"path": "d", "remainder": "keep"}}}, ["data.train.remainder: 'keep' is not one of drop or pad"]),
    ({"data": {"train": {"path": "d", "ragged": "x"}}}, ["data.train.ragged: 'x' is not one of pad or pack"]),
    (prune(method="l1"), ["post_training.passes.0.prune.method: 'l1' is not one of l1_unstructured or l1_structured"]),
    ({"post_training": {"passes": [{"quantize": {"method": "int3"}}]}},
     ["post_training.passes.0.quantize.method: 'int3' is not one of dynamic_int8, static_int8, weight_only_int8 "
      "or weight_only_int4"]),
    # bounds: ge, gt, lt, both ends
    ({"resources": {"workers": 0}}, ["resources.workers: 0 is out of range; it must be at least 1"]),
    ({"resources": {"cpus_per_worker": 0}}, ["resources.cpus_per_worker: 0 is out of range; it must be greater than 0"]),
    ({"resources": {"gpus_per_worker": -1}}, ["resources.gpus_per_worker: -1 is out of range; it must be at least 0"]),
    ({"resources": {"colocate": 0}}, ["resources.colocate: 0 is out of range; it must be at least 1"]),
    ({"checkpoint": {"every_n_steps": 0}}, ["checkpoint.every_n_steps: 0 is out of range; it must be at least 1"]),
    ({"checkpoint": {"keep": 0}}, ["checkpoint.keep: 0 is out of range"]),
    ({"failure": {"restart_timeout_s": 0}}, ["failure.restart_timeout_s: 0 is out of range; it must be greater than 0"]),
    ({"data": {"train": {"path": "d", "prefetch": -1}}}, ["data.train.prefetch: -1 is out of range; it must be at least 0"]),
    (prune(amount=1.5), ["post_training.passes.0.prune.amount: 1.5 is out of range; "
                         "it must be greater than 0 and less than 1"]),
    (prune(amount=0), ["prune.amount: 0 is out of range; it must be greater than 0 and less than 1"]),
    (post(gate={"min_speedup": 0.5}), ["post_training.gate.min_speedup: 0.5 is out of range; it must be at least 1"]),
    (post(gate={"min_size_gain": 1}), ["post_training.gate.min_size_gain: 1 is out of range; "
                                       "it must be at least 0 and less than 1"]),
    (post(eval={"latency_iters": 5}), ["post_training.eval.latency_iters: 5 is out of range; it must be at least 10"]),
    (prune(finetune={"lr": -1}), ["post_training.passes.0.prune.finetune.lr: -1 is out of range; "
                                  "it must be greater than 0"]),
    # not finite: would pass the bounds and fail much later
    ({"resources": {"cpus_per_worker": float("inf")}}, ["resources.cpus_per_worker: Infinity is not a finite number"]),
    ({"failure": {"restart_timeout_s": float("nan")}}, ["failure.restart_timeout_s: NaN is not a finite number",
                                                        "e.g. 300"]),
    # wrong types
    ({"resources": {"workers": "two"}}, ["resources.workers: 'two' is not a whole number; give an integer, e.g. 1"]),
    ({"resources": {"workers": 1.5}}, ["resources.workers: 1.5 is not a whole number"]),
    ({"priority": "high"}, ["priority: 'high' is not a whole number; give an integer, e.g. 0"]),
    ({"resources": {"cpus_per_worker": "lots"}}, ["resources.cpus_per_worker: 'lots' is not a number; give a number"]),
    ({"data": {"train": {"path": "d", "shuffle": "maybe"}}},
     ["data.train.shuffle: 'maybe' is not true or false; write true or false"]),
    ({"data": {"train": {"path": 3}}}, ["data.train.path: 3 is a number, not text", 'quotes: "3"']),
    ({"checkpoint": {"storage": None}}, ["checkpoint.storage: is empty (null)", "leave the field out"]),
    ({"checkpoint": {"storage": ["a"]}}, ['checkpoint.storage: ["a"] is a list, not text']),
    # mappings vs lists
    ({"resources": 4}, ["resources: 4 is a number, not a mapping", "colocate, cpus_per_worker, gpus_per_worker"]),
    ({"resources": [1]}, ["resources: [1] is a list, not a mapping"]),
    ({"strategy": "ddp"}, ["strategy: 'ddp' is text, not a mapping", "(name, options)"]),
    ({"strategy": {"name": "ddp", "options": [1]}}, ["strategy.options: [1] is a list, not a mapping",
                                                     "{key: value, ...}"]),
    ({"config": [1, 2]}, ["config: [1, 2] is a list, not a mapping"]),
    ({"env": ["A=1"]}, ['env: ["A=1"] is a list, not a mapping']),
    ({"data": [{"path": "d"}]}, ["data: [", "is a list, not a mapping"]),
    ({"data": {"train": "d"}}, ["data.train: 'd' is text, not a mapping", "batch_size", "path"]),
    ({"data": {1: {"path": "d"}}}, ["data: the key 1 is a number, not text; write it in quotes"]),
    ({"data": {"train": {"path": "d", "columns": "x"}}}, ["data.train.columns: 'x' is text, not a list",
                                                          "[item, ...]"]),
    ({"post_training": [PRUNE]}, ["post_training: [", "is a list, not a mapping", "passes"]),
    ({"post_training": {"passes": {"prune": PRUNE}}}, ["post_training.passes: ", "is a mapping, not a list"]),
    ({"post_training": {"passes": []}}, ["post_training.passes: [] has too few items; give at least 1 item"]),
    ({"post_training": {"passes": ["prune"]}}, ["post_training.passes.0: 'prune' is text, not a mapping",
                                                "(prune, quantize)"]),
    (prune(ignore="head"), ["post_training.passes.0.prune.ignore: 'head' is text, not a list"]),
    # extra fields in nested models name that model's fields
    ({"data": {"train": {"path": "d", "batch": 8}}}, ["data.train.batch: unknown field", "batch_size", "shuffle"]),
    (prune(finetune={"steps": 5, "lrate": 1}), ["post_training.passes.0.prune.finetune.lrate: unknown field",
                                                "lr, split, steps"]),
    (post(gate={"metrc": "acc"}), ["post_training.gate.metrc: unknown field", "max_drop", "metric"]),
    # environment variables that no worker could start with
    ({"env": {"A=B": "1"}}, ["env: 'A=B': '1' cannot be an environment variable", "rename or remove it"]),
    ({"env": {"A": "x\0y"}}, ["env: 'A':", "cannot be an environment variable"]),
])
def test_every_wrong_value_is_said_in_words(patch, expected):
    message = spec_error({**MINIMAL, **patch})
    assert message.startswith("job.yaml: "), message
    for needle in expected:
        assert needle in message, message
    for raw in PYDANTIC_TEXTS:
        assert raw not in message, message


def test_an_unknown_field_inside_a_data_split_lists_the_split_fields():
    """The hint walked into DataSpec by the split's *name* and so offered no field at all."""
    message = spec_error({**MINIMAL, "data": {"train": {"path": "d", "bogus": 1}}})
    assert message.startswith("job.yaml: data.train.bogus: unknown field; remove it or use one of: batch_size,")


def test_a_long_value_is_cut_to_keep_one_line():
    message = spec_error({**MINIMAL, "priority": list(range(200))})
    assert "priority: [0, 1, 2" in message and "..." in message and len(message) < 200


def test_a_value_from_set_is_blamed_on_set_not_on_the_file(tmp_path):
    path = write(tmp_path, VALID_YAML)
    message = spec_error(path=path, overrides=["resources.placement=everywhere"])
    assert message.startswith("--set resources.placement: 'everywhere' is not one of pack, spread"), message
    assert spec_error(path=path, overrides=["resources=4"]).startswith("--set resources: 4 is a number")
    # the file's own mistakes still name the file, whatever else is --set
    path = write(tmp_path, VALID_YAML.replace("workers: 2", "workers: 0"))
    assert spec_error(path=path, overrides=["priority=1"]).startswith(f"{path}: resources.workers: 0 is out")


def test_a_yaml_date_where_text_belongs_says_to_quote_it(tmp_path):
    message = spec_error(path=write(tmp_path, "name: 2024-01-01\nentrypoint: a:b\n"))
    assert "name: 2024-01-01 is a date, not text; write it in quotes" in message


def test_env_values_keep_working():
    assert parse_spec({**MINIMAL, "env": {"A": 1, "B": "x=y"}}).env == {"A": "1", "B": "x=y"}


# ---- files that are not YAML text ----------------------------------------------------------------


def test_a_binary_job_file_is_one_line(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02}q\x00")
    message = spec_error(path=path)
    assert message == (f"{path}: not a text file (byte 0x80 at offset 0 is not UTF-8); "
                       "pass the path of a job YAML")


def test_a_job_file_with_control_characters_is_one_line(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"name: a\x00b\nentrypoint: a:b\n")
    message = spec_error(path=path)
    assert message.startswith(f"{path}: character U+0000 at offset 7 is not allowed in YAML")
    assert "pass the path of a job YAML" in message


def test_an_unreadable_job_file_is_one_line(tmp_path, monkeypatch):
    from pathlib import Path

    path = write(tmp_path, VALID_YAML)

    def denied(self, *args, **kwargs):  # root reads any file, so a chmod cannot show this here
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    assert spec_error(path=path) == f"{path}: cannot read the job file (Permission denied); check its permissions"
