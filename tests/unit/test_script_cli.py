"""`trainctl run|submit ... -- python train.py`: the spec a command line makes, torchrun's flags,
and the pre-submit checks of a command job (no cluster needed)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from orchestrator.client.api import resolve
from orchestrator.client.cli import main
from orchestrator.client.command_job import (
    Launch,
    ResourceFlags,
    command_job,
    default_name,
    parse_launch,
    script_of,
)
from orchestrator.errors import SpecError
from orchestrator.spec import parse_spec

pytestmark = pytest.mark.timeout(60)


def test_a_plain_command_is_kept_as_it_is():
    assert parse_launch(["python", "train.py", "--lr", "0.1"]) == Launch(["python", "train.py", "--lr", "0.1"])


@pytest.mark.parametrize("argv, expected", [
    (["torchrun", "--nnodes", "2", "--nproc-per-node", "4", "train.py", "--lr", "0.1"],
     Launch(["python", "train.py", "--lr", "0.1"], nnodes=2, nproc_per_node=4)),
    (["torchrun", "--nnodes=1:3", "--nproc_per_node=2", "--standalone", "--rdzv-backend", "c10d", "--max-restarts", "5",
      "train.py"], Launch(["python", "train.py"], nnodes=3, min_nnodes=1, nproc_per_node=2, max_restarts=5)),
    (["python", "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "pkg.train", "--x"],
     Launch(["python", "-m", "pkg.train", "--x"], nproc_per_node=2)),
    (["/usr/bin/torchrun", "--no-python", "./run.sh", "a"], Launch(["./run.sh", "a"])),
])
def test_torchrun_flags_become_the_scripts_argv_and_a_layout(argv, expected):
    assert parse_launch(argv) == expected


@pytest.mark.parametrize("argv, words", [
    (["torchrun", "--frobnicate", "train.py"], "'--frobnicate' is not understood"),
    (["torchrun", "--nproc-per-node", "gpu", "train.py"], "needs a number"),
    (["torchrun", "--nnodes", "2"], "torchrun without a script"),
])
def test_a_torchrun_flag_trainctl_cannot_honour_is_one_clear_error(argv, words):
    with pytest.raises(SpecError, match=words):
        parse_launch(argv)


def test_nnodes_and_nproc_per_node_map_onto_workers_colocate_and_spread():
    doc = command_job(None, ["torchrun", "--nnodes", "2", "--nproc-per-node", "2", "train.py"], ResourceFlags())
    assert doc == {"command": ["python", "train.py"], "name": "train",
                   "resources": {"workers": 4, "colocate": 2, "placement": "spread"}}
    elastic = command_job(None, ["torchrun", "--nnodes", "1:2", "--nproc-per-node", "2", "t.py"], ResourceFlags())
    assert elastic["resources"]["min_workers"] == 2 and elastic["resources"]["workers"] == 4
    one_node = command_job(None, ["python", "t.py"], ResourceFlags(nproc_per_node=3))
    assert one_node["resources"] == {"workers": 3, "colocate": 3}


def test_the_command_replaces_the_files_entrypoint_and_flags_win_over_the_file():
    doc = {"name": "from-yaml", "entrypoint": "m:f", "resources": {"workers": 8, "cpus_per_worker": 2}}
    out = command_job(doc, ["python", "train.py"], ResourceFlags(workers=2, placement="spread"))
    assert out["command"] == ["python", "train.py"] and "entrypoint" not in out
    assert out["name"] == "from-yaml"  # the file's name stays; only without one is it the script's stem
    assert out["resources"] == {"workers": 2, "cpus_per_worker": 2, "placement": "spread"}
    assert doc["entrypoint"] == "m:f"  # the caller's document is not edited
    spec = parse_spec(out)
    assert spec.command == ["python", "train.py"] and spec.entrypoint is None


@pytest.mark.parametrize("command, name", [
    (["python", "train.py"], "train"), (["python", "-u", "src/my train.py"], "my-train"),
    (["python", "-m", "pkg.finetune"], "finetune"), (["./_run.sh"], "run"), (["python", "-c", "x"], "python")])
def test_default_name_is_the_scripts_stem(command, name):
    assert default_name(command) == name


def test_script_of_skips_interpreter_options():
    assert script_of(["python3", "-u", "-W", "ignore", "train.py", "x.py"]) == "train.py"
    assert script_of(["python", "-m", "pkg"]) is None and script_of(["bash", "x.py"]) is None


# ---- pre-submit checks of a command job --------------------------------------------------

def _command_spec(tmp_path, **fields):
    return parse_spec({"name": "s", "command": ["python", "train.py"], "working_dir": str(tmp_path), **fields})


def test_a_command_job_needs_its_script_not_an_importable_entrypoint(tmp_path):
    (tmp_path / "train.py").write_text("import this_module_does_not_exist\n")  # never imported by the check
    resolved = resolve(_command_spec(tmp_path))
    assert resolved.working_dir == str(tmp_path)


def test_a_missing_script_is_named_with_the_working_dir(tmp_path):
    with pytest.raises(SpecError, match=rf"command: train.py is not a file in working_dir {tmp_path}"):
        resolve(_command_spec(tmp_path))


@pytest.mark.parametrize("fields, words", [
    ({"strategy": {"name": "fsdp"}}, "strategy: a command job sets up its own"),
    ({"data": {"train": {"path": "x"}}}, "data"),
    ({"post_training": {"passes": [{"quantize": {"method": "dynamic_int8"}}], "hooks": "m"}}, "post_training: a command job"),
])
def test_entrypoint_only_fields_are_refused_for_a_command_job(tmp_path, fields, words):
    (tmp_path / "train.py").write_text("")
    with pytest.raises(SpecError, match=words):
        resolve(_command_spec(tmp_path, **fields))


# ---- the CLI --------------------------------------------------------------------------------

def _cli(args, cwd):
    import os

    before = os.getcwd()
    os.chdir(cwd)  # working_dir "." is the directory the CLI runs in
    try:
        return CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        os.chdir(before)


def test_cli_a_missing_script_is_exit_2_and_one_line_before_any_cluster(tmp_path):
    result = _cli(["submit", "--address", "127.0.0.1:1", "--workers", "2", "--", "python", "nope.py", "--lr", "1"], tmp_path)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "command: nope.py is not a file in working_dir" in result.output


def test_cli_without_a_file_or_a_command_says_what_to_give(tmp_path):
    result = _cli(["run"], tmp_path)
    assert result.exit_code == 2 and "run: Missing argument 'JOB_FILE' (or a command after --" in result.output


def test_cli_options_after_the_dashes_belong_to_the_script(tmp_path):
    from orchestrator.client import cli

    seen = {}

    def fake_prepare(job_file, overrides, command=None, flags=None):
        seen.update(job_file=job_file, command=command, flags=flags)
        raise SpecError("stop here")

    original, cli._prepare = cli._prepare, fake_prepare
    try:
        result = _cli(["submit", "--workers", "2", "--placement", "spread", "--",
                       "python", "train.py", "--workers", "9", "--", "x"], tmp_path)
    finally:
        cli._prepare = original
    assert result.exit_code == 2
    assert seen["command"] == ["python", "train.py", "--workers", "9", "--", "x"]
    assert seen["flags"] == ResourceFlags(workers=2, placement="spread") and seen["job_file"] is None
