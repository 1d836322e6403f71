"""Do cheap branch finishes rank a step's branches as the full finish does?

    python examples/benchmark/finish_agreement.py --base runs/base --out runs/finish-agreement

A tempflow branch's finish is never trained: it only turns x_{k+1} into an image for the reward.
This rolls out the same prompts, seeds and branches once with the full finish and once per
``--finish`` M (every branch finished in at most M ODE steps, ``tempflow rollout --finish-steps``).
The branch noise does not depend on M, so the same sample key is the same x_{k+1} in every
rollout; only its image differs. For each step k it reports, over the branches of that step:

* ``spearman``: rank correlation between the cheap-finish and full-finish shapes reward;
* ``adv_corr``: Pearson correlation of the seed-group advantages (what the update trains on), over
  groups whose full-finish rewards are not all equal;
* ``sign_agree``: share of branches whose advantage has the same sign under both finishes, among
  branches with a non-zero full-finish advantage;

and each rollout's NFE. Writes OUT/results.json and OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from stages.artifacts.rollout_config import RolloutConfig  # noqa: E402
from stages.artifacts.scores import read_scores  # noqa: E402
from stages.flow import group_advantages  # noqa: E402
from stages.policies.base import load_policy  # noqa: E402
from stages.rewards import parse_reward_spec  # noqa: E402
from stages.rollout import run_rollout  # noqa: E402
from stages.score import run_score  # noqa: E402
from stages.worlds import shapes  # noqa: E402


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their mean rank (what Spearman's correlation needs)."""
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(len(values))
    for value in np.unique(values):
        tied = values == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def roll(base: Path, finish: int, args: argparse.Namespace, out: Path) -> tuple[dict[str, float], int]:
    """One rollout with ``finish`` steps per branch finish (0: all), scored: rewards by key, NFE."""
    policy, record = load_policy(base)
    config = RolloutConfig(algo="tempflow", num_steps=args.num_steps, shift=3.0, noise_level=0.7,
                           seeds_per_prompt=args.seeds, branches=args.branches, branch_steps="all",
                           prompts_per_rollout=args.prompts, finish_steps=finish, seed=args.seed, batch_size=64,
                           samples_per_shard=4096)
    result = run_rollout(policy, shapes.train_prompts(), config, out / f"rollout-m{finish}",
                         {"identity": record.identity, "path": str(base)}, overwrite=True)
    run_score(out / f"rollout-m{finish}", [parse_reward_spec("shapes")], out / f"scores-m{finish}.parquet", overwrite=True)
    columns, _ = read_scores(out / f"scores-m{finish}.parquet")
    return dict(zip(columns["key"], columns["reward"].astype(float))), result.nfe


def agreement(full: dict[str, float], cheap: dict[str, float], step: int | None) -> dict[str, float]:
    """The three agreement figures over the branches of ``step`` (all steps when None)."""
    keys = sorted(k for k in full if step is None or int(k.split("_k")[1][:3]) == step)
    groups = [k.rsplit("_b", 1)[0] for k in keys]  # p.._s.._k..: the seed group of tempflow
    a, b = np.array([full[k] for k in keys]), np.array([cheap[k] for k in keys])
    adv_a = group_advantages(torch.from_numpy(a), groups).numpy()
    adv_b = group_advantages(torch.from_numpy(b), groups).numpy()
    varied = np.array([np.ptp(a[[g == h for h in groups]]) > 0 for g in groups])
    moving = adv_a != 0
    return {
        "branches": len(keys),
        "spearman": correlation(ranks(a), ranks(b)),
        "adv_corr": correlation(adv_a[varied], adv_b[varied]),
        "sign_agree": float((np.sign(adv_a[moving]) == np.sign(adv_b[moving])).mean()) if moving.any() else float("nan"),
        "reward_full": float(a.mean()),
        "reward_cheap": float(b.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=ROOT / "runs" / "base")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "finish-agreement")
    parser.add_argument("--finish", type=int, nargs="+", default=[1, 2, 3, 5])
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    full, full_nfe = roll(args.base, 0, args, args.out)
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "full_nfe": full_nfe, "finish": {}}
    lines = ["| M | rollout NFE | step | spearman | adv corr | sign agree | mean reward (full -> cheap) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for finish in args.finish:
        cheap, nfe = roll(args.base, finish, args, args.out)
        per_step = {str(k): agreement(full, cheap, k) for k in range(args.num_steps - 1)}
        overall = agreement(full, cheap, None)
        results["finish"][str(finish)] = {"nfe": nfe, "all": overall, "per_step": per_step}
        for label, row in [("all", overall), *per_step.items()]:
            lines.append(f"| {finish} | {nfe} | {label} | {row['spearman']:.3f} | {row['adv_corr']:.3f} | "
                         f"{row['sign_agree']:.3f} | {row['reward_full']:.3f} -> {row['reward_cheap']:.3f} |")
        print(lines[-args.num_steps], flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = f"Full finish: {full_nfe} NFE.\n\n" + "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
