"""What `tempflow eval` writes: ``metrics.json`` (the rewards' means, standard deviations and
standard errors, strict accuracy and per task type in the shapes world, the policy measured),
``results.jsonl`` (each image's prompt and scores), ``grid.png`` and, when asked, ``images/``.
Built, read and validated only here. A ``metrics.json`` written before it carried a schema is read
as this one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stages.artifacts.codecs import check_version, is_finite_number, is_int, read_json, versioned, write_json
from stages.support.errors import TempflowError

EVAL_SCHEMA = "tempflow.eval/1"
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.jsonl"
GRID_FILE = "grid.png"


def write_eval(folder: Path, metrics: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``folder/metrics.json`` and ``folder/results.jsonl`` (one row per image, in order)."""
    write_json(folder / METRICS_FILE, versioned(EVAL_SCHEMA, metrics))
    with open(folder / RESULTS_FILE, "w") as f:
        f.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)


def read_eval_metrics(folder: Path) -> dict[str, Any]:
    """An evaluation's metrics, checked: its schema and the fields a report reads, of the types
    `tempflow eval` writes (strict and per task in the shapes world only; each component's mean and
    std from the evaluations that score several rewards)."""
    path = Path(folder) / METRICS_FILE
    metrics = read_json(path, "the metrics.json of `tempflow eval`")
    if not _is_eval_metrics(metrics):
        raise TempflowError(f"{path}: not eval metrics (written by `tempflow eval`)")
    check_version(metrics, EVAL_SCHEMA, path, "evaluate the policy again with this tempflow", legacy_unversioned=True)
    return metrics


def _is_eval_metrics(metrics: Any) -> bool:
    if not isinstance(metrics, dict) or not {"reward", "policy"} <= set(metrics):
        return False
    policy, per_task, components = metrics["policy"], metrics.get("per_task", {}), metrics.get("rewards", {})
    return (is_finite_number(metrics["reward"]) and ("strict" not in metrics or is_finite_number(metrics["strict"]))
            and isinstance(policy, dict) and is_int(policy.get("step")) and isinstance(per_task, dict)
            and all(isinstance(v, dict) and is_finite_number(v.get("strict")) for v in per_task.values())
            and isinstance(components, dict)
            and all(isinstance(v, dict) and is_finite_number(v.get("mean")) and is_finite_number(v.get("std"))
                    for v in components.values()))
