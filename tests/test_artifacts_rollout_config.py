"""The rollout's config (stages.artifacts.rollout_config): bad options refused in one line naming
the option, the branch steps a config draws with their chances, and the paths of cheap finishes."""

from __future__ import annotations

import pytest

from stages.artifacts.rollout_config import RolloutConfig
from stages.flow import inclusion_probabilities, make_sigmas, noise_aware_weights
from stages.support.errors import TempflowError
from tests.conftest import _one_error_line, invoke


def test_step_plans_are_drawn_once_per_seed_with_their_chances():
    """sampled:N has equal chances N/(T-1); weighted:N the noise-aware ones; fixed sets record none."""
    T, sigmas = 6, make_sigmas(6, 3.0)
    plan = RolloutConfig(num_steps=T, branch_steps="sampled:2", seed=3).step_plan()
    assert len(plan.steps) == 2 and plan.inclusion == [0.4] * 5
    weighted = RolloutConfig(num_steps=T, branch_steps="weighted:2", seed=3).step_plan(sigmas)
    assert weighted.inclusion == pytest.approx(inclusion_probabilities(noise_aware_weights(sigmas, 0.7).tolist(), 2))
    assert len(weighted.steps) == 2
    assert weighted == RolloutConfig(num_steps=T, branch_steps="weighted:2", seed=3).step_plan(sigmas)  # same seed, same draw
    draws = {tuple(RolloutConfig(num_steps=T, branch_steps="weighted:2", seed=s).step_plan().steps) for s in range(40)}
    assert len(draws) > 3
    for spec, steps in (("all", [0, 1, 2, 3, 4]), ("first:2", [0, 1]), ("3,1", [1, 3])):
        assert RolloutConfig(num_steps=T, branch_steps=spec).step_plan().__dict__ == {"steps": steps, "inclusion": None,
                                                                                     "spread": None}
    with pytest.raises(TempflowError, match="weighted:N"):
        RolloutConfig(num_steps=T, branch_steps="weighted:6")


def test_finish_path_hand_computed():
    config = RolloutConfig(num_steps=6, finish_steps=2)
    assert [config.finish_path(k) for k in range(5)] == [[1, 3, 6], [2, 4, 6], [3, 5, 6], [4, 5, 6], [5, 6]]
    assert RolloutConfig(num_steps=6).finish_path(0) == [1, 2, 3, 4, 5, 6]
    assert RolloutConfig(num_steps=10, finish_steps=1).finish_path(2) == [3, 10]
    with pytest.raises(TempflowError, match="finish-steps"):
        RolloutConfig(algo="flow-grpo", finish_steps=2)
    with pytest.raises(TempflowError, match="finish-steps"):
        RolloutConfig(finish_steps=-1)


@pytest.mark.parametrize("args, needle", [
    (["--algo", "grpo"], "'--algo'"),
    (["--branch-steps", "9"], "branch-steps"),
    (["--branch-steps", "first:x"], "branch-steps"),
    (["--num-steps", "1"], "rollout: --num-steps must be >= 2, got 1"),
    (["--branches", "1"], "--branches must be >= 2 with --algo tempflow"),
    (["--algo", "flow-grpo-fast", "--window", "4", "--num-steps", "6"], "window"),
    (["--noise-level", "0"], "rollout: --noise-level must be a finite number > 0, got 0"),
])
def test_rollout_bad_options(policy_dir, prompts_file, tmp_path, args, needle):
    """Bad option values exit non-zero with one line naming the option; nothing is written."""
    out = tmp_path / "r"
    result = invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", out, *args)
    assert result.exit_code != 0
    assert needle in _one_error_line(result)
    assert not out.exists()
