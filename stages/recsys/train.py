"""Pretraining, offline RL and evaluation of the recommender on prepared sessions.

Training windows: a session's train events ``e_0 .. e_{n-1}`` are cut into windows of ``context``
targets; a window's input is the item before it (or the start token 0) and its targets, so that
state j predicts target j and state j + 1 is its next state; the session's last train event is
terminal. A state sees the items of its window (at most ``context``); evaluation states see the
``context`` items before the target, whatever split they belong to.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.errors import TempflowError
from stages.progress import Progress, no_progress
from stages.recsys.data import SPLIT_CODES, Sessions
from stages.recsys.losses import ALGOS, BASELINES, WEIGHTS, Batch, Objective, objective
from stages.recsys.metrics import rank_targets, summarise
from stages.recsys.model import RecModelConfig, RecTransformer, polyak

MODEL_FILE, CONFIG_FILE, METRICS_FILE = "model.safetensors", "config.json", "metrics.json"


@dataclass
class TrainConfig:
    """How to train. Every field is also a ``tempflow rec pretrain`` / ``rec train`` option."""

    epochs: int = 10
    """Passes over the train windows."""
    batch_size: int = 64
    """Windows per optimizer step."""
    learning_rate: float = 1e-3
    """Adam's step size."""
    seed: int = 0
    """Seed of the initial weights (pretrain), the window order and dropout."""
    gamma: float = 0.9
    """Discount of the critic's TD target (CRR, SQN, SA2C)."""
    tau: float = 0.01
    """Polyak rate of the target network after each step."""
    weight: str = "exp"
    """CRR's f: binary (1[A > 0]) or exp (min(exp(A / beta), 20))."""
    beta: float = 1.0
    """CRR's temperature of the exp weight."""
    baseline: str = "mean"
    """CRR's advantage baseline: mean (E_pi Q) or max (max_a Q)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise TempflowError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        checks = {"learning_rate": (0, 1), "gamma": (0, 1), "tau": (0, 1), "beta": (0, 1e6)}
        for name, (low, high) in checks.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and low < value <= high) and not (name == "gamma" and value == 0):
                raise TempflowError(f"--{name.replace('_', '-')} must lie in ({low}, {high}] (got {value})")
        if self.weight not in WEIGHTS or self.baseline not in BASELINES:
            raise TempflowError(f"--weight must be one of {', '.join(WEIGHTS)} and --baseline one of {', '.join(BASELINES)}")


def train_windows(sessions: Sessions, context: int) -> dict[str, torch.Tensor]:
    """Every train event as a target, in windows: ``items`` ``(B, W + 1)``, ``target``, ``reward``,
    ``done``, ``valid`` ``(B, W)``."""
    rows: list[tuple[list[int], list[int], list[float], list[bool]]] = []
    bounds = sessions.bounds()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        train = np.flatnonzero(sessions.split[lo:hi] == SPLIT_CODES["train"]) + lo
        items, rewards = sessions.item[train].tolist(), sessions.reward[train].tolist()
        for start in range(0, len(items), context):
            targets = items[start:start + context]
            before = items[start - 1] if start else 0
            done = [start + j == len(items) - 1 for j in range(len(targets))]
            rows.append(([before, *targets], targets, rewards[start:start + context], done))
    if not rows:
        raise TempflowError("no train events to learn from")
    out = {"items": torch.zeros(len(rows), context + 1, dtype=torch.long),
           "target": torch.zeros(len(rows), context, dtype=torch.long),
           "reward": torch.zeros(len(rows), context), "done": torch.zeros(len(rows), context, dtype=torch.bool),
           "valid": torch.zeros(len(rows), context, dtype=torch.bool)}
    for r, (items, targets, rewards, done) in enumerate(rows):
        n = len(targets)
        out["items"][r, :n + 1] = torch.tensor(items)
        out["target"][r, :n], out["reward"][r, :n] = torch.tensor(targets), torch.tensor(rewards)
        out["done"][r, :n], out["valid"][r, :n] = torch.tensor(done), True
    return out


def _batch(model: RecTransformer, target_model: RecTransformer | None, w: dict[str, torch.Tensor]) -> Batch:
    logits, q = model(w["items"])
    valid = w["valid"]
    at_s = (logits[:, :-1][valid], q[:, :-1][valid])
    next_q = q[:, 1:][valid].detach()
    if target_model is None:  # behaviour cloning reads neither
        next_logits, next_q_target = logits[:, 1:][valid].detach(), next_q
    else:
        with torch.no_grad():
            t_logits, t_q = target_model(w["items"])
        next_logits, next_q_target = t_logits[:, 1:][valid], t_q[:, 1:][valid]
    return Batch(logits=at_s[0], q=at_s[1], action=w["target"][valid], reward=w["reward"][valid],
                 done=w["done"][valid], next_logits=next_logits, next_q=next_q, next_q_target=next_q_target)


def fit(model: RecTransformer, windows: dict[str, torch.Tensor], algo: str, config: TrainConfig,
        progress: Progress = no_progress) -> list[dict[str, float]]:
    """Train ``model`` in place by ``algo`` (:data:`~stages.recsys.losses.ALGOS`); one row of mean
    losses per epoch."""
    if algo not in ALGOS:
        raise TempflowError(f"unknown algo {algo!r}; choose one of {', '.join(ALGOS)}")
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    target_model = None if algo == "bc" else copy.deepcopy(model).eval()
    settings = Objective(algo=algo, gamma=config.gamma, weight=config.weight, beta=config.beta, baseline=config.baseline)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    n, history = len(windows["items"]), []
    steps = config.epochs * math.ceil(n / config.batch_size)
    for epoch in range(config.epochs):
        model.train()
        sums: dict[str, float] = {}
        order = torch.randperm(n, generator=generator)
        for lo in range(0, n, config.batch_size):
            picked = {k: v[order[lo:lo + config.batch_size]] for k, v in windows.items()}
            loss, parts = objective(_batch(model, target_model, picked), settings)
            if not torch.isfinite(loss):
                raise TempflowError(f"{algo}: the loss is NaN or infinite at epoch {epoch}; lower --learning-rate")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if target_model is not None:
                polyak(target_model, model, config.tau)
            for key, value in {"loss": float(loss.detach()), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value
            progress("train", 1, steps)
        batches = math.ceil(n / config.batch_size)
        history.append({"epoch": epoch + 1, **{k: v / batches for k, v in sums.items()}})
    model.eval()
    return history


def eval_pairs(sessions: Sessions, split: str, context: int) -> tuple[list[tuple[list[int], int]], np.ndarray]:
    """The ``(history, target)`` pairs of ``split``'s events and the row of each target. A history
    holds the ``context + 1`` items before the target at most, so that
    :func:`~stages.recsys.metrics.rank_targets` can tell a session's start (at most ``context``
    items, led by the start token) from a cut history (it keeps the last ``context``)."""
    code = SPLIT_CODES[split]
    pairs, rows = [], []
    bounds = sessions.bounds()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for row in np.flatnonzero(sessions.split[lo:hi] == code) + lo:
            pairs.append((sessions.item[max(lo, row - context - 1):row].tolist(), int(sessions.item[row])))
            rows.append(row)
    if not pairs:
        raise TempflowError(f"the sessions have no {split} events")
    return pairs, np.asarray(rows)


def evaluate(model: RecTransformer, sessions: Sessions, split: str, device: str = "cpu") -> dict[str, float]:
    """Full-ranking metrics (:mod:`stages.recsys.metrics`) of ``split``'s targets."""
    model.eval()
    pairs, rows = eval_pairs(sessions, split, model.config.context)
    rank = rank_targets(model, pairs, device=device)
    return summarise(rank, sessions.purchase[rows], sessions.reward[rows].astype(np.float64))


# --------------------------------------------------------------------------------------------
# Model folders


def save_model(model: RecTransformer, out: Path, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / MODEL_FILE))
    config = {"schema": "tempflow.recsys.model/1", "n_items": model.n_items, "model": asdict(model.config), **record}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def load_model(folder: Path) -> tuple[RecTransformer, dict[str, Any]]:
    from stages.artifacts import load_safetensors, read_json

    record = read_json(Path(folder) / CONFIG_FILE, "the config.json of a `tempflow rec` model")
    if not isinstance(record, dict) or record.get("schema") != "tempflow.recsys.model/1":
        raise TempflowError(f"{folder}: not a `tempflow rec` model folder (config.json schema)")
    try:
        model = RecTransformer(int(record["n_items"]), RecModelConfig(**record["model"]))
        model.load_state_dict(load_safetensors(Path(folder) / MODEL_FILE))
    except TempflowError:
        raise
    except Exception as err:  # a damaged config.json: wrong keys, types or shapes
        raise TempflowError(f"{folder}: its weights do not fit its config.json ({type(err).__name__}: {err})") from None
    return model.eval(), record


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    began = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - began
