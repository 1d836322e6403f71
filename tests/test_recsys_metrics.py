"""The recommender's metrics (stages.recsys.metrics) against values computed by hand: ranks with
their tie order and the seen items removed, HR, NDCG (its discount) and reward overall and per kind,
the popularity floor, the protocol switch, and the history the evaluation feeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.recsys.data import Events, PrepareConfig, build_sessions
from stages.recsys.metrics import per_target, rank_by_scores, rank_targets, ranks, seen_mask, summarise
from stages.recsys.model import RecModelConfig

INF = math.inf


def test_ranks_count_the_candidates_before_the_target_ties_by_item_index():
    scores = torch.tensor([[-INF, 3.0, 1.0, 2.0, 2.0],
                           [-INF, 0.0, 5.0, 1.0, 1.0],
                           [-INF, 1.0, 1.0, 1.0, 1.0]])
    # row 0, target 3: item 1 scores higher; item 4 ties but has the higher index -> rank 1
    # row 1, target 4: items 2 (5.0) and 3 (a tie, lower index) come first -> rank 2
    # row 2, target 3: all tie; items 1 and 2 have lower indices -> rank 2; the start token never counts
    assert ranks(scores, torch.tensor([3, 4, 3])).tolist() == [1, 2, 2]
    seen = seen_mask([[1], [2, 3], [4]], 5)
    # removing what each user saw: row 0 loses item 1, row 1 items 2 and 3, row 2 item 4 (after the target)
    assert ranks(scores, torch.tensor([3, 4, 3]), seen).tolist() == [0, 0, 2]


def test_a_seen_target_stays_rankable():
    """The seen mask never hides the target itself (a repeated item stays a candidate)."""
    scores = torch.tensor([[-INF, 1.0, 2.0, 3.0]])
    assert ranks(scores, torch.tensor([1]), seen_mask([[1, 3]], 4)).tolist() == [1]


def test_metrics_by_hand():
    rank = np.array([0, 1, 4, 30])
    purchase = np.array([True, False, True, False])
    out = summarise(rank, purchase, np.array([1.0, 0.2, 1.0, 0.2]), ks=(5,))
    assert out["hr@5"] == 0.75 and out["purchase_hr@5"] == 1.0 and out["click_hr@5"] == 0.5
    assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert out["purchase_ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / 2)
    assert out["click_ndcg@5"] == pytest.approx((1 / math.log2(3)) / 2)
    assert out["reward@5"] == pytest.approx((1.0 + 0.2 + 1.0) / 4)
    assert out["hr@5_se"] == pytest.approx(np.std([1, 1, 1, 0], ddof=1) / 2)
    assert per_target(rank, "ndcg@5").tolist() == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(6), 0.0])
    assert per_target(rank, "hr@1").tolist() == [1.0, 0.0, 0.0, 0.0]


def _two_users():
    """u1: items a b c d (c validation, d test); u2: b a e c (e validation, c test). Item numbers by
    first appearance: a 1, b 2, c 3, d 4, e 5."""
    events = Events()
    for t, item in enumerate("abcd"):
        events.add("u1", item, item == "d", float(t))
    for t, item in enumerate("baec"):
        events.add("u2", item, False, float(10 + t))
    return build_sessions(events, PrepareConfig(split="user", min_session_length=3))


def test_popularity_floor_and_the_protocol_switch_by_hand():
    from stages.recsys.train import evaluate_popularity, popularity_scores

    sessions = _two_users()
    # train events: a b (u1), b a (u2): a and b twice each, c d e never
    assert popularity_scores(sessions).tolist() == [-INF, 2.0, 2.0, 0.0, 0.0, 0.0]
    # test targets: d for u1 (seen a b c), c for u2 (seen b a e)
    all_items = evaluate_popularity(sessions, "test", "all-items")
    # d: a, b score higher, c ties with a lower index -> 3; c: a, b higher -> 2
    assert all_items["ranks"] == [3, 2]
    removed = evaluate_popularity(sessions, "test", "seen-removed")
    # d: a, b, c seen -> 0; c: a, b seen -> 0
    assert removed["ranks"] == [0, 0] and removed["ndcg@5"] == 1.0 and removed["protocol"] == "seen-removed"
    assert all_items["hr@5"] == 1.0 and all_items["ndcg@5"] == pytest.approx((1 / 2 + 1 / math.log2(5)) / 2)
    assert rank_by_scores(popularity_scores(sessions), [4, 3], [[1, 2, 3], [1, 2, 5]]).tolist() == [0, 0]


def test_model_ranks_under_both_protocols(tmp_path):
    """evaluate: the same model's ranks with the seen items removed are those without, less the seen
    items that ranked before the target."""
    from stages.recsys.model import RecTransformer
    from stages.recsys.train import eval_targets, evaluate

    sessions = _two_users()
    torch.manual_seed(0)
    model = RecTransformer(sessions.n_items, RecModelConfig(layers=1, heads=1, width=8, context=4, dropout=0.0))
    kept, removed = evaluate(model, sessions, "test", protocol="all-items"), evaluate(model, sessions, "test")
    targets = eval_targets(sessions, "test", context=4)
    with torch.no_grad():
        for n, ((history, target), seen) in enumerate(zip(targets.pairs, targets.seen)):
            logits, _ = model(torch.tensor([[0, *history]]))
            row = logits[0, -1]
            before = [i for i in range(1, sessions.n_items + 1) if i != target
                      and (row[i] > row[target] or (row[i] == row[target] and i < target))]
            assert kept["ranks"][n] == len(before)
            assert removed["ranks"][n] == len([i for i in before if i not in seen])
    assert rank_targets(model, targets.pairs).tolist() == kept["ranks"]


def test_eval_feeds_a_cut_history_without_the_start_token():
    seen = []

    class Recorder(torch.nn.Module):
        config = RecModelConfig(layers=1, heads=1, width=8, context=3)

        def forward(self, items):
            seen.append(items.clone())
            return torch.zeros(*items.shape, 5), None

    rank_targets(Recorder(), [([1, 2], 3), ([1, 2, 3], 4), ([1, 2, 3, 4], 2)])
    assert seen[0].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [2, 3, 4, 0]]
