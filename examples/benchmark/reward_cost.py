"""What a model reward costs per image on this machine.

Three measurements, through the scorers of ``stages.rewards.models``:

- the built-in rewards (``shapes`` on the shapes world's 32x32 images, the JPEG size on 512x512);
- the tiny folders ``tempflow make-tiny clip|aesthetic`` writes, scored as ``tempflow score`` scores
  (load once, then batches);
- the released models' architectures at full size (CLIP ViT-H/14 for PickScore and HPSv2, ViT-L/14
  for the aesthetic predictor, ViT-B/32 for CLIPScore as its paper uses) with random weights, since
  no weights can be downloaded here: the cost of a forward pass does not depend on the weights'
  values. The images are 512x512 (the processor resizes them to 224); prompts are about 12 tokens.

    python examples/benchmark/reward_cost.py --threads 1 --out docs/reward-cost.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stages.rewards.models import load_model_reward, mlp_head_weights
from stages.rewards.tiny import clip_config, make_tiny_reward, save_clip_parts

PROMPT = "a red circle left of a blue square on a white table"
SIZES = {  # (vision width, layers, heads, patch; text width, layers, heads; projection)
    "ViT-H/14": (1280, 32, 16, 14, 1024, 24, 16, 1024),
    "ViT-L/14": (1024, 24, 16, 14, 768, 12, 12, 768),
    "ViT-B/32": (768, 12, 12, 32, 512, 12, 8, 512),
}
REAL = {"pickscore": "ViT-H/14", "hpsv2": "ViT-H/14", "aesthetic": "ViT-L/14", "clipscore": "ViT-B/32"}


def full_size_folder(arch: str, out: Path, with_head: bool) -> Path:
    """A CLIP folder of ``arch``'s shape with random weights and the generated tokenizer."""
    from safetensors.torch import save_file
    from transformers import CLIPModel

    vw, vl, vh, patch, tw, tl, th, proj = SIZES[arch]
    vocab = save_clip_parts(out, image=224)
    config = clip_config(vocab, text=(tw, tl, th), vision=(vw, vl, vh, patch), embed=proj, image=224, mlp=4)
    CLIPModel(config).save_pretrained(out, safe_serialization=True)
    if with_head:
        save_file(mlp_head_weights([proj, 1024, 128, 64, 16, 1]), str(out / "aesthetic_head.safetensors"))
    return out


def measure(name: str, folder: Path | None, batch: int, reps: int, side: int = 512,
            prompt: str = PROMPT) -> dict[str, float]:
    """Load seconds and the fastest of ``reps`` batches' seconds per image (built-ins: no folder)."""
    from stages.rewards import REWARDS

    began = time.perf_counter()
    reward = REWARDS[name] if folder is None else load_model_reward(name, folder)
    load = time.perf_counter() - began
    images = np.random.default_rng(0).integers(0, 256, size=(batch, side, side, 3), dtype=np.uint8)
    reward(images[:1], [prompt])  # warm-up
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        reward(images, [prompt] * batch)
        times.append(time.perf_counter() - began)
    return {"load_seconds": load, "seconds_per_image": min(times) / batch, "batch": batch, "image_side": side}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3, help="Timed batches; the fastest counts (the least disturbed).")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    rows = [{"reward": "shapes", "model": "built-in, 32x32 images", **measure("shapes", None, 64, 5, 32, "a red circle")},
            {"reward": "jpeg_compressibility", "model": "built-in, 512x512 images",
             **measure("jpeg_compressibility", None, 16, 5)}]
    with tempfile.TemporaryDirectory() as scratch:
        tiny = {kind: make_tiny_reward(kind, Path(scratch) / kind) for kind in ("clip", "aesthetic")}
        for name in REAL:
            folder = tiny["aesthetic" if name == "aesthetic" else "clip"]
            rows.append({"reward": name, "model": "tiny", **measure(name, folder, 16, 5)})
            print(rows[-1], flush=True)
        for name, arch in REAL.items():
            folder = full_size_folder(arch, Path(scratch) / f"{name}-full", with_head=name == "aesthetic")
            rows.append({"reward": name, "model": f"{arch}, random weights", **measure(name, folder, args.batch, args.reps)})
            print(rows[-1], flush=True)
            for path in folder.iterdir():
                path.unlink()
    record = {"threads": args.threads, "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    print("| reward | model | load s | ms per image |\n| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['reward']} | {row['model']} | {row['load_seconds']:.2f} | {1000 * row['seconds_per_image']:.0f} |")


if __name__ == "__main__":
    main()
