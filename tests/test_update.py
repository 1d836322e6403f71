"""The update stage (stages.update): scores must be of the rollout it trains on, drawn branch steps
are reweighted so that the gradient and the KL term are the all-steps ones in expectation, the
reward spread per step it measures, the metrics it writes, two processes under torchrun, and a
Ctrl-C or a broken step that leaves nothing behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.artifacts.rollout import Rollout
from stages.artifacts.rollout_config import RolloutConfig
from stages.flow import grpo_loss, make_sigmas, noise_aware_weights, sde_step
from stages.policies.base import index_cond, load_policy
from stages.score import run_score
from stages.support.distributed import Ranks
from stages.update import (
    UpdateConfig,
    carried_spread,
    draw_factors,
    plan_update,
    rollout_conditioning,
    step_reward_spread,
    step_weights,
)
from tests.conftest import (
    COMPRESSIBILITY,
    _assert_refused,
    _manifest,
    _one_error,
    _partials,
    _rollout,
    _scored,
    _scored_by_cli,
    _torchrun,
    _update_cli,
    invoke,
    make_rollout,
)


def test_scores_of_another_rollout_are_refused(policy_dir, tmp_path):
    """Scores of rollout A given with rollout B (another seed): update refuses, naming the mismatch."""
    _, scores_a = _scored(policy_dir, tmp_path, "a", seed=0)
    rollout_b = _rollout(policy_dir, tmp_path / "b", seed=1)
    out = tmp_path / "new"
    line = _assert_refused(_update_cli(policy_dir, rollout_b, scores_a, out), out, "another rollout")
    assert str(rollout_b) in line


def test_interrupted_update_leaves_nothing_and_rerun_succeeds(policy_dir, tmp_path, monkeypatch):
    """Ctrl-C while the new policy folder is being written: no output, no partial; a rerun succeeds."""
    import stages.update

    rollout, scores = _scored(policy_dir, tmp_path)
    out = tmp_path / "new"
    real = stages.update.save_optimizer

    def save_then_interrupt(optimizer, names, folder):
        real(optimizer, names, folder)
        assert any(folder.iterdir())  # weights and optimizer state already in the temporary folder
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(stages.update, "save_optimizer", save_then_interrupt)
        result = _update_cli(policy_dir, rollout, scores, out)
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr
    assert not out.exists() and _partials(out) == []

    result = _update_cli(policy_dir, rollout, scores, out)
    assert result.exit_code == 0, result.output
    assert (out / "metrics.json").is_file() and _partials(out) == []


def test_metrics_path_obeys_overwrite_and_kind(policy_dir, tmp_path):
    """--metrics never replaces an existing folder, and an existing file only with --overwrite."""
    rollout, scores = _scored(policy_dir, tmp_path)
    folder = tmp_path / "metrics"
    (folder / "it01.json").parent.mkdir()
    (folder / "it01.json").write_text("{}")
    r = _update_cli(policy_dir, rollout, scores, tmp_path / "new", "--metrics", folder)
    assert r.exit_code == 1 and "--overwrite" in r.stderr and (folder / "it01.json").is_file()
    r = _update_cli(policy_dir, rollout, scores, tmp_path / "new", "--metrics", folder, "--overwrite")
    assert r.exit_code == 1 and "folder" in r.stderr and (folder / "it01.json").is_file()
    assert not (tmp_path / "new").exists()  # refused before anything was trained or written


def test_edited_manifest_no_longer_matches_its_scores(policy_dir, tmp_path):
    """Scores name the manifest's hash: an update on an edited manifest is refused before any sample is read."""
    rollout, scores = _scored(policy_dir, tmp_path)
    manifest = _manifest(rollout)
    manifest["config"]["batch_size"] += 1  # still a valid manifest, but not the one that was scored
    (rollout / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "new"
    r = _update_cli(policy_dir, rollout, scores, out)
    assert r.exit_code == 1 and not out.exists()
    assert "another rollout" in r.stderr


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


def _step_gradients(policy_dir: Path, rollout: Path, scores: Path) -> tuple[dict[int, torch.Tensor], int]:
    """Per step k: the gradient of the sum over its samples of the unweighted clipped loss (on-policy,
    ratio 1), flattened; and the samples per step."""
    policy, _ = load_policy(policy_dir)
    params = [p for _, p in policy.trainable_parameters()]
    with Rollout(rollout) as opened:
        plan = plan_update(opened, scores, UpdateConfig(weighting="uniform"))
        cond = rollout_conditioning(policy, opened)
        by_step: dict[int, list] = {}
        for s in opened.samples(fields=("meta.json", "state.npy", "mean.npy")):
            by_step.setdefault(s.meta["step"], []).append(s)
    gradients = {}
    for k, samples in sorted(by_step.items()):
        state = torch.from_numpy(np.stack([s.state() for s in samples]))
        nxt = torch.from_numpy(np.stack([s.next() for s in samples]))
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


def test_step_reward_spread_hand_computed():
    """The mean over a step's branch groups of their rewards' (population) standard deviation."""
    metas = [{"group": g, "step": k} for g, k in (("a", 0), ("a", 0), ("b", 0), ("b", 0), ("c", 2), ("c", 2))]
    rewards = np.array([0.0, 1.0, 0.5, 0.5, 0.2, 0.6])
    assert step_reward_spread(metas, rewards, 4) == pytest.approx([0.25, None, 0.2, None])
    assert carried_spread([0.25, None, 0.2, None], [0.1, 0.3, 0.4, None]) == [0.25, 0.3, 0.2, None]
    assert carried_spread([0.25, None], None) == [0.25, None] and carried_spread(None, [0.1, 0.2]) is None


def test_update_that_breaks_the_weights_writes_nothing(policy_dir, tmp_path, monkeypatch):
    """A step that leaves an infinite weight: the update stops, names it, and writes no policy."""
    import stages.update

    rollout, scores = _scored_by_cli(policy_dir, tmp_path)
    real_step = stages.update.Trainer.step

    def step_then_break(self, batch):
        real_step(self, batch)
        with torch.no_grad():
            next(self.policy.trainable().parameters()).view(-1)[0] = float("inf")

    monkeypatch.setattr(stages.update.Trainer, "step", step_then_break)
    out = tmp_path / "new"
    _one_error(invoke("update", "--policy", policy_dir, "--rollout", rollout, "--rewards", scores, "--out", out,
                      "--beta", 0, "--metrics", tmp_path / "m.json"), "nothing was written")
    assert not out.exists() and not (tmp_path / "m.json").exists()


def _scored_rollout(policy_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    from stages.rewards import parse_reward_spec
    from stages.score import run_score
    from tests.conftest import make_rollout

    rollout = make_rollout(policy_dir, tmp_path / "r", num_steps=4, branches=3)
    run_score(rollout, [parse_reward_spec("jpeg_compressibility")], tmp_path / "s.parquet")
    return rollout, tmp_path / "s.parquet"


def test_a_rank_without_rows_computes_one_that_weighs_nothing(policy_dir, tmp_path):
    from stages.artifacts.rollout import Rollout
    from stages.update import UpdateConfig, _rank_batch, plan_update

    rollout, scores = _scored_rollout(policy_dir, tmp_path)
    with Rollout(rollout) as opened:
        plan = plan_update(opened, scores, UpdateConfig())
        samples = list(opened.samples(fields=("meta.json", "state.npy", "mean.npy")))[:3]
        whole = _rank_batch(samples, plan, opened.manifest, Ranks())
        first, second = (_rank_batch(samples, plan, opened.manifest, Ranks(r, 2)) for r in (0, 1))
        alone = [_rank_batch(samples[:1], plan, opened.manifest, Ranks(r, 2)) for r in (0, 1)]
    assert (whole.scale, whole.global_size, len(whole.prompt_index)) == (1.0, 3, 3)
    assert (first.scale, len(first.prompt_index)) == (2 * 2 / 3, 2) and (second.scale, len(second.prompt_index)) == (2 / 3, 1)
    assert torch_equal(first.state, whole.state[[0, 2]]) and torch_equal(second.state, whole.state[[1]])
    assert (alone[0].scale, alone[1].scale) == (2.0, 0.0) and len(alone[1].prompt_index) == 1


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_merged_stats_are_the_global_batchs():
    """Two ranks' sums, by hand: losses are scaled shares (their mean over ranks is the global
    mean), counts add up, extremes are the extremes, the gradient norm is the shared one."""
    from stages.update import Stats, merge_stats

    a = Stats(steps=2, loss=1.2, policy_loss=1.0, kl=0.4, clipped=1, samples=6, ratio_min=0.9, ratio_max=1.05,
              ratio_sum=6.1, grad_norms=[0.5, 0.7], first_step_ratio_deviation=1e-7)
    b = Stats(steps=2, loss=0.6, policy_loss=0.2, kl=0.2, clipped=3, samples=4, ratio_min=0.95, ratio_max=1.2,
              ratio_sum=3.9, grad_norms=[0.5, 0.7], first_step_ratio_deviation=3e-7)
    m = merge_stats([a, b])
    assert (m.steps, m.clipped, m.samples, m.grad_norms) == (2, 4, 10, [0.5, 0.7])
    assert m.loss == (1.2 + 0.6) / 2 and m.policy_loss == (1.0 + 0.2) / 2 and m.kl == (0.4 + 0.2) / 2
    assert (m.ratio_min, m.ratio_max, m.ratio_sum, m.first_step_ratio_deviation) == (0.9, 1.2, 10.0, 3e-7)


def test_two_process_update_matches_one(policy_dir, tmp_path):
    """torchrun with 2 ranks (DistributedDataParallel over gloo), uneven shares of a batch of 7, two
    inner epochs, the KL on: the new weights are the one-process update's within float tolerance,
    the metrics too; only rank 0 wrote."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    rollout, scores = _scored_rollout(policy_dir, tmp_path)
    options = ["--policy", str(policy_dir), "--rollout", str(rollout), "--rewards", str(scores), "--learning-rate", "1e-2",
               "--batch-size", "7", "--inner-epochs", "2", "--beta", "0.04"]
    one = invoke("update", *options, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    two = _torchrun("update", *options, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    name = "transformer/diffusion_pytorch_model.safetensors"
    start, a, b = (load_file(folder / name) for folder in (policy_dir, tmp_path / "one", tmp_path / "two"))
    assert any(not torch.equal(start[k], a[k]) for k in a)  # it trained
    for key in a:  # Adam at lr 1e-2 moves a weight by up to ~1e-2 a step; float rounding differs by ~1e-6
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    apart = max(float((b[k] - a[k]).abs().max()) for k in a)
    assert apart < 1e-3 * moved, (apart, moved)
    m1, m2 = (json.loads((tmp_path / folder / "metrics.json").read_text()) for folder in ("one", "two"))
    assert m1["optimizer_steps"] == m2["optimizer_steps"] == 2 * -(-m1["trained_samples"] // 7)
    assert m2["trained_samples"] == m1["trained_samples"] and m2["first_step_ratio_deviation"] < 1e-5
    for key in ("loss", "policy_loss", "kl", "grad_norm", "ratio_mean", "ratio_min", "ratio_max", "clip_fraction"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-3, abs=1e-7), key


def test_update_metrics_name_the_rewards_trained_toward(policy_dir, tmp_path):
    """Not a component of weight 0: one scored only to be watched."""
    from tests.conftest import make_rollout

    rollout = make_rollout(policy_dir, tmp_path / "r")
    assert invoke("score", "--rollout", rollout, "--reward", "jpeg_compressibility", "--reward", "shapes:0",
                  "--out", tmp_path / "s.parquet").exit_code == 0
    r = invoke("update", "--policy", policy_dir, "--rollout", rollout, "--rewards", tmp_path / "s.parquet",
               "--out", tmp_path / "new")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "new" / "metrics.json").read_text())["trained_rewards"] == ["jpeg_compressibility"]
