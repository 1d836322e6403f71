"""How does a base's held-out reward grow along pretraining, and does another recipe change that?

    python examples/benchmark/pretrain_curve.py --seed 2 --steps 3000 --tag s2 --threads 1   # ~20 min on 1 core

Trains the flow phase of params.yaml's recipe (``--steps``, ``--batch``, ``--lr``, ``--sigma-shift``,
``--ema``, ``--warmup`` override it) on the finished autoencoder of a base that ``base_spread.py``
made (``--ae-seed``, default ``--seed``: the autoencoder that seed's full pretraining trains first),
and every ``--every`` steps evaluates the EMA weights on the validation half of the held-out prompts
(16 per task type x 4 images, 20 ODE steps). The learning rate follows the schedule of ``--steps``,
so a point before the end is not what a shorter run would end with. Prints each row and writes
runs/curves/TAG.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from base_spread import PARAMS, options  # noqa: E402  (this folder's)

from stages.evaluate import EvalConfig, sample_ode  # noqa: E402
from stages.policies.base import load_policy  # noqa: E402
from stages.policies.tiny import build_policy  # noqa: E402
from stages.pretrain import PretrainConfig, flow_phase, flow_step  # noqa: E402
from stages.support.seeds import derive_seed  # noqa: E402
from stages.worlds import shapes  # noqa: E402


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="Pretraining seed (weights, data, noise).")
    parser.add_argument("--ae-seed", type=int, default=None, help="Whose autoencoder (default: --seed's).")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--sigma-shift", type=float, default=None)
    parser.add_argument("--ema", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--every", type=int, default=250, help="Evaluate every this many steps.")
    parser.add_argument("--tag", required=True, help="Name of the output runs/curves/TAG.json.")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def recipe(args: argparse.Namespace) -> PretrainConfig:
    base = PretrainConfig(**options("pretrain", PretrainConfig))
    changes = {"steps": args.steps, "batch_size": args.batch, "learning_rate": args.lr, "sigma_shift": args.sigma_shift,
               "ema": args.ema, "warmup": args.warmup}
    return replace(base, seed=args.seed, checkpoint_every=0, **{k: v for k, v in changes.items() if v is not None})


def with_autoencoder_of(config: PretrainConfig, folder: Path):
    """A fresh policy of ``config``'s seed carrying the trained autoencoder (and latent scaling) of ``folder``."""
    policy = build_policy(config.preset, config.seed, {"image_size": config.image_size})
    trained = load_policy(folder)[0].autoencoder
    policy.autoencoder.load_state_dict(trained.state_dict())
    policy.autoencoder.register_to_config(shift_factor=trained.config.shift_factor,
                                          scaling_factor=trained.config.scaling_factor)
    return policy


def ema_reward(policy, phase, prompts: list[str], seeds: list[int]) -> tuple[float, float]:
    """Reward and strict accuracy of the EMA weights; the live weights are put back afterwards."""
    live = {n: p.detach().clone() for n, p in phase.params.items()}
    with torch.no_grad():
        for n, p in phase.params.items():
            p.copy_(phase.ema[n])
    trainable = [m for m in policy.modules().values() if m is not policy.autoencoder]
    for module in trainable:
        module.eval()
    images = sample_ode(policy, prompts, seeds, EvalConfig(num_steps=20, grid_prompts=0))
    with torch.no_grad():
        for n, p in phase.params.items():
            p.copy_(live[n])
    for module in trainable:
        module.train()
    return float(shapes.shapes_reward(images, prompts).mean()), float(shapes.shapes_strict(images, prompts).mean())


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    config = recipe(args)
    folder = ROOT / "runs" / "base-spread" / f"base-s{args.seed if args.ae_seed is None else args.ae_seed}"
    policy = with_autoencoder_of(config, folder)
    phase = flow_phase(policy, config, [])
    prompts = shapes.eval_prompts("validation", per_task=16, seed=PARAMS["eval"]["seed"])
    pairs = [(prompt, i) for prompt in prompts for i in range(4)]
    seeds = [derive_seed("eval", 0, i, prompt) for prompt, i in pairs]
    rows, began = [], time.perf_counter()
    for step in range(config.steps):
        phase.losses.append(flow_step(policy, config, step, phase))
        phase.step = step + 1
        if phase.step % args.every == 0:
            reward, strict = ema_reward(policy, phase, [p for p, _ in pairs], seeds)
            rows.append({"step": phase.step, "reward": reward, "strict": strict,
                         "loss": float(np.mean(phase.losses[-100:])), "seconds": time.perf_counter() - began})
            print(args.tag, rows[-1], flush=True)
    out = ROOT / "runs" / "curves" / f"{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": config.__dict__, "autoencoder_of": str(folder), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
