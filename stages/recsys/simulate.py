"""A simulator of users with delayed effects, whose ground truth is known: it logs sessions from a
behaviour policy (offline data) and measures a policy online by return and session length.

Each user has a taste vector ``p`` and each item a vector ``v`` and an appeal ``b`` (seeded). At
every step the recommender shows one item the user has not consumed:

- click with chance ``sigmoid(p . v + b)``; a clicked item is consumed and logged;
- a click is a purchase with chance ``sigmoid(p . v - purchase_bar + lift * g)``, where ``g``
  counts the *gateway* items the user has consumed so far: the delayed effect. Gateway items have
  a low appeal (``gateway_appeal``), so a recommender that maximises the next click avoids them,
  and only one that values the purchases they unlock later recommends them;
- a shown item that is not clicked counts as a miss, and after each step the user leaves with
  chance ``leave_base + leave_per_miss * misses``; the session also ends at ``horizon`` steps.

Rewards are the logged protocol's: 0.2 a click, 1.0 a purchase. The behaviour policy shows, with
chance ``1 - epsilon``, the unconsumed item of highest click chance, else one at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.support.errors import TempflowError
from stages.support.rules import Rules

# torch is imported only to score a model online: preparing the simulator's logs needs numpy alone,
# for start-up time.


@dataclass
class SimulatorConfig(Rules):
    """The simulated world: ``rec prepare --source simulator`` records it in the sessions it writes
    (its users and seed from the options, the rest these defaults)."""

    command = "simulator"
    flag = ""

    sim_items: int = 20
    """Items in the catalogue."""
    sim_gateways: int = 3
    """Gateway items among them: low appeal, and each consumed one raises later purchase chances."""
    sim_users: int = 1500
    """Logged sessions the behaviour policy produces."""
    horizon: int = 20
    """Steps a session lasts at most."""
    lift: float = 3.0
    """Purchase logit added per gateway item consumed."""
    purchase_bar: float = 2.5
    """Purchase logit subtracted from the taste match (purchases are rare without gateways)."""
    gateway_appeal: float = 0.0
    """Click logit offset of gateway items (the others get +1)."""
    leave_base: float = 0.02
    """Chance of leaving after any step."""
    leave_per_miss: float = 0.02
    """Added chance of leaving per shown item that was not clicked."""
    epsilon: float = 0.5
    """Behaviour policy: chance of showing a random unconsumed item instead of the likeliest click."""
    sim_seed: int = 0
    """Seed of the world (tastes, items) and of the logged sessions."""

    def __post_init__(self) -> None:
        self.at_least(1, "sim_gateways", "sim_users")
        self.at_least(2, "horizon")
        self.require(self.sim_gateways < self.sim_items, "sim_gateways", f"fewer than sim_items ({self.sim_items})")
        for name in ("leave_base", "leave_per_miss", "epsilon"):
            self.within(name, 0.0, 1.0)


class World:
    """The items and the users' tastes of one seeded world."""

    DIM = 4

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        rng = np.random.default_rng(config.sim_seed)
        self.vectors = rng.normal(size=(config.sim_items, self.DIM)) / math.sqrt(self.DIM)
        self.appeal = np.full(config.sim_items, 1.0)
        self.gateway = np.zeros(config.sim_items, dtype=bool)
        self.gateway[rng.choice(config.sim_items, config.sim_gateways, replace=False)] = True
        self.appeal[self.gateway] = config.gateway_appeal

    def taste(self, rng: np.random.Generator) -> np.ndarray:
        return rng.normal(size=self.DIM)

    def click_chance(self, taste: np.ndarray) -> np.ndarray:
        return _sigmoid(self.vectors @ taste + self.appeal)

    def session(self, taste: np.ndarray, choose, rng: np.random.Generator) -> list[tuple[int, bool]]:
        """One session: ``choose(history, consumed_mask) -> item`` shows items until the user leaves;
        the consumed items and whether each was purchased."""
        c = self.config
        consumed = np.zeros(c.sim_items, dtype=bool)
        clicks = self.click_chance(taste)
        history: list[tuple[int, bool]] = []
        misses = gateways = 0
        for _ in range(c.horizon):
            if consumed.all():
                break
            item = int(choose(history, consumed))
            if consumed[item]:
                misses += 1  # showing a consumed item again is a miss
            elif rng.random() < clicks[item]:
                consumed[item] = True
                logit = self.vectors[item] @ taste - c.purchase_bar + c.lift * gateways
                history.append((item, bool(rng.random() < _sigmoid(logit))))
                gateways += int(self.gateway[item])
            else:
                misses += 1
            if rng.random() < c.leave_base + c.leave_per_miss * misses:
                break
        return history

    def behaviour(self, taste: np.ndarray, rng: np.random.Generator):
        clicks = self.click_chance(taste)

        def choose(history, consumed):
            free = np.flatnonzero(~consumed)
            if rng.random() < self.config.epsilon:
                return rng.choice(free)
            return free[np.argmax(clicks[free])]

        return choose


def simulator_config(prepare: "Any") -> SimulatorConfig:
    """The simulator of a ``PrepareConfig`` (its users and seed; the rest the defaults)."""
    return SimulatorConfig(sim_users=prepare.sim_users, sim_seed=prepare.sim_seed)


def simulate_logs(config: SimulatorConfig) -> list[tuple[int, str, bool, float]]:
    """``sim_users`` sessions of the behaviour policy, as logged events ``(session, item id, purchase,
    time)`` in order (item ids ``i0 .. iN``)."""
    world = World(config)
    rng = np.random.default_rng(config.sim_seed + 1)
    events = []
    for user in range(config.sim_users):
        taste = world.taste(rng)
        for step, (item, purchase) in enumerate(world.session(taste, world.behaviour(taste, rng), rng)):
            events.append((user, f"i{item}", purchase, float(step)))
    if not events:
        raise TempflowError("the simulated behaviour produced no clicks; raise the items' appeal")
    return events


def online_return(config: SimulatorConfig, scores, users: int = 500, seed: int = 12345) -> dict[str, float]:
    """Mean return and session length (with standard errors) of the recommender whose
    ``scores(history_items) -> (n_items,)`` ranks the catalogue; it shows the best unconsumed item.
    The same seeded users for every recommender."""
    world = World(config)
    rng = np.random.default_rng(seed)
    returns, lengths, purchases = [], [], []
    for _ in range(users):
        taste = world.taste(rng)

        def choose(history, consumed):
            s = np.asarray(scores([item for item, _ in history]), dtype=np.float64).copy()
            s[consumed] = -np.inf
            return int(np.argmax(s))

        session = world.session(taste, choose, rng)
        purchases.append(sum(p for _, p in session))
        returns.append(sum(1.0 if p else 0.2 for _, p in session))
        lengths.append(len(session))
    out = {}
    for name, values in (("return", returns), ("length", lengths), ("purchases", purchases)):
        v = np.asarray(values, dtype=np.float64)
        out[name], out[f"{name}_se"] = float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v)))
    return out


def policy_scores(model: Any, item_ids: list[str], sim_items: int):
    """``scores(history) -> (sim_items,)`` of a recommender model trained on a simulator's logs:
    its item logits after the history, mapped back to the world's items (``i<k>``); an item the
    logs never held scores lowest."""
    import torch

    index = {item: k + 1 for k, item in enumerate(item_ids)}
    order = np.array([index.get(f"i{k}", 0) for k in range(sim_items)])
    context = model.config.context

    @torch.no_grad()
    def scores(history: list[int]) -> np.ndarray:
        items = [index[f"i{h}"] for h in history]
        items = [0, *items] if len(items) <= context else items[-context:]
        logits, _ = model(torch.tensor([items]))
        row = logits[0, -1].cpu().numpy()
        return np.where(order > 0, row[order], -np.inf)

    return scores


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))
