"""How much does the default run's base depend on chance? Pretrain it with several seeds and evaluate each.

    python examples/benchmark/base_spread.py --out runs/base-spread            # seeds 0,1,2: ~20 min on 2 cores

The recipe is params.yaml's `pretrain` group with only `seed` changed. The seed stands in for
another machine: pretraining amplifies differences in the last bits of CPU kernels, just as it
amplifies a different initialisation. Each base is evaluated the way the default run evaluates
(params.yaml's `eval` group: 50 held-out prompts x 8 images, 40 ODE steps). The script prints and
writes OUT/results.json: each seed's held-out reward and strict accuracy, their mean, and the
largest deviation from the mean. A finished base is reused and an interrupted one resumes from its
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from stages import shapes  # noqa: E402
from stages.evaluate import EvalConfig, run_eval  # noqa: E402
from stages.pretrain import PretrainConfig, run_pretrain  # noqa: E402


def options(group: str, cls: type) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())[group]
    names = set(cls.__dataclass_fields__)
    return {k.replace("-", "_"): v for k, v in params.items() if k.replace("-", "_") in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "base-spread")
    parser.add_argument("--seeds", default="0,1,2", help="Comma list of pretraining seeds.")
    args = parser.parse_args()
    recipe = PretrainConfig(**options("pretrain", PretrainConfig))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["eval"]
    eval_config = EvalConfig(num_steps=params["num-steps"], images_per_prompt=params["images-per-prompt"],
                             seed=params["seed"], grid_prompts=0)
    prompts = shapes.eval_prompts(params["split"], per_task=params["per-task"], seed=params["seed"])
    rows = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        base = args.out / f"base-s{seed}"
        began = time.perf_counter()
        if not (base / "config.json").is_file():
            run_pretrain(replace(recipe, seed=seed), base)
        pretrain_seconds = time.perf_counter() - began
        metrics = run_eval(base, prompts, args.out / f"eval-s{seed}", eval_config, overwrite=True).metrics
        rows[seed] = {"reward": metrics["reward"], "strict": metrics["strict"], "pretrain_seconds": pretrain_seconds}
        print(f"seed {seed}: held-out reward {metrics['reward']:.3f}, strict {metrics['strict']:.3f} "
              f"(pretrained in {pretrain_seconds:.0f} s)", flush=True)
    summary = {}
    for key in ("reward", "strict"):
        values = [row[key] for row in rows.values()]
        mean = sum(values) / len(values)
        summary[key] = {"mean": mean, "max_deviation": max(abs(v - mean) for v in values)}
    print(json.dumps(summary, indent=2))
    (args.out / "results.json").write_text(json.dumps({"recipe": recipe.__dict__, "per_seed": rows,
                                                       "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
