"""What every command shares (tempflow_cli.command): one line on stderr for any user error, the
libraries' own output kept off it unless --debug, configs built (and refused) the same way by a
command and by `tempflow check`, every path a command reads protected from its outputs before any
work, and --threads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import PROMPTS, _one_error, _snapshot, invoke, make_rollout


def _tempflow(*args, cwd) -> subprocess.CompletedProcess:
    """A fresh interpreter (a library imported by an earlier test would keep its log level), with the
    environment of a shell that set no library verbosity (an earlier test's command did, in this one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")}
    return subprocess.run([sys.executable, "-m", "tempflow_cli.main", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def test_a_library_log_line_stays_off_stderr_unless_debug(policy_dir, tmp_path):
    """An outside fault matrix found diffusers' own error log before tempflow's line when a model folder
    lacks its safetensors weights: two lines on stderr. Now one, and --debug shows the library's too."""
    for weights in (policy_dir / "transformer").glob("*.safetensors"):
        weights.unlink()
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    quiet = _tempflow("rollout", "--policy", policy_dir, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "r", cwd=tmp_path)
    assert quiet.returncode == 1 and quiet.stderr.count("\n") == 1 and quiet.stderr.startswith("error: ")
    assert "cannot load the tiny policy" in quiet.stderr
    loud = _tempflow("--debug", "rollout", "--policy", policy_dir, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "r",
                     cwd=tmp_path)
    assert "An error occurred while trying to fetch" in loud.stderr and "Traceback" in loud.stderr


def test_check_and_the_command_build_the_same_configs_and_refuse_alike(tmp_path):
    """Every command's config is built once, by the command's own builders: the same refusal, in
    the one form, from the command and from `tempflow check`, whichever option group it is in."""
    for args, says in ((["rollout", "--num-steps", "1"], "rollout: --num-steps must be >= 2, got 1"),
                       (["score", "--reward", "shapes", "--reward-timeout", "0"],
                        "score: --reward-timeout must be a finite number > 0, got 0"),
                       (["eval", "--reward-retries", "21"], "eval: --reward-retries must be at most 20"),
                       (["eval", "--per-task", "0"], "eval: --per-task must be >= 1, got 0"),
                       (["update", "--threads", "0"], "update: --threads must be >= 1, got 0")):
        checked = invoke("check", *args)
        assert checked.exit_code == 1 and checked.stderr.startswith(f"error: {says}"), (args, checked.stderr)


def test_an_option_that_names_the_same_path_as_an_output_is_refused_before_work(policy_dir, tmp_path):
    shutil.copy(policy_dir / "config.json", tmp_path / "x.json")
    r = invoke("init", "--out", tmp_path / "p", "--vocab-from", tmp_path / "p")
    assert r.exit_code == 1 and "would replace the input" in r.stderr


def test_overwrite_never_deletes_prompts_or_vocab_files(policy_dir, tmp_path):
    """An --out that is the folder of --prompts (rollout, eval) or of --vocab-from (init) is refused."""
    user = tmp_path / "userdata"
    user.mkdir()
    prompts = user / "prompts.txt"
    prompts.write_text("a red circle\n")
    (user / "neighbour.txt").write_text("precious")
    before = _snapshot(user)
    runs = [
        ("rollout", "--policy", policy_dir, "--prompts", prompts, "--out", user, "--overwrite"),
        ("eval", "--policy", policy_dir, "--prompts", prompts, "--out", user, "--overwrite", "--num-steps", 2),
        ("init", "--vocab-from", prompts, "--out", user, "--overwrite"),
        ("rollout", "--policy", policy_dir, "--prompts", prompts, "--out", policy_dir / "inside"),
    ]
    for args in runs:
        line = _one_error(invoke(*args), "input")
        assert str(user) in line or str(policy_dir) in line
    assert _snapshot(user) == before
    assert not (policy_dir / "inside").exists()


def test_refusals_come_before_any_work(policy_dir, prompts_file, tmp_path, monkeypatch):
    """An --out of the wrong kind, or --metrics inside --out, is refused before the policy is even loaded."""
    import stages.policies.base

    def no_work(*args, **kwargs):
        raise AssertionError("the stage started working before refusing its output")

    monkeypatch.setattr(stages.policies.base, "load_policy", no_work)
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"mine")
    _one_error(invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", a_file, "--overwrite"),
               "is a file")
    folder = tmp_path / "folder"
    folder.mkdir()
    _one_error(invoke("score", "--rollout", tmp_path / "r", "--reward", "shapes", "--out", folder, "--overwrite"),
               "is a folder")
    _one_error(invoke("update", "--policy", policy_dir, "--rollout", tmp_path / "r", "--rewards", a_file,
                      "--out", tmp_path / "new", "--metrics", tmp_path / "new" / "m.json"), "inside")
    assert a_file.read_bytes() == b"mine" and folder.is_dir()


def test_threads_sets_torchs_threads_for_every_compute_stage(policy_dir, tmp_path, monkeypatch):
    """--threads N reaches torch.set_num_threads before the stage runs; every command that takes
    --device takes --threads; 0 is refused by its config, in the one form."""
    import torch

    from tempflow_cli.main import cli

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    rollout = make_rollout(policy_dir, tmp_path / "r")
    r = invoke("score", "--rollout", rollout, "--reward", "shapes", "--out", tmp_path / "s.parquet", "--threads", "3")
    assert r.exit_code == 0, r.output
    assert calls == [3]
    assert invoke("score", "--rollout", rollout, "--reward", "shapes", "--out", tmp_path / "t.parquet").exit_code == 0
    assert calls == [3]  # without it, torch keeps its own
    r = invoke("score", "--rollout", rollout, "--reward", "shapes", "--out", tmp_path / "u.parquet", "--threads", "0")
    assert r.exit_code == 1 and "score: --threads must be >= 1, got 0" in r.output
    commands = [*(cli.get_command(None, n) for n in cli.list_commands(None)), *cli.get_command(None, "rec").commands.values()]
    with_device = [c for c in commands if any(p.name == "device" for p in c.params)]
    with_threads = [c for c in commands if any(p.name == "threads" for p in c.params)]
    assert with_device == with_threads and len(with_device) == 9  # rollout score update pretrain eval loop; rec's 3


def test_debug_shows_the_traceback(tmp_path, prompts_file):
    from click.testing import CliRunner

    from tempflow_cli.main import cli

    result = CliRunner().invoke(cli, ["--debug", "rollout", "--policy", str(tmp_path / "nope"),
                                      "--prompts", str(prompts_file), "--out", str(tmp_path / "r")])
    assert result.exception is not None and type(result.exception).__name__ == "TempflowError"
