"""Reference tests for the flow math in ``stages.flow`` (DESIGN.md §1-§2).

Each test checks one formula against an independent reference: diffusers'
FlowMatchEulerDiscreteScheduler, or a value computed by hand with plain ``math`` following
DESIGN.md literally; the draw of branch steps (inclusion chances, systematic sampling, spread
weights) against hand-computed values and their frequencies. Everything is tiny; the whole file runs
in a few seconds on CPU.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from stages.flow import (
    group_advantages,
    grpo_loss,
    inclusion_probabilities,
    kl_scale,
    kl_to_reference,
    make_sigmas,
    noise_aware_weights,
    ode_step,
    sde_step,
    spread_weights,
    systematic_sample,
)
from stages.update import group_label

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hand_sde(x, v, s, s_next, a, eps):
    """DESIGN.md §1's SDE step, element by element in plain Python floats.

    Returns (mean list, std, sample list, log_prob) for one batch row given as flat lists.
    """
    d = s_next - s
    denominator = (1.0 - s_next) if s == 1.0 else (1.0 - s)
    sig = a * math.sqrt(s / denominator)
    mean = [xi * (1 + sig**2 * d / (2 * s)) + vi * (1 + sig**2 * (1 - s) / (2 * s)) * d for xi, vi in zip(x, v)]
    std = sig * math.sqrt(-d)
    sample = [m + std * e for m, e in zip(mean, eps)]
    log_density = [-((xn - m) ** 2) / (2 * std**2) - math.log(std) - LOG_SQRT_2PI for xn, m in zip(sample, mean)]
    return mean, std, sample, sum(log_density) / len(log_density)


# --------------------------------------------------------------------------- 1. schedule


@pytest.mark.parametrize("num_steps", [2, 10, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_make_sigmas_equals_diffusers_scheduler(num_steps, shift):
    """make_sigmas(T, shift) == FlowMatchEulerDiscreteScheduler(shift).set_timesteps(T).sigmas, bit for bit."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    ours = make_sigmas(num_steps, shift)
    assert ours.dtype == torch.float32
    assert ours.shape == (num_steps + 1,)
    assert torch.equal(ours, scheduler.sigmas)
    assert ours[0].item() == 1.0 and ours[-1].item() == 0.0
    assert bool((ours[1:] < ours[:-1]).all())


# --------------------------------------------------------------------------- 2. ODE step


def test_ode_trajectory_matches_diffusers_step():
    """A 10-step ODE trajectory (shift 3) matches diffusers' scheduler.step at every step."""
    num_steps, shift = 10, 3.0
    g = _gen(0)
    weight = torch.randn(4, 4, generator=g) * 0.5
    bias = torch.randn(1, 4, 1, 1, generator=g) * 0.1

    def velocity(x):  # a fixed linear map of x over channels
        return torch.einsum("bchw,dc->bdhw", x, weight) + bias

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    sigmas = make_sigmas(num_steps, shift)

    x0 = torch.randn(2, 4, 8, 8, generator=g)
    ours, theirs = x0.clone(), x0.clone()
    for i, t in enumerate(scheduler.timesteps):
        theirs = scheduler.step(velocity(theirs), t, theirs).prev_sample
        ours = ode_step(velocity(ours), ours, sigmas[i], sigmas[i + 1])
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=f"step {i}")


# --------------------------------------------------------------------------- 3. SDE with a = 0


def test_sde_mean_with_zero_noise_is_ode_step_float_sigmas():
    """sde_step(noise_level=0).mean == ode_step for float sigmas (DESIGN.md §1: a=0 is the ODE)."""
    g = _gen(1)
    v = torch.randn(3, 2, 4, 4, generator=g)
    x = torch.randn(3, 2, 4, 4, generator=g)
    f32_eps = torch.finfo(torch.float32).eps
    for s, s_next in [(1.0, 0.9), (0.7312, 0.5127), (0.25, 0.0625), (0.1, 0.0)]:
        out = sde_step(v, x, s, s_next, noise_level=0.0, noise=torch.zeros_like(x))
        # equal up to float32 rounding: with Python-float sigmas ode_step forms d = s_{i+1} - s_i in
        # float64, sde_step rounds each sigma to float32 first (DESIGN.md §1: float32 arithmetic), so d
        # differs by up to an ulp of the sigmas, times |v|; plus one ulp of x in the final sum
        bound = 2 * f32_eps * (x.abs() + v.abs() * (abs(s) + abs(s_next)))
        assert ((out.mean - ode_step(v, x, s, s_next)).abs() <= bound).all()
        # with the same float32 sigmas both paths are bit-identical
        s32, s_next32 = torch.tensor(s), torch.tensor(s_next)
        assert torch.equal(out.mean, ode_step(v, x, s32, s_next32))


def test_sde_mean_with_zero_noise_is_ode_step_per_row_tensor_sigmas():
    """sde_step(noise_level=0).mean == ode_step for (B,1,1,1) sigmas that differ per row."""
    g = _gen(2)
    v = torch.randn(4, 3, 5, 5, generator=g)
    x = torch.randn(4, 3, 5, 5, generator=g)
    sigmas = make_sigmas(10, 3.0)
    rows = torch.tensor([0, 3, 6, 8])
    s = sigmas[rows].view(4, 1, 1, 1)
    s_next = sigmas[rows + 1].view(4, 1, 1, 1)
    out = sde_step(v, x, s, s_next, noise_level=0.0, noise=torch.zeros_like(x))
    expected = ode_step(v, x, s, s_next)
    assert torch.equal(out.mean, expected)
    # and the broadcast really is per row: row b uses its own sigma pair
    for b in range(4):
        row = x[b] + (s_next[b] - s[b]) * v[b]
        torch.testing.assert_close(out.mean[b], row, rtol=0, atol=1e-7)


def test_sde_step_per_row_sigmas_equal_row_by_row_calls():
    """With a > 0, a batched call with (B,1,1,1) sigmas equals one scalar-sigma call per row."""
    g = _gen(3)
    v = torch.randn(3, 2, 4, 4, generator=g)
    x = torch.randn(3, 2, 4, 4, generator=g)
    eps = torch.randn(3, 2, 4, 4, generator=g)
    sigmas = make_sigmas(10, 3.0)
    rows = [0, 4, 8]  # includes s_0 = 1
    s = sigmas[rows].view(3, 1, 1, 1)
    s_next = sigmas[[r + 1 for r in rows]].view(3, 1, 1, 1)
    batched = sde_step(v, x, s, s_next, noise_level=0.7, noise=eps)
    assert batched.log_prob.shape == (3,)
    for b, r in enumerate(rows):
        single = sde_step(v[b : b + 1], x[b : b + 1], sigmas[r].item(), sigmas[r + 1].item(), 0.7, noise=eps[b : b + 1])
        torch.testing.assert_close(batched.mean[b : b + 1], single.mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(batched.prev_sample[b : b + 1], single.prev_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(batched.log_prob[b : b + 1], single.log_prob, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- 4. hand-computed SDE step


def test_sde_step_hand_computed():
    """mean, std, sample and log_prob of one SDE step equal DESIGN.md §1 computed by hand."""
    x, v, eps = [0.3, -1.2], [0.5, 2.0], [0.1, -0.4]
    s, s_next, a = 0.5, 0.25, 0.7
    # by hand: d = -0.25, sig = 0.7 * sqrt(0.5 / 0.5) = 0.7, std = 0.7 * sqrt(0.25) = 0.35
    mean, std, sample, log_prob = _hand_sde(x, v, s, s_next, a, eps)
    assert std == pytest.approx(0.35)
    assert mean[0] == pytest.approx(0.3 * (1 - 0.49 * 0.25) + 0.5 * (1 + 0.49 * 0.5) * -0.25)
    # log p with x_{i+1} = mean + std*eps is -eps^2/2 - log std - log sqrt(2 pi), averaged
    assert log_prob == pytest.approx(sum(-e * e / 2 for e in eps) / 2 - math.log(0.35) - LOG_SQRT_2PI)

    out = sde_step(torch.tensor([v]), torch.tensor([x]), s, s_next, a, noise=torch.tensor([eps]))
    torch.testing.assert_close(out.mean, torch.tensor([mean]), rtol=1e-6, atol=1e-6)
    assert float(out.std) == pytest.approx(std, rel=1e-6)
    torch.testing.assert_close(out.prev_sample, torch.tensor([sample]), rtol=1e-6, atol=1e-6)
    assert out.log_prob.shape == (1,)
    assert out.log_prob.dtype == torch.float32
    assert out.log_prob.item() == pytest.approx(log_prob, rel=1e-6, abs=1e-6)


def test_sde_step_hand_computed_at_pure_noise():
    """At s_i = 1 the noise scale uses s_{i+1} in the denominator: sig = a*sqrt(1/(1 - s_{i+1}))."""
    x, v, eps = [0.3, -1.2], [0.5, 2.0], [0.1, -0.4]
    s, s_next, a = 1.0, 0.8, 0.7
    mean, std, sample, log_prob = _hand_sde(x, v, s, s_next, a, eps)
    assert std == pytest.approx(0.7 * math.sqrt(5.0) * math.sqrt(0.2))  # = 0.7
    # at s = 1 the velocity coefficient is exactly d (the (1 - s) term vanishes)
    assert mean[1] == pytest.approx(-1.2 * (1 + 0.49 * 5.0 * -0.2 / 2) + 2.0 * -0.2)

    out = sde_step(torch.tensor([v]), torch.tensor([x]), s, s_next, a, noise=torch.tensor([eps]))
    assert torch.isfinite(out.mean).all() and torch.isfinite(out.log_prob).all()
    torch.testing.assert_close(out.mean, torch.tensor([mean]), rtol=1e-6, atol=1e-6)
    assert float(out.std) == pytest.approx(std, rel=1e-6)
    torch.testing.assert_close(out.prev_sample, torch.tensor([sample]), rtol=1e-6, atol=1e-6)
    assert out.log_prob.item() == pytest.approx(log_prob, rel=1e-6, abs=1e-6)


def test_sde_step_scores_given_prev_sample():
    """Passing prev_sample scores it: log p(mean + std*eps) equals the log-prob when sampled with eps."""
    g = _gen(4)
    v = torch.randn(3, 2, 4, 4, generator=g)
    x = torch.randn(3, 2, 4, 4, generator=g)
    eps = torch.randn(3, 2, 4, 4, generator=g)
    sampled = sde_step(v, x, 0.6, 0.45, 0.7, noise=eps)
    scored = sde_step(v, x, 0.6, 0.45, 0.7, prev_sample=sampled.prev_sample)
    assert torch.equal(scored.prev_sample, sampled.prev_sample)
    torch.testing.assert_close(scored.log_prob, sampled.log_prob, rtol=1e-6, atol=1e-6)
    # and by hand: log p = mean_dims(-eps^2/2) - log std - log sqrt(2 pi)
    std = 0.7 * math.sqrt(0.6 / 0.4) * math.sqrt(0.15)
    hand = (-(eps.double() ** 2) / 2).mean(dim=(1, 2, 3)) - math.log(std) - LOG_SQRT_2PI
    torch.testing.assert_close(scored.log_prob.double(), hand, rtol=1e-5, atol=1e-5)
    # a different sample scores differently (it is really scored, not recomputed from noise)
    other = sde_step(v, x, 0.6, 0.45, 0.7, prev_sample=sampled.prev_sample + 0.3)
    assert not torch.allclose(other.log_prob, sampled.log_prob)


# --------------------------------------------------------------------------- 5. log-prob is a mean


def test_log_prob_is_per_element_mean():
    """log_prob averages over non-batch dims: tiling the same values to a larger shape keeps it."""
    g = _gen(5)
    v = torch.randn(2, 3, generator=g)
    x = torch.randn(2, 3, generator=g)
    eps = torch.randn(2, 3, generator=g)
    small = sde_step(v, x, 0.5, 0.3, 0.7, noise=eps)

    def tile(t):  # (2, 3) -> (2, 4, 3, 5): every value repeated 20 times
        return t.view(2, 1, 3, 1).expand(2, 4, 3, 5).contiguous()

    big = sde_step(tile(v), tile(x), 0.5, 0.3, 0.7, noise=tile(eps))
    assert big.log_prob.shape == (2,)
    torch.testing.assert_close(big.log_prob, small.log_prob, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- 6. noise-aware weights


def test_noise_aware_weights_sd35_constant():
    """w_k = std_k / mean std over 0..T-2; 1/mean std = 2.25 for 10 steps, shift 3, a = 0.7."""
    sigmas = make_sigmas(10, 3.0)
    weights = noise_aware_weights(sigmas, 0.7)
    assert weights.shape == (9,)
    assert float(weights.mean()) == pytest.approx(1.0, abs=1e-6)
    assert weights[0] > weights[-1]

    s = sigmas.tolist()
    stds = []
    for k in range(9):
        denominator = (1.0 - s[k + 1]) if s[k] == 1.0 else (1.0 - s[k])
        stds.append(0.7 * math.sqrt(s[k] / denominator) * math.sqrt(s[k] - s[k + 1]))
    mean_std = sum(stds) / len(stds)
    assert 1.0 / mean_std == pytest.approx(2.25, abs=0.01)
    torch.testing.assert_close(weights.double(), torch.tensor(stds, dtype=torch.float64) / mean_std,
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- 7. group advantages


def _hand_advantages(rewards, labels, clip=5.0):
    groups: dict[str, list[float]] = {}
    for r, g in zip(rewards, labels):
        groups.setdefault(g, []).append(r)
    out = []
    for r, g in zip(rewards, labels):
        mean = statistics.fmean(groups[g])
        std = statistics.pstdev(groups[g])
        out.append(max(-clip, min(clip, (r - mean) / (std + 1e-4))))
    return out


def test_group_advantages_seed_vs_prompt_groups():
    """Seed-group and prompt-group advantages equal (R - mean)/(pop std + 1e-4) computed by hand."""
    # 2 prompts x 2 seeds x 1 step (k=3) x 2 branches
    table = {  # (prompt, seed): rewards of the two branches
        (0, 0): [1.0, 3.0],
        (0, 1): [2.0, 2.0],  # all equal: zero in the seed group
        (1, 0): [0.0, 4.0],
        (1, 1): [5.0, 7.0],
    }
    metas, rewards = [], []
    for (p, s), rs in table.items():
        for r in rs:
            metas.append({"prompt_index": p, "seed": s, "step": 3})
            rewards.append(r)
    seed_labels = [group_label(m, "seed") for m in metas]
    prompt_labels = [group_label(m, "prompt") for m in metas]
    assert seed_labels[0] == "p0-s0-k3" and prompt_labels[0] == "p0-k3"

    seed_adv = group_advantages(torch.tensor(rewards), seed_labels)
    prompt_adv = group_advantages(torch.tensor(rewards), prompt_labels)
    assert seed_adv.dtype == torch.float64 and seed_adv.shape == (8,)
    torch.testing.assert_close(seed_adv, torch.tensor(_hand_advantages(rewards, seed_labels), dtype=torch.float64))
    torch.testing.assert_close(prompt_adv, torch.tensor(_hand_advantages(rewards, prompt_labels), dtype=torch.float64))

    # explicit values: seed group p0-s0 = [1, 3] -> mean 2, std 1
    assert seed_adv[0].item() == pytest.approx(-1 / 1.0001)
    assert seed_adv[1].item() == pytest.approx(1 / 1.0001)
    assert seed_adv[2].item() == 0.0 and seed_adv[3].item() == 0.0
    # prompt group p0 = [1, 3, 2, 2] -> mean 2, std sqrt(0.5)
    assert prompt_adv[0].item() == pytest.approx(-1 / (math.sqrt(0.5) + 1e-4))
    assert prompt_adv[2].item() == 0.0  # equal to the prompt mean, not an all-equal group
    # the seed-1 branches of prompt 1 are both above the prompt mean (4) but split in their seed group
    assert seed_adv[6].item() < 0 < seed_adv[7].item()
    assert prompt_adv[6].item() > 0 and prompt_adv[7].item() > 0
    assert prompt_adv[6].item() == pytest.approx(1 / (math.sqrt(6.5) + 1e-4))


def test_group_advantages_all_equal_group_is_exactly_zero():
    """A group whose rewards are all equal gets A = 0 exactly (also with global_std)."""
    rewards = [0.3, 0.3, 0.3, 1.0, 2.0]
    labels = ["a", "a", "a", "b", "b"]
    for global_std in (False, True):
        adv = group_advantages(rewards, labels, global_std=global_std)
        assert adv[:3].tolist() == [0.0, 0.0, 0.0]
        assert adv[3] < 0 < adv[4]


def test_group_advantages_clipping():
    """Advantages are clipped to [-clip, clip]; values inside the range are untouched."""
    rewards = [0.0] * 9 + [10.0]  # mean 1, pop std 3: outlier A = 9 / 3.0001 ~ 3
    labels = ["g"] * 10
    adv = group_advantages(rewards, labels, clip=2.0)
    assert adv[-1].item() == 2.0
    assert adv[0].item() == pytest.approx(-1 / 3.0001)
    unclipped = group_advantages(rewards, labels)  # default clip 5
    assert unclipped[-1].item() == pytest.approx(9 / 3.0001)
    low = group_advantages([-r for r in rewards], labels, clip=2.0)
    assert low[-1].item() == -2.0


def test_group_advantages_global_std():
    """global_std=True divides by the whole batch's population std; the mean stays the group's."""
    rewards = [0.0, 2.0, 10.0, 14.0]
    labels = ["g1", "g1", "g2", "g2"]
    adv = group_advantages(rewards, labels, global_std=True)
    batch_std = statistics.pstdev(rewards)  # sqrt(32.75)
    assert batch_std == pytest.approx(math.sqrt(32.75))
    expected = [-1 / (batch_std + 1e-4), 1 / (batch_std + 1e-4), -2 / (batch_std + 1e-4), 2 / (batch_std + 1e-4)]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_group_advantages_rejects_non_finite_rewards(bad):
    """NaN or infinite rewards raise ValueError instead of poisoning the batch."""
    with pytest.raises(ValueError):
        group_advantages([1.0, bad, 2.0], ["a", "a", "b"])


def test_group_advantages_rejects_label_count_mismatch():
    """A reward/label count mismatch raises ValueError."""
    with pytest.raises(ValueError):
        group_advantages([1.0, 2.0, 3.0], ["a", "a"])


# --------------------------------------------------------------------------- 8. GRPO loss


def _loss_grad(lp_new, lp_old, adv, weight, eps):
    lp_new = torch.tensor([lp_new], dtype=torch.float32, requires_grad=True)
    loss = grpo_loss(lp_new, torch.tensor([lp_old]), torch.tensor([adv]), torch.tensor([weight]), eps)
    loss.sum().backward()
    return loss.item(), lp_new.grad.item()


def test_grpo_loss_gradient_sign_on_policy():
    """At ratio 1, d loss / d log p_new = -w*A: minimising raises log p of positive-advantage samples."""
    for adv in (1.5, -1.5):
        for weight in (1.0, 2.25):
            loss, grad = _loss_grad(-0.8, -0.8, adv, weight, 1e-4)
            assert loss == pytest.approx(-weight * adv)
            assert grad == pytest.approx(-weight * adv, rel=1e-6)
    assert _loss_grad(-0.8, -0.8, 1.5, 1.0, 1e-4)[1] < 0
    assert _loss_grad(-0.8, -0.8, -1.5, 1.0, 1e-4)[1] > 0
    # scales with the weight
    assert _loss_grad(-0.8, -0.8, 1.5, 2.0, 1e-4)[1] == pytest.approx(2 * _loss_grad(-0.8, -0.8, 1.5, 1.0, 1e-4)[1])


def test_grpo_loss_clipping_hand_computed():
    """PPO clipping: r > 1+eps with A > 0 is clipped (value w*-A*(1+eps), zero grad); r < 1-eps is not."""
    eps, adv, weight = 0.2, 2.0, 0.5
    # r = 1.5 > 1.2: policy = 0.5 * max(-3.0, -2.4) = -1.2, the clipped branch: no gradient
    loss, grad = _loss_grad(math.log(1.5), 0.0, adv, weight, eps)
    assert loss == pytest.approx(-1.2, rel=1e-6)
    assert grad == 0.0
    # r = 0.5 < 0.8: policy = 0.5 * max(-1.0, -1.6) = -0.5, the unclipped branch: grad = -w*A*r = -0.5
    loss, grad = _loss_grad(math.log(0.5), 0.0, adv, weight, eps)
    assert loss == pytest.approx(-0.5, rel=1e-6)
    assert grad == pytest.approx(-0.5, rel=1e-6)
    # A < 0 mirrors it: r = 0.5 < 0.8 is clipped (zero grad), r = 1.5 is not
    loss, grad = _loss_grad(math.log(0.5), 0.0, -adv, weight, eps)
    assert loss == pytest.approx(0.8, rel=1e-6)
    assert grad == 0.0
    loss, grad = _loss_grad(math.log(1.5), 0.0, -adv, weight, eps)
    assert loss == pytest.approx(1.5, rel=1e-6)
    assert grad == pytest.approx(1.5, rel=1e-6)


def test_grpo_loss_is_per_sample():
    """grpo_loss returns one value per sample, each w_i * max(-A_i r_i, -A_i clip(r_i))."""
    lp_new = torch.tensor([0.0, math.log(1.5), math.log(0.5)])
    lp_old = torch.zeros(3)
    adv = torch.tensor([1.0, 2.0, 2.0])
    weights = torch.tensor([1.0, 0.5, 0.5])
    loss = grpo_loss(lp_new, lp_old, adv, weights, 0.2)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, torch.tensor([-1.0, -1.2, -0.5]))


# --------------------------------------------------------------------------- 9. KL to the reference


def test_kl_to_reference_hand_computed():
    """kl = mean_dims (mean_new - mean_ref)^2 / (2 std^2), per row; zero when the means agree."""
    mean_new = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    mean_ref = torch.tensor([[1.5, 2.0, 2.0], [1.0, -1.0, 2.0]])
    std = torch.tensor([[0.5], [2.0]])
    kl = kl_to_reference(mean_new, mean_ref, std)
    # row 0: diffs 0.5, 0, 1 over 2*0.25 = 0.5 -> (0.5 + 0 + 2) / 3
    # row 1: diffs 1, 1, 2 over 2*4 = 8 -> (1/8 + 1/8 + 4/8) / 3
    assert kl.shape == (2,)
    torch.testing.assert_close(kl, torch.tensor([2.5 / 3, 0.75 / 3]))
    assert torch.equal(kl_to_reference(mean_new, mean_new.clone(), std), torch.zeros(2))


def test_kl_scale_of_both_forms_hand_computed():
    """s = 0.75 -> 0.5 at a = 0.7: sig = 0.7 sqrt(0.75 / 0.25) = 1.2124, std = sig sqrt(0.25) = 0.6062.
    The flow-grpo form's KL is the exact one times s_k - s_{k+1} = 0.25."""
    sig = 0.7 * math.sqrt(3.0)
    assert float(kl_scale("exact", 0.75, 0.5, 0.7)) == pytest.approx(sig * 0.5, rel=1e-6)
    assert float(kl_scale("flow-grpo", 0.75, 0.5, 0.7)) == pytest.approx(sig, rel=1e-6)
    mean_new, mean_ref = torch.zeros(1, 4), torch.full((1, 4), 0.1)
    exact = kl_to_reference(mean_new, mean_ref, kl_scale("exact", 0.75, 0.5, 0.7))
    sig_only = kl_to_reference(mean_new, mean_ref, kl_scale("flow-grpo", 0.75, 0.5, 0.7))
    assert float(exact) == pytest.approx(0.01 / (2 * 0.7**2 * 3 * 0.25), rel=1e-5)  # 0.013605
    assert float(sig_only) == pytest.approx(0.25 * float(exact), rel=1e-5)
    # at s_0 = 1 both use s_1 in sig's denominator (DESIGN §1)
    assert float(kl_scale("flow-grpo", 1.0, 0.9, 0.7)) == pytest.approx(0.7 * math.sqrt(1.0 / 0.1), rel=1e-6)
    with pytest.raises(ValueError, match="unknown KL form"):
        kl_scale("sig", 0.75, 0.5, 0.7)


def test_constant_group_gives_exact_zero_despite_mean_rounding():
    """[0.1]*3 has a float mean that is not exactly 0.1; the group still gets A = 0 exactly."""
    rewards = torch.tensor([0.1, 0.1, 0.1, -0.7, -0.7, -0.7, 1.0, 2.0], dtype=torch.float64)
    adv = group_advantages(rewards, ["a"] * 3 + ["b"] * 3 + ["c"] * 2)
    assert torch.equal(adv[:6], torch.zeros(6, dtype=torch.float64))
    assert adv[6] < 0 < adv[7]


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


def test_spread_weights_hand_computed():
    """An unmeasured step takes the measured mean; none falls below 5 % of the largest."""
    assert spread_weights([0.2, None, 0.0, 0.1]) == pytest.approx([0.2, 0.1, 0.01, 0.1])
    assert spread_weights([None, None]) is None and spread_weights([0.0, None]) is None
