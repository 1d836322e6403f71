"""Rewards by name (stages.rewards): reward specs parsed (a plugin named like a float is a function,
only module:function is ever imported), model and remote rewards planned with their folders and
URLs, and a plugin that fails, returns NaN or does not import refused in one line."""

from __future__ import annotations

import textwrap

import pytest

from stages.rewards import parse_reward_spec
from tests.conftest import (
    _assert_refused,
    _one_error,
    _one_error_line,
    _rollout,
    invoke,
    make_rollout,
)


def test_nan_from_a_user_reward_is_refused(policy_dir, tmp_path, monkeypatch):
    """A module:function reward returning NaN: score refuses and writes nothing."""
    (tmp_path / "nan_reward_for_artifact_tests.py").write_text(textwrap.dedent("""
        import numpy as np
        def returns_nan(images, prompts):
            values = np.zeros(len(images))
            values[-1] = np.nan
            return values
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    rollout = _rollout(policy_dir, tmp_path / "r")
    out = tmp_path / "s.parquet"
    result = invoke("score", "--rollout", rollout, "--reward", "nan_reward_for_artifact_tests:returns_nan",
                    "--out", out)
    _assert_refused(result, out, "NaN", "nan_reward_for_artifact_tests:returns_nan")


def test_user_reward_function_named_like_a_float_is_a_function():
    """'module:nan' names the function nan of module, not a NaN weight; numeric tails are weights."""
    from stages.rewards import RewardSpec
    from stages.support.errors import TempflowError

    assert parse_reward_spec("my_rewards:nan") == RewardSpec("my_rewards:nan", 1.0)
    assert parse_reward_spec("my_rewards:inf:0.5") == RewardSpec("my_rewards:inf", 0.5)
    assert parse_reward_spec("jpeg_compressibility:-2") == RewardSpec("jpeg_compressibility", -2.0)
    with pytest.raises(TempflowError, match="finite"):
        parse_reward_spec("jpeg_compressibility:-inf")


@pytest.mark.parametrize("spec", ["side-effect:f", "os.path", "foo:bar:baz:qux", "a b:c"])
def test_only_module_function_names_are_imported(tmp_path, monkeypatch, spec):
    """A reward that is neither a built-in nor `module:function` fails at parse time, importing nothing."""
    marker = tmp_path / "imported"
    (tmp_path / "side-effect.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef f(images, prompts): return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("score", "--rollout", tmp_path, "--reward", spec, "--out", tmp_path / "s.parquet")
    assert result.exit_code == 2 and "module:function" in result.stderr, result.output
    assert not marker.exists()


@pytest.mark.parametrize("module, body, needle", [
    ("raising_reward", "raise RuntimeError('model server down')", "RuntimeError: model server down"),
    ("wordy_reward", "return {'not': 'numbers'}", "did not return numbers"),
    ("broken_reward", "return 1 +", "SyntaxError"),
])
def test_a_failing_reward_plugin_is_one_line(policy_dir, tmp_path, monkeypatch, module, body, needle):
    (tmp_path / f"{module}.py").write_text(f"def score(images, prompts):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rollout = make_rollout(policy_dir, tmp_path / "r")
    _one_error(invoke("score", "--rollout", rollout, "--reward", f"{module}:score", "--out", tmp_path / "s.parquet"),
               needle)
    assert not (tmp_path / "s.parquet").exists()


@pytest.mark.parametrize("args, needle", [
    (["--reward", "pickscore"], "--reward-model pickscore=DIR"),
    (["--reward", "shapes", "--reward-model", "pickscore=/x"], "names no --reward"),
    (["--reward", "shapes", "--reward-model", "imagereward=/x"], "not a model reward"),
    (["--reward", "pickscore", "--reward-model", "pickscore"], "expected NAME=DIR"),
    (["--reward", "pickscore", "--reward-model", "pickscore=/a", "--reward-model", "pickscore=/b"], "given twice"),
])
def test_reward_option_mistakes_fail_at_parse_time(args, needle, tmp_path):
    r = invoke("score", "--rollout", tmp_path, "--out", tmp_path / "s.parquet", *args)
    assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = invoke("check", "score", *args)
    assert r.exit_code == 2 and needle in r.stderr


def test_a_model_folder_under_home_is_found(folders, monkeypatch, tmp_path):
    from stages.rewards import plan_rewards

    monkeypatch.setenv("HOME", str(folders["clip"].parent))
    (spec,) = plan_rewards(["pickscore"], {"pickscore": "~/clip"})
    assert spec.source == str(folders["clip"])


@pytest.mark.parametrize("args, needle", [
    (["--reward", "judge"], "--reward-url judge=URL"),
    (["--reward", "judge", "--reward-url", "judge=ftp://x"], "must start with http://"),
    (["--reward", "shapes", "--reward-url", "shapes=http://x"], "not as a built-in"),
    (["--reward", "shapes", "--reward-url", "judge=http://x"], "names no --reward"),
])
def test_remote_option_mistakes(args, needle, tmp_path):
    r = invoke("score", "--rollout", tmp_path, "--out", tmp_path / "s.parquet", *args)
    assert r.exit_code == 2 and needle in r.stderr, r.stderr


def test_unknown_reward_fails_at_parse_time(tmp_path):
    r = invoke("score", "--rollout", tmp_path, "--reward", "jpeg_compresibility", "--out", tmp_path / "s.parquet")
    assert r.exit_code == 2
    assert "jpeg_compressibility" in _one_error_line(r)  # the message lists the real names


def test_user_reward_import_errors(policy_dir, tmp_path):
    rollout = make_rollout(policy_dir, tmp_path / "r")
    r = invoke("score", "--rollout", rollout, "--reward", "no_such_module_xyz:f", "--out", tmp_path / "s.parquet")
    assert r.exit_code == 1 and "no_such_module_xyz" in _one_error_line(r)
    r = invoke("score", "--rollout", rollout, "--reward", "json:no_such_function", "--out", tmp_path / "s.parquet")
    assert r.exit_code == 1 and "no_such_function" in _one_error_line(r)
    assert not (tmp_path / "s.parquet").exists()
