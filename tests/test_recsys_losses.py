"""The recommender's objectives (stages.recsys.losses): every formula of DESIGN.md §8 by hand, CRR
against tianshou's discrete CRR (its formulas quoted, and tianshou itself), SQN and SA2C."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.recsys import losses
from tests.conftest import load_example


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

    check = load_example("examples/recsys/check_tianshou.py", "check_tianshou")
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


def test_crr_conservative_term_by_hand_and_as_tianshou_adds_it():
    """cql_weight w adds w * mean(logsumexp_a Q(s, a) - Q(s, a_logged)) to the loss (tianshou's
    DiscreteCRR min_q_loss); the start token's Q (the lowest float) adds nothing to the logsumexp."""
    q = torch.tensor([[torch.finfo(torch.float32).min, 1.0, 2.0], [torch.finfo(torch.float32).min, 0.0, 0.0]])
    by_hand = ((math.log(math.e + math.e ** 2) - 2.0) + (math.log(2.0) - 0.0)) / 2
    assert losses.conservative_term(q, torch.tensor([2.0, 0.0])).item() == pytest.approx(by_hand, rel=1e-6)
    batch = _batch(seed=4)
    plain, _ = losses.objective(batch, losses.Objective(algo="crr"))
    with_cql, parts = losses.objective(batch, losses.Objective(algo="crr", cql_weight=10.0))
    q_sa = batch.q.gather(1, batch.action[:, None])[:, 0]
    expected = (batch.q.logsumexp(1) - q_sa).mean().item()
    assert parts["cql_loss"] == pytest.approx(expected, rel=1e-6)
    assert with_cql.item() - plain.item() == pytest.approx(10.0 * expected, rel=1e-5)


def test_crr_sampled_negatives_learn_toward_the_target_of_reward_zero():
    """Each sampled item's Q is pulled toward gamma * E_pi' Q'(s', .) (0 after the last step): the
    TD target of the logged transition with its reward taken away."""
    q = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 5.0, 6.0, 7.0]])
    batch = losses.Batch(logits=torch.zeros(2, 4), q=q, action=torch.tensor([1, 2]), reward=torch.tensor([1.0, 0.2]),
                         done=torch.tensor([False, True]), next_logits=torch.zeros(2, 4), next_q=torch.zeros(2, 4),
                         next_q_target=torch.tensor([[4.0, 4.0, 8.0, 0.0], [9.0, 9.0, 9.0, 9.0]]),
                         negatives=torch.tensor([[2, 3], [1, 3]]))
    gamma = 0.5
    # row 0: uniform next policy, E Q' = 4, bootstrap 0.5 * 4 = 2: (2 - 2)^2, (3 - 2)^2; row 1 ends: (5 - 0)^2, (7 - 0)^2
    expected = (0.0 + 1.0 + 25.0 + 49.0) / 4
    plain, _ = losses.objective(batch, losses.Objective(algo="crr", gamma=gamma))
    with_negatives, parts = losses.objective(batch, losses.Objective(algo="crr", gamma=gamma, critic_negatives=True))
    assert parts["negatives_loss"] == pytest.approx(expected)
    assert with_negatives.item() - plain.item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="sampled negatives"):
        losses.objective(replace(batch, negatives=None), losses.Objective(algo="crr", critic_negatives=True))


def test_crr_warm_up_trains_the_critic_under_the_plain_cross_entropy():
    """Unweighted (the warm-up's epochs), CRR's loss is the cross-entropy plus its critic's TD loss:
    the actor does not yet lean on an untrained critic."""
    batch = _batch(seed=5)
    warm, parts = losses.objective(batch, losses.Objective(algo="crr", weighted=False))
    td = parts["critic_loss"]
    assert warm.item() == pytest.approx(F.cross_entropy(batch.logits, batch.action).item() + td, rel=1e-6)
    _, weighted = losses.objective(batch, losses.Objective(algo="crr"))
    assert weighted["critic_loss"] == pytest.approx(td) and "weight_mean" in weighted and "weight_mean" not in parts
