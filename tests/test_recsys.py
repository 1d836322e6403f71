"""The recommender (stages.recsys): loaders on hand-made fixtures, the real MovieLens file of the
recbole wheel, every formula of DESIGN.md §8 by hand and against tianshou's discrete CRR, the
metrics by hand, and the stages end to end on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.recsys import losses
from stages.recsys.data import PrepareConfig, PrepareFiles, build_sessions, read_events, read_movielens, split_by_gap
from stages.recsys.metrics import ranks, summarise
from stages.recsys.model import RecModelConfig, RecTransformer, polyak
from stages.recsys.train import TrainConfig, eval_pairs, fit, train_windows
from stages.support.errors import TempflowError
from tests.conftest import invoke

REPO = Path(__file__).resolve().parents[1]

TINY = ["--layers", "1", "--heads", "2", "--width", "16", "--context", "8", "--epochs", "2", "--batch-size", "16"]


# --- data ---------------------------------------------------------------------------------------

def _retailrocket(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "events.csv"
    path.write_text("timestamp,visitorid,event,itemid,transactionid\n" + "\n".join(rows) + "\n")
    return path


MINUTE = 60_000  # RetailRocket's timestamps are milliseconds


def test_retailrocket_sessions_split_at_30_minute_gaps(tmp_path):
    rows = [f"{0 * MINUTE},7,view,100,", f"{10 * MINUTE},7,addtocart,101,", f"{20 * MINUTE},7,transaction,101,5",
            f"{51 * MINUTE},7,view,102,",  # 31 minutes later: a new session
            f"{52 * MINUTE},7,view,100,", f"{53 * MINUTE},7,view,103,",
            f"{5 * MINUTE},8,view,100,", f"{6 * MINUTE},8,view,104,", f"{7 * MINUTE},8,transaction,104,6"]
    config = PrepareConfig(source="retailrocket", split="time", min_session_length=3)
    sessions = build_sessions(read_events(config, PrepareFiles(source=config.source, events=_retailrocket(tmp_path, rows))), config)
    assert sessions.info["sessions"] == 3 and sessions.info["purchases"] == 2
    bounds = sessions.bounds()
    first = [sessions.item_ids[i - 1] for i in sessions.item[bounds[0]:bounds[1]]]
    assert first == ["100", "101", "101"]  # visitor 7's first visit, in time order
    np.testing.assert_allclose(sessions.reward[bounds[0]:bounds[1]], [0.2, 0.2, 1.0])


@pytest.mark.parametrize("row, needle", [
    ("1000,7,like,100,", "line 2: unknown event 'like'"),
    ("1000,7,view,100", "line 2: expected 5 comma-separated fields, got 4"),
    ("soon,7,view,100,", "line 2: timestamp 'soon' is not a number"),
    ("1000,,view,100,", "line 2: empty visitorid or itemid"),
])
def test_retailrocket_bad_rows_are_refused_naming_the_line(row, needle, tmp_path):
    config = PrepareConfig(source="retailrocket")
    with pytest.raises(TempflowError, match=needle):
        read_events(config, PrepareFiles(source=config.source, events=_retailrocket(tmp_path, [row])))


def test_yoochoose_clicks_and_buys(tmp_path):
    clicks = tmp_path / "clicks.dat"
    clicks.write_text("1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:54:09.868Z,214536500,0\n"
                      "1,2014-04-07T10:54:46.998Z,214536506,0\n2,2014-04-07T13:56:37.614Z,214662742,0\n")
    buys = tmp_path / "buys.dat"
    buys.write_text("1,2014-04-07T10:55:00.000Z,214536500,1046,1\n")
    config = PrepareConfig(source="yoochoose", split="time", min_session_length=2)
    sessions = build_sessions(read_events(config, PrepareFiles(source=config.source, clicks=clicks, buys=buys)), config)
    assert sessions.info == {**sessions.info, "sessions": 1, "sessions_dropped_short": 1, "purchases": 1}
    assert sessions.purchase.tolist() == [False, False, False, True]  # the buy comes last in time
    with pytest.raises(TempflowError, match="buys.dat line 1: expected 5 comma-separated fields, got 4 .is this the buys"):
        buys.write_text("1,2014-04-07T10:55:00.000Z,214536500,0\n")
        read_events(config, PrepareFiles(source=config.source, clicks=clicks, buys=buys))


def test_movielens_from_the_recbole_wheel():
    config = PrepareConfig()
    events = read_movielens(config)
    assert len(events.item) == 100_000 and len(set(events.session)) == 943 and len(set(events.item)) == 1682
    sessions = build_sessions(events, config)
    assert sessions.n_items == 1682 and sessions.info["sessions"] == 943
    bounds = sessions.bounds()
    split = sessions.split[bounds[0]:bounds[1]]
    assert split[-1] == 2 and split[-2] == 1 and (split[:-2] == 0).all()  # leave-last-out
    times = sessions.time[bounds[0]:bounds[1]]
    assert (np.diff(times) >= 0).all()
    text = _ml_text()
    ratings = [float(line.split("\t")[2]) for line in text.splitlines()[1:]]
    assert sessions.purchase.sum() == sum(r >= 4 for r in ratings) == 55_375  # purchase: rating >= 4
    every = sessions.split[:]
    assert (every == 2).sum() == (every == 1).sum() == 943  # one test and one validation event per user


def _ml_text() -> str:
    from stages.recsys.data import _movielens_text

    return _movielens_text()


def test_movielens_bad_rows(tmp_path):
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    with pytest.raises(TempflowError, match="line 2: rating 'five' is not a number"):
        read_movielens(PrepareConfig(), header + "1\t2\tfive\t3\n")
    with pytest.raises(TempflowError, match="line 2: expected 4 tab-separated fields, got 3"):
        read_movielens(PrepareConfig(), header + "1\t2\t5\n")
    with pytest.raises(TempflowError, match="no events in it"):
        read_movielens(PrepareConfig(), header)


def test_a_source_refuses_files_it_does_not_read(tmp_path):
    with pytest.raises(TempflowError, match="rec prepare: --events must be given with --source retailrocket, got None"):
        PrepareFiles(source="retailrocket")
    with pytest.raises(TempflowError, match="rec prepare: --events must be left out with --source movielens"):
        PrepareFiles(events=tmp_path)
    with pytest.raises(TempflowError, match="--buys must be given with --source yoochoose"):
        PrepareFiles(source="yoochoose", clicks=tmp_path)


def test_split_by_gap_counts_each_visitor_apart():
    from stages.recsys.data import Events

    events = Events()
    for visitor, stamp in (("a", 0), ("b", 10), ("a", 100), ("a", 5000)):
        events.add(visitor, "x", False, stamp)
    assert split_by_gap(events, 1800).session == ["a#0", "a#0", "a#1", "b#2"]


# --- formulas -----------------------------------------------------------------------------------

def test_crr_target_advantage_and_weights_by_hand():
    probs = torch.tensor([[0.5, 0.25, 0.25]])
    q_next = torch.tensor([[2.0, 4.0, 0.0]])
    target = losses.crr_target(torch.tensor([1.0]), torch.tensor([False]), probs, q_next, gamma=0.5)
    assert target.item() == pytest.approx(1.0 + 0.5 * (0.5 * 2 + 0.25 * 4))  # 2.0
    assert losses.crr_target(torch.tensor([1.0]), torch.tensor([True]), probs, q_next, 0.5).item() == 1.0
    q = torch.tensor([[1.0, 3.0, -1.0]])
    adv = losses.advantage(q, q[:, 1], probs)
    assert adv.item() == pytest.approx(3.0 - (0.5 - 0.25 + 0.75))  # 2.0
    assert losses.advantage(q, q[:, 0], probs, "max").item() == -2.0
    assert losses.crr_weight(torch.tensor([2.0, -1.0]), "binary", 1.0).tolist() == [1.0, 0.0]
    np.testing.assert_allclose(losses.crr_weight(torch.tensor([1.0, 5.0]), "exp", 2.0).numpy(),
                               [math.exp(0.5), min(math.exp(2.5), 20.0)], rtol=1e-6)
    assert losses.crr_weight(torch.tensor([100.0]), "exp", 1.0).item() == 20.0  # the ceiling


def test_sqn_target_is_double_q():
    next_q = torch.tensor([[0.0, 5.0, 1.0]])  # the online head picks item 1
    next_q_target = torch.tensor([[9.0, 2.0, 7.0]])  # the target head values it
    target = losses.sqn_target(torch.tensor([0.2]), torch.tensor([False]), next_q, next_q_target, gamma=0.9)
    assert target.item() == pytest.approx(0.2 + 0.9 * 2.0)


def _batch(seed: int = 0, n: int = 6, v: int = 5) -> losses.Batch:
    g = torch.Generator().manual_seed(seed)
    return losses.Batch(logits=torch.randn(n, v, generator=g, requires_grad=True), q=torch.randn(n, v, generator=g),
                        action=torch.randint(0, v, (n,), generator=g), reward=torch.rand(n, generator=g),
                        done=torch.tensor([False, True] * (n // 2)), next_logits=torch.randn(n, v, generator=g),
                        next_q=torch.randn(n, v, generator=g), next_q_target=torch.randn(n, v, generator=g))


def test_bc_is_the_cross_entropy_and_crr_the_weighted_one():
    batch = _batch()
    bc, _ = losses.objective(batch, losses.Objective(algo="bc"))
    assert bc.item() == pytest.approx(F.cross_entropy(batch.logits, batch.action).item(), rel=1e-6)
    crr, parts = losses.objective(batch, losses.Objective(algo="crr", weight="binary", gamma=0.9))
    log_pi = F.log_softmax(batch.logits, -1).detach()
    q_sa = batch.q.gather(1, batch.action[:, None])[:, 0]
    adv = q_sa - (log_pi.exp() * batch.q).sum(-1)
    expected_actor = -((adv > 0).float() * log_pi.gather(1, batch.action[:, None])[:, 0]).mean()
    assert parts["actor_loss"] == pytest.approx(expected_actor.item(), rel=1e-6)


def test_crr_weight_carries_no_gradient_into_the_critic():
    """The actor term reaches the Q head only through f, which is detached: the Q head's gradient
    is the critic loss's alone, and the logits' the weighted cross-entropy's with f held fixed."""
    batch = _batch(seed=1)
    batch.q.requires_grad_(True)
    settings = losses.Objective(algo="crr", weight="exp", beta=0.5)
    loss, _ = losses.objective(batch, settings)
    loss.backward()
    q, logits = batch.q.detach().clone().requires_grad_(True), batch.logits.detach().clone().requires_grad_(True)
    q_sa = q.gather(1, batch.action[:, None])[:, 0]
    target = losses.crr_target(batch.reward, batch.done, F.softmax(batch.next_logits, -1), batch.next_q_target, settings.gamma)
    losses.critic_loss(q_sa, target).backward()
    torch.testing.assert_close(batch.q.grad, q.grad)
    with torch.no_grad():
        probs = F.softmax(logits, -1)
        f = losses.crr_weight(losses.advantage(q, q_sa, probs), "exp", 0.5)
    losses.weighted_nll(F.log_softmax(logits, -1), batch.action, f).backward()
    torch.testing.assert_close(batch.logits.grad, logits.grad)


TIANSHOU_CRR = """
Tianshou's DiscreteCRR._update_with_batch (tianshou 2.0.1, tianshou/algorithm/imitation/discrete_crr.py),
with its CQL term off (min_q_weight = 0) and its lagged networks given, reduces on one batch to:
    target   = rew + gamma * (softmax(actor_old(obs_next)) * critic_old(obs_next)).sum(-1), 0 where done
    critic   = 0.5 * mse(q[act], target)
    adv      = q[act] - (softmax(actor(obs)) * q).sum(-1)
    coef     = (adv > 0) or exp(adv / beta).clamp(0, ratio_upper_bound)
    actor    = mean(-log_softmax(actor(obs))[act] * coef)
(in its code coef has shape (N, 1) against the log-probabilities' (N,), so on a batch of more than one
transition the product broadcasts to (N, N); examples/recsys/check_tianshou.py shows it, and compares on
single transitions, where the two agree)
"""


@pytest.mark.parametrize("mode", ["binary", "exp"])
def test_crr_equals_the_formulas_quoted_from_tianshous_discrete_crr(mode):
    """The same batch through tempflow's objective and through tianshou's formulas as quoted above
    (typed here from its code: the next test runs tianshou itself)."""
    batch = _batch(seed=3, n=8, v=7)
    beta, gamma = 0.7, 0.95
    _, parts = losses.objective(batch, losses.Objective(algo="crr", weight=mode, beta=beta, gamma=gamma))
    with torch.no_grad():
        target_m = F.softmax(batch.next_logits, -1)
        expected_target_q = (batch.next_q_target * target_m).sum(-1)
        expected_target_q[batch.done] = 0.0
        target = batch.reward + gamma * expected_target_q
        qa = batch.q.gather(1, batch.action[:, None])[:, 0]
        tianshou_critic = 0.5 * F.mse_loss(qa, target)
        dist = torch.distributions.Categorical(logits=batch.logits)
        adv = qa - (batch.q * dist.probs).sum(-1)
        coef = (adv > 0).float() if mode == "binary" else (adv / beta).exp().clamp(0, 20.0)
        tianshou_actor = (-dist.log_prob(batch.action) * coef).mean()
    assert parts["critic_loss"] == pytest.approx(2 * tianshou_critic.item(), rel=1e-6)  # DESIGN.md: no 1/2
    assert parts["actor_loss"] == pytest.approx(tianshou_actor.item(), rel=1e-6)


def test_crr_matches_tianshou_itself():
    """tianshou's own DiscreteCRR on a hand-made batch (examples/recsys/check_tianshou.py); the test
    set-up installs tianshou 2.0.1 (tests/requirements-no-deps.txt), so this runs in CI."""
    import tianshou  # noqa: F401  (a missing install fails here, loudly, rather than skipping)

    spec = importlib.util.spec_from_file_location("check_tianshou", REPO / "examples/recsys/check_tianshou.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    for mode in ("binary", "exp"):
        r = check.compare(mode)
        assert check.agrees(r["tempflow_actor"], r["tianshou_actor_per_transition"]), r
        assert check.agrees(r["tempflow_critic"], r["tianshou_critic_x2_batch"]), r


def test_sa2c_weights_the_cross_entropy_by_the_clipped_sampled_advantage():
    """Xin et al.'s code: A = Q(s, a) - mean over the logged item and N sampled items of Q, clipped
    to [0, 10]; the actor term is A * cross-entropy. Hand-made Q values and negatives."""
    q = torch.tensor([[0.0, 1.0, 2.0, 3.0, 30.0], [0.0, 4.0, 0.0, 0.0, 1.0]])
    batch = losses.Batch(logits=torch.zeros(2, 5), q=q, action=torch.tensor([4, 2]), reward=torch.zeros(2),
                         done=torch.tensor([True, True]), next_logits=torch.zeros(2, 5), next_q=torch.zeros(2, 5),
                         next_q_target=torch.zeros(2, 5), negatives=torch.tensor([[1, 2], [1, 4]]))
    # row 0: 30 - (30 + 1 + 2) / 3 = 19 -> clipped to 10; row 1: 0 - (0 + 4 + 1) / 3 < 0 -> 0
    adv = losses.sampled_advantage(q, q.gather(1, batch.action[:, None])[:, 0], batch.negatives)
    torch.testing.assert_close(adv, torch.tensor([19.0, -5 / 3]))
    _, parts = losses.objective(batch, losses.Objective(algo="sa2c"))
    assert parts["weight_mean"] == pytest.approx(5.0)
    assert parts["actor_loss"] == pytest.approx(10 * math.log(5) / 2, rel=1e-6)  # uniform logits: -log pi = log 5
    _, warm = losses.objective(batch, losses.Objective(algo="sa2c", weighted=False))  # the warm-up is SQN's loss
    _, sqn = losses.objective(batch, losses.Objective(algo="sqn"))
    assert warm == sqn
    with pytest.raises(ValueError, match="negatives"):
        losses.objective(replace(batch, negatives=None), losses.Objective(algo="sa2c"))


def test_polyak():
    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    before = a.weight.detach().clone()
    polyak(a, b, 0.25)
    torch.testing.assert_close(a.weight, 0.75 * before + 0.25 * b.weight)


# --- model, windows, metrics ----------------------------------------------------------------------

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
    pairs, _ = eval_pairs(sessions, "test", context=3)
    assert pairs == [([3, 4, 5, 6], 7)]  # the test target g, validation's f in its history; 4 > 3: cut
    assert eval_pairs(sessions, "validation", context=6)[0] == [([1, 2, 3, 4, 5], 6)]  # from the session's start


def test_the_start_token_is_never_an_action():
    model = RecTransformer(5, RecModelConfig(layers=1, heads=1, width=8, context=4, dropout=0.0))
    logits, q = model(torch.tensor([[0, 1, 2]]))
    assert logits.shape == q.shape == (1, 3, 6) and torch.isinf(logits[..., 0]).all()
    assert (q.argmax(-1) > 0).all() and (q[..., 0] < q[..., 1:].min()).all()  # no max or argmax picks it
    assert torch.isfinite(losses.expected_value(F.softmax(logits, -1), q)).all()  # pi(0) Q(0) = 0, not NaN


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


# --- the stages -----------------------------------------------------------------------------------

def test_prepare_pretrain_train_eval_end_to_end(tmp_path):
    rows = []
    for visitor in range(40):
        for t in range(6):
            item = (visitor + t) % 9
            rows.append(f"{(visitor * 1000 + t) * MINUTE},{visitor},{'transaction' if t == 5 else 'view'},{item},")
    events = _retailrocket(tmp_path, rows)
    data = tmp_path / "sessions.parquet"
    r = invoke("rec", "prepare", "--source", "retailrocket", "--events", events, "--split", "user", "--out", data)
    assert r.exit_code == 0, r.output
    r = invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "pre", *TINY)
    assert r.exit_code == 0, r.output
    for algo in ("crr", "bc", "sqn", "sa2c"):
        r = invoke("rec", "train", "--data", data, "--policy", tmp_path / "pre", "--algo", algo, "--out",
                   tmp_path / algo, "--epochs", "1", "--batch-size", "16")
        assert r.exit_code == 0, r.output
        metrics = json.loads((tmp_path / algo / "metrics.json").read_text())
        assert metrics["algo"] == algo and metrics["started_from"]["path"] == str(tmp_path / "pre")
    r = invoke("rec", "eval", "--data", data, "--policy", tmp_path / "crr", "--out", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["targets"] == 40 and metrics["purchase_targets"] == 40
    hits = [metrics[f"purchase_hr@{k}"] for k in (5, 10, 20)]
    assert hits == sorted(hits) and metrics["purchase_ndcg@10"] <= metrics["purchase_hr@10"]  # a longer list hits more
    assert metrics["purchase_hr@10_se"] == pytest.approx(  # the standard error of a mean of 40 hits
        (metrics["purchase_hr@10"] * (1 - metrics["purchase_hr@10"]) / 39) ** 0.5, abs=1e-9)


def _sessions_file(tmp_path) -> Path:
    rows = [f"{t * MINUTE},{v},view,{(v + t) % 4}," for v in range(6) for t in range(4)]
    data = tmp_path / "s.parquet"
    assert invoke("rec", "prepare", "--source", "retailrocket", "--events", _retailrocket(tmp_path, rows),
                  "--out", data).exit_code == 0
    return data


@pytest.mark.parametrize("damage, needle", [
    ("nulls", "a column holds nulls"), ("item_ids", "lacks the item ids"), ("unsorted", "not sorted by session"),
    ("schema", "this tempflow reads 'tempflow.recsys.sessions/1'"),
])
def test_damaged_sessions_are_refused(damage, needle, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.artifacts.sessions import read_sessions

    data = _sessions_file(tmp_path)
    table = pq.read_table(data)
    meta = json.loads(table.schema.metadata[b"tempflow"])
    if damage == "nulls":
        reward = pa.array([None] + table.column("reward").to_pylist()[1:], type=pa.float32())
        table = table.set_column(table.schema.get_field_index("reward"), "reward", reward)
    elif damage == "item_ids":
        meta["item_ids"] = 4
    elif damage == "unsorted":
        position = pa.array(table.column("position").to_pylist()[::-1], type=pa.int32())
        table = table.set_column(table.schema.get_field_index("position"), "position", position)
    else:
        meta["schema"] = "tempflow.recsys.sessions/0"
    pq.write_table(table.replace_schema_metadata({"tempflow": json.dumps(meta)}), data)
    with pytest.raises(TempflowError, match=needle):
        read_sessions(data)


class _Stop(Exception):
    pass


def _stop_after(steps: int):
    done = []

    def progress(task: str, advance: int, total: int) -> None:
        done.append(advance)
        if sum(done) >= steps:
            raise _Stop

    return progress


@pytest.mark.parametrize("algo, every, stop", [("crr", 3, 5), ("sa2c", 4, 9), ("bc", 4, 4)])
def test_an_interrupted_fit_resumes_to_the_same_weights(algo, every, stop, tmp_path):
    """Stopped mid-epoch (crr), past an epoch's end with SA2C's switch in between (sa2c), or right
    at a checkpoint that closes an epoch (bc: 4 batches an epoch): the rerun ends with the weights
    and losses of a fit that never stopped, dropout and SA2C's negatives included."""
    import copy

    from stages.artifacts.rec_checkpoint import RecTrainCheckpoint as TrainCheckpoint
    from stages.artifacts.sessions import read_sessions

    sessions = read_sessions(_sessions_file(tmp_path))
    windows = train_windows(sessions, 1)
    assert len(windows["items"]) == 12  # 6 sessions of 2 train events in windows of 1: 4 batches of 3
    config = TrainConfig(epochs=3, batch_size=3, checkpoint_every=every, sa2c_warmup=1, tau=0.1)
    torch.manual_seed(0)
    start = RecTransformer(sessions.n_items, RecModelConfig(layers=1, heads=2, width=8, context=1, dropout=0.2))
    whole = copy.deepcopy(start)
    expected = fit(whole, windows, algo, config)
    ckpt = TrainCheckpoint(tmp_path / "ck")
    with pytest.raises(_Stop):
        fit(copy.deepcopy(start), windows, algo, config, _stop_after(stop), ckpt, {"start": "x"})
    saved = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert saved["step"] == stop // every * every
    resumed = copy.deepcopy(start)
    assert fit(resumed, windows, algo, config, checkpoint=ckpt, key={"start": "x"}) == expected
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    other = copy.deepcopy(start)  # a checkpoint of another fit (another key) is not taken up
    fit(other, windows, algo, config, checkpoint=ckpt, key={"start": "y"})
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), other.state_dict().values()))


def test_rec_train_resumes_through_the_cli_and_removes_its_checkpoint(tmp_path, monkeypatch):
    data = _sessions_file(tmp_path)
    assert invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "pre", *TINY).exit_code == 0
    args = ["rec", "train", "--data", data, "--policy", tmp_path / "pre", "--algo", "crr", "--epochs", "3",
            "--batch-size", "2", "--checkpoint-every", "2"]
    assert invoke(*args, "--out", tmp_path / "whole").exit_code == 0
    import stages.recsys.train as train

    real = train._train_step
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "_train_step", failing)
    assert invoke(*args, "--out", tmp_path / "again").exit_code != 0
    assert (tmp_path / "again.ckpt" / "state.json").is_file() and not (tmp_path / "again").exists()
    monkeypatch.setattr(train, "_train_step", real)
    assert invoke(*args, "--out", tmp_path / "again").exit_code == 0
    assert not (tmp_path / "again.ckpt").exists()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = invoke(*args, "--out", tmp_path / "third", "--checkpoint", tmp_path / "mine")
    assert r.exit_code != 0 and "not a tempflow recommender training checkpoint" in r.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def _gpt2_folder(tmp_path: Path, **shape) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(vocab_size=50, n_positions=64, **{"n_layer": 1, "n_head": 2, "n_embd": 16, **shape})
    folder = tmp_path / "distilgpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)  # the layout of DistilGPT2's hub folder
    return folder


def test_init_from_a_local_gpt2_folder(tmp_path):
    from transformers import GPT2Model

    from stages.recsys.model import init_from_gpt2

    folder = _gpt2_folder(tmp_path)
    model = RecTransformer(7, RecModelConfig(layers=1, heads=2, width=16, context=8))
    record = init_from_gpt2(model, folder)
    source = GPT2Model.from_pretrained(folder).state_dict()
    mine = model.transformer.state_dict()
    assert record["loaded"] == len(source) - 1  # all but the word embeddings
    torch.testing.assert_close(mine["wpe.weight"], source["wpe.weight"][:9])
    for name in ("h.0.attn.c_attn.weight", "h.0.mlp.c_proj.bias", "ln_f.weight"):
        assert torch.equal(mine[name], source[name]), name
    with pytest.raises(TempflowError, match="pass --width 16"):
        init_from_gpt2(RecTransformer(7, RecModelConfig(layers=1, heads=2, width=32, context=8)), folder)
    with pytest.raises(TempflowError, match="64 positions"):
        init_from_gpt2(RecTransformer(7, RecModelConfig(layers=1, heads=2, width=16, context=100)), folder)
    with pytest.raises(TempflowError, match="no config.json"):
        init_from_gpt2(model, tmp_path)


def test_rec_pretrain_init_from_records_its_start(tmp_path):
    data, folder = _sessions_file(tmp_path), _gpt2_folder(tmp_path)
    r = invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "m", "--init-from", folder, *TINY)
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["init_from"]["path"] == str(folder) and config["init_from"]["width"] == 16
    r = invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "n", "--init-from", folder, *TINY, "--width", "32")
    assert r.exit_code != 0 and "pass --width 16" in r.output


def test_a_damaged_model_config_is_one_line(tmp_path):
    data = _sessions_file(tmp_path)
    assert invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "m", *TINY).exit_code == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "n_items": "abc"}))
    r = invoke("rec", "eval", "--data", data, "--policy", tmp_path / "m", "--out", tmp_path / "e.json")
    assert r.exit_code == 1 and "n_items is not a count" in r.stderr and len(r.stderr.splitlines()) == 1


def test_an_unreadable_csv_names_its_line(tmp_path):
    path = tmp_path / "events.csv"
    path.write_bytes(b"timestamp,visitorid,event,itemid,transactionid\n1000,7,view,\xff\xfe,\n")
    with pytest.raises(TempflowError, match="line 2: not UTF-8 text"):
        read_events(PrepareConfig(source="retailrocket"), PrepareFiles(source="retailrocket", events=path))


def test_eval_refuses_a_model_of_other_data(tmp_path):
    rows = [f"{t * MINUTE},{v},view,{(v + t) % 4},"for v in range(6) for t in range(4)]
    data = tmp_path / "a.parquet"
    assert invoke("rec", "prepare", "--source", "retailrocket", "--events", _retailrocket(tmp_path, rows),
                  "--out", data).exit_code == 0
    assert invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "m", *TINY).exit_code == 0
    other = tmp_path / "b.parquet"
    rows = [f"{t * MINUTE},{v},view,{(v + t) % 7},"for v in range(6) for t in range(4)]
    (tmp_path / "other").mkdir()
    assert invoke("rec", "prepare", "--source", "retailrocket", "--events", _retailrocket(tmp_path / "other", rows),
                  "--out", other).exit_code == 0
    r = invoke("rec", "eval", "--data", other, "--policy", tmp_path / "m", "--out", tmp_path / "x.json")
    assert r.exit_code == 1 and "number their items differently" in r.stderr


@pytest.mark.parametrize("command", ["prepare", "pretrain", "train", "eval"])
def test_every_rec_command_documents_its_options(command):
    from tempflow_cli.rec import rec

    result = invoke("rec", command, "--help")
    assert result.exit_code == 0
    for param in rec.commands[command].params:
        assert param.help, f"rec {command} --{param.name} has no help"
        assert param.opts[0] in result.stdout


@pytest.mark.parametrize("args, needle", [
    (["prepare", "--source", "netflix", "--out", "x"], "'netflix' is not one of"),
    (["prepare", "--split", "user", "--min-session-length", "2", "--out", "x"], ">= 3 with --split user"),
    (["pretrain", "--data", "missing.parquet", "--out", "m"], "no such sessions file"),
    (["pretrain", "--data", "d", "--out", "m", "--width", "10", "--heads", "4"], "multiple of --heads"),
    (["train", "--data", "d", "--policy", "p", "--out", "m", "--gamma", "1.5"], "rec train: --gamma must be in [0, 1], got 1.5"),
    (["pretrain", "--data", "d", "--out", "m", "--gamma", "1.5"], "rec pretrain: --gamma must be in [0, 1], got 1.5"),
])
def test_rec_bad_options_in_one_line(args, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("rec", *args)
    assert result.exit_code != 0 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- the simulator --------------------------------------------------------------------------------

def test_the_simulators_gateways_pay_only_later():
    """Ground truth: showing the gateway items first beats the likeliest-click policy online,
    although their next click is less likely, and the behaviour policy rarely consumes them."""
    from stages.recsys.simulate import SimulatorConfig, World, online_return, simulate_logs

    config = SimulatorConfig(sim_users=300)
    world = World(config)
    appeal = world.click_chance(np.zeros(World.DIM))
    assert appeal[world.gateway].max() < appeal[~world.gateway].min()
    greedy = online_return(config, lambda history: appeal, users=300)
    gateways_first = online_return(config, lambda history: appeal + 10 * world.gateway, users=300)
    assert gateways_first["return"] - greedy["return"] > 3 * math.hypot(greedy["return_se"], gateways_first["return_se"])
    logged = simulate_logs(config)
    share = np.mean([world.gateway[int(item[1:])] for _, item, _, _ in logged])
    assert share < 0.15


def test_crr_beats_bc_on_the_simulator_end_to_end(tmp_path):
    """Only a learner of long-term value can win here: CRR, from the same pretrained model and for
    the same epochs as BC, reaches a higher online return, by more than three standard errors."""
    data = tmp_path / "sim.parquet"
    r = invoke("rec", "prepare", "--source", "simulator", "--split", "time", "--min-session-length", "2", "--out", data)
    assert r.exit_code == 0, r.output
    model = ["--layers", "1", "--heads", "2", "--width", "32", "--context", "20", "--dropout", "0"]
    run = ["--epochs", "10", "--batch-size", "64"]
    assert invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "pre", *model, *run,
                  "--learning-rate", "0.003").exit_code == 0
    online = {}
    for algo in ("bc", "crr"):
        r = invoke("rec", "train", "--data", data, "--policy", tmp_path / "pre", "--algo", algo, "--out", tmp_path / algo,
                   *run, "--weight", "binary", "--gamma", "0.9", "--tau", "0.05")
        assert r.exit_code == 0, r.output
        assert invoke("rec", "eval", "--data", data, "--policy", tmp_path / algo, "--out", tmp_path / f"{algo}.json",
                      "--online-users", "300").exit_code == 0
        online[algo] = json.loads((tmp_path / f"{algo}.json").read_text())["online"]
    gap = online["crr"]["return"] - online["bc"]["return"]
    assert gap > 3 * math.hypot(online["crr"]["return_se"], online["bc"]["return_se"]), online
