"""What `tempflow loop` keeps beside its iterations: ``loop.json``, the run it is (every setting but
the number of iterations, and a fingerprint of them) and how far it got. Built, read and validated
only here.

    {"schema": "tempflow.loop/1", "fingerprint": "<sha256 of run>", "run": {...}, "done": 12}

``done`` counts the iterations whose policy, metrics and evaluation have landed; the file is rewritten
after each one, so a run killed anywhere resumes after the last iteration it names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.artifacts.codecs import check_version, is_int, read_json_object, versioned, write_json
from stages.support.errors import TempflowError

LOOP_SCHEMA = "tempflow.loop/1"
LOOP_FILE = "loop.json"


def run_fingerprint(run: dict[str, Any]) -> str:
    """sha256 of a run's description, as canonical JSON."""
    return hashlib.sha256(json.dumps(run, sort_keys=True, allow_nan=False).encode()).hexdigest()


@dataclass
class LoopState:
    run: dict[str, Any]
    """Everything that decides an iteration's bytes: the start policy, prompts, each stage's config."""
    done: int = 0
    """Iterations whose policy, metrics and evaluation have landed."""

    @property
    def fingerprint(self) -> str:
        return run_fingerprint(self.run)


def write_loop_state(path: Path, state: LoopState) -> None:
    """A loop folder's :data:`LOOP_FILE`, written to ``path`` (callers make it atomic)."""
    write_json(Path(path), versioned(LOOP_SCHEMA, {
        "fingerprint": state.fingerprint, "run": state.run, "done": state.done}))


def read_loop_state(folder: Path) -> LoopState | None:
    """The state of the loop folder ``folder``; None when it holds no ``loop.json``."""
    path = Path(folder) / LOOP_FILE
    if not path.exists():
        return None
    fix = "delete the folder, or pass --overwrite to start the loop afresh"
    record = read_json_object(path, "the loop.json of `tempflow loop`", fix)
    check_version(record, LOOP_SCHEMA, path, fix)
    run, done = record.get("run"), record.get("done")
    if not isinstance(run, dict) or not is_int(done) or done < 0:
        raise TempflowError(f"{path}: run must be an object and done a whole number >= 0; {fix}")
    state = LoopState(run=run, done=done)
    if record.get("fingerprint") != state.fingerprint:
        raise TempflowError(f"{path}: its fingerprint is not that of its run (the file was edited); {fix}")
    return state
