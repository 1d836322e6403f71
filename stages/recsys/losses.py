"""The training objectives of the recommender, DESIGN.md §8, on flat batches of transitions.

Shapes: ``logits``, ``q``: ``(N, V)`` at the states s_t; ``action``: ``(N,)`` the logged next item;
``reward``, ``done``: ``(N,)``; ``next_*``: ``(N, V)`` at s_{t+1} (ignored where ``done``). Every
function is the formula it is named for; :func:`objective` puts them together per algorithm.

- CRR (Wang et al. 2020, the variant of arXiv:2307.14450): an expected-value TD target under the
  target network's policy, ``A = Q(s, a) - E_{a'~pi} Q(s, a')`` (the mean baseline; the max
  baseline is optional), ``f = 1[A > 0]`` or ``min(exp(A / beta), 20)`` from the detached critic,
  actor loss ``-f log pi(a|s)``. Options of the critic: a conservative term (tianshou's
  DiscreteCRR's CQL form) ``cql_weight * mean(logsumexp_a Q(s, a) - Q(s, a_logged))``, which pushes
  down the Q of items the log never shows; and sampled negatives, N items drawn uniformly per
  transition whose Q is trained toward the TD target of reward 0 (``gamma * E_pi Q'(s', .)``, 0 after
  the last step), as Xin et al.'s Q loss treats its negative items. During a warm-up the actor term
  is the plain cross-entropy, so that the critic learns before its advantage weighs anything.
- BC: ``f = 1``, the cross-entropy of the logged item (also the pretraining objective).
- SQN (Xin et al. 2020): cross-entropy plus a one-step double-Q loss on the Q head,
  ``(r + gamma Q'(s', argmax_a Q(s', a)) - Q(s, a))^2`` (the online head picks, the target head values).
- SA2C (Xin et al. 2022, as their published code computes it): SQN's Q loss plus the
  cross-entropy weighted by the detached advantage ``A = Q(s, a) - mean(Q(s, a), Q(s, n_1), ...,
  Q(s, n_N))`` over the logged item and N items drawn uniformly (the code's N = 10), clipped to
  [0, 10] as the code's default clip does, so that no weight is negative and the loss is bounded.
  The code trains SQN's loss first and switches to the weighted one later; the switch is
  :class:`~stages.recsys.train.TrainConfig`'s ``warmup`` (epochs). Left out: the code's
  negative items in the Q loss and its propensity factor (whose default exponent 0 makes it 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ALGOS = {
    "crr": "Critic Regularized Regression: -f log pi with f from the critic's advantage",
    "bc": "behaviour cloning: f = 1, the logged item's cross-entropy",
    "sqn": "Xin et al.'s SQN: cross-entropy + a double-Q loss on the Q head",
    "sa2c": "Xin et al.'s SA2C: SQN's loss, then the cross-entropy weighted by a clipped sampled advantage",
}
WEIGHTS = {"binary": "1[A > 0]", "exp": "min(exp(A / beta), 20)"}
"""CRR's f of the advantage."""
BASELINES = {"mean": "E_pi Q", "max": "max_a Q"}
"""CRR's advantage baseline."""
SA2C_NEGATIVES, SA2C_CLIP = 10, (0.0, 10.0)


def expected_value(probs: Tensor, q: Tensor) -> Tensor:
    """``sum_a pi(a|s) Q(s, a)`` per row."""
    return (probs * q).sum(dim=-1)


def crr_target(reward: Tensor, done: Tensor, next_probs: Tensor, next_q_target: Tensor, gamma: float) -> Tensor:
    """``r + gamma * sum_a' pi(a'|s') Q_target(s', a')``, the bootstrap 0 after the last step."""
    return reward + gamma * (1.0 - done.float()) * expected_value(next_probs, next_q_target)


def sqn_target(reward: Tensor, done: Tensor, next_q: Tensor, next_q_target: Tensor, gamma: float) -> Tensor:
    """Double Q-learning's ``r + gamma * Q_target(s', argmax_a Q(s', a))``, 0 after the last step."""
    pick = next_q.argmax(dim=-1, keepdim=True)
    return reward + gamma * (1.0 - done.float()) * next_q_target.gather(-1, pick).squeeze(-1)


def critic_loss(q_sa: Tensor, target: Tensor) -> Tensor:
    """``mean (Q(s, a) - target)^2``, the target held fixed."""
    return (q_sa - target.detach()).pow(2).mean()


def advantage(q: Tensor, q_sa: Tensor, probs: Tensor, baseline: str = "mean") -> Tensor:
    """``Q(s, a) - E_{a'~pi} Q(s, a')`` (mean) or ``Q(s, a) - max_a' Q(s, a')`` (max)."""
    return q_sa - (expected_value(probs, q) if baseline == "mean" else q.max(dim=-1).values)


def sampled_advantage(q: Tensor, q_sa: Tensor, negatives: Tensor) -> Tensor:
    """SA2C's ``Q(s, a) - (Q(s, a) + sum_j Q(s, n_j)) / (1 + N)`` for ``negatives`` ``(rows, N)``."""
    q_neg = q.gather(-1, negatives).sum(dim=-1)
    return q_sa - (q_sa + q_neg) / (1 + negatives.shape[-1])


def crr_weight(adv: Tensor, mode: str, beta: float, ceiling: float = 20.0) -> Tensor:
    """``1[A > 0]`` (binary) or ``min(exp(A / beta), ceiling)`` (exp), never carrying a gradient."""
    adv = adv.detach()
    return (adv > 0).float() if mode == "binary" else torch.exp(adv / beta).clamp(max=ceiling)


def weighted_nll(log_probs: Tensor, action: Tensor, weight: Tensor | float) -> Tensor:
    """``mean -f * log pi(a|s)``."""
    return -(weight * log_probs.gather(-1, action.unsqueeze(-1)).squeeze(-1)).mean()


@dataclass
class Batch:
    """One batch of transitions, flattened over the valid positions of its windows."""

    logits: Tensor
    q: Tensor
    action: Tensor
    reward: Tensor
    done: Tensor
    next_logits: Tensor  # the target network's, at s'
    next_q: Tensor  # the online network's, at s' (double Q picks with it)
    next_q_target: Tensor
    negatives: Tensor | None = None  # (N, SA2C_NEGATIVES) uniform item draws, SA2C's advantage only


@dataclass(frozen=True)
class Objective:
    algo: str = "crr"
    gamma: float = 0.9
    weight: str = "exp"
    beta: float = 1.0
    baseline: str = "mean"
    ceiling: float = 20.0
    weighted: bool = True
    """CRR, SA2C: False during the warm-up, when the actor term is the plain cross-entropy (SA2C's
    loss is then SQN's) and only the critic learns from the rewards."""
    cql_weight: float = 0.0
    """CRR: weight of the conservative term on the critic (tianshou's min_q_weight; 0: off)."""
    critic_negatives: bool = False
    """CRR: train the Q of the batch's sampled negatives toward the TD target of reward 0."""


def objective(batch: Batch, settings: Objective) -> tuple[Tensor, dict[str, float]]:
    """The loss to minimise and its parts (for the metrics), per :data:`ALGOS`."""
    log_probs = F.log_softmax(batch.logits, dim=-1)
    if settings.algo == "bc":
        actor = weighted_nll(log_probs, batch.action, 1.0)
        return actor, {"actor_loss": float(actor.detach())}
    q_sa = batch.q.gather(-1, batch.action.unsqueeze(-1)).squeeze(-1)
    critic, parts = _critic(batch, q_sa, settings)
    probs = log_probs.exp().detach()
    if settings.algo == "sqn" or not settings.weighted:
        actor = weighted_nll(log_probs, batch.action, 1.0)
        return actor + critic, {"actor_loss": float(actor.detach()), **parts}
    if settings.algo == "crr":
        adv = advantage(batch.q.detach(), q_sa.detach(), probs, settings.baseline)
        f = crr_weight(adv, settings.weight, settings.beta, settings.ceiling)
    else:  # sa2c
        if batch.negatives is None:
            raise ValueError("SA2C's advantage needs the batch's sampled negatives")
        adv = sampled_advantage(batch.q.detach(), q_sa.detach(), batch.negatives)
        f = adv.clamp(*SA2C_CLIP)
    actor = weighted_nll(log_probs, batch.action, f)
    return actor + critic, {"actor_loss": float(actor.detach()), "advantage_mean": float(adv.mean()),
                            "weight_mean": float(f.mean()), **parts}


def _critic(batch: Batch, q_sa: Tensor, settings: Objective) -> tuple[Tensor, dict[str, float]]:
    """The critic's loss: the TD loss (CRR's expected-value target, SQN's and SA2C's double Q) and
    CRR's optional terms; each part's value for the metrics (``critic_loss`` the TD loss)."""
    if settings.algo != "crr":
        critic = critic_loss(q_sa, sqn_target(batch.reward, batch.done, batch.next_q, batch.next_q_target, settings.gamma))
        return critic, {"critic_loss": float(critic.detach())}
    next_probs = F.softmax(batch.next_logits, dim=-1)
    critic = critic_loss(q_sa, crr_target(batch.reward, batch.done, next_probs, batch.next_q_target, settings.gamma))
    parts = {"critic_loss": float(critic.detach())}
    if settings.cql_weight:
        cql = conservative_term(batch.q, q_sa)
        parts["cql_loss"] = float(cql.detach())
        critic = critic + settings.cql_weight * cql
    if settings.critic_negatives:
        if batch.negatives is None:
            raise ValueError("critic_negatives needs the batch's sampled negatives")
        bootstrap = crr_target(torch.zeros_like(batch.reward), batch.done, next_probs, batch.next_q_target, settings.gamma)
        negative = negatives_loss(batch.q, batch.negatives, bootstrap)
        parts["negatives_loss"] = float(negative.detach())
        critic = critic + negative
    return critic, parts


def conservative_term(q: Tensor, q_sa: Tensor) -> Tensor:
    """``mean(logsumexp_a Q(s, a) - Q(s, a_logged))`` (tianshou's DiscreteCRR; the start token's Q,
    the lowest float, adds nothing to the sum)."""
    return (q.logsumexp(dim=-1) - q_sa).mean()


def negatives_loss(q: Tensor, negatives: Tensor, bootstrap: Tensor) -> Tensor:
    """``mean (Q(s, n) - bootstrap)^2`` over the sampled items ``n`` of each row, ``bootstrap``
    ``(N,)`` the TD target of reward 0, held fixed."""
    return (q.gather(-1, negatives) - bootstrap.detach().unsqueeze(-1)).pow(2).mean()
