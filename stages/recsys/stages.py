"""The recommender's stages, each writing its artifact atomically: prepared sessions (parquet), a
model folder (``model.safetensors``, ``config.json``, ``metrics.json``), evaluation metrics."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from stages.artifacts import atomic_output, check_out_free, read_sessions, sha256_file, write_json, write_sessions
from stages.errors import TempflowError
from stages.progress import Progress, no_progress
from stages.recsys.data import PrepareConfig, build_sessions, read_events
from stages.recsys.model import RecModelConfig, RecTransformer
from stages.recsys.train import METRICS_FILE, TrainConfig, evaluate, fit, load_model, save_model, timed, train_windows


def run_prepare(config: PrepareConfig, out: Path, events: Path | None = None, clicks: Path | None = None,
                buys: Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Read ``config.source``'s events, build sessions and splits, write ``out`` (parquet)."""
    inputs = tuple(p for p in (events, clicks, buys) if p is not None)
    check_out_free(out, overwrite, inputs, kind="file")
    sessions = build_sessions(read_events(config, events, clicks, buys), config)
    if config.source == "simulator":  # its world, so that `rec eval` can measure a policy online in it
        from stages.recsys.simulate import simulator_config

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


def _train_and_save(model: RecTransformer, sessions: Any, out: Path, algo: str, config: TrainConfig, record: dict,
                    device: str, progress: Progress, overwrite: bool, inputs: tuple[Path, ...]) -> dict[str, Any]:
    model.to(device)
    windows = {k: v.to(device) for k, v in train_windows(sessions, model.config.context).items()}
    history, seconds = timed(fit, model, windows, algo, config, progress)
    metrics = {**record, "windows": len(windows["items"]), "epochs": history, "seconds": seconds,
               "validation": evaluate(model, sessions, "validation", device)}
    with atomic_output(out, overwrite=overwrite, inputs=inputs) as tmp:
        save_model(model.cpu(), tmp, record)
        write_json(tmp / METRICS_FILE, metrics)
    return metrics


def run_pretrain(data: Path, out: Path, model_config: RecModelConfig, config: TrainConfig, device: str = "cpu",
                 progress: Progress = no_progress, overwrite: bool = False) -> dict[str, Any]:
    """A fresh transformer (seeded by ``config.seed``) fitted by next-item cross-entropy."""
    check_out_free(out, overwrite, (data,))
    sessions = read_sessions(data)
    torch.manual_seed(config.seed)
    model = RecTransformer(sessions.n_items, model_config)
    record = _record(data, "pretrain", config, None, sessions.items_digest())
    return _train_and_save(model, sessions, out, "bc", config, record, device, progress, overwrite, (data,))


def run_train(data: Path, policy_dir: Path, out: Path, algo: str, config: TrainConfig, device: str = "cpu",
              progress: Progress = no_progress, overwrite: bool = False) -> dict[str, Any]:
    """``policy_dir``'s model fine-tuned offline by ``algo``."""
    check_out_free(out, overwrite, (data, policy_dir))
    model, record = load_model(policy_dir)
    sessions = read_sessions(data)
    _check_items(sessions, record, data, policy_dir)
    start = {"path": str(policy_dir), "algo": record.get("algo")}
    return _train_and_save(model, sessions, out, algo, config, _record(data, algo, config, start, record["items_sha256"]),
                           device, progress, overwrite, (data, policy_dir))


def run_eval(data: Path, policy_dir: Path, out: Path, split: str, device: str = "cpu",
             overwrite: bool = False, online_users: int = 500) -> dict[str, Any]:
    """Full-ranking metrics of ``split``'s events under ``policy_dir``'s model, written to ``out``;
    for sessions of the simulator also the model's return online in its world (``online_users``
    seeded users, the same for every model)."""
    check_out_free(out, overwrite, (data, policy_dir), kind="file")
    sessions = read_sessions(data)
    model, record = load_model(policy_dir)
    _check_items(sessions, record, data, policy_dir)
    metrics = {"policy": str(policy_dir), "algo": record.get("algo"), "split": split,
               **evaluate(model.to(device), sessions, split, device)}
    if "simulator" in sessions.info:
        from stages.recsys.simulate import SimulatorConfig, online_return, policy_scores

        world = SimulatorConfig(**sessions.info["simulator"])
        scores = policy_scores(model.cpu(), sessions.item_ids, world.sim_items)
        metrics["online"] = online_return(world, scores, users=online_users)
    with atomic_output(out, overwrite=overwrite, inputs=(data, policy_dir), kind="file") as tmp:
        write_json(tmp, metrics)
    return metrics
