"""What every command shares (tempflow_cli.command): one line on stderr for any user error, the
libraries' own output kept off it unless --debug, configs built (and refused) the same way by a
command and by `tempflow check`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import PROMPTS, invoke


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
