"""Logged sessions: read from a source, checked row by row, prepared into one parquet schema.

A session is one user's (MovieLens) or one visit's (RetailRocket, YooChoose) events in time order;
each event is an item and its kind, a click or a purchase, rewarded ``click_reward`` (0.2) and
``purchase_reward`` (1.0) as in Xin et al.'s SQN/SA2C protocol. Sources:

- ``movielens``: the real MovieLens-100k ratings that the ``recbole==1.2.1`` wheel ships
  (``recbole/dataset_example/ml-100k/ml-100k.inter``, read through importlib.resources and never
  copied): any rating is a click, a rating of at least ``purchase_rating`` (4) a purchase;
- ``retailrocket``: ``events.csv`` (``timestamp,visitorid,event,itemid,transactionid``; ms
  timestamps): ``view`` and ``addtocart`` are clicks, ``transaction`` a purchase; a visitor's
  events split into sessions at gaps over ``session_gap_minutes`` (30);
- ``yoochoose``: a clicks file (``session,timestamp,item,category``) and a buys file
  (``session,timestamp,item,price,quantity``), ISO timestamps;
- ``simulator``: the logged sessions of :mod:`stages.recsys.simulate`'s behaviour policy, whose
  world is recorded in the prepared file so that ``rec eval`` can measure a policy online in it.

A malformed row, an unknown event type or an empty file is refused with one line naming the file
and line; sessions shorter than ``min_session_length`` are dropped and counted, never silently.
Splits: ``user`` (leave-last-out: each session's last event is a test target, the one before a
validation target, the rest train) or ``time`` (whole sessions by start time, 80/10/10).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from stages.artifacts.sessions import SPLIT_CODES, Sessions
from stages.recsys.simulate import simulate_logs, simulator_config
from stages.support.errors import TempflowError
from stages.support.rules import Rules

SOURCES = {
    "movielens": "MovieLens-100k as the recbole wheel ships it (943 users, 1,682 items, 100,000 ratings)",
    "retailrocket": "RetailRocket events.csv (--events FILE)",
    "yoochoose": "YooChoose clicks and buys files (--clicks FILE --buys FILE)",
    "simulator": "sessions of the simulator's behaviour policy (stages.recsys.simulate), users with delayed effects",
}
SPLITS = {"user": "leave-last-out per session (last event test, the one before validation)",
          "time": "whole sessions by start time, 80 % train, 10 % validation, 10 % test"}
RETAILROCKET_HEADER = ["timestamp", "visitorid", "event", "itemid", "transactionid"]
RETAILROCKET_EVENTS = {"view": 0, "addtocart": 0, "transaction": 1}
"""RetailRocket's event types and their kind (0 click, 1 purchase)."""


@dataclass
class PrepareConfig(Rules):
    """How logged events become sessions. Every field is also a ``tempflow rec prepare`` option."""

    command = "rec prepare"

    source: str = "movielens"
    """Where the events come from: movielens, retailrocket or yoochoose."""
    split: str = "user"
    """user: leave-last-out per session; time: whole sessions by start time, 80/10/10."""
    purchase_rating: float = 4.0
    """movielens: a rating at least this is a purchase (any rating is a click)."""
    click_reward: float = 0.2
    """Reward of a click (Xin et al.'s protocol)."""
    purchase_reward: float = 1.0
    """Reward of a purchase."""
    session_gap_minutes: float = 30.0
    """retailrocket: a visitor's events split into sessions where two lie further apart than this."""
    min_session_length: int = 3
    """Sessions with fewer events are dropped (and counted): the user split needs a train, a
    validation and a test event."""
    sim_users: int = 1500
    """simulator: sessions to log (its other settings are SimulatorConfig's defaults, recorded in the file)."""
    sim_seed: int = 0
    """simulator: seed of the world and of its logged sessions."""

    def __post_init__(self) -> None:
        self.choice("source", SOURCES)
        self.choice("split", SPLITS)
        for name in ("click_reward", "purchase_reward", "purchase_rating", "session_gap_minutes"):
            self.within(name, 0.0, 1e6)
        self.at_least(1, "sim_users")
        self.seeds("sim_seed")
        self.at_least(1, "min_session_length")
        self.require(self.split != "user" or self.min_session_length >= 3, "min_session_length",
                     ">= 3 with --split user (a train, a validation and a test event)")


@dataclass
class PrepareFiles(Rules):
    """The files `tempflow rec prepare` reads: exactly those its source needs."""

    command = "rec prepare"

    source: str = "movielens"
    events: Path | None = None
    clicks: Path | None = None
    buys: Path | None = None

    NEEDS = {"movielens": (), "simulator": (), "retailrocket": ("events",), "yoochoose": ("clicks", "buys")}

    def __post_init__(self) -> None:
        self.choice("source", SOURCES)
        for name in ("events", "clicks", "buys"):
            needed = name in self.NEEDS[self.source]
            self.require((getattr(self, name) is not None) == needed, name,
                         f"{'given' if needed else 'left out'} with --source {self.source}")


@dataclass
class Events:
    """Raw events in file order: session key, item id (as the source names it), purchase flag, time."""

    session: list[Any] = field(default_factory=list)
    item: list[str] = field(default_factory=list)
    purchase: list[bool] = field(default_factory=list)
    time: list[float] = field(default_factory=list)

    def add(self, session: Any, item: str, purchase: bool, time: float) -> None:
        self.session.append(session)
        self.item.append(item)
        self.purchase.append(purchase)
        self.time.append(time)


# --------------------------------------------------------------------------------------------
# Sources


def _rows(lines: Iterable[str], where: str, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Non-empty rows with their line numbers; a row the csv module or UTF-8 cannot read is refused."""
    reader = csv.reader(lines, delimiter=delimiter)
    number = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise TempflowError(f"{where} line {reader.line_num or number + 1}: unreadable ({type(err).__name__}: "
                                f"{str(err)[:80]})") from None
        number = reader.line_num
        if row:
            yield number, row


def read_movielens(config: PrepareConfig, text: str | None = None, where: str = "ml-100k.inter") -> Events:
    """``user_id:token  item_id:token  rating:float  timestamp:float`` (tab-separated, recbole's atomic
    format); ``text`` defaults to the copy inside the installed recbole wheel."""
    text = _movielens_text() if text is None else text
    events = Events()
    rows = _rows(io.StringIO(text), where, "\t")
    header = next(rows, (0, []))[1]
    if [h.split(":")[0] for h in header] != ["user_id", "item_id", "rating", "timestamp"]:
        raise TempflowError(f"{where} line 1: expected the header user_id:token item_id:token rating:float "
                            f"timestamp:float, got {header!r}")
    for number, row in rows:
        if len(row) != 4:
            raise TempflowError(f"{where} line {number}: expected 4 tab-separated fields, got {len(row)}")
        rating, stamp = _number(row[2], where, number, "rating"), _number(row[3], where, number, "timestamp")
        events.add(row[0], row[1], rating >= config.purchase_rating, stamp)
    return _nonempty(events, where)


def _movielens_text() -> str:
    try:
        return (resources.files("recbole") / "dataset_example" / "ml-100k" / "ml-100k.inter").read_text()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise TempflowError("MovieLens-100k comes from the recbole wheel: `pip install --no-deps recbole==1.2.1` "
                            f"({type(err).__name__}: {err})") from None


def read_retailrocket(path: Path, config: PrepareConfig) -> Events:
    """RetailRocket's ``events.csv``; sessions are a visitor's events split at long gaps (below)."""
    raw = Events()
    with _open(path) as lines:
        rows = _rows(lines, str(path), ",")
        header = next(rows, (0, []))[1]
        if header != RETAILROCKET_HEADER:
            raise TempflowError(f"{path} line 1: expected the header {','.join(RETAILROCKET_HEADER)}, got {','.join(header)!r}")
        for number, row in rows:
            if len(row) != 5:
                raise TempflowError(f"{path} line {number}: expected 5 comma-separated fields, got {len(row)}")
            stamp, visitor, event, item = _number(row[0], path, number, "timestamp") / 1000.0, row[1], row[2], row[3]
            if event not in RETAILROCKET_EVENTS:
                raise TempflowError(f"{path} line {number}: unknown event {event!r}; expected one of "
                                    f"{', '.join(RETAILROCKET_EVENTS)}")
            if not visitor or not item:
                raise TempflowError(f"{path} line {number}: empty visitorid or itemid")
            raw.add(visitor, item, bool(RETAILROCKET_EVENTS[event]), stamp)
    return split_by_gap(_nonempty(raw, str(path)), 60.0 * config.session_gap_minutes)


def split_by_gap(events: Events, gap_seconds: float) -> Events:
    """Each visitor's events in time order, cut into sessions where two lie more than ``gap_seconds`` apart."""
    order = sorted(range(len(events.item)), key=lambda i: (events.session[i], events.time[i], i))
    out, last_visitor, last_time, count = Events(), None, -math.inf, -1
    for i in order:
        visitor, stamp = events.session[i], events.time[i]
        if visitor != last_visitor or stamp - last_time > gap_seconds:
            count += 1
        out.add(f"{visitor}#{count}", events.item[i], events.purchase[i], stamp)
        last_visitor, last_time = visitor, stamp
    return out


def read_yoochoose(clicks: Path, buys: Path) -> Events:
    """YooChoose's clicks (``session,timestamp,item,category``) and buys (``session,timestamp,item,price,quantity``)."""
    events = Events()
    for path, width, purchase in ((clicks, 4, False), (buys, 5, True)):
        with _open(path) as lines:
            seen = False
            for number, row in _rows(lines, str(path), ","):
                if len(row) != width:
                    raise TempflowError(f"{path} line {number}: expected {width} comma-separated fields, got {len(row)} "
                                        f"(is this the {'buys' if purchase else 'clicks'} file?)")
                if not row[0] or not row[2]:
                    raise TempflowError(f"{path} line {number}: empty session or item")
                events.add(row[0], row[2], purchase, _iso_time(row[1], path, number))
                seen = True
        if not seen:
            raise TempflowError(f"{path}: no events in it")
    return events


class _open:  # noqa: N801 (used as a context manager like open)
    """A file's lines, each decoded as UTF-8 on its own, so that a bad byte is named by its line."""

    def __init__(self, path: Path) -> None:
        try:
            self.handle = open(path, "rb")
        except OSError as err:
            raise TempflowError(f"{path}: cannot read it ({err.strerror or err})") from None
        self.path = path

    def __enter__(self) -> Iterator[str]:
        return self._lines()

    def __exit__(self, *exc: Any) -> None:
        self.handle.close()

    def _lines(self) -> Iterator[str]:
        for number, raw in enumerate(self.handle, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise TempflowError(f"{self.path} line {number}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _number(text: str, where: Any, line: int, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TempflowError(f"{where} line {line}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise TempflowError(f"{where} line {line}: {what} {text!r} is not finite")
    return value


def _iso_time(text: str, where: Path, line: int) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise TempflowError(f"{where} line {line}: timestamp {text!r} is not an ISO 8601 time") from None


def _nonempty(events: Events, where: str) -> Events:
    if not events.item:
        raise TempflowError(f"{where}: no events in it")
    return events


# --------------------------------------------------------------------------------------------
# Sessions and splits


def build_sessions(events: Events, config: PrepareConfig) -> Sessions:
    """Group events into sessions (time order, ties in file order), drop and count short sessions,
    number the items 1..n by first appearance, reward each event and assign its split."""
    by_session: dict[Any, list[int]] = {}
    for i, key in enumerate(events.session):
        by_session.setdefault(key, []).append(i)
    kept = []
    for rows in by_session.values():
        rows.sort(key=lambda i: (events.time[i], i))
        if len(rows) >= config.min_session_length:
            kept.append(rows)
    if not kept:
        raise TempflowError(f"no session has {config.min_session_length} or more events; lower --min-session-length")
    kept.sort(key=lambda rows: (events.time[rows[0]], rows[0]))  # sessions by start time
    item_index: dict[str, int] = {}
    columns: dict[str, list] = {"session": [], "position": [], "item": [], "purchase": [], "time": [], "split": []}
    for s, rows in enumerate(kept):
        labels = _split_labels(len(rows), s, len(kept), config.split)
        for p, (i, label) in enumerate(zip(rows, labels)):
            columns["session"].append(s)
            columns["position"].append(p)
            columns["item"].append(item_index.setdefault(events.item[i], len(item_index) + 1))
            columns["purchase"].append(events.purchase[i])
            columns["time"].append(events.time[i])
            columns["split"].append(label)
    purchase = np.asarray(columns["purchase"], dtype=bool)
    info = {"events": len(events.item), "sessions_in_source": len(by_session), "sessions": len(kept),
            "sessions_dropped_short": len(by_session) - len(kept), "items": len(item_index),
            "purchases": int(purchase.sum())}
    return Sessions(
        session=np.asarray(columns["session"], dtype=np.int64), position=np.asarray(columns["position"], dtype=np.int32),
        item=np.asarray(columns["item"], dtype=np.int32), purchase=purchase,
        reward=np.where(purchase, config.purchase_reward, config.click_reward).astype(np.float32),
        time=np.asarray(columns["time"], dtype=np.float64), split=np.asarray(columns["split"], dtype=np.int8),
        item_ids=list(item_index), info=info)


def _split_labels(length: int, index: int, total: int, split: str) -> list[int]:
    """The split code of each event of session ``index`` (of ``total``, by start time)."""
    if split == "user":
        return [SPLIT_CODES["train"]] * (length - 2) + [SPLIT_CODES["validation"], SPLIT_CODES["test"]]
    fraction = index / total
    code = SPLIT_CODES["train"] if fraction < 0.8 else SPLIT_CODES["validation"] if fraction < 0.9 else SPLIT_CODES["test"]
    return [code] * length


def read_events(config: PrepareConfig, files: PrepareFiles = PrepareFiles()) -> Events:
    """The events of ``config.source``, from the ``files`` it needs."""
    if config.source == "movielens":
        return read_movielens(config)
    if config.source == "simulator":
        events = Events()
        for event in simulate_logs(simulator_config(config)):
            events.add(*event)
        return events
    if config.source == "retailrocket":
        return read_retailrocket(Path(files.events), config)
    return read_yoochoose(Path(files.clicks), Path(files.buys))
