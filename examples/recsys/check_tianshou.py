"""tempflow's CRR losses against tianshou's own DiscreteCRR, run on one hand-made batch.

    pip install tianshou==2.0.1        # in a separate environment: it pulls numba, pandas, tensorboard ...
    python examples/recsys/check_tianshou.py [--out docs/recsys/tianshou-crr-check.json]

tianshou's ``DiscreteCRR._update_with_batch`` computes its critic and actor losses from an actor and
a critic network. Here both are lookup tables whose rows are the batch's logits and Q values at s
(rows 0..N-1) and at s' (rows N..2N-1), so it sees exactly the tensors that tempflow's objective
sees: with ``target_update_freq = 0`` its lagged networks are the online ones, which matches
tempflow's ``next_logits`` and ``next_q_target`` taken from the same tables. Its CQL term is off
(``min_q_weight = 0``). tempflow's critic loss has no 1/2 (DESIGN.md §8), so it is compared with
twice tianshou's.

Found on the way: tianshou 2.0.1 multiplies the log-probabilities, shape ``(N,)``, by weights of
shape ``(N, 1)``; the product broadcasts to ``(N, N)``, so its actor loss on a batch is
``mean(-log pi) * mean(f)`` rather than CRR's ``mean(-f log pi)`` (each transition's own weight is
lost). On one transition at a time the two agree, so tempflow is compared with the mean of
tianshou's losses over single-transition batches, and the full-batch figure is shown beside it
with ``mean(-log pi) * mean(f)`` computed by hand. Exit status 1 if any loss differs beyond 1e-6
(relative).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from stages.recsys import losses  # noqa: E402


def hand_batch(n: int = 8, v: int = 7, seed: int = 3) -> losses.Batch:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, v, generator=g)
    return losses.Batch(logits=torch.randn(n, v, generator=g), q=q, action=torch.randint(0, v, (n,), generator=g),
                        reward=torch.rand(n, generator=g), done=torch.tensor([False, True] * (n // 2)),
                        next_logits=torch.randn(n, v, generator=g), next_q=torch.randn(n, v, generator=g),
                        next_q_target=torch.randn(n, v, generator=g))


def tianshou_losses(batch: losses.Batch, mode: str, beta: float, gamma: float) -> dict[str, float]:
    import gymnasium as gym
    from tianshou.algorithm.imitation.discrete_crr import DiscreteCRR
    from tianshou.algorithm.modelfree.reinforce import DiscreteActorPolicy
    from tianshou.algorithm.optim import AdamOptimizerFactory
    from tianshou.data import Batch
    from tianshou.utils.net.common import ActionReprNet

    class Table(ActionReprNet):
        def __init__(self, rows: torch.Tensor, actor: bool) -> None:
            super().__init__()
            self.rows, self.actor = torch.nn.Parameter(rows.clone()), actor

        def forward(self, obs, state=None, info=None):
            out = self.rows[torch.as_tensor(obs).long()]
            return (out, state) if self.actor else out

    n, v = batch.logits.shape
    actor = Table(torch.cat([batch.logits, batch.next_logits]), actor=True)
    critic = Table(torch.cat([batch.q, batch.next_q_target]), actor=False)
    policy = DiscreteActorPolicy(actor=actor, action_space=gym.spaces.Discrete(v))
    crr = DiscreteCRR(policy=policy, critic=critic, optim=AdamOptimizerFactory(lr=0.0), gamma=gamma,
                      policy_improvement_mode=mode, beta=beta, min_q_weight=0.0, target_update_freq=0)
    data = Batch(obs=torch.arange(n).numpy(), obs_next=torch.arange(n, 2 * n).numpy(), act=batch.action.numpy(),
                 rew=batch.reward.numpy(), done=batch.done.numpy())
    stats = crr._update_with_batch(data)
    return {"actor_loss": stats.actor_loss, "critic_loss": stats.critic_loss}


def row(batch: losses.Batch, i: int) -> losses.Batch:
    return losses.Batch(**{k: getattr(batch, k)[i:i + 1] for k in ("logits", "q", "action", "reward", "done",
                                                                   "next_logits", "next_q", "next_q_target")})


def compare(mode: str, beta: float = 0.7, gamma: float = 0.95) -> dict[str, float]:
    batch = hand_batch()
    _, mine = losses.objective(batch, losses.Objective(algo="crr", weight=mode, beta=beta, gamma=gamma))
    singles = [tianshou_losses(row(batch, i), mode, beta, gamma) for i in range(len(batch.action))]
    whole = tianshou_losses(batch, mode, beta, gamma)
    log_pi = torch.log_softmax(batch.logits, -1).gather(1, batch.action[:, None])[:, 0]
    q_sa = batch.q.gather(1, batch.action[:, None])[:, 0]
    f = losses.crr_weight(losses.advantage(batch.q, q_sa, torch.softmax(batch.logits, -1)), mode, beta)
    return {"mode": mode, "tempflow_actor": mine["actor_loss"],
            "tianshou_actor_per_transition": sum(r["actor_loss"] for r in singles) / len(singles),
            "tempflow_critic": mine["critic_loss"],
            "tianshou_critic_x2_per_transition": 2 * sum(r["critic_loss"] for r in singles) / len(singles),
            "tianshou_critic_x2_batch": 2 * whole["critic_loss"], "tianshou_actor_batch": whole["actor_loss"],
            "mean_nll_times_mean_f": float((-log_pi).mean() * f.mean())}


def agrees(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b))


def main() -> None:
    import tianshou

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = [compare(mode) for mode in ("binary", "exp")]
    ok = all(agrees(r["tempflow_actor"], r["tianshou_actor_per_transition"])
             and agrees(r["tempflow_critic"], r["tianshou_critic_x2_per_transition"])
             and agrees(r["tempflow_critic"], r["tianshou_critic_x2_batch"])
             and agrees(r["tianshou_actor_batch"], r["mean_nll_times_mean_f"]) for r in rows)
    report = {"tianshou": tianshou.__version__, "torch": torch.__version__, "rows": rows, "equal": ok}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
