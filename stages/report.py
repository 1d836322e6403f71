"""Collect a loop's per-iteration ``metrics.json`` and evaluations into curves (for ``dvc plots``) and a
summary of a few figures (for ``dvc exp show``)."""

from __future__ import annotations

import re
from collections import Counter
from itertools import accumulate
from pathlib import Path
from typing import Any

from stages.artifacts.codecs import write_json
from stages.artifacts.evaluation import read_eval_metrics
from stages.artifacts.update_record import NUMBER_FIELDS, read_update_metrics, trained_rewards, wall_seconds
from stages.support.errors import TempflowError
from stages.support.outputs import atomic_output
from stages.support.plots import line_chart

CURVE_FIELDS = NUMBER_FIELDS
"""The columns of curve.json besides the iteration, its name and the NFE: every update's figures."""


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
        metrics = read_update_metrics(path)
        rows.append({"iteration": i, "name": path.stem, "nfe_before": nfe, "nfe": nfe + metrics["rollout_nfe"],
                     **{f: metrics[f] for f in CURVE_FIELDS}})
        nfe += metrics["rollout_nfe"]
        walls.append(wall_seconds(metrics))
    if all(wall is not None for wall in walls):  # updates from before they were recorded: no seconds
        for row, seconds in zip(rows, accumulate(sum(wall) for wall in walls)):
            row["seconds"] = seconds
    return rows


def read_evals(evals: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """``name -> metrics.json`` of ``tempflow eval`` folders, reduced to what a report compares: the
    total reward, each component's mean and image std, and in the shapes world strict accuracy."""
    out = {}
    for name, folder in evals.items():
        metrics = read_eval_metrics(Path(folder))
        components = metrics.get("rewards") or {}
        out[name] = {"reward": metrics["reward"], "strict": metrics.get("strict"), "step": metrics["policy"]["step"],
                     "identity": metrics["policy"].get("identity"),
                     "per_task": {t: v["strict"] for t, v in metrics.get("per_task", {}).items()},
                     "components": {c: (v["mean"], v["std"]) for c, v in components.items()}}
    return out


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


def gather_evals(named: list[tuple[str, Path]], eval_dir: Path | None) -> dict[str, Path]:
    """The evaluations a report compares, by name: the ``NAME=DIR`` pairs in their order, then the
    folders of ``eval_dir`` in the order of their policies' steps; a name given twice is refused."""
    named = list(named) + (list(eval_folders(eval_dir).items()) if eval_dir is not None else [])
    twice = sorted(name for name, count in Counter(name for name, _ in named).items() if count > 1)
    if twice:
        raise TempflowError(f"report: eval name(s) {', '.join(twice)} given twice (--eval and --eval-dir share one "
                            "namespace); rename one")
    return dict(named)


def write_report(metrics_dir: Path, out: Path, overwrite: bool = False,
                 evals: dict[str, Path] | None = None) -> dict[str, Any]:
    """curve.json (one row per update), evals.json (one row per evaluation of ``evals``, e.g.
    ``{"base": ..., "final": ...}`` from before to after; empty without), curve.png, rewards.png (each
    reward component the evaluations scored, trained and held out, on one plot) and summary.json,
    which compares the first and the last evaluation. The summary is what `dvc exp show` lists, so it holds
    the loop's few headline figures only; everything per iteration is in the two curves (`dvc plots`)."""
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
        _draw_curve(tmp / "curve.png", rows, points)
        _draw_rewards(tmp / "rewards.png", points, evaluated, trained_components(files))
    return summary


def trained_components(metrics_files: list[Path]) -> set[str]:
    """The reward components any update trained toward (``trained_rewards`` of its metrics)."""
    return {name for path in metrics_files for name in trained_rewards(read_update_metrics(path))}


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


def _draw_curve(path: Path, rows: list[dict[str, Any]], points: list[dict[str, Any]]) -> None:
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


def _draw_rewards(path: Path, points: list[dict[str, Any]], evaluated: dict[str, dict[str, Any]], trained: set[str]) -> None:
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
