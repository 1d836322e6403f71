"""Full-ranking metrics: every item is a candidate, none is sampled away, and the protocol says
which items a target competes with.

Protocols (:data:`PROTOCOLS`): ``seen-removed``, where the items the user interacted with before
the target are not candidates (the target itself always is), as RecBole's full ranking does for its
general recommenders (its sequential ones, SASRec among them, rank every item); ``all-items``, where
they are. A target's rank is the number of candidates ordered before it: a higher score, or
an equal score and a lower item index (a fixed tie order, so that a model of equal scores, such as
the popularity floor, is neither flattered nor penalised by the order of a sort; column 0, the start
token, is never a candidate). ``HR@k = 1[rank < k]``, ``NDCG@k = 1[rank < k] / log2(rank + 2)`` (one
relevant item, so the ideal DCG is 1), averaged over all targets and over click and purchase targets
apart (Xin et al.'s split), each with the standard error of its mean; ``reward@k`` is the mean over
all targets of the event's reward when it is hit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

KS = (5, 10, 20)
PROTOCOLS = {
    "seen-removed": "the items the user interacted with before the target are not candidates",
    "all-items": "every item is a candidate, the user's earlier ones included",
}


def ranks(scores: Tensor, targets: Tensor, seen: Tensor | None = None) -> Tensor:
    """``(N,)`` rank of each target among the candidates of its row of ``scores`` ``(N, V)``: those
    ordered before it by (score descending, item index ascending), less the ``seen`` ones (a bool
    mask ``(N, V)``; the target is never removed)."""
    target_score = scores.gather(-1, targets.unsqueeze(-1))
    index = torch.arange(scores.shape[-1], device=scores.device)
    before = (scores > target_score) | ((scores == target_score) & (index < targets.unsqueeze(-1)))
    before[:, 0] = False  # the start token is never a candidate
    if seen is not None:
        before &= ~seen
    return before.sum(dim=-1)


def seen_mask(seen: list[list[int]], width: int, device: str | torch.device = "cpu") -> Tensor:
    """``(N, width)`` bool: row n marks the items of ``seen[n]``."""
    mask = torch.zeros(len(seen), width, dtype=torch.bool, device=device)
    for row, items in enumerate(seen):
        if items:
            mask[row, torch.tensor(items, dtype=torch.long, device=device)] = True
    return mask


def summarise(rank: np.ndarray, purchase: np.ndarray, reward: np.ndarray,
              ks: tuple[int, ...] = KS) -> dict[str, float | None]:
    """HR@k, NDCG@k (all targets, and click and purchase targets apart) and reward@k, each ``mean``
    with ``_se``."""
    out: dict[str, float | None] = {"targets": float(len(rank)), "click_targets": float((~purchase).sum()),
                                    "purchase_targets": float(purchase.sum())}
    everyone = np.ones_like(purchase, dtype=bool)
    for k in ks:
        values = {name: per_target(rank, name) for name in (f"hr@{k}", f"ndcg@{k}")}
        for kind, mask in (("", everyone), ("click_", ~purchase), ("purchase_", purchase)):
            for name, value in values.items():
                out[f"{kind}{name}"], out[f"{kind}{name}_se"] = _mean_se(value[mask])
        out[f"reward@{k}"], out[f"reward@{k}_se"] = _mean_se(np.where(rank < k, reward, 0.0))
    return out


def per_target(rank: np.ndarray, metric: str) -> np.ndarray:
    """Each target's value of ``metric`` (``hr@k`` or ``ndcg@k``), for paired comparisons."""
    name, _, k = metric.partition("@")
    hit = rank < int(k)
    if name == "hr":
        return hit.astype(np.float64)
    if name == "ndcg":
        return np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    raise ValueError(f"unknown metric {metric!r}; expected hr@k or ndcg@k")


def _mean_se(values: np.ndarray) -> tuple[float | None, float | None]:
    """The mean and its standard error; None for a kind of target the split does not hold."""
    if len(values) == 0:
        return None, None
    se = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(np.mean(values)), se


@torch.no_grad()
def rank_targets(model, windows: list[tuple[list[int], int]], seen: list[list[int]] | None = None, batch: int = 256,
                 device: str = "cpu") -> np.ndarray:
    """Ranks of ``(history, target)`` pairs under ``model``'s item logits at the end of each history,
    without the ``seen`` items of each (None: every item a candidate). A history that begins its
    session is led by the start token 0; one cut to the model's context is not, as a training window
    after a session's first starts with a real item."""
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
        mask = None if seen is None else seen_mask(seen[lo:lo + batch], at_end.shape[-1], device)
        out.append(ranks(at_end, torch.tensor([t for _, t in chunk], device=device), mask).cpu())
    return torch.cat(out).numpy()


def rank_by_scores(scores: Tensor, targets: list[int], seen: list[list[int]] | None = None,
                   batch: int = 1024) -> np.ndarray:
    """Ranks of ``targets`` under one score per item shared by every target (a model-free floor such as
    popularity), without each target's ``seen`` items."""
    out = []
    for lo in range(0, len(targets), batch):
        chunk = torch.tensor(targets[lo:lo + batch], dtype=torch.long)
        rows = scores.unsqueeze(0).expand(len(chunk), -1)
        mask = None if seen is None else seen_mask(seen[lo:lo + batch], scores.shape[-1])
        out.append(ranks(rows, chunk, mask))
    return torch.cat(out).numpy()
