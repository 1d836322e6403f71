"""Prepared sessions of the recommender (`tempflow rec prepare`): one parquet file, one row per
event, sorted by session then position; its metadata holds the schema, the item ids in index order,
the preparation's config and counts. Built, read and validated only here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.artifacts.codecs import check_version, versioned
from stages.support.errors import TempflowError

# pyarrow is imported where a sessions file is written or read, for start-up time.

SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
SESSIONS_SCHEMA = "tempflow.recsys.sessions/1"
SESSION_COLUMNS = {"session": "int64", "position": "int32", "item": "int32", "purchase": "bool",
                   "reward": "float", "time": "double", "split": "int8"}


@dataclass
class Sessions:
    """Prepared sessions, one row per event, sorted by session then position. Items are 1..n_items
    (0 is reserved for padding and the start token); ``split`` holds :data:`SPLIT_CODES`."""

    session: np.ndarray  # int64
    position: np.ndarray  # int32
    item: np.ndarray  # int32
    purchase: np.ndarray  # bool
    reward: np.ndarray  # float32
    time: np.ndarray  # float64
    split: np.ndarray  # int8
    item_ids: list[str]  # item_ids[i - 1] is item i's id in the source
    info: dict[str, Any]

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def items_digest(self) -> str:
        """sha256 of the item ids in index order: what a model's item embeddings are tied to."""
        return hashlib.sha256("\n".join(self.item_ids).encode()).hexdigest()

    def bounds(self) -> np.ndarray:
        """Row offsets where each session starts, and the end: ``rows[b[i]:b[i+1]]`` is session i."""
        starts = np.flatnonzero(np.r_[True, self.session[1:] != self.session[:-1]])
        return np.r_[starts, len(self.session)]


def write_sessions(path: Path, sessions: Any, meta: dict[str, Any]) -> None:
    """One row per event (:class:`Sessions`); metadata: schema, the item ids in
    index order, the preparation's config and counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: getattr(sessions, name) for name in SESSION_COLUMNS})
    info = versioned(SESSIONS_SCHEMA, {"item_ids": sessions.item_ids, "info": sessions.info, **meta})
    pq.write_table(table.replace_schema_metadata({"tempflow": json.dumps(info, sort_keys=True)}), path)


def read_sessions(path: Path | str) -> Any:
    """Prepared sessions, checked: schema, column types, sorted sessions with positions 0..L-1,
    items within 1..n_items, finite rewards, known split codes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise TempflowError(f"{path}: no such sessions file; create it with `tempflow rec prepare --out {path}`")
    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {})[b"tempflow"])
    except (pa.ArrowException, OSError, ValueError, KeyError) as err:
        raise TempflowError(f"{path}: not a sessions file of `tempflow rec prepare` ({type(err).__name__}: {err})") from None
    check_version(meta, SESSIONS_SCHEMA, path, "prepare it again with `tempflow rec prepare`")
    types = {f.name: str(f.type) for f in table.schema}
    if types != SESSION_COLUMNS:
        raise TempflowError(f"{path}: columns {types} are not {SESSION_COLUMNS}; prepare it again")
    if any(table.column(name).null_count for name in SESSION_COLUMNS):
        raise TempflowError(f"{path}: a column holds nulls; prepare it again")
    item_ids, info = meta.get("item_ids"), meta.get("info")
    if not isinstance(item_ids, list) or not all(isinstance(i, str) for i in item_ids) or not isinstance(info, dict):
        raise TempflowError(f"{path}: its metadata lacks the item ids (a list of strings) or the counts; prepare it again")
    columns = {name: table.column(name).to_numpy() for name in SESSION_COLUMNS}
    sessions = Sessions(**columns, item_ids=item_ids, info=info)
    _check_sessions(sessions, path, set(SPLIT_CODES.values()))
    return sessions


def _check_sessions(s: Any, path: Path, codes: set[int]) -> None:
    if len(s.item) == 0:
        raise TempflowError(f"{path}: holds no events")
    new = np.r_[True, s.session[1:] != s.session[:-1]]
    if np.any(np.diff(s.session) < 0) or np.any(s.position != _positions(new)):
        raise TempflowError(f"{path}: rows are not sorted by session with positions 0, 1, ...; prepare it again")
    if s.item.min() < 1 or s.item.max() > len(s.item_ids):
        raise TempflowError(f"{path}: item indices outside 1..{len(s.item_ids)} (the metadata's item_ids)")
    if not np.isfinite(s.reward).all() or not np.isin(s.split, list(codes)).all():
        raise TempflowError(f"{path}: non-finite rewards or unknown split codes; prepare it again")


def _positions(new_session: np.ndarray) -> np.ndarray:
    """0, 1, ... within each run that ``new_session`` starts."""
    index = np.arange(len(new_session))
    return index - np.maximum.accumulate(np.where(new_session, index, 0))
