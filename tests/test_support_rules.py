"""The configs' rules (stages.support.rules): values past their limits are refused in one line
that says what they would cost, before anything is written."""

from __future__ import annotations

import pytest

from tests.conftest import _one_error, invoke


@pytest.mark.parametrize("args, needle", [
    (["update", "--learning-rate", "1e30"], "learning-rate"),
    (["update", "--beta", "1e30"], "beta"),
    (["rollout", "--shift", "1e30"], "shift"),
    (["rollout", "--noise-level", "1e-30"], "noise-level"),
    (["rollout", "--branches", "1000000000"], "branches"),
    (["init", "--image-size", "100000"], "GiB"),
    (["pretrain", "--image-size", "100000"], "image-size"),
    (["eval", "--num-steps", "100000000"], "num-steps"),
])
def test_values_past_their_limits_are_refused_saying_what_they_cost(policy_dir, prompts_file, tmp_path, args, needle):
    command, *options = args
    paths = {
        "update": ["--policy", policy_dir, "--rollout", tmp_path / "r", "--rewards", tmp_path / "s", "--out", tmp_path / "o"],
        "rollout": ["--policy", policy_dir, "--prompts", prompts_file, "--out", tmp_path / "o"],
        "init": ["--out", tmp_path / "o"],
        "pretrain": ["--out", tmp_path / "o"],
        "eval": ["--policy", policy_dir, "--out", tmp_path / "o"],
    }[command]
    line = _one_error(invoke(command, *paths, *options), needle)
    assert ("must be at most" in line or "must be at least" in line) and "(" in line  # the limit, and its cost
    assert not (tmp_path / "o").exists()
