"""The benchmark's statistics: paired differences between methods with 95 % intervals, the point of a
curve chosen on validation, and the NFE a curve needs to reach a target.

Pairing: every method is evaluated on the same prompts and initial noises, so image i of method A
and image i of method B differ only by the policy; the difference of their rewards has far less
variance than either reward. Training seeds are matched by index (seed s of A with seed s of B;
the two runs share no randomness beyond the base, so the matching is a bookkeeping choice). The
interval is Student's t over the training seeds' mean differences: it carries the training noise
and the noise of each image given the prompt set, but it is conditional on the one fixed set of
test prompts and noises every method is evaluated on. The within-seed standard error over images
is reported beside it as the evaluation's own resolution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# Student's t, two-sided 95 % (the 0.975 quantile) by degrees of freedom: a table from any statistics text.
_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
          12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom: the table's entry at or below
    ``df`` (never too small up to 120), 1.96 past 120 (too small by at most 0.02)."""
    if df < 1:
        raise ValueError(f"need at least 1 degree of freedom, got {df}")
    if df > 120:
        return 1.96
    return _T_975[max(k for k in _T_975 if k <= df)]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof = 1``; NaN for one value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd


def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """``mean``, the 95 % interval's half-width ``ci95`` (NaN for one value) and ``n``."""
    mean, sd = mean_sd(values)
    n = len(values)
    return {"mean": mean, "ci95": t_975(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan, "n": n}


def paired_difference(method: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]]) -> dict[str, Any]:
    """``method[s][i] - baseline[s][i]``: per training seed s the mean over images i, then the mean over
    seeds with its t interval; ``image_se``, the mean over seeds of the standard error over images."""
    if len(method) != len(baseline) or any(len(a) != len(b) for a, b in zip(method, baseline)):
        raise ValueError("paired evaluation needs the same seeds and the same images for both methods")
    per_seed, image_se = [], []
    for a, b in zip(method, baseline):
        diffs = [x - y for x, y in zip(a, b)]
        mean, sd = mean_sd(diffs)
        per_seed.append(mean)
        image_se.append(sd / math.sqrt(len(diffs)))
    return {**mean_ci(per_seed), "per_seed": per_seed, "image_se": sum(image_se) / len(image_se)}


def paired_bootstrap(method: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]], resamples: int = 4000,
                     seed: int = 0) -> dict[str, Any]:
    """``method[s][i] - baseline[s][i]`` over training seeds s and targets i (users, images), its mean
    and a 95 % percentile interval from a two-way bootstrap: each resample draws the seeds and the
    targets anew, with replacement, and independently, so the interval carries the training noise and
    the sampling of the targets (a test set is one draw of its users) where :func:`paired_difference`
    conditions on the targets. ``per_seed``: each seed's mean difference."""
    import numpy as np

    a, b = np.asarray(method, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError("paired evaluation needs the same seeds and the same targets for both methods")
    diffs = a - b
    rng = np.random.default_rng(seed)
    seeds, targets = diffs.shape
    means = np.empty(resamples)
    for r in range(resamples):
        means[r] = diffs[rng.integers(seeds, size=seeds)].mean(axis=0)[rng.integers(targets, size=targets)].mean()
    low, high = np.quantile(means, [0.025, 0.975])
    return {"mean": float(diffs.mean()), "low": float(low), "high": float(high), "per_seed": diffs.mean(axis=1).tolist(),
            "seeds": seeds, "targets": targets, "resamples": resamples}


def chosen_index(curve: Sequence[dict[str, Any]], key: str = "val_reward") -> int:
    """The evaluation point with the best validation figure (the earliest of equals)."""
    values = [row[key] for row in curve]
    return values.index(max(values))


def nfe_to_reach(curve: Sequence[dict[str, Any]], target: float, key: str = "val_reward") -> float | None:
    """Rollout NFE at the first evaluation whose ``key`` reaches ``target``; None when none does."""
    for row in curve:
        if row[key] >= target:
            return float(row["nfe"])
    return None


def reach_summary(curves: Sequence[Sequence[dict[str, Any]]], target: float, key: str = "val_reward") -> dict[str, Any]:
    """Each seed's NFE to reach ``target``, their mean and t interval over the seeds that reached it,
    and how many did not (a mean over only those that reached is optimistic: say so beside it)."""
    reached = [nfe_to_reach(c, target, key) for c in curves]
    hits = [r for r in reached if r is not None]
    summary = mean_ci(hits) if hits else {"mean": None, "ci95": None, "n": 0}
    return {**summary, "per_seed": reached, "not_reached": len(reached) - len(hits)}
