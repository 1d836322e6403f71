"""Pretraining, offline RL and evaluation of the recommender on prepared sessions.

Training windows: a session's train events ``e_0 .. e_{n-1}`` are cut into windows of ``context``
targets; a window's input is the item before it (or the start token 0) and its targets, so that
state j predicts target j and state j + 1 is its next state; the session's last train event is
terminal. A state sees the items of its window (at most ``context``); evaluation states see the
``context`` items before the target, whatever split they belong to.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.artifacts.rec_checkpoint import RecTrainCheckpoint
from stages.artifacts.rec_model import read_rec_model, write_rec_model
from stages.artifacts.sessions import SPLIT_CODES, Sessions
from stages.recsys.losses import ALGOS, BASELINES, SA2C_NEGATIVES, WEIGHTS, Batch, Objective, objective
from stages.recsys.metrics import KS, PROTOCOLS, rank_by_scores, rank_targets, summarise
from stages.recsys.model import RecModelConfig, RecTransformer, polyak
from stages.support.errors import TempflowError
from stages.support.progress import Progress, no_progress
from stages.support.rules import Rules


@dataclass
class TrainConfig(Rules):
    """How to train. Every field is also a ``tempflow rec pretrain`` / ``rec train`` option."""

    command = "rec train"

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
    warmup: int = 1
    """CRR, SA2C: epochs of the plain cross-entropy, the critic learning beside it, before the
    advantage weighs the actor's loss (SA2C's loss is then SQN's)."""
    cql_weight: float = 0.0
    """CRR: weight of the conservative term on the critic, tianshou's min_q_weight form
    mean(logsumexp Q(s, .) - Q(s, a)); 0: off."""
    critic_negatives: bool = False
    """CRR: also train the Q of 10 uniformly drawn items per transition toward the TD target of
    reward 0 (as Xin et al.'s Q loss treats its negative items)."""
    checkpoint_every: int = 200
    """Write the resumable checkpoint every this many steps (0: never)."""
    select: str = "ndcg@10"
    """The validation metric that chooses which epoch's weights are kept (measured after every epoch,
    under the seen-removed protocol): hr@k or ndcg@k (k = 5, 10, 20), over all targets or with a
    click_ or purchase_ prefix; last keeps the last epoch's without measuring."""
    patience: int = 0
    """Stop once --select has not improved for this many epochs (0: run every epoch)."""

    def __post_init__(self) -> None:
        self.at_least(1, "epochs", "batch_size")
        self.at_least(0, "warmup", "checkpoint_every", "patience")
        self.within("cql_weight", 0.0, 1e6)
        self.require(self.select in SELECTABLE, "select", "last, or hr@k or ndcg@k (k = 5, 10, 20), optionally with a "
                     "click_ or purchase_ prefix")
        self.require(self.patience == 0 or self.select != "last", "patience", "0 with --select last (nothing is measured)")
        self.within("gamma", 0.0, 1.0)
        for name, high in (("learning_rate", 1.0), ("tau", 1.0), ("beta", 1e6)):
            self.within(name, 0.0, high, low_open=True)
        self.choice("weight", WEIGHTS)
        self.choice("baseline", BASELINES)
        self.seeds("seed")


SELECTABLE = ("last", *(f"{kind}{name}@{k}" for kind in ("", "click_", "purchase_") for name in ("hr", "ndcg")
                        for k in KS))
"""The values of ``TrainConfig.select``."""


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


def _batch(model: RecTransformer, target_model: RecTransformer | None, w: dict[str, torch.Tensor],
           negatives: bool = False) -> Batch:
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
    drawn = None
    if negatives:  # SA2C's uniform draws over the items (never the start token 0)
        drawn = torch.randint(1, model.n_items + 1, (len(at_s[0]), SA2C_NEGATIVES), device=valid.device)
    return Batch(logits=at_s[0], q=at_s[1], action=w["target"][valid], reward=w["reward"][valid],
                 done=w["done"][valid], next_logits=next_logits, next_q=next_q, next_q_target=next_q_target,
                 negatives=drawn)


class _Fit:
    """The mutable state of one :func:`fit`, every part of it saved in its checkpoint."""

    def __init__(self, model: RecTransformer, algo: str, config: TrainConfig) -> None:
        torch.manual_seed(config.seed)  # dropout and SA2C's negatives draw from the global generator
        self.model, self.config = model, config
        self.order_rng = torch.Generator().manual_seed(config.seed)
        self.epoch_rng = self.order_rng.get_state()  # the order generator where the current epoch began
        self.target = None if algo == "bc" else copy.deepcopy(model).eval()
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        self.epoch, self.batch, self.step = 0, 0, 0
        self.sums: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.best_value: float | None = None  # of config.select on validation, and the epoch that had it
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def out_of_patience(self) -> bool:
        patience = self.config.patience
        return bool(patience) and self.best_value is not None and self.epoch - self.best_epoch >= patience

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        if self.target is not None:
            out.update({f"target/{k}": v for k, v in self.target.state_dict().items()})
        names = [n for n, _ in self.model.named_parameters()]
        for i, slots in self.optimizer.state_dict()["state"].items():
            out.update({f"adam/{names[i]}/{k}": v for k, v in slots.items()})
        if self.best_state is not None:
            out.update({f"best/{k}": v for k, v in self.best_state.items()})
        out["rng/global"], out["rng/epoch"] = torch.get_rng_state(), self.epoch_rng
        return out

    def info(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "step": self.step, "sums": self.sums, "history": self.history,
                "best_value": self.best_value, "best_epoch": self.best_epoch}

    def restore(self, info: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        try:
            self.model.load_state_dict(part("model/"))
            if self.target is not None:
                self.target.load_state_dict(part("target/"))
            names = [n for n, _ in self.model.named_parameters()]
            adam: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in part("adam/").items():
                name, _, slot = key.rpartition("/")
                adam.setdefault(names.index(name), {})[slot] = value
            self.optimizer.load_state_dict({"state": adam, "param_groups": self.optimizer.state_dict()["param_groups"]})
            torch.set_rng_state(tensors["rng/global"])
            self.epoch_rng = tensors["rng/epoch"]
            self.epoch, self.batch, self.step = int(info["epoch"]), int(info["batch"]), int(info["step"])
            self.sums, self.history = dict(info["sums"]), list(info["history"])
            self.best_value, self.best_epoch = info["best_value"], int(info["best_epoch"])
            self.best_state = part("best/") or None
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise TempflowError(f"{where}: recommender training checkpoint is damaged ({type(err).__name__}: "
                                f"{str(err).splitlines()[0]}); delete it to start over") from None


def fit(model: RecTransformer, windows: dict[str, torch.Tensor], algo: str, config: TrainConfig,
        progress: Progress = no_progress, checkpoint: RecTrainCheckpoint | None = None,
        key: dict[str, Any] | None = None, validate: Callable[[], dict[str, Any]] | None = None) -> list[dict[str, float]]:
    """Train ``model`` in place by ``algo`` (:data:`~stages.recsys.losses.ALGOS`); one row of mean
    losses per epoch. With ``validate`` (the validation metrics of the model as it is) and
    ``config.select`` not ``last``, each row also holds ``validation_<select>``, training stops once it
    has not improved for ``config.patience`` epochs, and the model ends with the weights of the epoch
    that scored best (the first of equals: :func:`selected_epoch`). With a ``checkpoint``, the state is
    saved every ``config.checkpoint_every`` steps and taken up again when the saved ``key`` (what the
    fit is of) is this one's."""
    if algo not in ALGOS:
        raise TempflowError(f"unknown algo {algo!r}; choose one of {', '.join(ALGOS)}")
    run = _Fit(model, algo, config)
    key = {**(key or {}), "algo": algo, "train": {**asdict(config), "checkpoint_every": None},
           "windows": len(windows["items"])}
    saved = checkpoint.load(key) if checkpoint is not None else None
    if saved is not None:
        run.restore(saved[0], saved[1], checkpoint.path)
    settings = Objective(algo=algo, gamma=config.gamma, weight=config.weight, beta=config.beta, baseline=config.baseline,
                         cql_weight=config.cql_weight, critic_negatives=config.critic_negatives)
    n = len(windows["items"])
    batches = math.ceil(n / config.batch_size)
    steps = config.epochs * batches
    if run.step:
        progress("train", run.step, steps)
    validate = validate if config.select != "last" else None
    while run.epoch < config.epochs and not run.out_of_patience():
        model.train()
        run.order_rng.set_state(run.epoch_rng)
        order = torch.randperm(n, generator=run.order_rng)
        weighted = replace(settings, weighted=run.epoch >= config.warmup)
        finished = False
        while not finished:
            lo = run.batch * config.batch_size
            picked = {k: v[order[lo:lo + config.batch_size]] for k, v in windows.items()}
            _train_step(run, picked, algo, weighted)
            run.batch, run.step = run.batch + 1, run.step + 1
            finished = run.batch == batches
            if finished:  # before a checkpoint, so that one at an epoch's end resumes at the next epoch
                _end_epoch(run, batches, validate)
            if checkpoint is not None and config.checkpoint_every and run.step % config.checkpoint_every == 0:
                checkpoint.save(key, run.tensors(), run.info())
            progress("train", 1, steps)
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    model.eval()
    return run.history


def selected_epoch(history: list[dict[str, float]], select: str) -> int:
    """The epoch whose weights :func:`fit` kept: the first best by ``validation_<select>``, or the last."""
    column = f"validation_{select}"
    scored = [row for row in history if column in row]
    return max(scored, key=lambda row: row[column])["epoch"] if scored else len(history)


def _train_step(run: _Fit, picked: dict[str, torch.Tensor], algo: str, settings: Objective) -> None:
    negatives = algo == "sa2c" or (algo == "crr" and settings.critic_negatives)
    loss, parts = objective(_batch(run.model, run.target, picked, negatives=negatives), settings)
    if not torch.isfinite(loss):
        raise TempflowError(f"{algo}: the loss is NaN or infinite at epoch {run.epoch}; lower --learning-rate")
    run.optimizer.zero_grad()
    loss.backward()
    run.optimizer.step()
    if run.target is not None:
        polyak(run.target, run.model, run.config.tau)
    for name, value in {"loss": float(loss.detach()), **parts}.items():
        run.sums[name] = run.sums.get(name, 0.0) + value


def _end_epoch(run: _Fit, batches: int, validate: Callable[[], dict[str, Any]] | None) -> None:
    """Close the epoch's row of mean losses (and its validation score, the best weights kept) and
    move to the next epoch's start."""
    row = {"epoch": run.epoch + 1, **{k: v / batches for k, v in run.sums.items()}}
    if validate is not None:
        select = run.config.select
        value = validate()[select]
        if value is None:
            raise TempflowError(f"--select {select}: the validation split has no such targets; select another metric")
        row[f"validation_{select}"] = value
        if run.best_value is None or value > run.best_value:
            run.best_value, run.best_epoch = value, run.epoch + 1
            run.best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    run.history.append(row)
    run.epoch, run.batch, run.sums = run.epoch + 1, 0, {}
    run.epoch_rng = run.order_rng.get_state()


@dataclass
class EvalTargets:
    """``split``'s events as ranking targets, in session order: each one's ``(history, target)`` pair
    (the history holds the ``context + 1`` items before the target at most, so that
    :func:`~stages.recsys.metrics.rank_targets` can tell a session's start, at most ``context`` items
    led by the start token, from a cut history, of which it keeps the last ``context``), the items
    its session held before it (``seen``, the target's own item left out: a repeat stays rankable),
    and its row in the sessions."""

    pairs: list[tuple[list[int], int]]
    seen: list[list[int]]
    rows: np.ndarray


def eval_targets(sessions: Sessions, split: str, context: int) -> EvalTargets:
    code = SPLIT_CODES[split]
    pairs, seen, rows = [], [], []
    bounds = sessions.bounds()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for row in np.flatnonzero(sessions.split[lo:hi] == code) + lo:
            target = int(sessions.item[row])
            pairs.append((sessions.item[max(lo, row - context - 1):row].tolist(), target))
            seen.append(sorted(set(sessions.item[lo:row].tolist()) - {target}))
            rows.append(row)
    if not pairs:
        raise TempflowError(f"the sessions have no {split} events")
    return EvalTargets(pairs, seen, np.asarray(rows))


def eval_record(rank: np.ndarray, sessions: Sessions, targets: EvalTargets, protocol: str) -> dict[str, Any]:
    """The metrics of ``rank``, the protocol they were ranked under, and every target's rank (in
    :func:`eval_targets`' order, the same for every model of the sessions: what paired tests compare)."""
    rows = targets.rows
    return {"protocol": protocol, **summarise(rank, sessions.purchase[rows], sessions.reward[rows].astype(np.float64)),
            "ranks": rank.tolist()}


def evaluate(model: RecTransformer, sessions: Sessions, split: str, device: str = "cpu",
             protocol: str = "seen-removed") -> dict[str, Any]:
    """Full-ranking metrics (:mod:`stages.recsys.metrics`) of ``split``'s targets under ``protocol``."""
    model.eval()
    targets = eval_targets(sessions, split, model.config.context)
    rank = rank_targets(model, targets.pairs, _seen(targets, protocol), device=device)
    return eval_record(rank, sessions, targets, protocol)


def popularity_scores(sessions: Sessions) -> torch.Tensor:
    """Each item's count of train events (index 0, the start token, at -inf): the most-popular floor."""
    counts = np.bincount(sessions.item[sessions.split == SPLIT_CODES["train"]], minlength=sessions.n_items + 1)
    scores = torch.from_numpy(counts.astype(np.float64))
    scores[0] = -math.inf
    return scores


def evaluate_popularity(sessions: Sessions, split: str, protocol: str = "seen-removed") -> dict[str, Any]:
    """The metrics of ranking every target by :func:`popularity_scores` (ties by item index)."""
    targets = eval_targets(sessions, split, context=0)
    rank = rank_by_scores(popularity_scores(sessions), [t for _, t in targets.pairs], _seen(targets, protocol))
    return eval_record(rank, sessions, targets, protocol)


def _seen(targets: EvalTargets, protocol: str) -> list[list[int]] | None:
    if protocol not in PROTOCOLS:
        raise TempflowError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return targets.seen if protocol == "seen-removed" else None


# --------------------------------------------------------------------------------------------
# Model folders (their schema: stages.artifacts.rec_model)


def save_model(model: RecTransformer, out: Path, record: dict[str, Any], metrics: dict[str, Any]) -> None:
    """A new model folder ``out``: the weights, what they are (``record``) and the training's ``metrics``."""
    write_rec_model(out, model.state_dict(), model.n_items, asdict(model.config), record, metrics)


def load_model(folder: Path) -> tuple[RecTransformer, dict[str, Any]]:
    """The model of a folder and its record; a config that does not build the model its weights
    fit is refused as damaged."""
    record, weights = read_rec_model(folder)
    try:
        model = RecTransformer(record["n_items"], RecModelConfig(**record["model"]))
        model.load_state_dict(weights)
    except TempflowError as err:
        raise TempflowError(f"{folder}/config.json: {err}; the model folder is damaged") from None
    except (TypeError, RuntimeError) as err:  # wrong config keys, or weights of other shapes
        raise TempflowError(f"{folder}: its weights do not fit its config.json ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]})") from None
    return model.eval(), record


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    began = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - began
