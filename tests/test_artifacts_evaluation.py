"""What `tempflow eval` writes (stages.artifacts.evaluation): metrics.json with its schema and
results.jsonl, read back checked; metrics written before they carried a schema still read."""

from __future__ import annotations

import json

import pytest

from stages.artifacts.evaluation import EVAL_SCHEMA, read_eval_metrics, write_eval
from stages.support.errors import TempflowError

METRICS = {"reward": 0.8, "strict": 0.5, "policy": {"step": 2, "identity": "x"},
           "per_task": {"single": {"reward": 1.0, "strict": 1.0, "images": 2}},
           "rewards": {"shapes": {"mean": 0.8, "std": 0.1, "se": 0.01}}}


def test_an_evaluation_is_written_with_its_schema_and_read_back(tmp_path):
    write_eval(tmp_path, METRICS, [{"prompt": "a red circle", "image": 0, "reward": 1.0}])
    assert read_eval_metrics(tmp_path) == {"schema": EVAL_SCHEMA, **METRICS}
    assert [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()] == [
        {"image": 0, "prompt": "a red circle", "reward": 1.0}]


def test_metrics_written_before_they_carried_a_schema_still_read(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    assert read_eval_metrics(tmp_path)["reward"] == 0.8


@pytest.mark.parametrize("edit, says", [
    (lambda m: m.update(schema="tempflow.update-metrics/1"), "this tempflow reads 'tempflow.eval/1'"),
    (lambda m: m.update(reward="high"), "not eval metrics"),
    (lambda m: m["policy"].update(step=True), "not eval metrics"),
    (lambda m: m["rewards"]["shapes"].pop("std"), "not eval metrics"),
])
def test_metrics_of_another_shape_are_refused(tmp_path, edit, says):
    metrics = json.loads(json.dumps(METRICS))
    edit(metrics)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(TempflowError, match=says):
        read_eval_metrics(tmp_path)
