"""Training the recommender (stages.recsys.train): windows and their next states, CRR learning from
rewards where BC copies the log, and an interrupted fit resumed to the same weights."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from stages.recsys.data import PrepareConfig, build_sessions
from stages.recsys.model import RecModelConfig, RecTransformer
from stages.recsys.train import TrainConfig, eval_targets, fit, train_windows
from tests.conftest import _sessions_file


def test_windows_chain_states_and_end_each_session():
    config = PrepareConfig(split="user", min_session_length=3)
    from stages.recsys.data import Events

    events = Events()
    for t, item in enumerate(["a", "b", "c", "d", "e", "f", "g"]):
        events.add("u", item, t == 3, float(t))
    sessions = build_sessions(events, config)
    w = train_windows(sessions, context=3)  # train events a..e (f: validation, g: test)
    assert w["items"].tolist() == [[0, 1, 2, 3], [3, 4, 5, 0]]
    assert w["target"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert w["done"].tolist() == [[False, False, False], [False, True, False]]
    assert w["valid"].tolist() == [[True, True, True], [True, True, False]]
    np.testing.assert_allclose(w["reward"][0].numpy(), [0.2, 0.2, 0.2])
    assert w["reward"][1, 0].item() == 1.0  # d was a purchase
    test = eval_targets(sessions, "test", context=3)
    assert test.pairs == [([3, 4, 5, 6], 7)]  # the test target g, validation's f in its history; 4 > 3: cut
    assert test.seen == [[1, 2, 3, 4, 5, 6]]  # yet every earlier item of the session is seen
    assert eval_targets(sessions, "validation", context=6).pairs == [([1, 2, 3, 4, 5], 6)]  # from the session's start


def test_states_pair_with_their_next_states_and_the_target_network():
    """_batch: the state at position j is paired with the target network's outputs at j + 1."""
    from stages.recsys.train import _batch as make_batch

    torch.manual_seed(0)
    online = RecTransformer(6, RecModelConfig(layers=1, heads=1, width=8, context=3, dropout=0.0)).eval()
    target = RecTransformer(6, RecModelConfig(layers=1, heads=1, width=8, context=3, dropout=0.0)).eval()
    items = torch.tensor([[0, 1, 2, 3]])
    w = {"items": items, "target": torch.tensor([[1, 2, 3]]), "reward": torch.zeros(1, 3),
         "done": torch.tensor([[False, False, True]]), "valid": torch.tensor([[True, True, False]])}
    batch = make_batch(online, target, w)
    logits, q = online(items)
    t_logits, t_q = target(items)
    torch.testing.assert_close(batch.logits, logits[0, :2])
    torch.testing.assert_close(batch.next_q, q[0, 1:3])
    torch.testing.assert_close(batch.next_logits, t_logits[0, 1:3])
    torch.testing.assert_close(batch.next_q_target, t_q[0, 1:3])
    assert batch.action.tolist() == [1, 2]


def test_crr_learns_from_rewards_where_bc_copies_the_log():
    """A logged behaviour that, after item 1, picks item 2 (reward 0) three times as often as item 3
    (reward 1): behaviour cloning ranks 2 first, CRR learns that 3 pays."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(256):
        good = bool(torch.rand(1, generator=g) < 0.25)
        rows.append(([0, 1, 3 if good else 2], [1, 3 if good else 2], [0.0, 1.0 if good else 0.0]))
    windows = {"items": torch.tensor([r[0] for r in rows]), "target": torch.tensor([r[1] for r in rows]),
               "reward": torch.tensor([r[2] for r in rows]), "done": torch.tensor([[False, True]] * len(rows)),
               "valid": torch.ones(len(rows), 2, dtype=torch.bool)}
    chosen = {}
    for algo in ("bc", "crr"):
        torch.manual_seed(0)
        model = RecTransformer(3, RecModelConfig(layers=1, heads=1, width=16, context=2, dropout=0.0))
        fit(model, windows, algo, TrainConfig(epochs=30, batch_size=64, learning_rate=3e-3, weight="binary", tau=0.05))
        logits, _ = model(torch.tensor([[0, 1]]))
        chosen[algo] = int(logits[0, 1].argmax())
    assert chosen == {"bc": 2, "crr": 3}


class _Stop(Exception):
    pass


def _stop_after(steps: int):
    done = []

    def progress(task: str, advance: int, total: int) -> None:
        done.append(advance)
        if sum(done) >= steps:
            raise _Stop

    return progress


def _validating(model, sessions):
    from stages.recsys.train import evaluate

    return lambda: evaluate(model, sessions, "validation")


@pytest.mark.parametrize("algo, every, stop, select", [("crr", 3, 5, "ndcg@10"), ("sa2c", 4, 9, "last"),
                                                       ("bc", 4, 4, "hr@5")])
def test_an_interrupted_fit_resumes_to_the_same_weights(algo, every, stop, select, tmp_path):
    """Stopped mid-epoch (crr), past an epoch's end with SA2C's switch in between (sa2c), or right
    at a checkpoint that closes an epoch (bc: 4 batches an epoch): the rerun ends with the weights
    and losses of a fit that never stopped, dropout, SA2C's negatives and the best epoch's weights
    (chosen on validation) included."""
    import copy

    from stages.artifacts.rec_checkpoint import RecTrainCheckpoint as TrainCheckpoint
    from stages.artifacts.sessions import read_sessions

    sessions = read_sessions(_sessions_file(tmp_path))
    windows = train_windows(sessions, 1)
    assert len(windows["items"]) == 12  # 6 sessions of 2 train events in windows of 1: 4 batches of 3
    config = TrainConfig(epochs=3, batch_size=3, checkpoint_every=every, warmup=1, tau=0.1, select=select)
    torch.manual_seed(0)
    start = RecTransformer(sessions.n_items, RecModelConfig(layers=1, heads=2, width=8, context=1, dropout=0.2))
    whole = copy.deepcopy(start)
    expected = fit(whole, windows, algo, config, validate=_validating(whole, sessions))
    assert all((f"validation_{select}" in row) == (select != "last") for row in expected)
    ckpt = TrainCheckpoint(tmp_path / "ck")
    with pytest.raises(_Stop):
        stopped = copy.deepcopy(start)
        fit(stopped, windows, algo, config, _stop_after(stop), ckpt, {"start": "x"}, _validating(stopped, sessions))
    saved = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert saved["step"] == stop // every * every
    resumed = copy.deepcopy(start)
    assert fit(resumed, windows, algo, config, checkpoint=ckpt, key={"start": "x"},
               validate=_validating(resumed, sessions)) == expected
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    other = copy.deepcopy(start)  # a checkpoint of another fit (another key) is not taken up
    fit(other, windows, algo, config, checkpoint=ckpt, key={"start": "y"}, validate=_validating(other, sessions))
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), other.state_dict().values()))


def test_the_best_validation_epoch_is_kept_and_patience_stops_the_fit(tmp_path):
    """Validation scores 0.1, 0.3, 0.2, 0.25 (then never asked): with patience 2 the fit stops after
    epoch 4, two epochs past the best, and ends with the weights it had after epoch 2."""
    from stages.artifacts.sessions import read_sessions
    from stages.recsys.train import selected_epoch

    sessions = read_sessions(_sessions_file(tmp_path))
    windows = train_windows(sessions, 1)
    torch.manual_seed(0)
    model = RecTransformer(sessions.n_items, RecModelConfig(layers=1, heads=2, width=8, context=1, dropout=0.0))
    scores, states = iter([0.1, 0.3, 0.2, 0.25]), []

    def validate():
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"purchase_ndcg@10": next(scores)}

    config = TrainConfig(epochs=10, batch_size=3, select="purchase_ndcg@10", patience=2)
    history = fit(model, windows, "bc", config, validate=validate)
    assert [row["validation_purchase_ndcg@10"] for row in history] == [0.1, 0.3, 0.2, 0.25]
    assert selected_epoch(history, "purchase_ndcg@10") == 2 and len(states) == 4
    assert all(torch.equal(v, states[1][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, states[3][k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fields, needle", [
    ({"select": "ndcg@7"}, "--select must be last, or hr@k or ndcg@k"),
    ({"select": "last", "patience": 2}, "--patience must be 0 with --select last"),
    ({"patience": -1}, "--patience"),
])
def test_selection_options_are_checked(fields, needle):
    from stages.support.errors import TempflowError

    with pytest.raises(TempflowError, match=re.escape(needle)):
        TrainConfig(**fields)
