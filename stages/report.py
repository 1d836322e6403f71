"""Collect a loop's per-iteration ``metrics.json`` and evaluations into curves (for ``dvc plots``) and a
summary of a few figures (for ``dvc exp show``)."""

from __future__ import annotations

import math
import re
from itertools import accumulate
from pathlib import Path
from typing import Any

from stages.artifacts import atomic_output, read_json, write_json
from stages.errors import TempflowError

CURVE_FIELDS = ("reward_mean", "reward_std", "loss", "policy_loss", "kl", "clip_fraction", "grad_norm",
                "trained_samples", "skipped_samples", "rollout_nfe")
WALL_FIELDS = ("rollout_seconds", "update_seconds")
"""An update's record of the wall time of its rollout and of itself (optional: older updates lack them)."""


def natural_key(path: Path) -> list:
    """Order it2 before it10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def build_curve(metrics_files: list[Path]) -> list[dict[str, Any]]:
    """One row per update, in natural file-name order (it2 before it10); ``reward_mean`` is the reward of the rollout that
    update trained on, i.e. of the policy *before* it (sampled after ``nfe_before`` forward passes), and ``nfe`` counts
    forward passes up to it; ``seconds``, the rollouts' and updates' wall time so far, is there when every update
    recorded both."""
    if not metrics_files:
        raise TempflowError("no update metrics files found; run `tempflow update --metrics FILE` first")
    rows, walls, nfe = [], [], 0
    for i, path in enumerate(sorted(metrics_files, key=natural_key)):
        metrics = read_json(path, "a metrics.json written by `tempflow update`")
        missing = [f for f in CURVE_FIELDS if f not in metrics] if isinstance(metrics, dict) else list(CURVE_FIELDS)
        if missing:
            raise TempflowError(f"{path}: not update metrics (missing {', '.join(missing)})")
        not_numbers = [f for f in CURVE_FIELDS if not _is_number(metrics[f])]
        if not_numbers:
            raise TempflowError(f"{path}: {', '.join(not_numbers)} must be numbers; not update metrics written by `tempflow update`")
        rows.append({"iteration": i, "name": path.stem, "nfe_before": nfe, "nfe": nfe + metrics["rollout_nfe"],
                     **{f: metrics[f] for f in CURVE_FIELDS}})
        nfe += metrics["rollout_nfe"]
        walls.append([metrics.get(f) for f in WALL_FIELDS])
    if all(_is_number(v) for wall in walls for v in wall):  # updates from before they were recorded: no seconds
        for row, seconds in zip(rows, accumulate(sum(wall) for wall in walls)):
            row["seconds"] = seconds
    return rows


def read_evals(evals: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """``name -> metrics.json`` of ``tempflow eval`` folders, reduced to what a report compares: the
    total reward, each component's mean and image std, and in the shapes world strict accuracy."""
    out = {}
    for name, folder in evals.items():
        metrics = read_json(Path(folder) / "metrics.json", "the metrics.json of `tempflow eval`")
        if not _is_eval_metrics(metrics):
            raise TempflowError(f"{folder}/metrics.json: not eval metrics (written by `tempflow eval`)")
        components = metrics.get("rewards") or {}
        out[name] = {"reward": metrics["reward"], "strict": metrics.get("strict"), "step": metrics["policy"]["step"],
                     "identity": metrics["policy"].get("identity"),
                     "per_task": {t: v["strict"] for t, v in metrics.get("per_task", {}).items()},
                     "components": {c: (v["mean"], v["std"]) for c, v in components.items()}}
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_eval_metrics(metrics: Any) -> bool:
    """The fields a report reads, of the types `tempflow eval` writes (strict and per task in the
    shapes world only; each component's mean and std from the evals that score several rewards)."""
    if not isinstance(metrics, dict) or not {"reward", "policy"} <= set(metrics):
        return False
    policy, per_task, components = metrics["policy"], metrics.get("per_task", {}), metrics.get("rewards", {})
    return (_is_number(metrics["reward"]) and ("strict" not in metrics or _is_number(metrics["strict"]))
            and isinstance(policy, dict) and isinstance(policy.get("step"), int) and isinstance(per_task, dict)
            and all(isinstance(v, dict) and _is_number(v.get("strict")) for v in per_task.values())
            and isinstance(components, dict)
            and all(isinstance(v, dict) and _is_number(v.get("mean")) and _is_number(v.get("std"))
                    for v in components.values()))


def eval_folders(folder: Path) -> dict[str, Path]:
    """Every ``tempflow eval`` output under ``folder`` (a subfolder with a metrics.json), by name,
    ordered by the step of the policy it measured (so the base comes first, the final policy last)."""
    found = {sub.name: sub for sub in sorted(Path(folder).iterdir(), key=natural_key)
             if (sub / "metrics.json").is_file()} if Path(folder).is_dir() else {}
    if not found:
        raise TempflowError(f"--eval-dir {folder}: no `tempflow eval` folders (with a metrics.json) in it")
    measured = read_evals(found)
    seen: dict[tuple[str, int], str] = {}
    for name, metrics in measured.items():
        # the step too: a loop whose every group was skipped leaves a later policy with the base's weights
        identity = (metrics["identity"] or name, metrics["step"])
        if identity in seen:
            raise TempflowError(f"--eval-dir {folder}: {seen[identity]} and {name} measured the same policy "
                                f"(step {metrics['step']}); delete the stale one")
        seen[identity] = name
    # stable sort: ties keep name order
    return {name: found[name] for name in sorted(found, key=lambda name: measured[name]["step"])}


def write_report(metrics_dir: Path, out: Path, overwrite: bool = False,
                 evals: dict[str, Path] | None = None) -> dict[str, Any]:
    """curve.json (one row per update), evals.json (one row per evaluation of ``evals``, e.g.
    ``{"base": ..., "final": ...}`` from before to after; empty without), curve.png, rewards.png (each
    reward component the evaluations scored, trained and held out, on one plot) and summary.json,
    which compares the first and the last evaluation. The summary is what `dvc exp show` lists, so it holds
    the loop's few headline figures only; everything per iteration is in the two curves (`dvc plots`)."""
    from stages.plots import line_chart

    if not Path(metrics_dir).is_dir():
        raise TempflowError(f"--metrics-dir {metrics_dir}: no such folder; give the folder `tempflow update --metrics` wrote into")
    files = list(Path(metrics_dir).glob("*.json"))
    rows = build_curve(files)
    evaluated = read_evals(evals or {})
    points = eval_points(rows, evaluated)
    summary = summarise(rows, points)
    with atomic_output(out, overwrite=overwrite, inputs=(metrics_dir, *(evals or {}).values())) as tmp:
        tmp.mkdir()
        write_json(tmp / "curve.json", rows)
        write_json(tmp / "evals.json", points)
        write_json(tmp / "summary.json", summary)
        _draw_curve(tmp / "curve.png", rows, points, line_chart)
        _draw_rewards(tmp / "rewards.png", points, evaluated, trained_rewards(files), line_chart)
    return summary


def trained_rewards(metrics_files: list[Path]) -> set[str]:
    """The reward components any update trained toward (``trained_rewards`` of its metrics)."""
    found: set[str] = set()
    for path in metrics_files:
        names = read_json(path, "a metrics.json written by `tempflow update`").get("trained_rewards", [])
        if isinstance(names, list):
            found.update(n for n in names if isinstance(n, str))
    return found


def eval_points(rows: list[dict[str, Any]], evaluated: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluation, in the given order: its policy's step and the rollout NFE spent before
    that policy (step s has trained on s rollouts)."""
    spent = [0] + [r["nfe"] for r in rows]
    points = []
    for name, m in evaluated.items():
        point = {"name": name, "step": m["step"], "nfe": spent[min(m["step"], len(rows))], "reward": m["reward"]}
        if m["strict"] is not None:
            point["strict"] = m["strict"]
        point.update({f"reward_{c}": mean for c, (mean, _) in m["components"].items()})
        points.append(point)
    return points


def summarise(rows: list[dict[str, Any]], points: list[dict[str, Any]]) -> dict[str, Any]:
    """The loop's headline figures. With evaluations: the first (``base_*``) and the last (``final_*``)
    held-out reward and strict accuracy (one evaluation: both are it), their gains (two or more), the
    best evaluation's reward and its policy's step (the first of equals, in the order given); without,
    the training rollouts' first and last mean reward. Always the iterations, the rollout NFE spent
    and, when every update recorded both, the seconds of the rollouts and updates (not of scoring or
    evaluating)."""
    summary: dict[str, Any] = {"iterations": len(rows)}
    if points:
        first, last = points[0], points[-1]
        best = max(points, key=lambda p: p["reward"])  # the earliest of equals
        strict = all("strict" in p for p in points)  # the shapes world's evaluations
        summary.update({"base_reward": first["reward"], **({"base_strict": first["strict"]} if strict else {}),
                        "final_reward": last["reward"], **({"final_strict": last["strict"]} if strict else {})})
        if len(points) >= 2:
            summary["reward_gain"] = last["reward"] - first["reward"]
            if strict:
                summary["strict_gain"] = last["strict"] - first["strict"]
        summary.update({"best_reward": best["reward"], "best_step": best["step"]})
    else:
        summary.update({"rollout_reward_first": rows[0]["reward_mean"], "rollout_reward_last": rows[-1]["reward_mean"]})
    summary["nfe"] = rows[-1]["nfe"]
    if "seconds" in rows[-1]:
        summary["seconds"] = rows[-1]["seconds"]
    return summary


def _draw_curve(path: Path, rows: list[dict[str, Any]], points: list[dict[str, Any]], line_chart: Any) -> None:
    """Training reward (each rollout's mean; the rollouts draw different prompts, so it wanders) against
    forward passes; the evaluations' reward and strict accuracy as lines, each point placed at the NFE
    spent before the policy it measured (step s has seen s rollouts)."""
    rollout = "rollout reward (train prompts, SDE)"
    series = {rollout: ([r["nfe_before"] for r in rows], [r["reward_mean"] for r in rows])}
    if points:
        at = [p["nfe"] for p in points]
        series["eval reward (ODE)"] = (at, [p["reward"] for p in points])
        if all("strict" in p for p in points):
            series["eval strict accuracy (ODE)"] = (at, [p["strict"] for p in points])
    line_chart(path, series, xlabel="forward passes (NFE) spent on rollouts", ylabel="mean reward / accuracy",
               title="reward across the loop")


def _draw_rewards(path: Path, points: list[dict[str, Any]], evaluated: dict[str, dict[str, Any]], trained: set[str],
                  line_chart: Any) -> None:
    """Each component the evaluations scored, as its change from the first evaluation in units of
    that evaluation's image standard deviation (so rewards of any scale share one axis), labelled
    trained or held out: a trained reward that rises while a held-out one falls is reward hacking."""
    first = next(iter(evaluated.values()))["components"] if evaluated else {}
    series: dict[str, Any] = {}
    for column, (mean0, std0) in first.items():
        if not all(column in m["components"] for m in evaluated.values()):
            continue
        scale = std0 if std0 > 0 else 1.0
        label = f"{column} ({'trained' if column in trained else 'held out'})"
        series[label] = ([p["nfe"] for p in points], [(m["components"][column][0] - mean0) / scale for m in evaluated.values()])
    if not series:  # drawn anyway, so that the file a pipeline declares is always there
        series["(no evaluation scored reward components)"] = ([], [])
    line_chart(path, series, xlabel="forward passes (NFE) spent on rollouts",
               ylabel="change from the first evaluation (its image std)", title="trained and held-out rewards")
