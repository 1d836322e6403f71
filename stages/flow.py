"""The math of TempFlow-GRPO: the sigma schedule, the ODE and SDE steps, noise-aware weights,
group advantages, the clipped GRPO loss, the KL term and the draw of branch steps (DESIGN.md §1-§2).

Convention (SD3 / diffusers): ``x_s = (1 - s) * x_data + s * noise``; ``s = 1`` is pure noise and the
model predicts the velocity ``v ~ noise - x_data``. Everything here is pure tensor math: no I/O, no
models. Sigmas may be Python floats or tensors that broadcast against the batch, e.g. ``(B, 1, 1, 1)``.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

Sigma = float | Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def make_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """The sampling schedule ``s_0 = 1 > ... > s_{T-1} > s_T = 0``, shape ``(T + 1,)``, float32.

    Reproduces ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps).sigmas``
    (static shift ``s' = shift*s / (1 + (shift-1)*s)``): the unshifted sigmas are spaced linearly
    from 1 down to the scheduler's smallest *shifted* training sigma, then shifted, then 0 appended.
    ``num_steps >= 1`` and ``shift > 0``: the configs that take them (rollout's, eval's) check both.
    """
    # the scheduler's training grid ends at 1/num_train_timesteps, shifted in float32
    s_min_unshifted = torch.tensor(1.0 / num_train_timesteps, dtype=torch.float32)
    s_min = (shift * s_min_unshifted / (1 + (shift - 1) * s_min_unshifted)).item()
    s_max = (shift * torch.tensor(1.0) / (1 + (shift - 1) * torch.tensor(1.0))).item()
    s = np.linspace(s_max * num_train_timesteps, s_min * num_train_timesteps, num_steps)
    s = s / num_train_timesteps
    s = shift * s / (1 + (shift - 1) * s)
    sigmas = torch.from_numpy(s).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def ode_step(velocity: Tensor, sample: Tensor, sigma: Sigma, sigma_next: Sigma) -> Tensor:
    """One Euler step of the probability-flow ODE: ``x_{i+1} = x_i + (s_{i+1} - s_i) * v``."""
    return sample + (sigma_next - sigma) * velocity


@dataclass
class SDEStep:
    """Result of one SDE step: the sample, its log-density and the Gaussian it was drawn from.

    ``prev_sample`` keeps diffusers' name for "the next, less noisy state" ``x_{i+1}``.
    """

    prev_sample: Tensor  # (B, ...) x_{i+1}, float32
    log_prob: Tensor  # (B,) mean over non-batch dims of the Gaussian log-density, float32
    mean: Tensor  # (B, ...) mean of x_{i+1} given x_i
    std: Tensor  # std of x_{i+1}, broadcastable against the batch


def sde_noise_scale(sigma: Sigma, sigma_next: Sigma, noise_level: float) -> tuple[Tensor, Tensor]:
    """``sig_i = a * sqrt(s_i / (1 - s_i))`` (with ``s_{i+1}`` in the denominator when ``s_i = 1``,
    where the formula diverges), and the step's std ``sig_i * sqrt(s_i - s_{i+1})``. float32.
    """
    s = torch.as_tensor(sigma, dtype=torch.float32)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32)
    denominator = torch.where(s >= 1.0, 1.0 - s_next, 1.0 - s)
    sig = noise_level * torch.sqrt(s / denominator)
    return sig, sig * torch.sqrt(s - s_next)


def sde_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    noise_level: float,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """One Flow-GRPO SDE step from ``x_i = sample`` at ``s_i = sigma`` to ``s_{i+1} = sigma_next``.

    Draws ``x_{i+1} = mean + std * noise`` (``noise`` given, or drawn from ``generator``) unless
    ``prev_sample`` is given, in which case that sample is scored instead. All arithmetic is float32
    whatever the model's dtype: log-probs of old and new policy are subtracted, and bf16 rounding
    there is a known source of ratios that are not 1 on-policy.

    With ``noise_level = 0`` the mean is exactly the ODE step; the std is then 0 and ``log_prob`` is
    meaningless (infinite), so callers never score a zero-noise step.
    """
    v = velocity.float()
    x = sample.float()
    s = torch.as_tensor(sigma, dtype=torch.float32)
    s_next = torch.as_tensor(sigma_next, dtype=torch.float32)
    d = s_next - s  # negative
    sig, std = sde_noise_scale(s, s_next, noise_level)
    mean = x * (1 + sig**2 * d / (2 * s)) + v * (1 + sig**2 * (1 - s) / (2 * s)) * d
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
        prev_sample = mean + std * noise.float()
    else:
        prev_sample = prev_sample.float()
    log_density = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    log_prob = log_density.mean(dim=tuple(range(1, log_density.ndim)))
    return SDEStep(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


def noise_aware_weights(sigmas: Tensor, noise_level: float) -> Tensor:
    """Per-step weights ``w_k = std_k / mean_j std_j`` over steps ``0 .. T-2``, shape ``(T-1,)``.

    ``std_k = sig_k * sqrt(s_k - s_{k+1})`` is the SDE step's noise (see :func:`sde_noise_scale`):
    early, high-noise steps explore more and weigh more. The mean runs over the whole schedule, so a
    step's weight does not depend on which steps a rollout happened to branch at.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    if sigmas.ndim != 1 or sigmas.numel() < 3:
        raise ValueError(f"sigmas must be a 1-D schedule of T+1 >= 3 values, got shape {tuple(sigmas.shape)}")
    if noise_level <= 0:
        raise ValueError(f"noise-aware weights need noise_level > 0, got {noise_level}")
    _, std = sde_noise_scale(sigmas[:-2], sigmas[1:-1], noise_level)
    return std / std.mean()


def inclusion_probabilities(weights: Sequence[float], n: int) -> list[float]:
    """``pi_k = min(1, c * w_k)`` with ``c`` such that ``sum pi = n``: each step's chance of being among
    ``n`` drawn branch steps, proportional to its weight where no step would exceed certainty."""
    w = [float(x) for x in weights]
    if not 1 <= n <= len(w) or min(w) <= 0 or not all(math.isfinite(x) for x in w):
        raise ValueError(f"need 1 <= n <= {len(w)} and finite positive weights (got n = {n})")
    certain: set[int] = set()
    while True:
        rest = sum(x for k, x in enumerate(w) if k not in certain)
        scale = (n - len(certain)) / rest
        newly = {k for k, x in enumerate(w) if k not in certain and scale * x >= 1.0}
        if not newly:
            return [1.0 if k in certain else scale * x for k, x in enumerate(w)]
        certain |= newly


SPREAD_FLOOR = 0.05
"""Under ``spread:N`` no step's drawing weight falls below this share of the largest: a step whose
branches agreed last time still keeps a chance, and Horvitz-Thompson needs every chance above 0."""


def spread_weights(spread: Sequence[float | None]) -> list[float] | None:
    """Drawing weights of the steps from their measured within-group reward spread (None: not measured
    yet, which takes the mean of the measured ones), floored at :data:`SPREAD_FLOOR` of the largest.
    None when nothing was measured, every spread is 0 or their sum overflows: nothing to allocate by."""
    known = [float(s) for s in spread if s is not None]
    if not known or max(known) <= 0 or not math.isfinite(sum(known)):
        return None
    fill, floor = sum(known) / len(known), SPREAD_FLOOR * max(known)
    return [max(floor, fill if s is None else float(s)) for s in spread]


def systematic_sample(pi: Sequence[float], u: float) -> list[int]:
    """Madow's systematic sampling: lay the ``pi_k`` end to end on ``[0, n)`` and take the steps whose
    stretch holds one of ``u, u + 1, ..., u + n - 1`` (``u`` uniform in ``[0, 1)``). Each step is drawn
    with probability exactly ``pi_k`` (all ``pi_k <= 1``) and exactly ``n = sum pi`` distinct steps are
    drawn, so a sum over the drawn steps of ``term_k / pi_k`` is an unbiased (Horvitz-Thompson)
    estimate of the sum over all steps."""
    n = round(sum(pi))
    edges = list(itertools.accumulate(pi, initial=0.0))
    picked = sorted({min(bisect.bisect_right(edges, u + i) - 1, len(pi) - 1) for i in range(n)})
    if len(picked) != n or not 0.0 <= u < 1.0:
        raise ValueError(f"systematic sampling of {n} steps drew {picked} at u = {u}")
    return picked


def group_advantages(
    rewards: Tensor | Sequence[float],
    groups: Sequence[object],
    clip: float = 5.0,
    global_std: bool = False,
) -> Tensor:
    """``A = (R - mean_group) / (std_group + 1e-4)``, clipped to ``[-clip, clip]``. float64, ``(N,)``.

    ``groups[i]`` is any hashable label; samples with equal labels are normalised together. The std
    is the population std (``ddof=0``). With ``global_std`` the std of the whole batch replaces the
    group's (Flow-GRPO's option); the mean is still the group's. A group whose rewards are all equal
    gets ``A = 0`` exactly.
    """
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    if len(groups) != r.numel():
        raise ValueError(f"{r.numel()} rewards but {len(groups)} group labels")
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or infinite values")
    labels: dict[object, int] = {}
    index = torch.tensor([labels.setdefault(g, len(labels)) for g in groups], dtype=torch.long)
    n_groups = len(labels)
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, index, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, index, r) / count
    centred = r - mean[index]
    var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, index, centred**2) / count
    std = var.sqrt()[index]
    if global_std:
        std = r.std(unbiased=False).expand_as(r)
    advantages = centred / (std + 1e-4)
    # equal rewards: the mean's rounding can leave centred at ~1e-13 instead of 0, so test max == min
    high = torch.full((n_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, index, r, "amax")
    low = torch.full((n_groups,), torch.inf, dtype=torch.float64).scatter_reduce(0, index, r, "amin")
    advantages = torch.where((high == low)[index], torch.zeros_like(advantages), advantages)
    return advantages.clamp(-clip, clip)


def grpo_loss(
    log_prob_new: Tensor,
    log_prob_old: Tensor,
    advantages: Tensor,
    weights: Tensor | float,
    clip_range: float,
) -> Tensor:
    """Per-sample clipped policy loss ``w * max(-A r, -A clip(r, 1-eps, 1+eps))``, ``(B,)``.

    ``r = exp(log_prob_new - log_prob_old)``. Minimising it raises the log-prob of samples with
    positive advantage. The caller takes the mean and adds ``beta * kl``.
    """
    ratio = torch.exp(log_prob_new - log_prob_old)
    advantages = advantages.to(ratio.dtype)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.as_tensor(weights, dtype=ratio.dtype) * torch.maximum(unclipped, clipped)


KL_FORMS = {
    "exact": "the KL of the two steps' Gaussians, divided by std_k^2 (TempFlow-GRPO's code; its beta 0.001-0.004)",
    "flow-grpo": "divided by sig_k^2 alone, the exact KL x (s_k - s_{k+1}) (Flow-GRPO's code; its beta 0.01-0.04)",
}
"""The KL terms :func:`kl_scale` offers (DESIGN.md §2), with what each means."""


def kl_scale(form: str, sigma: Sigma, sigma_next: Sigma, noise_level: float) -> Tensor:
    """The ``scale`` :func:`kl_to_reference` divides by: ``std_k`` for the ``exact`` form, ``sig_k``
    for the ``flow-grpo`` form (DESIGN.md §2). float32."""
    sig, std = sde_noise_scale(sigma, sigma_next, noise_level)
    if form == "exact":
        return std
    if form == "flow-grpo":
        return sig
    raise ValueError(f"unknown KL form {form!r}; choose one of {', '.join(KL_FORMS)}")


def kl_to_reference(mean_new: Tensor, mean_ref: Tensor, scale: Tensor) -> Tensor:
    """The KL term between the new and reference policy's Gaussians (same std), mean over non-batch
    dims: ``mean_dims (mean_new - mean_ref)^2 / (2 scale^2)``, shape ``(B,)``.

    ``scale`` decides what the term is (DESIGN.md §2): the step's ``std_k = sig_k sqrt(s_k - s_{k+1})``
    gives the exact KL ("exact", TempFlow-GRPO's code); ``sig_k`` alone gives Flow-GRPO's code's term,
    the exact KL times ``s_k - s_{k+1}`` ("flow-grpo"). A beta is only meaningful with its form.
    """
    kl = (mean_new - mean_ref) ** 2 / (2 * scale**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
