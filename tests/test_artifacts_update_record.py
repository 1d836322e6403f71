"""An update's metrics.json and update.json (stages.artifacts.update_record): written with their
schema, read back checked; metrics written before they carried one still read; the measured reward
spread read back for the next rollout."""

from __future__ import annotations

import json

import pytest

from stages.artifacts.update_record import (
    METRICS_SCHEMA,
    read_step_spread,
    read_update_metrics,
    write_metrics,
    write_update,
)
from stages.support.errors import TempflowError
from tests.conftest import UPDATE_ROW

ROW = {**UPDATE_ROW, "reward_mean": 0.5}


def test_metrics_are_written_with_their_schema_and_read_back(tmp_path):
    write_update(tmp_path, {**ROW, "step_reward_spread": [0.1, None, 0.3]}, {"config": {"beta": 0.04}})
    assert json.loads((tmp_path / "metrics.json").read_text())["schema"] == METRICS_SCHEMA
    assert json.loads((tmp_path / "update.json").read_text()) == {"schema": "tempflow.update/1", "config": {"beta": 0.04}}
    assert read_update_metrics(tmp_path / "metrics.json")["reward_mean"] == 0.5
    assert read_step_spread(tmp_path, 4) == [0.1, None, 0.3] and read_step_spread(tmp_path, 5) is None


def test_metrics_written_before_they_carried_a_schema_still_read(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps(ROW))
    assert read_update_metrics(tmp_path / "old.json")["rollout_nfe"] == 100


@pytest.mark.parametrize("row, says", [
    ({**ROW, "schema": "tempflow.eval/1"}, "schema 'tempflow.eval/1', this tempflow reads 'tempflow.update-metrics/1'"),
    ({**ROW, "kl": True}, "kl must be numbers"),
    ({k: v for k, v in ROW.items() if k != "loss"}, "missing loss"),
    ([ROW], "not a JSON object"),
])
def test_metrics_of_another_shape_are_refused(tmp_path, row, says):
    (tmp_path / "m.json").write_text(json.dumps(row))
    with pytest.raises(TempflowError, match=says):
        read_update_metrics(tmp_path / "m.json")


def test_a_metrics_file_of_one_update_is_what_its_policy_folder_holds(tmp_path):
    write_metrics(tmp_path / "copy.json", ROW)
    (tmp_path / "policy").mkdir()
    write_update(tmp_path / "policy", ROW, {})
    assert (tmp_path / "copy.json").read_bytes() == (tmp_path / "policy" / "metrics.json").read_bytes()


def test_read_step_spread_refuses_damaged_metrics_and_ignores_another_schedule(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"step_reward_spread": [0.1, None, 0.2]}))
    assert read_step_spread(tmp_path, 4) == [0.1, None, 0.2]
    assert read_step_spread(tmp_path, 6) is None  # measured on a 4-step schedule: not this one's
    assert read_step_spread(tmp_path / "nothing", 4) is None and read_step_spread(None, 4) is None
    for damaged in ({"step_reward_spread": [0.1, -1.0, 0.2]}, {"step_reward_spread": "wide"}, [0.1, 0.2, 0.3]):
        (tmp_path / "metrics.json").write_text(json.dumps(damaged))
        with pytest.raises(TempflowError, match="damaged"):
            read_step_spread(tmp_path, 4)
