"""`tempflow rec` (tempflow_cli.rec): every option documented, bad options refused in one line."""

from __future__ import annotations

import pytest

from tests.conftest import invoke


@pytest.mark.parametrize("command", ["prepare", "pretrain", "train", "eval"])
def test_every_rec_command_documents_its_options(command):
    from tempflow_cli.rec import rec

    result = invoke("rec", command, "--help")
    assert result.exit_code == 0
    for param in rec.commands[command].params:
        assert param.help, f"rec {command} --{param.name} has no help"
        assert param.opts[0] in result.stdout


@pytest.mark.parametrize("args, needle", [
    (["prepare", "--source", "netflix", "--out", "x"], "'netflix' is not one of"),
    (["prepare", "--split", "user", "--min-session-length", "2", "--out", "x"], ">= 3 with --split user"),
    (["pretrain", "--data", "missing.parquet", "--out", "m"], "no such sessions file"),
    (["pretrain", "--data", "d", "--out", "m", "--width", "10", "--heads", "4"], "multiple of --heads"),
    (["train", "--data", "d", "--policy", "p", "--out", "m", "--gamma", "1.5"], "rec train: --gamma must be in [0, 1], got 1.5"),
    (["pretrain", "--data", "d", "--out", "m", "--gamma", "1.5"], "rec pretrain: --gamma must be in [0, 1], got 1.5"),
    (["eval", "--data", "d", "--out", "m.json"], "exactly one of --policy and --popularity"),
    (["eval", "--data", "d", "--policy", "p", "--popularity", "--out", "m.json"], "exactly one of --policy and --popularity"),
    (["eval", "--data", "d", "--popularity", "--protocol", "some", "--out", "m.json"], "'some' is not one of"),
])
def test_rec_bad_options_in_one_line(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("rec", *args)
    assert result.exit_code != 0 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_file_output_is_replaced_by_overwrite(tmp_path):
    """`rec prepare` and `rec eval` write a file: --overwrite replaces an existing one (the command
    names its outputs' kind; it once took every --out for a folder and refused the file)."""
    out = tmp_path / "sim.parquet"
    args = ("rec", "prepare", "--source", "simulator", "--sim-users", "40", "--split", "time",
            "--min-session-length", "2", "--out", out)
    assert invoke(*args).exit_code == 0
    again = invoke(*args, "--overwrite")
    assert again.exit_code == 0, again.output
    refused = invoke(*args)
    assert refused.exit_code == 1 and "already exists" in refused.stderr
