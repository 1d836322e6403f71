"""Where tempflow spends its forward passes: drawn branch steps and their unbiased reweighting,
cheap branch finishes and their NFE accounting (DESIGN.md §2; issue 15 §3)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.artifacts.rollout import Rollout, check_manifest
from stages.artifacts.rollout_config import RolloutConfig
from stages.artifacts.update_record import read_step_spread
from stages.flow import (
    grpo_loss,
    inclusion_probabilities,
    make_sigmas,
    noise_aware_weights,
    sde_step,
    spread_weights,
    systematic_sample,
)
from stages.policies.base import index_cond, load_policy
from stages.rewards import parse_reward_spec
from stages.score import run_score
from stages.support.errors import TempflowError
from stages.update import (
    UpdateConfig,
    carried_spread,
    draw_factors,
    plan_update,
    rollout_conditioning,
    step_reward_spread,
    step_weights,
)
from tests.conftest import PROMPTS, make_rollout

COMPRESSIBILITY = [parse_reward_spec("jpeg_compressibility")]


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    with Rollout(folder) as rollout:
        return {s.key: dict(s.fields) for s in rollout.samples(fields=("meta.json", "state.npy", "next.npy", "image.png"))
                if "image.png" in s.present}


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# --------------------------------------------------------------------------------------------
# The draw: inclusion chances and systematic sampling


def test_inclusion_probabilities_hand_computed():
    """pi = n w / sum w where none exceeds 1; a step that would is certain and the rest share the remainder."""
    assert inclusion_probabilities([1.0, 1.0, 2.0], 2) == pytest.approx([0.5, 0.5, 1.0])
    assert inclusion_probabilities([10.0, 1.0, 1.0], 2) == pytest.approx([1.0, 0.5, 0.5])
    assert inclusion_probabilities([3.0, 1.0], 1) == pytest.approx([0.75, 0.25])
    assert inclusion_probabilities([5.0, 4.0, 1.0, 1.0], 3) == pytest.approx([1.0, 1.0, 0.5, 0.5])
    with pytest.raises(ValueError):
        inclusion_probabilities([1.0, 0.0], 1)
    with pytest.raises(ValueError):
        inclusion_probabilities([1.0, 1.0], 3)


def test_systematic_sample_draws_n_steps_with_their_chances():
    """Exactly n distinct steps per draw; over many draws each step's frequency is its pi."""
    pi = inclusion_probabilities(noise_aware_weights(make_sigmas(10, 3.0), 0.7).tolist(), 3)
    rng, counts, draws = random.Random(0), Counter(), 20000
    for _ in range(draws):
        steps = systematic_sample(pi, rng.random())
        assert len(steps) == 3 == len(set(steps)) and steps == sorted(steps)
        counts.update(steps)
    for k, p in enumerate(pi):
        assert counts[k] / draws == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / draws))
    assert systematic_sample([0.5, 0.5, 1.0], 0.25) == [0, 2]  # points 0.25 and 1.25
    assert systematic_sample([0.5, 0.5, 1.0], 0.75) == [1, 2]


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


def test_step_weights_divide_by_the_relative_chance():
    """w_k * mean(pi) / pi_k: the noise-aware weights with none recorded, uniform chances change nothing."""
    sigmas = make_sigmas(6, 3.0)
    manifest = {"sigmas": sigmas.tolist(), "config": {"noise_level": 0.7}, "step_inclusion": None}
    w = noise_aware_weights(sigmas, 0.7).tolist()
    assert step_weights(manifest, "noise-aware") == pytest.approx(w)
    assert step_weights({**manifest, "step_inclusion": [0.4] * 5}, "noise-aware") == pytest.approx(w)
    pi = [1.0, 0.5, 0.25, 0.125, 0.125]  # sums to 2: mean 0.4
    assert step_weights({**manifest, "step_inclusion": pi}, "uniform") == pytest.approx([0.4, 0.8, 1.6, 3.2, 3.2])
    expected = [wk * 0.4 / p for wk, p in zip(w, pi)]
    assert step_weights({**manifest, "step_inclusion": pi}, "noise-aware") == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Drawn steps in a rollout and the unbiased gradient


def test_weighted_rollout_writes_the_all_steps_transitions_of_its_drawn_steps(policy_dir, tmp_path):
    """The branch noise does not depend on which steps were drawn: a weighted:2 rollout's samples are
    the all-steps rollout's samples of its two steps, byte for byte; its manifest records the draw."""
    every = make_rollout(policy_dir, tmp_path / "all", num_steps=6, seed=4)
    drawn = make_rollout(policy_dir, tmp_path / "w", num_steps=6, seed=4, branch_steps="weighted:2")
    manifest = _manifest(drawn)
    steps = manifest["trained_steps"]
    assert len(steps) == 2 and sum(manifest["step_inclusion"]) == pytest.approx(2.0)
    all_samples, drawn_samples = _samples(every), _samples(drawn)
    assert sorted(drawn_samples) == sorted(k for k in all_samples if int(k.split("_k")[1][:3]) in steps)
    for key, fields in drawn_samples.items():
        for name in ("meta.json", "state.npy", "next.npy"):
            assert fields[name] == all_samples[key][name], (key, name)
    T, n = 6, len(PROMPTS) * 2
    assert manifest["nfe"] == n * (steps[-1] + 1) + n * 2 * sum(T - k - 1 for k in steps)
    assert manifest["decodes"] == n * 2 * len(steps)


def _step_gradients(policy_dir: Path, rollout: Path, scores: Path) -> tuple[dict[int, torch.Tensor], int]:
    """Per step k: the gradient of the sum over its samples of the unweighted clipped loss (on-policy,
    ratio 1), flattened; and the samples per step."""
    policy, _ = load_policy(policy_dir)
    params = [p for _, p in policy.trainable_parameters()]
    with Rollout(rollout) as opened:
        plan = plan_update(opened, scores, UpdateConfig(weighting="uniform"))
        cond = rollout_conditioning(policy, opened)
        by_step: dict[int, list] = {}
        for s in opened.samples(fields=("meta.json", "state.npy", "next.npy")):
            by_step.setdefault(s.meta["step"], []).append(s)
    gradients = {}
    for k, samples in sorted(by_step.items()):
        state = torch.from_numpy(np.stack([s.array("state.npy") for s in samples]))
        nxt = torch.from_numpy(np.stack([s.array("next.npy") for s in samples]))
        metas = [s.meta for s in samples]
        sigma = torch.tensor([m["sigma"] for m in metas])
        v = policy.velocity(state, sigma, index_cond(cond, [m["prompt_index"] for m in metas], "cpu"))
        new = sde_step(v, state, metas[0]["sigma"], metas[0]["sigma_next"], 0.7, prev_sample=nxt)
        advantage = torch.tensor([plan.advantage[s.key] for s in samples])
        loss = grpo_loss(new.log_prob, torch.tensor([m["log_prob"] for m in metas]), advantage, 1.0, 0.01).sum()
        gradients[k] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    counts = {len(v) for v in by_step.values()}
    assert len(counts) == 1
    return gradients, counts.pop()


def test_weighted_draws_give_the_all_steps_gradient_in_expectation(policy_dir, tmp_path):
    """On a fixed all-steps rollout: the gradient the update takes on a weighted:2 draw (its samples, the
    weights of step_weights, the mean over the drawn samples) averaged over 3000 draws equals the
    all-steps gradient within Monte Carlo error. Dropping the 1/pi reweighting does not."""
    T = 6
    rollout = make_rollout(policy_dir, tmp_path / "r", num_steps=T, branches=3)
    run_score(rollout, COMPRESSIBILITY, tmp_path / "s.parquet")
    g, m = _step_gradients(policy_dir, rollout, tmp_path / "s.parquet")
    manifest = _manifest(rollout)
    full_weights = step_weights(manifest, "noise-aware")
    target = sum(full_weights[k] * g[k] for k in g) / ((T - 1) * m)

    def estimates(reweigh: bool) -> torch.Tensor:
        rows = []
        for seed in range(3000):
            plan = RolloutConfig(num_steps=T, branch_steps="weighted:2", seed=seed).step_plan(torch.tensor(manifest["sigmas"]))
            weights = step_weights({**manifest, "step_inclusion": plan.inclusion if reweigh else None}, "noise-aware")
            rows.append(sum(weights[k] * g[k] for k in plan.steps) / (len(plan.steps) * m))
        return torch.stack(rows).double()

    for reweigh, unbiased in ((True, True), (False, False)):
        draws = estimates(reweigh)
        error = float((draws.mean(0) - target.double()).norm())
        monte_carlo = float((draws.var(0) / len(draws)).sum().sqrt())  # the expected error of an unbiased mean
        assert (error < 4 * monte_carlo) == unbiased, (reweigh, error, monte_carlo, float(target.norm()))


def test_reweighted_kl_term_is_the_all_steps_mean_in_expectation():
    """The KL term of a draw, the mean over its samples of draw_factors * kl, averages over 3000
    draws to the all-steps mean (per-step KL values fixed); without the factors it leans to the
    likelier steps."""
    T, sigmas = 10, make_sigmas(10, 3.0)
    kl = [0.5 + k for k in range(T - 1)]  # any per-step mean KL; rising with k, so a lean shows
    target = sum(kl) / (T - 1)
    estimates = {True: [], False: []}
    for seed in range(3000):
        plan = RolloutConfig(num_steps=T, branch_steps="weighted:3", seed=seed).step_plan(sigmas)
        factors = draw_factors({"sigmas": sigmas.tolist(), "step_inclusion": plan.inclusion})
        for reweigh in (True, False):
            estimates[reweigh].append(sum((factors[k] if reweigh else 1.0) * kl[k] for k in plan.steps) / 3)
    for reweigh, unbiased in ((True, True), (False, False)):
        values = torch.tensor(estimates[reweigh], dtype=torch.float64)
        error, monte_carlo = abs(float(values.mean()) - target), float(values.std() / math.sqrt(len(values)))
        assert (error < 4 * monte_carlo) == unbiased, (reweigh, error, monte_carlo)


def test_update_reweighs_drawn_steps(policy_dir, tmp_path):
    """run_update takes the manifest's chances into its weights and says so in metrics.json."""
    from stages.update import run_update

    rollout = make_rollout(policy_dir, tmp_path / "r", num_steps=6, branch_steps="weighted:2", seed=1)
    run_score(rollout, COMPRESSIBILITY, tmp_path / "s.parquet")
    with Rollout(rollout) as opened:
        plan = plan_update(opened, tmp_path / "s.parquet", UpdateConfig())
        expected = step_weights(opened.manifest, "noise-aware")
        steps = {s.key: s.meta["step"] for s in opened.samples(fields=("meta.json",))}
    assert plan.weight == pytest.approx({key: expected[k] for key, k in steps.items()})
    factors = draw_factors(json.loads((rollout / "manifest.json").read_text()))
    assert plan.kl_factor == pytest.approx({key: factors[k] for key, k in steps.items()})
    assert len(set(plan.kl_factor.values())) == 2  # the two drawn steps' chances differ
    metrics = run_update(policy_dir, rollout, tmp_path / "s.parquet", tmp_path / "p", UpdateConfig(beta=0.0)).metrics
    assert metrics["step_reweighting"] == "inclusion"


def test_fixed_branch_steps_record_no_chances(policy_dir, tmp_path):
    rollout = make_rollout(policy_dir, tmp_path / "r", num_steps=6, branch_steps="0,3")
    manifest = _manifest(rollout)
    manifest["step_inclusion"] = [0.4] * 5
    with pytest.raises(TempflowError, match="draws nothing"):
        check_manifest(manifest, rollout / "manifest.json")


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(step_inclusion=[0.5] * 5), "step_inclusion"),  # sums to 2.5 for 2 steps
    (lambda m: m.update(step_inclusion=[1.0, 1.0, 0.0, 0.0, 0.0]), "step_inclusion"),
    (lambda m: m.update(step_inclusion=[0.4] * 4), "step_inclusion"),
    (lambda m: m.update(trained_steps=[3, 1]), "trained_steps"),
    (lambda m: m.update(trained_steps=[0, 5]), "trained_steps"),
    (lambda m: m.update(decodes=-1), "decodes"),
    (lambda m: m.update(step_inclusion=[1.0, 0.25, 0.25, 0.25, 0.25], trained_steps=[1, 2]), "step_inclusion"),
    (lambda m: m.update(step_inclusion=None), "step_inclusion"),  # sampled:2 drew its steps
    (lambda m: m.update(step_spread=[1.0] * 5), "step_spread"),  # sampled:2 does not draw by spread
])
def test_manifest_with_bad_step_records_is_refused(policy_dir, tmp_path, edit, field):
    rollout = make_rollout(policy_dir, tmp_path / "r", num_steps=6, branch_steps="sampled:2")
    manifest = _manifest(rollout)
    check_manifest(manifest, rollout / "manifest.json")
    edit(manifest)
    with pytest.raises(TempflowError, match=field):
        check_manifest(manifest, rollout / "manifest.json")


# --------------------------------------------------------------------------------------------
# Drawing by the measured reward spread


def test_spread_weights_hand_computed():
    """An unmeasured step takes the measured mean; none falls below 5 % of the largest."""
    assert spread_weights([0.2, None, 0.0, 0.1]) == pytest.approx([0.2, 0.1, 0.01, 0.1])
    assert spread_weights([None, None]) is None and spread_weights([0.0, None]) is None


def test_step_reward_spread_hand_computed():
    """The mean over a step's branch groups of their rewards' (population) standard deviation."""
    metas = [{"group": g, "step": k} for g, k in (("a", 0), ("a", 0), ("b", 0), ("b", 0), ("c", 2), ("c", 2))]
    rewards = np.array([0.0, 1.0, 0.5, 0.5, 0.2, 0.6])
    assert step_reward_spread(metas, rewards, 4) == pytest.approx([0.25, None, 0.2, None])
    assert carried_spread([0.25, None, 0.2, None], [0.1, 0.3, 0.4, None]) == [0.25, 0.3, 0.2, None]
    assert carried_spread([0.25, None], None) == [0.25, None] and carried_spread(None, [0.1, 0.2]) is None


def test_spread_draws_follow_the_sampling_policys_measured_spread(policy_dir, tmp_path):
    """spread:2 from a base (nothing measured) draws by the noise-aware weights and records no
    spread; its update measures the two branched steps; the next rollout draws by that policy's
    spread, and the next update carries the steps it did not branch at."""
    from stages.update import run_update

    first = make_rollout(policy_dir, tmp_path / "r1", num_steps=6, branch_steps="spread:2", seed=2)
    weighted = make_rollout(policy_dir, tmp_path / "w", num_steps=6, branch_steps="weighted:2", seed=2)
    assert _manifest(first)["step_spread"] is None
    assert _manifest(first)["step_inclusion"] == _manifest(weighted)["step_inclusion"]
    run_score(first, COMPRESSIBILITY, tmp_path / "s1.parquet")
    spread = run_update(policy_dir, first, tmp_path / "s1.parquet", tmp_path / "p1", UpdateConfig(beta=0.0)).metrics[
        "step_reward_spread"]
    drawn = _manifest(first)["trained_steps"]
    assert [k for k, s in enumerate(spread) if s is not None] == drawn and all(spread[k] > 0 for k in drawn)

    second = make_rollout(tmp_path / "p1", tmp_path / "r2", num_steps=6, branch_steps="spread:2", seed=5)
    manifest = _manifest(second)
    assert manifest["step_spread"] == pytest.approx(spread_weights(spread))
    assert manifest["step_inclusion"] == pytest.approx(inclusion_probabilities(spread_weights(spread), 2))
    assert manifest["trained_steps"] == RolloutConfig(num_steps=6, branch_steps="spread:2", seed=5).step_plan(
        spread=spread).steps
    for edit in ([1.0] * 4, [0.0] + [1.0] * 4, [1.0, 2.0, 3.0, 4.0, 5.0]):  # short, a zero, other chances
        with pytest.raises(TempflowError, match="step_spread|step_inclusion"):
            check_manifest({**manifest, "step_spread": edit}, second / "manifest.json")
    with pytest.raises(TempflowError, match="step_spread"):  # a rollout that draws nothing records no weights
        check_manifest({**_manifest(make_rollout(policy_dir, tmp_path / "all", num_steps=6)), "step_spread": [1.0] * 5},
                       second / "manifest.json")
    run_score(second, COMPRESSIBILITY, tmp_path / "s2.parquet")
    carried = run_update(tmp_path / "p1", second, tmp_path / "s2.parquet", tmp_path / "p2", UpdateConfig(beta=0.0)).metrics[
        "step_reward_spread"]
    for k in range(5):
        if k in manifest["trained_steps"]:
            assert carried[k] is not None and carried[k] > 0
        else:
            assert carried[k] == spread[k]


def test_read_step_spread_refuses_damaged_metrics_and_ignores_another_schedule(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"step_reward_spread": [0.1, None, 0.2]}))
    assert read_step_spread(tmp_path, 4) == [0.1, None, 0.2]
    assert read_step_spread(tmp_path, 6) is None  # measured on a 4-step schedule: not this one's
    assert read_step_spread(tmp_path / "nothing", 4) is None and read_step_spread(None, 4) is None
    for damaged in ({"step_reward_spread": [0.1, -1.0, 0.2]}, {"step_reward_spread": "wide"}, [0.1, 0.2, 0.3]):
        (tmp_path / "metrics.json").write_text(json.dumps(damaged))
        with pytest.raises(TempflowError, match="damaged"):
            read_step_spread(tmp_path, 4)


# --------------------------------------------------------------------------------------------
# Cheap finishes


def test_finish_path_hand_computed():
    config = RolloutConfig(num_steps=6, finish_steps=2)
    assert [config.finish_path(k) for k in range(5)] == [[1, 3, 6], [2, 4, 6], [3, 5, 6], [4, 5, 6], [5, 6]]
    assert RolloutConfig(num_steps=6).finish_path(0) == [1, 2, 3, 4, 5, 6]
    assert RolloutConfig(num_steps=10, finish_steps=1).finish_path(2) == [3, 10]
    with pytest.raises(TempflowError, match="finish-steps"):
        RolloutConfig(algo="flow-grpo", finish_steps=2)
    with pytest.raises(TempflowError, match="finish-steps"):
        RolloutConfig(finish_steps=-1)


def test_cheap_finish_counts_its_nfe_and_keeps_the_trained_transitions(policy_dir, tmp_path):
    """--finish-steps 2 at T = 6 finishes along [[1,3,6],[2,4,6],[3,5,6],[4,5,6],[5,6]]: 9 forward passes per
    branch set instead of 15. The trained transitions (x_k, x_{k+1}, log p) are those of the full finish;
    the early steps' images differ."""
    full = make_rollout(policy_dir, tmp_path / "full", num_steps=6, seed=2)
    cheap = make_rollout(policy_dir, tmp_path / "cheap", num_steps=6, seed=2, finish_steps=2)
    n, K = len(PROMPTS) * 2, 2
    assert _manifest(cheap)["nfe"] == n * 5 + n * K * 9
    assert _manifest(full)["nfe"] == n * 5 + n * K * 15
    assert _manifest(cheap)["decodes"] == _manifest(full)["decodes"] == n * K * 5
    a, b = _samples(full), _samples(cheap)
    assert sorted(a) == sorted(b)
    for key in a:
        for name in ("meta.json", "state.npy", "next.npy"):
            assert a[key][name] == b[key][name], (key, name)
    assert any(a[key]["image.png"] != b[key]["image.png"] for key in a if "_k000_" in key)
