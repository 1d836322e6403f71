"""Full-ranking metrics: every item is a candidate, none is sampled away.

For each evaluated event, the target's rank is the number of items scored strictly above it (0:
the top; the start token 0 is never a candidate). ``HR@k = 1[rank < k]``, ``NDCG@k = 1[rank < k] /
log2(rank + 2)`` (one relevant item, so the ideal DCG is 1), each averaged separately over click and
purchase targets as in Xin et al.'s protocol, with the standard error of the mean; ``reward@k`` is
the mean over all targets of the event's reward when it is hit (their cumulative reward of hits,
per event).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

KS = (5, 10, 20)


def ranks(logits: Tensor, targets: Tensor) -> Tensor:
    """``(N,)`` rank of each target among all items of its row of ``logits`` ``(N, V)``."""
    target_score = logits.gather(-1, targets.unsqueeze(-1))
    return (logits > target_score).sum(dim=-1)


def summarise(rank: np.ndarray, purchase: np.ndarray, reward: np.ndarray,
              ks: tuple[int, ...] = KS) -> dict[str, float | None]:
    """HR@k, NDCG@k (click and purchase targets apart) and reward@k, each ``mean`` with ``_se``."""
    out: dict[str, float | None] = {"targets": float(len(rank)), "click_targets": float((~purchase).sum()),
                             "purchase_targets": float(purchase.sum())}
    for k in ks:
        hit = rank < k
        ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
        for kind, mask in (("click", ~purchase), ("purchase", purchase)):
            for name, values in ((f"hr@{k}", hit.astype(np.float64)), (f"ndcg@{k}", ndcg)):
                out[f"{kind}_{name}"], out[f"{kind}_{name}_se"] = _mean_se(values[mask])
        out[f"reward@{k}"], out[f"reward@{k}_se"] = _mean_se(np.where(hit, reward, 0.0))
    return out


def _mean_se(values: np.ndarray) -> tuple[float | None, float | None]:
    """The mean and its standard error; None for a kind of target the split does not hold."""
    if len(values) == 0:
        return None, None
    se = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(np.mean(values)), se


@torch.no_grad()
def rank_targets(model, windows: list[tuple[list[int], int]], batch: int = 256, device: str = "cpu") -> np.ndarray:
    """Ranks of ``(history, target)`` pairs under ``model``'s item logits at the end of each history.
    A history that begins its session is led by the start token 0; one cut to the model's context is
    not, as a training window after a session's first starts with a real item."""
    out, context = [], model.config.context
    for lo in range(0, len(windows), batch):
        chunk = [([0, *h] if len(h) <= context else h[-context:], t) for h, t in windows[lo:lo + batch]]
        width = max(len(h) for h, _ in chunk)
        items = torch.zeros(len(chunk), width, dtype=torch.long)
        last = torch.tensor([len(h) - 1 for h, _ in chunk])
        for row, (history, _) in enumerate(chunk):
            items[row, :len(history)] = torch.tensor(history, dtype=torch.long)
        logits, _ = model(items.to(device))
        at_end = logits[torch.arange(len(chunk)), last.to(device)]
        out.append(ranks(at_end, torch.tensor([t for _, t in chunk], device=device)).cpu())
    return torch.cat(out).numpy()
