"""What `tempflow update` writes beside the new policy's weights: ``metrics.json`` (the update's
figures, also copied to ``--metrics FILE`` for the loop's report) and ``update.json`` (its config and
inputs). Built, read and validated only here. A ``metrics.json`` written before it carried a schema
is read as this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.artifacts.codecs import check_version, is_finite_number, is_number, read_json, short, versioned, write_json
from stages.support.errors import TempflowError

METRICS_SCHEMA = "tempflow.update-metrics/1"
RECORD_SCHEMA = "tempflow.update/1"
METRICS_FILE = "metrics.json"
RECORD_FILE = "update.json"
NUMBER_FIELDS = ("reward_mean", "reward_std", "loss", "policy_loss", "kl", "clip_fraction", "grad_norm",
                 "trained_samples", "skipped_samples", "rollout_nfe")
"""Figures every update's metrics hold as finite numbers (the report's curve is made of them)."""
WALL_FIELDS = ("rollout_seconds", "update_seconds")
"""An update's record of the wall time of its rollout and of itself (optional: older updates lack them)."""


def write_update(folder: Path, metrics: dict[str, Any], provenance: dict[str, Any]) -> None:
    """``folder/metrics.json`` and ``folder/update.json`` of a new policy folder."""
    write_metrics(Path(folder) / METRICS_FILE, metrics)
    write_json(Path(folder) / RECORD_FILE, versioned(RECORD_SCHEMA, provenance))


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """An update's metrics, with their schema (the policy folder's copy, or ``--metrics FILE``)."""
    write_json(path, versioned(METRICS_SCHEMA, metrics))


def read_update_metrics(path: Path) -> dict[str, Any]:
    """An update's metrics, checked: its schema, and :data:`NUMBER_FIELDS` finite numbers."""
    metrics = read_json(path, "a metrics.json written by `tempflow update`")
    if not isinstance(metrics, dict):
        raise TempflowError(f"{path}: not update metrics (not a JSON object)")
    check_version(metrics, METRICS_SCHEMA, path, "give the metrics of this tempflow's `tempflow update`",
                  legacy_unversioned=True)
    missing = [f for f in NUMBER_FIELDS if f not in metrics]
    if missing:
        raise TempflowError(f"{path}: not update metrics (missing {', '.join(missing)})")
    not_numbers = [f for f in NUMBER_FIELDS if not is_finite_number(metrics[f])]
    if not_numbers:
        raise TempflowError(f"{path}: {', '.join(not_numbers)} must be numbers; not update metrics written by `tempflow update`")
    return metrics


def wall_seconds(metrics: dict[str, Any]) -> list[float] | None:
    """The rollout's and the update's seconds, or None when the update did not record both."""
    walls = [metrics.get(f) for f in WALL_FIELDS]
    return walls if all(is_finite_number(v) for v in walls) else None


def trained_rewards(metrics: dict[str, Any]) -> list[str]:
    """The reward components the update trained toward (none recorded by older updates)."""
    names = metrics.get("trained_rewards", [])
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def read_step_spread(policy_dir: Path | str | None, num_steps: int) -> list[float | None] | None:
    """The within-group reward spread per step of ``0..T-2`` recorded with a policy by the update that
    made it (``metrics.json``'s ``step_reward_spread``; None for a step never measured). None when the
    folder has none (a base; an update of a rollout that did not branch) or records another T."""
    path = Path(policy_dir) / METRICS_FILE if policy_dir else None
    if path is None or not path.is_file():
        return None
    metrics = read_json(path, "an update's metrics")
    damaged = "the metrics are damaged: restore the policy folder"
    if not isinstance(metrics, dict):
        raise TempflowError(f"{path}: is not a JSON object; {damaged}")
    check_version(metrics, METRICS_SCHEMA, path, damaged, legacy_unversioned=True)
    spread = metrics.get("step_reward_spread")
    if spread is None or (isinstance(spread, list) and len(spread) != num_steps - 1):
        return None
    if not (isinstance(spread, list) and all(s is None or (is_number(s) and s >= 0) for s in spread)):
        raise TempflowError(f"{path}: step_reward_spread {short(spread)} is not a list of spreads >= 0 (or null); {damaged}")
    return spread
