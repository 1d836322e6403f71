"""Collect the per-iteration ``metrics.json`` of a loop into one curve (for ``dvc plots``) and a summary."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from stages.artifacts import atomic_output, read_json, write_json
from stages.errors import TempflowError

CURVE_FIELDS = ("reward_mean", "reward_std", "loss", "policy_loss", "kl", "clip_fraction", "grad_norm",
                "trained_samples", "skipped_samples", "rollout_nfe")


def natural_key(path: Path) -> list:
    """Order it2 before it10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def build_curve(metrics_files: list[Path]) -> list[dict[str, Any]]:
    """One row per update, in natural file-name order (it2 before it10); ``reward_mean`` is the reward of the rollout that
    update trained on, i.e. of the policy *before* it, and ``nfe`` counts forward passes so far."""
    if not metrics_files:
        raise TempflowError("no update metrics files found; run `tempflow update --metrics FILE` first")
    rows, nfe = [], 0
    for i, path in enumerate(sorted(metrics_files, key=natural_key)):
        metrics = read_json(path, "a metrics.json written by `tempflow update`")
        missing = [f for f in CURVE_FIELDS if f not in metrics]
        if missing:
            raise TempflowError(f"{path}: not update metrics (missing {', '.join(missing)})")
        nfe += metrics["rollout_nfe"]
        rows.append({"iteration": i, "name": path.stem, "nfe": nfe, **{f: metrics[f] for f in CURVE_FIELDS}})
    return rows


def write_report(metrics_dir: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    rows = build_curve(list(Path(metrics_dir).glob("*.json")))
    summary = {
        "iterations": len(rows),
        "reward_first": rows[0]["reward_mean"],
        "reward_last": rows[-1]["reward_mean"],
        "reward_best": max(r["reward_mean"] for r in rows),
        "reward_gain": rows[-1]["reward_mean"] - rows[0]["reward_mean"],
        "total_nfe": rows[-1]["nfe"],
    }
    with atomic_output(out, overwrite=overwrite, inputs=(metrics_dir,)) as tmp:
        tmp.mkdir()
        write_json(tmp / "curve.json", rows)
        write_json(tmp / "summary.json", summary)
    return summary
