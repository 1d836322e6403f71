"""The recommender's stages, each writing its artifact atomically: prepared sessions (parquet), a
model folder (``model.safetensors``, ``config.json``, ``metrics.json``), evaluation metrics."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from stages.artifacts.checkpoints import default_checkpoint
from stages.artifacts.codecs import sha256_file
from stages.artifacts.rec_checkpoint import RecTrainCheckpoint
from stages.artifacts.rec_model import MODEL_FILE, write_rec_eval
from stages.artifacts.sessions import read_sessions, write_sessions
from stages.recsys.data import PrepareConfig, PrepareFiles, build_sessions, read_events
from stages.recsys.model import RecModelConfig, RecTransformer, init_from_gpt2
from stages.recsys.simulate import SimulatorConfig, online_return, policy_scores, simulator_config
from stages.recsys.metrics import PROTOCOLS
from stages.recsys.train import (
    TrainConfig,
    evaluate,
    evaluate_popularity,
    fit,
    load_model,
    save_model,
    selected_epoch,
    timed,
    train_windows,
)
from stages.support.errors import TempflowError
from stages.support.outputs import atomic_output, check_out_free
from stages.support.progress import Progress, no_progress
from stages.support.rules import Rules


def run_prepare(config: PrepareConfig, out: Path, files: PrepareFiles = PrepareFiles(),
                overwrite: bool = False) -> dict[str, Any]:
    """Read ``config.source``'s events (from the ``files`` it needs), build sessions and splits,
    write ``out`` (parquet)."""
    inputs = tuple(p for p in (files.events, files.clicks, files.buys) if p is not None)
    check_out_free(out, overwrite, inputs, kind="file")
    sessions = build_sessions(read_events(config, files), config)
    if config.source == "simulator":  # its world, so that `rec eval` can measure a policy online in it
        sessions.info["simulator"] = asdict(simulator_config(config))
    with atomic_output(out, overwrite=overwrite, inputs=inputs, kind="file") as tmp:
        write_sessions(tmp, sessions, {"config": asdict(config), "files": [str(p) for p in inputs]})
    return sessions.info


def _record(data: Path, algo: str, config: TrainConfig, start: dict[str, Any] | None, items: str) -> dict[str, Any]:
    return {"algo": algo, "train": asdict(config), "items_sha256": items,
            "data": {"path": str(data), "sha256": sha256_file(Path(data))}, "started_from": start}


def _check_items(sessions: Any, record: dict[str, Any], data: Path, model: Path) -> None:
    """A model's item embeddings belong to the item ids it was trained on."""
    if record.get("items_sha256") != sessions.items_digest():
        raise TempflowError(f"{data} and {model} number their items differently (prepared from other data); "
                            "train and evaluate on the sessions the model was pretrained on")


@dataclass
class Run:
    """Where a training stage writes: its model folder, and the checkpoint beside it (default
    ``OUT.ckpt``), which a rerun of the same training continues from and a finished one deletes."""

    out: Path
    checkpoint: Path | None = None
    overwrite: bool = False

    def checkpoint_folder(self) -> RecTrainCheckpoint:
        return RecTrainCheckpoint(self.checkpoint or default_checkpoint(self.out))


def _train_and_save(model: RecTransformer, sessions: Any, run: Run, algo: str, config: TrainConfig, record: dict,
                    device: str, progress: Progress, inputs: tuple[Path, ...], start: Any) -> dict[str, Any]:
    ckpt = run.checkpoint_folder()
    model.to(device)
    windows = {k: v.to(device) for k, v in train_windows(sessions, model.config.context).items()}
    key = {"data": record["data"]["sha256"], "start": start}

    def validate() -> dict[str, Any]:
        return evaluate(model, sessions, "validation", device)

    history, seconds = timed(fit, model, windows, algo, config, progress, ckpt, key, validate)
    metrics = {**record, "windows": len(windows["items"]), "epochs": history,
               "selected_epoch": selected_epoch(history, config.select), "seconds": seconds,
               "validation": validate()}
    with atomic_output(run.out, overwrite=run.overwrite, inputs=inputs) as tmp:
        save_model(model.cpu(), tmp, record, metrics)
    ckpt.remove()
    return metrics


def _check_run(run: Run, inputs: tuple[Path, ...]) -> None:
    check_out_free(run.out, run.overwrite, inputs)
    run.checkpoint_folder().check_path(run.out)


def run_pretrain(data: Path, run: Run, model_config: RecModelConfig, config: TrainConfig, device: str = "cpu",
                 progress: Progress = no_progress, init_from: Path | None = None) -> dict[str, Any]:
    """A transformer fitted by next-item cross-entropy: fresh (seeded by ``config.seed``), or its
    blocks taken from the local GPT-2 folder ``init_from`` (DistilGPT2's, for the paper's start)."""
    _check_run(run, (data,) + ((init_from,) if init_from else ()))
    sessions = read_sessions(data)
    torch.manual_seed(config.seed)
    model = RecTransformer(sessions.n_items, model_config)
    loaded = init_from_gpt2(model, init_from) if init_from is not None else None
    record = _record(data, "pretrain", config, None, sessions.items_digest())
    record["init_from"] = loaded
    start = {"model": asdict(model_config), "init_from": _folder_digest(init_from) if init_from else None}
    return _train_and_save(model, sessions, run, "bc", config, record, device, progress, (data,), start=start)


def _folder_digest(folder: Path) -> str:
    """The sha256 of a folder's files' hashes, so that a checkpoint of another init is never resumed."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    return hashlib.sha256("".join(f"{p.relative_to(folder)}:{sha256_file(p)}\n" for p in files).encode()).hexdigest()


def run_train(data: Path, policy_dir: Path, run: Run, algo: str, config: TrainConfig, device: str = "cpu",
              progress: Progress = no_progress) -> dict[str, Any]:
    """``policy_dir``'s model fine-tuned offline by ``algo``."""
    _check_run(run, (data, policy_dir))
    model, record = load_model(policy_dir)
    sessions = read_sessions(data)
    _check_items(sessions, record, data, policy_dir)
    start = {"path": str(policy_dir), "algo": record.get("algo")}
    return _train_and_save(model, sessions, run, algo, config, _record(data, algo, config, start, record["items_sha256"]),
                           device, progress, (data, policy_dir), start=sha256_file(Path(policy_dir) / MODEL_FILE))


@dataclass
class RecEvalConfig(Rules):
    """What `tempflow rec eval` measures. Every field is also one of its options."""

    command = "rec eval"

    split: str = "test"
    """Which held-out events to rank (choose settings on validation, report test)."""
    protocol: str = "seen-removed"
    """Which items each target is ranked among."""
    online_users: int = 500
    """Sessions of the simulator (its data only) to measure the policy's return online in."""

    def __post_init__(self) -> None:
        self.choice("split", ("validation", "test"))
        self.choice("protocol", PROTOCOLS)
        self.at_least(2, "online_users")
        self.at_most("online_users", 10**6, "each user is a simulated session of the policy")


def run_eval(data: Path, policy_dir: Path | None, out: Path, config: RecEvalConfig = RecEvalConfig(), device: str = "cpu",
             overwrite: bool = False) -> dict[str, Any]:
    """Full-ranking metrics of ``config.split``'s events under ``policy_dir``'s model (None: the
    most-popular floor, items ranked by their train events), written to ``out``; for a model on
    sessions of the simulator also its return online in its world (``config.online_users`` seeded
    users, the same for every model)."""
    split, inputs = config.split, (data,) if policy_dir is None else (data, policy_dir)
    check_out_free(out, overwrite, inputs, kind="file")
    sessions = read_sessions(data)
    if policy_dir is None:
        metrics = {"policy": None, "algo": "popularity", "split": split,
                   **evaluate_popularity(sessions, split, config.protocol)}
    else:
        model, record = load_model(policy_dir)
        _check_items(sessions, record, data, policy_dir)
        metrics = {"policy": str(policy_dir), "algo": record.get("algo"), "split": split,
                   **evaluate(model.to(device), sessions, split, device, config.protocol)}
        if "simulator" in sessions.info:
            world = SimulatorConfig(**sessions.info["simulator"])
            scores = policy_scores(model.cpu(), sessions.item_ids, world.sim_items)
            metrics["online"] = online_return(world, scores, users=config.online_users)
    with atomic_output(out, overwrite=overwrite, inputs=inputs, kind="file") as tmp:
        write_rec_eval(tmp, metrics)
    return metrics
