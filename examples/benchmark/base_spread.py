"""How much does the default run depend on chance? Pretrain its base with several seeds, evaluate each,
and (``--loop``) run the default GRPO loop from each.

    python examples/benchmark/base_spread.py --out runs/base-spread            # seeds 0,1,2: ~35 min on 2 cores
    python examples/benchmark/base_spread.py --out runs/base-spread --loop     # + the loop from each: ~15 min more

The recipe is params.yaml's `pretrain` group with only `seed` changed (and what ``--pretrain
OPTION=VALUE`` changes, e.g. ``--pretrain steps=2000``; give such a recipe its own ``--out``). The seed stands in for
another machine: pretraining amplifies differences in the last bits of CPU kernels, just as it
amplifies a different initialisation. Each base is evaluated the way the default run evaluates
(params.yaml's `eval` group: 50 held-out prompts x 8 images, 40 ODE steps).

``--loop`` then runs params.yaml's `loop` from each base exactly as dvc.yaml chains it (the same
rollout, score and update options and seeds, the base as KL reference), through the library
functions the commands call, and evaluates the last policy the same way: the default run's gain
from each base. ``--iterations 32`` continues that loop past its 16 iterations in the same pattern
(it17 with seed 17, ...), reusing the 16 of an earlier run. ``--seeds 1 --threads 1`` in two shells
runs two seeds side by side.

Prints and writes OUT/results.json: each seed's base held-out reward and strict accuracy (with
``--loop`` also the final policy's and the gain), and for each the mean over seeds and the largest
deviation from it. A finished base or loop is reused
when it was made by the same recipe (pretraining options and model config; a loop also by the same
base weights); an interrupted pretraining resumes from its checkpoint, an interrupted loop from its
last finished iteration.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from stages.artifacts.prompts import read_prompts  # noqa: E402
from stages.artifacts.rollout_config import RolloutConfig  # noqa: E402
from stages.evaluate import EvalConfig, run_eval  # noqa: E402
from stages.policies.base import load_policy  # noqa: E402
from stages.policies.tiny import build_policy, model_config  # noqa: E402
from stages.pretrain import PretrainConfig, run_pretrain  # noqa: E402
from stages.rewards import parse_reward_spec  # noqa: E402
from stages.rollout import run_rollout  # noqa: E402
from stages.score import ScoreConfig, run_score  # noqa: E402
from stages.update import UpdateConfig, run_update  # noqa: E402
from stages.worlds import shapes  # noqa: E402

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def options(group: str, cls: type) -> dict[str, Any]:
    """params.yaml's ``group`` as ``cls``'s field names; every option must be one (as on the command line)."""
    fields = {k.replace("-", "_"): v for k, v in PARAMS[group].items()}
    unknown = set(fields) - set(cls.__dataclass_fields__)
    if unknown:
        sys.exit(f"params.yaml `{group}` has options {sorted(unknown)} that {cls.__name__} lacks; update this script")
    return fields


def made_by(base: Path, recipe: PretrainConfig) -> bool:
    """Whether ``base`` was pretrained with ``recipe`` into the model the preset builds today (a base of
    the same options made before the preset changed, e.g. with the pooled text, is not)."""
    if not ((base / "pretrain.json").is_file() and (base / "config.json").is_file()):
        return False
    model = model_config(build_policy(recipe.preset, recipe.seed, {"image_size": recipe.image_size}))
    return (json.loads((base / "pretrain.json").read_text()).get("config") == asdict(recipe)
            and json.loads((base / "config.json").read_text()).get("model") == model)


def pretrained(recipe: PretrainConfig, base: Path) -> float:
    """Pretrain ``base`` unless it exists with this recipe; the seconds it took (0: reused)."""
    if made_by(base, recipe):
        return 0.0
    shutil.rmtree(base, ignore_errors=True)
    began = time.perf_counter()
    run_pretrain(recipe, base)
    return time.perf_counter() - began


def loop_items(iterations: int) -> list[dict[str, Any]]:
    """params.yaml's loop, continued past its end in its own pattern (it17 samples with policies/it16 and
    seed 17, ...) when ``iterations`` is larger, or cut short when smaller."""
    items = list(PARAMS["loop"])
    for i in range(len(items) + 1, iterations + 1):
        items.append({"name": f"it{i:02d}", "prev": f"policies/{items[-1]['name']}", "seed": i})
    return items[:iterations]


def default_loop(base: Path, work: Path, changes: dict[str, dict[str, Any]], iterations: int) -> tuple[Path, float]:
    """params.yaml's loop from ``base``, as dvc.yaml runs it, with ``changes`` to its ``update`` and
    ``rollout`` options and ``iterations`` iterations; the last policy and the seconds it took. Finished
    iterations are kept (``work/loop.json`` lists them), so a longer loop continues a shorter one of the
    same key."""
    record = work / "loop.json"
    update = {**options("update", UpdateConfig), **changes["update"]}
    rollout = {**options("rollout", RolloutConfig), **changes["rollout"]}
    key = {"base": json.loads((base / "config.json").read_text())["identity"],
           **{group: PARAMS[group] for group in ("prompts", "rollout", "score", "update", "loop")}}
    for group in ("update", "rollout"):
        key[group] = {**key[group], **{name.replace("_", "-"): value for name, value in changes[group].items()}}
    kept = json.loads(record.read_text()) if record.is_file() else {}
    if kept.get("key") != key:
        shutil.rmtree(work, ignore_errors=True)
        kept = {}
    done = kept.get("done", [item["name"] for item in PARAMS["loop"]] if kept else [])
    seconds = kept.get("seconds", 0.0)
    work.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(ROOT / PARAMS["prompts"])
    specs = [parse_reward_spec(text) for text in PARAMS["score"]["reward"]]
    for item in loop_items(iterations):
        it = item["name"]
        if it in done and (work / "policies" / it).is_dir():
            continue
        began = time.perf_counter()
        prev = base if item["prev"] == "base" else work / item["prev"]
        policy, meta = load_policy(prev)
        # overwrite: an iteration interrupted after its rollout or score is redone whole
        run_rollout(policy, prompts, RolloutConfig(**rollout, seed=item["seed"]), work / "rollouts" / it,
                    {"identity": meta.identity, "path": str(prev), "step": meta.step}, overwrite=True)
        run_score(work / "rollouts" / it, specs, work / "scores" / f"{it}.parquet",
                  ScoreConfig(batch_size=PARAMS["score"]["batch-size"]), overwrite=True)
        metrics = run_update(prev, work / "rollouts" / it, work / "scores" / f"{it}.parquet", work / "policies" / it,
                             UpdateConfig(**update, seed=item["seed"]), reference_dir=base, overwrite=True).metrics
        shutil.rmtree(work / "rollouts" / it)  # a rollout is large and needed by its update only
        print(f"  {base.name} {it}: reward {metrics['reward_mean']:.3f}, kl {metrics['kl']:.4f}", flush=True)
        seconds += time.perf_counter() - began
        done.append(it)
        record.write_text(json.dumps({"key": key, "done": done, "seconds": seconds}) + "\n")
    return work / "policies" / loop_items(iterations)[-1]["name"], seconds


def evaluated(policy: Path, out: Path, split: str, per_task: int) -> dict[str, float]:
    params = PARAMS["eval"]
    config = EvalConfig(num_steps=params["num-steps"], images_per_prompt=params["images-per-prompt"],
                        seed=params["seed"], grid_prompts=0)
    prompts = shapes.eval_prompts(split, per_task=per_task, seed=params["seed"])
    metrics = run_eval(policy, prompts, out, config, overwrite=True).metrics
    return {"reward": metrics["reward"], "strict": metrics["strict"], "by_kind": by_heldout_kind(out)}


def by_heldout_kind(evaluation: Path) -> dict[str, float]:
    """Mean reward of an evaluation's images per held-out kind (``pair``: an unseen colour-shape pairing,
    ``composition``: seen objects in an unseen combination; ``train`` on the train split), where
    the seeds part (BENCHMARKS.md)."""
    rewards: dict[str, list[float]] = {}
    for line in (evaluation / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        kind = shapes.heldout_kind(shapes.parse_prompt(row["prompt"])) or "train"
        rewards.setdefault(kind, []).append(row["reward"])
    return {kind: sum(values) / len(values) for kind, values in sorted(rewards.items())}


def spread(rows: dict[int, dict[str, Any]], key: str) -> dict[str, float]:
    values = [row[key] for row in rows.values()]
    mean = sum(values) / len(values)
    return {"mean": mean, "max_deviation": max(abs(v - mean) for v in values)}


def option_change(cls: type, command: str):
    """A parser of ``OPTION=VALUE`` for ``cls``'s options (``beta=0.004`` -> ("beta", 0.004)): the option as
    params.yaml spells it, its value as YAML reads it."""
    def parse(text: str) -> tuple[str, Any]:
        name, sep, value = text.partition("=")
        field = name.replace("-", "_")
        if not sep or field not in cls.__dataclass_fields__:
            raise argparse.ArgumentTypeError(f"{text!r} is not OPTION=VALUE with OPTION a `tempflow {command}` option")
        return field, yaml.safe_load(value)
    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "base-spread")
    parser.add_argument("--seeds", default="0,1,2", help="Comma list of pretraining seeds.")
    parser.add_argument("--loop", action="store_true", help="Also run the default loop from each base.")
    parser.add_argument("--pretrain", dest="recipe_changes", type=option_change(PretrainConfig, "pretrain"),
                        action="append", default=[], metavar="OPTION=VALUE",
                        help="Change a pretraining option of params.yaml's recipe (repeatable), e.g. steps=2000.")
    parser.add_argument("--update", dest="changes", type=option_change(UpdateConfig, "update"), action="append", default=[],
                        metavar="OPTION=VALUE", help="Change an update option of the loop (repeatable), e.g. beta=0.004.")
    parser.add_argument("--rollout", dest="rollout_changes", type=option_change(RolloutConfig, "rollout"), action="append",
                        default=[], metavar="OPTION=VALUE",
                        help="Change a rollout option of the loop (repeatable), e.g. prompts-per-rollout=32.")
    parser.add_argument("--split", default=PARAMS["eval"]["split"], choices=list(shapes.SPLITS + shapes.HELDOUT_HALVES),
                        help="Held-out prompts to evaluate on (default: params.yaml's); validation for choosing settings.")
    parser.add_argument("--per-task", type=int, default=PARAMS["eval"]["per-task"],
                        help="Prompts per task type to evaluate on (default: params.yaml's; 1000: all of the split).")
    parser.add_argument("--iterations", type=int, default=len(PARAMS["loop"]),
                        help="Iterations of the loop (default: params.yaml's; more continue its pattern and reuse "
                             "the default's iterations).")
    parser.add_argument("--threads", type=int, default=0, help="Torch threads (0: torch's default).")
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if args.iterations != len(PARAMS["loop"]) and not args.loop:
        parser.error("--iterations sets the length of the loop: give --loop too")
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(name == "seed" for name, _ in args.recipe_changes + args.rollout_changes + args.changes):
        parser.error("OPTION seed: choose the pretraining seeds with --seeds; the loop's come from params.yaml")
    recipe = PretrainConfig(**{**options("pretrain", PretrainConfig), **dict(args.recipe_changes)})
    changes = {"update": dict(args.changes), "rollout": dict(args.rollout_changes)}
    tag = "".join(f"-{k}={v}" for k, v in sorted(changes["update"].items()))
    tag += "".join(f"-rollout.{k}={v}" for k, v in sorted(changes["rollout"].items()))
    evaluation = "" if (args.split, args.per_task) == (PARAMS["eval"]["split"], PARAMS["eval"]["per-task"]) \
        else f"-{args.split}{args.per_task}"
    loop_tag, tag = tag, tag + evaluation
    if args.iterations != len(PARAMS["loop"]):
        tag += f"-it{args.iterations}"
    rows = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        base = args.out / f"base-s{seed}"
        row: dict[str, Any] = {"pretrain_seconds": pretrained(replace(recipe, seed=seed), base)}
        row.update(evaluated(base, args.out / f"eval-s{seed}{tag}", args.split, args.per_task))
        print(f"seed {seed}: base {args.split} reward {row['reward']:.3f}, strict {row['strict']:.3f} "
              f"(pretrained in {row['pretrain_seconds']:.0f} s; 0: reused)", flush=True)
        if args.loop:
            final, row["loop_seconds"] = default_loop(base, args.out / f"loop-s{seed}{loop_tag}", changes,
                                                        args.iterations)
            row["final"] = evaluated(final, args.out / f"eval-final-s{seed}{tag}", args.split, args.per_task)
            row["gain"] = {key: row["final"][key] - row[key] for key in ("reward", "strict")}
            print(f"seed {seed}: final {args.split} reward {row['final']['reward']:.3f}, strict {row['final']['strict']:.3f} "
                  f"(gain {row['gain']['reward']:+.3f} / {row['gain']['strict']:+.3f}; loop {row['loop_seconds']:.0f} s)",
                  flush=True)
        rows[seed] = row
    summary = {key: spread(rows, key) for key in ("reward", "strict")}
    if args.loop:
        for part in ("final", "gain"):
            summary[part] = {key: spread({s: row[part] for s, row in rows.items()}, key) for key in ("reward", "strict")}
    print(json.dumps(summary, indent=2))
    result = {"recipe": asdict(recipe), "loop_iterations": args.iterations if args.loop else 0,
              "update_changes": changes["update"], "rollout_changes": changes["rollout"], "split": args.split, "per_task": args.per_task,
              "torch_threads": torch.get_num_threads(), "per_seed": rows, "summary": summary}
    name = f"results{'' if args.seeds == '0,1,2' else '-s' + args.seeds.replace(',', '-')}{tag}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
