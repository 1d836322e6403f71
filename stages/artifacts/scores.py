"""Scores (DESIGN.md §4): one parquet file, one row per rollout sample: ``key``, ``reward`` (the
weighted total) and ``reward_<name>`` per component; its metadata records the schema, the reward
spec and the rollout manifest's hash. Built, read and validated only here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from stages.artifacts.codecs import check_version, is_number, loads_json, versioned
from stages.support.errors import TempflowError

# pyarrow is imported where a scores file is written or read, for start-up time.

SCORES_SCHEMA = "tempflow.scores/1"
MAX_REWARD_WEIGHT = 1e6
"""Largest |weight| of a reward component (`--reward NAME:WEIGHT`)."""
REWARD_LIMIT = 1e12
"""Largest |reward| a scores file may hold: group statistics of larger values lose all precision
(and overflow past 1e154); rescale such a reward."""


def write_scores(path: Path, keys: list[str], total: np.ndarray, components: dict[str, np.ndarray], meta: dict) -> None:
    """One row per rollout sample: ``key``, ``reward`` (weighted total), ``reward_<name>`` per component."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"key": pa.array(keys, type=pa.string()), "reward": pa.array(total, type=pa.float64())}
    for name, values in components.items():
        columns[f"reward_{name}"] = pa.array(values, type=pa.float64())
    table = pa.table(columns)
    table = table.replace_schema_metadata({"tempflow": json.dumps(versioned(SCORES_SCHEMA, meta), sort_keys=True)})
    pq.write_table(table, path)


def check_rewards(values: np.ndarray, keys: Any, what: str) -> None:
    """Rewards must be finite and within :data:`REWARD_LIMIT`; one line naming the first bad key."""
    bad = ~np.isfinite(values) | (np.abs(np.nan_to_num(values)) > REWARD_LIMIT)
    if bad.any():
        first = int(np.argmax(bad))
        raise TempflowError(f"{what}: {int(bad.sum())} rewards are NaN or infinite, or beyond ±{REWARD_LIMIT:g} "
                            f"(first {float(values[first])} at key {keys[first]}); fix or rescale the reward")


def read_scores(path: Path | str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Columns and tempflow metadata of a scores file, after checking schema, types and values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise TempflowError(f"{path}: no such scores file; create it with `tempflow score --out {path}`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise TempflowError(f"{path}: not a readable parquet file ({err})") from None
    meta = _scores_meta(table, path)
    types = {field.name: field.type for field in table.schema}
    if "key" not in types or "reward" not in types:
        raise TempflowError(f"{path}: needs 'key' and 'reward' columns, found {table.column_names}")
    if not (pa.types.is_string(types["key"]) or pa.types.is_large_string(types["key"])):
        raise TempflowError(f"{path}: column 'key' is {types['key']}, not strings; re-run `tempflow score`")
    columns: dict[str, np.ndarray] = {"key": table.column("key").to_numpy(zero_copy_only=False)}
    if any(k is None for k in columns["key"]):
        raise TempflowError(f"{path}: column 'key' has empty (null) keys; re-run `tempflow score`")
    for name in table.column_names:
        if name == "key":
            continue
        if not (pa.types.is_floating(types[name]) or pa.types.is_integer(types[name])) or table.column(name).null_count:
            raise TempflowError(f"{path}: column {name!r} is {types[name]}, not numbers without nulls; "
                                "re-run `tempflow score`")
        columns[name] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        check_rewards(columns[name], columns["key"], f"{path} column {name!r}")
    _check_weighted_sum(columns, meta, path)
    return columns, meta


def reward_column(name: str) -> str:
    """The scores column suffix of reward ``name`` (``reward_<suffix>``): ``module:function`` becomes
    ``module.function``."""
    return name.replace(":", ".")


def _check_weighted_sum(columns: dict[str, np.ndarray], meta: dict[str, Any], path: Path) -> None:
    """``reward`` must be the weighted sum of the components the metadata names: an edited column
    would otherwise train on a reward nobody asked for."""
    rewards = meta.get("rewards")
    if not isinstance(rewards, list) or not rewards or not all(
            isinstance(r, dict) and isinstance(r.get("name"), str) and is_number(r.get("weight"))
            and abs(r["weight"]) <= MAX_REWARD_WEIGHT for r in rewards):
        raise TempflowError(f"{path}: scores metadata lists no rewards with weights; re-run `tempflow score`")
    total = np.zeros_like(columns["reward"])
    for reward in rewards:
        column = "reward_" + reward_column(reward["name"])
        if column not in columns:
            raise TempflowError(f"{path}: the metadata names reward {reward['name']} but there is no {column} column")
        total += reward["weight"] * columns[column]
    off = ~(np.abs(total - columns["reward"]) <= 1e-9 * np.maximum(1.0, np.abs(total)))  # NaN counts as off
    if off.any():
        raise TempflowError(f"{path}: 'reward' is not the weighted sum of its components (first at key "
                            f"{columns['key'][int(np.argmax(off))]}); re-run `tempflow score`")


def _scores_meta(table: Any, path: Path) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(b"tempflow")
    try:
        meta = loads_json(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        meta = None
    if meta is None:
        raise TempflowError(f"{path}: its tempflow metadata is unreadable; re-run `tempflow score`")
    check_version(meta, SCORES_SCHEMA, path, "re-run `tempflow score` with this version")
    if not isinstance(meta.get("rollout_manifest_sha256"), str):
        raise TempflowError(f"{path}: scores metadata names no rollout (rollout_manifest_sha256); re-run `tempflow score`")
    return meta


def check_keys_match(scores_keys: Iterable[str], rollout_keys: Iterable[str], scores_path: Path, rollout: Path) -> None:
    """Scores and rollout must hold exactly the same keys: a partial join would train on a subset silently."""
    scores_list = list(scores_keys)
    s, r = set(scores_list), set(rollout_keys)
    if len(s) != len(scores_list):
        raise TempflowError(f"{scores_path}: duplicate keys; re-run `tempflow score`")
    if s != r:
        only_s, only_r = sorted(s - r), sorted(r - s)
        detail = f"{len(only_s)} keys only in the scores (e.g. {only_s[:1]}), {len(only_r)} only in the rollout (e.g. {only_r[:1]})"
        raise TempflowError(f"{scores_path} does not match rollout {rollout}: {detail}; score this rollout again")
