"""The recommender's metrics (stages.recsys.metrics): hit rate, NDCG and reward by hand, and the
history the evaluation feeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.recsys.metrics import ranks, summarise
from stages.recsys.model import RecModelConfig


def test_metrics_by_hand():
    logits = torch.tensor([[-math.inf, 3.0, 1.0, 2.0], [-math.inf, 0.0, 5.0, 1.0]])
    assert ranks(logits, torch.tensor([3, 3])).tolist() == [1, 1]
    rank = np.array([0, 1, 4, 30])
    purchase = np.array([True, False, True, False])
    out = summarise(rank, purchase, np.array([1.0, 0.2, 1.0, 0.2]), ks=(5,))
    assert out["purchase_hr@5"] == 1.0 and out["click_hr@5"] == 0.5
    assert out["purchase_ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / 2)
    assert out["click_ndcg@5"] == pytest.approx((1 / math.log2(3)) / 2)
    assert out["reward@5"] == pytest.approx((1.0 + 0.2 + 1.0) / 4)


def test_eval_feeds_a_cut_history_without_the_start_token():
    from stages.recsys.metrics import rank_targets

    seen = []

    class Recorder(torch.nn.Module):
        config = RecModelConfig(layers=1, heads=1, width=8, context=3)

        def forward(self, items):
            seen.append(items.clone())
            return torch.zeros(*items.shape, 5), None

    rank_targets(Recorder(), [([1, 2], 3), ([1, 2, 3], 4), ([1, 2, 3, 4], 2)])
    assert seen[0].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [2, 3, 4, 0]]
