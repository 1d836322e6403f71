"""Does the autoencoder of a pretraining seed reconstruct what the reward reads?

    python examples/benchmark/autoencoder_check.py --seed 1 --steps 1000 --threads 1   # 6-8 min on 1 core beside two other jobs

Trains only the autoencoder phase of params.yaml's recipe (``--steps``, ``--batch``, ``--lr`` override
it) with pretraining seed ``--seed``, and at four points along it encodes and decodes 256 rendered
train scenes and 256 held-out ones (always the same) through the latent means, then scores the
reconstructions with the shapes reward (the held-out ones: a pairing or composition the flow never
learns to draw, which the codec must still represent). A rendered scene scores 1, so the figures are the ceiling the autoencoder puts on
any policy that draws on its latents. The learning rate follows the schedule of ``--steps``, so a
point before the end is not what a shorter run would end with. Prints each row and writes
runs/autoencoder/TAG.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from base_spread import options  # noqa: E402  (this folder's)

from stages.policies.base import load_policy  # noqa: E402
from stages.policies.tiny import build_policy  # noqa: E402
from stages.pretrain import PretrainConfig, autoencoder_phase, autoencoder_step  # noqa: E402
from stages.worlds import shapes  # noqa: E402

SCENES_SEED = 123  # the reconstructed scenes: independent of the pretraining seed


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="Pretraining seed (weights, data, noise).")
    parser.add_argument("--policy", type=Path, default=None,
                        help="Instead of training: score the autoencoder of this finished base (e.g. one that "
                             "base_spread.py made) on the same scenes, and print one row.")
    parser.add_argument("--steps", type=int, default=None, help="Autoencoder steps (default: params.yaml's).")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--tag", default=None, help="Name of runs/autoencoder/TAG.json (default: sSEED-STEPS).")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if (args.seed is None) == (args.policy is None):
        parser.error("give --seed (train an autoencoder) or --policy (score a finished one)")
    if args.policy is not None and any(v is not None for v in (args.steps, args.batch, args.lr, args.tag)):
        parser.error("--steps, --batch, --lr and --tag set up training; --policy scores a finished one")
    return args


def scored(autoencoder, size: int) -> dict[str, float]:
    """Reconstruction reward and strict accuracy of the fixed train and held-out scenes."""
    row = {}
    for split in shapes.SPLITS:
        reward, strict = reconstruction_reward(autoencoder, *fixed_scenes(size, split))
        prefix = "" if split == "train" else f"{split}_"  # train keeps the names of earlier records
        row.update({f"{prefix}reward": reward, f"{prefix}strict": strict})
    return row


def recipe(args: argparse.Namespace) -> PretrainConfig:
    base = PretrainConfig(**options("pretrain", PretrainConfig))
    changes = {"autoencoder_steps": args.steps, "autoencoder_batch_size": args.batch,
               "autoencoder_learning_rate": args.lr}
    return replace(base, seed=args.seed, checkpoint_every=0, **{k: v for k, v in changes.items() if v is not None})


def fixed_scenes(size: int, split: str, count: int = 256) -> tuple[list[str], torch.Tensor]:
    rng = np.random.default_rng([SCENES_SEED, shapes.SPLITS.index(split)] if split != "train" else SCENES_SEED)
    scenes = [shapes.sample_scene(rng, split) for _ in range(count)]
    images = shapes.render_batch(scenes, rng, size)
    return [scene.prompt for scene in scenes], torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def reconstruction_reward(autoencoder, prompts: list[str], images: torch.Tensor) -> tuple[float, float]:
    autoencoder.eval()
    decoded = autoencoder.decode(autoencoder.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    autoencoder.train()
    pixels = ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return float(shapes.shapes_reward(pixels, prompts).mean()), float(shapes.shapes_strict(pixels, prompts).mean())


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    if args.policy is not None:
        policy = load_policy(args.policy)[0]
        if getattr(policy, "autoencoder", None) is None:
            sys.exit(f"--policy {args.policy}: a pixel-space policy has no autoencoder to score")
        print({"policy": str(args.policy), **scored(policy.autoencoder, policy.config.image_size)})
        return
    config = recipe(args)
    policy = build_policy(config.preset, config.seed, {"image_size": config.image_size})
    phase = autoencoder_phase(policy, config)
    every = max(1, config.autoencoder_steps // 4)
    rows, began = [], time.perf_counter()
    for step in range(config.autoencoder_steps):
        phase.losses.append(autoencoder_step(policy, config, step, phase))
        if (step + 1) % every == 0:
            row = {"step": step + 1, **scored(policy.autoencoder, config.image_size)}
            rows.append({**row, "loss": float(np.mean(phase.losses[-50:])), "seconds": time.perf_counter() - began})
            print(rows[-1], flush=True)
    out = ROOT / "runs" / "autoencoder" / f"{args.tag or f's{args.seed}-{config.autoencoder_steps}'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": asdict(config), "threads": args.threads, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
