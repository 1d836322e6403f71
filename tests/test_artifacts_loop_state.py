"""A loop folder's loop.json (stages.artifacts.loop_state): written and read back, its fingerprint that
of its run, an edited or foreign file refused in one line."""

from __future__ import annotations

import json

import pytest

from stages.artifacts.loop_state import LOOP_FILE, LoopState, read_loop_state, run_fingerprint, write_loop_state
from stages.support.errors import TempflowError


def test_state_round_trips_and_a_folder_without_one_has_none(tmp_path):
    state = LoopState(run={"start": {"identity": "ab"}, "update": {"beta": 0.04}}, done=7)
    write_loop_state(tmp_path / LOOP_FILE, state)
    record = json.loads((tmp_path / LOOP_FILE).read_text())
    assert record["schema"] == "tempflow.loop/1" and record["fingerprint"] == run_fingerprint(state.run)
    assert read_loop_state(tmp_path) == state
    assert read_loop_state(tmp_path / "elsewhere") is None
    assert run_fingerprint({"b": 1, "a": 2}) == run_fingerprint({"a": 2, "b": 1}) != run_fingerprint({"a": 2})


@pytest.mark.parametrize("edit, says", [
    (lambda r: r["run"].update(extra=1), "fingerprint is not that of its run"),
    (lambda r: r.update(done=-1), "done a whole number >= 0"),
    (lambda r: r.update(schema="tempflow.loop/0"), "schema 'tempflow.loop/0', this tempflow reads 'tempflow.loop/1'"),
])
def test_an_edited_or_foreign_state_is_refused(tmp_path, edit, says):
    write_loop_state(tmp_path / LOOP_FILE, LoopState(run={"a": 1}, done=2))
    record = json.loads((tmp_path / LOOP_FILE).read_text())
    edit(record)
    (tmp_path / LOOP_FILE).write_text(json.dumps(record))
    with pytest.raises(TempflowError, match="--overwrite") as err:
        read_loop_state(tmp_path)
    assert says in str(err.value)
