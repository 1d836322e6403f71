"""The recommender's pipeline (examples/recsys/dvc.yaml, its params.yaml) over several seeds, with
95 % intervals: MovieLens-100k hit rates and NDCG for the pretrained policy, BC, SQN, SA2C and CRR,
and on the simulator CRR's online return against BC's.

    python examples/recsys/benchmark.py --out runs/recsys-benchmark              # seeds 0,1,2
    python examples/recsys/benchmark.py --out runs/recsys-benchmark --seeds 0    # one seed

Seed s sets the pretraining's initial weights and the window order and dropout of every training
(``--seed s``). MovieLens is the same real data for every seed; the simulator's logs are drawn anew
per seed (``--sim-seed s``), so that its interval also carries the logging noise, while its online
evaluation plays the same 500 seeded users for every model. Every model of a seed starts from that
seed's one pretraining, as in the pipeline.

Intervals: Student's t over the seeds (examples/benchmark/stats.py); ``vs bc`` is each model's
difference from BC of the same seed. The mean within-seed standard error over test events (or
simulated users) is given beside it: it is the evaluation's own resolution, the seed interval the
training's noise on top. Every stage's output is kept in OUT, so a rerun after an interruption goes
on from the first missing one. Writes OUT/results.json and OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "benchmark"))

import stats  # noqa: E402  (the image benchmark's statistics)

from stages.recsys.data import PrepareConfig  # noqa: E402
from stages.recsys.model import RecModelConfig  # noqa: E402
from stages.recsys.stages import Run, run_eval, run_prepare, run_pretrain, run_train  # noqa: E402
from stages.recsys.train import TrainConfig  # noqa: E402

PARAMS = yaml.safe_load((Path(__file__).parent / "params.yaml").read_text())
METRICS = ("purchase_hr@10", "purchase_ndcg@10", "click_hr@10", "click_ndcg@10")
ONLINE = ("return", "length", "purchases")


def fields(group: dict[str, Any]) -> dict[str, Any]:
    """A params.yaml group with its option names (``batch-size``) as field names (``batch_size``)."""
    return {k.replace("-", "_"): v for k, v in group.items()}


def seed_runs(out: Path, seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """Every dataset's pipeline for one seed; each stage skipped when its output is there."""
    evals: dict[str, dict[str, dict[str, Any]]] = {}
    for name, spec in PARAMS["datasets"].items():
        prepare = PrepareConfig(**{**fields(spec["prepare"]), **({"sim_seed": seed} if name == "simulator" else {})})
        data = out / (f"{name}.parquet" if name != "simulator" else f"{name}-s{seed}.parquet")
        if not data.exists():
            run_prepare(prepare, data)
        folder = out / name / f"s{seed}"
        pretrained = folder / "pretrained"
        if not pretrained.exists():
            print(f"  {name} seed {seed}: pretraining", flush=True)
            run_pretrain(data, Run(pretrained), RecModelConfig(**fields(spec["model"])),
                         TrainConfig(**{**fields(PARAMS["pretrain"]), "seed": seed}))
        policies = {"pretrained": pretrained}
        for algo in PARAMS["algos"]:
            policies[algo] = folder / algo
            if not policies[algo].exists():
                print(f"  {name} seed {seed}: {algo}", flush=True)
                config = TrainConfig(**{**fields(PARAMS["train"]), **fields(spec["train"]), "seed": seed})
                run_train(data, pretrained, Run(policies[algo]), algo, config)
        evals[name] = {}
        for policy, path in policies.items():
            result = out / "eval" / f"{name}-s{seed}-{policy}.json"
            if not result.exists():
                result.parent.mkdir(parents=True, exist_ok=True)
                run_eval(data, path, result)
            evals[name][policy] = json.loads(result.read_text())
    return evals


def summary(per_seed: list[dict[str, dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    """Per dataset and model: each metric's mean over seeds with its interval, its difference from
    BC with that interval, and the mean within-seed standard error."""
    out: dict[str, Any] = {}
    for name in per_seed[0]:
        out[name] = {}
        for policy in per_seed[0][name]:
            rows = [seed[name][policy] for seed in per_seed]
            bc = [seed[name]["bc"] for seed in per_seed]
            keys = [(m, m) for m in METRICS] + ([(f"online_{m}", m) for m in ONLINE] if "online" in rows[0] else [])
            out[name][policy] = {key: _figure(rows, bc, key, raw) for key, raw in keys}
    return out


def _figure(rows: list[dict[str, Any]], bc: list[dict[str, Any]], key: str, raw: str) -> dict[str, Any]:
    def value(row: dict[str, Any], suffix: str = "") -> float:
        return row["online"][raw + suffix] if key.startswith("online_") else row[raw + suffix]

    values = [value(r) for r in rows]
    return {**stats.mean_ci(values), "per_seed": values, "within_seed_se": sum(value(r, "_se") for r in rows) / len(rows),
            "vs_bc": stats.mean_ci([a - value(b) for a, b in zip(values, bc)])}


def table(results: dict[str, Any], seeds: int) -> str:
    lines = []
    for name, models in results.items():
        keys = list(next(iter(models.values())))
        lines += [f"### {name} (test split, {seeds} seeds: mean ± 95 % interval; [difference from BC])", "",
                  "| model | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 1)]
        for policy, figures in models.items():
            cells = []
            for key in keys:
                f = figures[key]
                cell = f"{f['mean']:.3f} ± {f['ci95']:.3f}"
                if policy != "bc":
                    cell += f" [{f['vs_bc']['mean']:+.3f} ± {f['vs_bc']['ci95']:.3f}]"
                cells.append(cell)
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
        se = {k: round(sum(m[k]["within_seed_se"] for m in models.values()) / len(models), 3) for k in keys}
        lines += ["", f"Mean within-seed standard error: {se}", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/recsys-benchmark"))
    parser.add_argument("--seeds", default="0,1,2", help="Comma list of seeds.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    per_seed = [seed_runs(args.out, seed) for seed in seeds]
    results = summary(per_seed)
    report = {"seeds": seeds, "params": PARAMS, "results": results, "seconds_this_run": time.perf_counter() - began,
              "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "table.md").write_text(table(results, len(seeds)))
    print(table(results, len(seeds)))
    print(f"wrote {args.out}/results.json and table.md; this run took {report['seconds_this_run']:.0f} s")


if __name__ == "__main__":
    main()
