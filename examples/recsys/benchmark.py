"""The recommender's benchmark under the standard protocol (issue 36): MovieLens-100k over several
seeds, every model ranked among the items its user has not seen, with paired intervals against BC.

    python examples/recsys/benchmark.py --out runs/recsys-benchmark --seeds 0,1,2,3,4 --threads 1
    python examples/recsys/benchmark.py --out runs/recsys-benchmark --sasrec runs/rec/recbole   # with SASRec
    python examples/recsys/benchmark.py --out /tmp/rb --quick    # a small data set, 2 seeds: checks the script

Per seed s: the transformer pretrained from scratch by next-item cross-entropy (``--seed s``), then
every variant of :data:`VARIANTS` fine-tuned from that one pretraining with the same budget: at most
``params.yaml``'s epochs, the epoch kept chosen on validation NDCG@10 (seen items removed), stopped
after ``patience`` epochs without a better one. The test split is read only by ``rec eval``. The
most-popular floor is the same for every seed. CRR is also tuned on validation (``crr-tuned``,
:func:`tune_crr`): each option's value is chosen by its one-change variant's mean validation
NDCG@10, the combination trained, and the best of them all on validation kept. With ``--sasrec
DIR``, RecBole's SASRec joins the table from the records ``examples/recsys/recbole_sasrec.py rank``
wrote there (``sasrec-sN.json``).

Figures: each metric's mean over the seeds, and each model's difference from BC of the same seed,
target by target, with a 95 % interval from a two-way bootstrap over seeds and test targets
(examples/benchmark/stats.py ``paired_bootstrap``): it carries both the training noise and the
sampling of the 943 users. Every stage's output is kept in OUT, so a rerun after an interruption
goes on from the first missing one. Writes OUT/results.json and OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "benchmark"))

import stats  # noqa: E402  (the image benchmark's statistics)

from stages.artifacts.sessions import read_sessions  # noqa: E402
from stages.recsys.data import PrepareConfig  # noqa: E402
from stages.recsys.metrics import per_target  # noqa: E402
from stages.recsys.model import RecModelConfig  # noqa: E402
from stages.recsys.stages import RecEvalConfig, Run, run_eval, run_prepare, run_pretrain, run_train  # noqa: E402
from stages.recsys.train import TrainConfig, eval_targets  # noqa: E402

PARAMS = yaml.safe_load((Path(__file__).parent / "params.yaml").read_text())
BASE = {"weight": "exp", "beta": 1.0, "gamma": 0.9, "warmup": 1, "cql_weight": 0.0, "critic_negatives": False}
"""The settings of crr-exp, which every variant of the ablation changes one of; SQN and SA2C take
its gamma and warm-up too. They are TrainConfig's defaults, pinned here so that the benchmark's
baseline stays what its table says if a default changes (the pipeline's CRR, as this benchmark
chose it, is params.yaml's ``datasets.movielens.algos.crr``)."""
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # the table
    "bc": ("bc", {}),
    "crr-exp": ("crr", {"weight": "exp"}),
    "crr-binary": ("crr", {"weight": "binary"}),
    "sqn": ("sqn", {}),
    "sa2c": ("sa2c", {}),
    # the ablation of CRR (each one change from crr-exp)
    "crr-exp-no-warmup": ("crr", {"weight": "exp", "warmup": 0}),
    "crr-exp-cql": ("crr", {"weight": "exp", "cql_weight": 1.0}),
    "crr-exp-negatives": ("crr", {"weight": "exp", "critic_negatives": True}),
    "crr-exp-beta-0.3": ("crr", {"weight": "exp", "beta": 0.3}),
    "crr-exp-beta-3": ("crr", {"weight": "exp", "beta": 3.0}),
    "crr-exp-gamma-0.5": ("crr", {"weight": "exp", "gamma": 0.5}),
    "crr-exp-gamma-0": ("crr", {"weight": "exp", "gamma": 0.0}),
    "crr-warmup-only": ("crr", {"weight": "exp", "warmup": 1000}),  # never weighted: cross-entropy + CRR's critic
}
# CRR's options chosen on validation: each one-change variant tries one value of one option
TUNING = ("crr-exp-no-warmup", "crr-exp-cql", "crr-exp-negatives", "crr-exp-beta-0.3", "crr-exp-beta-3",
          "crr-exp-gamma-0.5", "crr-exp-gamma-0")
TABLE = ("popularity", "sasrec", "bc", "crr-exp", "crr-tuned", "crr-binary", "sqn", "sa2c")
ABLATION_EXTRA = ("crr-combined",)
METRICS = ("hr@10", "ndcg@10")
KINDS = ("", "click_", "purchase_")


def fields(group: dict[str, Any]) -> dict[str, Any]:
    """A params.yaml group with its option names (``batch-size``) as field names (``batch_size``)."""
    return {k.replace("-", "_"): v for k, v in group.items()}


def budget(quick: bool) -> dict[str, Any]:
    """The training budget every model gets, from params.yaml's ``benchmark`` group."""
    group = fields(PARAMS["benchmark"])
    return {**group, "epochs": 1, "patience": 0} if quick else group


def common(seed: int, quick: bool) -> dict[str, Any]:
    """The settings every training of one seed shares: the budget, the epoch chosen on validation."""
    plan = budget(quick)
    return {"epochs": plan["epochs"], "patience": plan["patience"], "select": "ndcg@10", "seed": seed}


def seed_runs(out: Path, data: Path, seed: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every model of one seed, each stage skipped when its output is there: name -> eval record."""
    spec, shared = PARAMS["datasets"]["movielens"], common(seed, args.quick)
    folder = out / f"s{seed}"
    pretrained = folder / "pretrained"
    if not pretrained.exists():
        print(f"  seed {seed}: pretraining", flush=True)
        run_pretrain(data, Run(pretrained), RecModelConfig(**fields(spec["model"])),
                     TrainConfig(**{**fields(PARAMS["pretrain"]), **shared}))
    evals = {"popularity": _eval(data, None, out / "eval" / "popularity.json")}
    for name in args.variants:
        evals[name] = trained_eval(data, folder, name, *VARIANTS[name], shared)
    if args.sasrec:
        record = args.sasrec / f"sasrec-s{seed}.json"
        if record.exists():
            evals["sasrec"] = json.loads(record.read_text())
    return evals


def trained_eval(data: Path, folder: Path, name: str, algo: str, overrides: dict[str, Any],
                 shared: dict[str, Any]) -> dict[str, Any]:
    """One variant fine-tuned from the seed's pretraining (unless it is there) and its test record,
    with what its training kept: the epoch, the epochs run, the seconds and the validation record."""
    model = folder / name
    if not model.exists():
        print(f"  seed {shared['seed']}: {name}", flush=True)
        config = TrainConfig(**{**fields(PARAMS["train"]), **BASE, **shared, **overrides})
        run_train(data, folder / "pretrained", Run(model), algo, config)
    trained = json.loads((model / "metrics.json").read_text())
    stale = {k: trained["train"].get(k) for k, v in {**BASE, **overrides}.items() if trained["train"].get(k) != v}
    if algo == "crr" and stale:  # crr-combined's settings follow the validation scores, which a rerun may change
        raise SystemExit(f"{model} was trained with {stale}, not {overrides}: delete it to train it again")
    return {**_eval(data, model, folder.parent / "eval" / f"s{shared['seed']}-{name}.json"),
            "training": {"selected_epoch": trained["selected_epoch"], "epochs_run": len(trained["epochs"]),
                         "seconds": trained["seconds"], "validation_ndcg@10": trained["validation"]["ndcg@10"]}}


def choose_crr(validation: dict[str, float]) -> dict[str, Any]:
    """CRR's settings chosen on validation: from crr-exp's, each option of :data:`TUNING` takes the
    value whose one-change variant has the highest mean validation NDCG@10 over the seeds, if that
    beats crr-exp's own. ``validation``: variant name -> that mean (crr-exp's included)."""
    chosen: dict[str, tuple[Any, float]] = {}
    for name in TUNING:
        if name not in validation:
            continue
        (option, value), = ((k, v) for k, v in VARIANTS[name][1].items() if k != "weight")
        if validation[name] > chosen.get(option, (None, validation["crr-exp"]))[1]:
            chosen[option] = (value, validation[name])
    return {"weight": "exp", **{option: value for option, (value, _) in sorted(chosen.items())}}


def tune_crr(out: Path, data: Path, seeds: list[int], per_seed: list[dict[str, Any]], quick: bool) -> dict[str, Any]:
    """Adds ``crr-tuned`` to every seed's records: of crr-exp, its one-change variants and
    ``crr-combined`` (:func:`choose_crr`'s settings, trained with the same budget unless a variant
    already holds exactly them), the one with the highest mean validation NDCG@10. Returns the choice."""
    def mean_validation(name: str) -> float:
        return float(np.mean([seed[name]["training"]["validation_ndcg@10"] for seed in per_seed]))

    validation = {name: mean_validation(name) for name in ("crr-exp", *TUNING) if name in per_seed[0]}
    combined = choose_crr(validation)
    if not any(VARIANTS[name][1] == combined for name in validation):
        for seed, evals in zip(seeds, per_seed):
            evals["crr-combined"] = trained_eval(data, out / f"s{seed}", "crr-combined", "crr", combined,
                                                 common(seed, quick))
        validation["crr-combined"] = mean_validation("crr-combined")
    chosen = max(validation, key=validation.__getitem__)
    for evals in per_seed:
        evals["crr-tuned"] = evals[chosen]
    return {"combined": combined, "chosen": chosen, "validation_ndcg@10": validation}


def _eval(data: Path, model: Path | None, result: Path) -> dict[str, Any]:
    if not result.exists():
        result.parent.mkdir(parents=True, exist_ok=True)
        run_eval(data, model, result, RecEvalConfig(split="test"))
    return json.loads(result.read_text())


def summary(per_seed: list[dict[str, dict[str, Any]]], purchase: np.ndarray) -> dict[str, Any]:
    """Per model and metric (all targets, clicks, purchases): the mean over seeds and the paired
    difference from BC with its two-way bootstrap interval."""
    masks = {"": np.ones_like(purchase), "click_": ~purchase, "purchase_": purchase}
    out: dict[str, Any] = {}
    for name in per_seed[0]:
        if not all(name in seed for seed in per_seed):
            continue
        out[name] = {"selected_epochs": [seed[name].get("training", {}).get("selected_epoch") for seed in per_seed]}
        for kind in KINDS:
            for metric in METRICS:
                mine = [per_target(np.asarray(seed[name]["ranks"]), metric)[masks[kind]] for seed in per_seed]
                bc = [per_target(np.asarray(seed["bc"]["ranks"]), metric)[masks[kind]] for seed in per_seed]
                out[name][kind + metric] = {"mean": float(np.mean(mine)), "per_seed": [float(m.mean()) for m in mine],
                                            "vs_bc": stats.paired_bootstrap(mine, bc)}
    return out


def table(results: dict[str, Any], seeds: int, rows: tuple[str, ...]) -> str:
    keys = [kind + metric for kind in KINDS for metric in METRICS]
    heads = [f"{kind.rstrip('_') or 'all'} {metric.upper()}" for kind in KINDS for metric in METRICS]
    lines = [f"MovieLens-100k, test split, seen items removed, {seeds} seeds: mean [difference from BC, "
             "95 % two-way bootstrap interval over seeds and targets]; the epoch each seed kept", "",
             "| model | " + " | ".join(heads) + " | epochs kept |", "|" + " --- |" * (len(keys) + 2)]
    for name in rows:
        if name not in results:
            continue
        cells = []
        for key in keys:
            f = results[name][key]
            cell = f"{f['mean']:.3f}"
            if name != "bc":
                d = f["vs_bc"]
                cell += f" [{d['mean']:+.3f}, {d['low']:+.3f} to {d['high']:+.3f}]"
            cells.append(cell)
        kept = ", ".join("-" if e is None else str(e) for e in results[name]["selected_epochs"])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {kept} |")
    return "\n".join(lines) + "\n"


def quick_data(out: Path) -> Path:
    """A small MovieLens: its first 120 users (every rating of theirs)."""
    from stages.artifacts.sessions import write_sessions
    from stages.recsys.data import build_sessions, read_movielens

    config = PrepareConfig(**fields(PARAMS["datasets"]["movielens"]["prepare"]))
    events = read_movielens(config)
    keep = sorted(set(events.session), key=int)[:120]
    chosen = set(keep)
    small = type(events)()
    for s, i, p, t in zip(events.session, events.item, events.purchase, events.time):
        if s in chosen:
            small.add(s, i, p, t)
    path = out / "movielens-quick.parquet"
    write_sessions(path, build_sessions(small, config), {"config": {"quick": True}})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/recsys-benchmark"))
    parser.add_argument("--seeds", default="0,1,2,3,4", help="Comma list of seeds.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma list of VARIANTS to train.")
    parser.add_argument("--sasrec", type=Path, default=None, help="Folder of recbole_sasrec.py's sasrec-sN.json records.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--quick", action="store_true", help="120 users, one epoch: checks the script, measures nothing.")
    args = parser.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or "bc" not in args.variants:
        parser.error(f"--variants: unknown {unknown}" if unknown else "--variants must include bc (the paired baseline)")
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        data = args.out / "movielens-quick.parquet"
        data = data if data.exists() else quick_data(args.out)
    else:
        data = args.out / "movielens.parquet"
        if not data.exists():
            run_prepare(PrepareConfig(**fields(PARAMS["datasets"]["movielens"]["prepare"])), data)
    began = time.perf_counter()
    per_seed = [seed_runs(args.out, data, seed, args) for seed in seeds]
    sessions = read_sessions(data)
    purchase = sessions.purchase[eval_targets(sessions, "test", context=0).rows]
    tuned = tune_crr(args.out, data, seeds, per_seed, args.quick) if "crr-exp" in args.variants else None
    results = summary(per_seed, purchase)
    report = {"seeds": seeds, "crr_tuned": tuned, "params": PARAMS, "budget": budget(args.quick),
              "variants": {k: VARIANTS[k] for k in args.variants},
              "results": results, "seconds_this_run": time.perf_counter() - began,
              "torch_threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    chosen = "" if tuned is None else (
        f"\ncrr-tuned is {tuned['chosen']}, the best on validation NDCG@10 (mean over seeds): "
        + ", ".join(f"{k} {v:.4f}" for k, v in tuned["validation_ndcg@10"].items())
        + f"; crr-combined is {tuned['combined']}, each option at its best one-change value\n")
    ablation = ("bc", "crr-exp", *(v for v in args.variants if v.startswith("crr-") and v not in TABLE), *ABLATION_EXTRA)
    text = (table(results, len(seeds), TABLE) + chosen
            + "\nAblation of CRR (each one change from crr-exp; crr-combined takes each option's best):\n\n"
            + table(results, len(seeds), ablation))
    (args.out / "table.md").write_text(text)
    print(text)
    print(f"wrote {args.out}/results.json and table.md; this run took {report['seconds_this_run']:.0f} s")


if __name__ == "__main__":
    main()
