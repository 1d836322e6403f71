"""What each method's kept benchmark runs show against flow-grpo: NFE to reach a target reward, and
paired test differences, read from OUT/runs/*.json of benchmark.py (no training, seconds to run).

    python examples/benchmark/reach.py --runs runs/benchmark/runs [--out runs/benchmark/reach.json]

Two targets, both on the validation half (the test half only reports):
- ``final``: flow-grpo's final validation reward, the mean over its seeds (what the issue asks and
  benchmark.py reports). One evaluation of a noisy curve: flow-grpo's own run may pass it long
  before its budget ends, and the table shows where it does.
- ``plateau``: the mean of flow-grpo's last three validation evaluations, over its seeds: the level
  its curve holds at the end, less at the mercy of one evaluation.

For each method and target: each seed's NFE at the first evaluation whose validation reward reaches
the target (None: never), their mean with a t interval over the seeds that reached it, and that
mean as a fraction of flow-grpo's whole budget. Test differences from flow-grpo are paired over
images and seeds (stats.py), at the end of the budget, at the NFE nearest half of it, and (where
every seed reached the final target) at each seed's reaching point against flow-grpo's end: the
test half's check of a reach that the validation half found.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402  (this folder's statistics)


def load_runs(folder: Path) -> dict[str, list[list[dict[str, Any]]]]:
    """Curves by method, seeds in order (``NAME-sSEED.json``)."""
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for path in sorted(folder.glob("*-s*.json")):
        name, _, seed = path.stem.rpartition("-s")
        runs.setdefault(name, {})[int(seed)] = json.loads(path.read_text())["curve"]
    return {name: [by_seed[s] for s in sorted(by_seed)] for name, by_seed in runs.items()}


def targets(baseline: list[list[dict[str, Any]]]) -> dict[str, float]:
    final = sum(c[-1]["val_reward"] for c in baseline) / len(baseline)
    plateau = sum(sum(r["val_reward"] for r in c[-3:]) / 3 for c in baseline) / len(baseline)
    return {"final": final, "plateau": plateau}


def nearest(curve: list[dict[str, Any]], nfe: float) -> dict[str, Any]:
    return min(curve, key=lambda row: abs(row["nfe"] - nfe))


def analyse(runs: dict[str, list[list[dict[str, Any]]]]) -> dict[str, Any]:
    baseline = runs["flow-grpo"]
    goal = targets(baseline)
    budget = sum(c[-1]["nfe"] for c in baseline) / len(baseline)
    out: dict[str, Any] = {"targets": goal, "flow_grpo_budget_nfe": budget, "methods": {}}
    for name, curves in runs.items():
        seeds = min(len(curves), len(baseline))
        row: dict[str, Any] = {"seeds": len(curves)}
        for key, value in goal.items():
            reach = stats.reach_summary(curves, value)
            reach["fraction_of_budget"] = None if reach["mean"] is None else reach["mean"] / budget
            row[f"reach_{key}"] = reach
        row["diff_final"] = stats.paired_difference([c[-1]["test_images"] for c in curves[:seeds]],
                                                    [c[-1]["test_images"] for c in baseline[:seeds]])
        at_reach = [next((row for row in c if row["val_reward"] >= goal["final"]), None) for c in curves[:seeds]]
        row["diff_at_reach_vs_flow_grpo_final"] = None if None in at_reach else stats.paired_difference(
            [r["test_images"] for r in at_reach], [c[-1]["test_images"] for c in baseline[:seeds]])
        half = [nearest(c, budget / 2) for c in curves[:seeds]]
        row["half_budget_nfe"] = sum(r["nfe"] for r in half) / seeds
        row["diff_half_vs_flow_grpo_final"] = stats.paired_difference(
            [r["test_images"] for r in half], [c[-1]["test_images"] for c in baseline[:seeds]])
        out["methods"][name] = row
    return out


def _ci(s: dict[str, Any], digits: int = 3, signed: bool = False) -> str:
    if s["mean"] is None:
        return "never"
    mean = f"{s['mean']:+.{digits}f}" if signed else f"{s['mean']:.{digits}f}"
    return mean if s["ci95"] is None or math.isnan(s["ci95"]) else f"{mean} ± {s['ci95']:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    t = result["targets"]
    lines = [f"Targets (validation reward): flow-grpo final {t['final']:.3f}, plateau {t['plateau']:.3f}; "
             f"flow-grpo's budget {result['flow_grpo_budget_nfe']:,.0f} NFE.", "",
             "| method | seeds | NFE to final (fraction; per seed) | NFE to plateau (fraction; per seed) | "
             "test Δ vs flow-grpo at end | test Δ at ~half budget vs flow-grpo's end (NFE) | "
             "test Δ at the final target's reach vs flow-grpo's end |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["methods"].items():
        cells = []
        for key in ("final", "plateau"):
            reach = r[f"reach_{key}"]
            per_seed = ", ".join("never" if v is None else f"{v:,.0f}" for v in reach["per_seed"])
            frac = "" if reach["fraction_of_budget"] is None else f"{reach['fraction_of_budget']:.2f}; "
            cells.append(f"{_ci(reach, 0)} ({frac}{per_seed})")
        lines.append(f"| {name} | {r['seeds']} | {cells[0]} | {cells[1]} | {_ci(r['diff_final'], signed=True)} | "
                     f"{_ci(r['diff_half_vs_flow_grpo_final'], signed=True)} ({r['half_budget_nfe']:,.0f}) | "
                     f"{'a seed never reached it' if r['diff_at_reach_vs_flow_grpo_final'] is None else _ci(r['diff_at_reach_vs_flow_grpo_final'], signed=True)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="benchmark.py's OUT/runs folder.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the figures as JSON here.")
    args = parser.parse_args()
    result = analyse(load_runs(args.runs))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
