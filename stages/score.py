"""The score stage: read a rollout's images, compute rewards, write one parquet row per sample."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from stages.artifacts.rollout import Rollout, check_meta
from stages.artifacts.scores import check_rewards, write_scores
from stages.rewards import RewardRuntime, RewardSpec, load_rewards, plan_rewards, score_batch
from stages.support.distributed import Ranks, gather, join, rank_device
from stages.support.errors import TempflowError
from stages.support.outputs import atomic_output, check_out_free
from stages.support.progress import Progress, no_progress
from stages.support.rules import Rules


@dataclass
class ScoreConfig(Rules):
    """How to score. Every field is also a ``tempflow score`` option."""

    command = "score"

    batch_size: int = 64
    """Images per reward call."""

    def __post_init__(self) -> None:
        self.at_least(1, "batch_size")


@dataclass
class ScoreResult:
    samples: int
    images: int
    mean: dict[str, float]  # per column: "reward" and each "reward_<name>"
    std: dict[str, float]


def run_score(
    rollout: Path,
    specs: list[RewardSpec],
    out: Path,
    config: ScoreConfig = ScoreConfig(),
    progress: Progress = no_progress,
    overwrite: bool = False,
    runtime: RewardRuntime = RewardRuntime(),
    fns: list | None = None,
) -> ScoreResult:
    """Score every image of ``rollout`` with each reward of ``specs``; write ``out`` (parquet) atomically.

    Samples that share a trajectory's image (``image_key`` in their meta) get that image's rewards.
    ``runtime`` says where model rewards run and how long a remote one may take; ``fns``, the rewards
    already loaded for ``specs`` (by :func:`~stages.rewards.load_rewards`), if a caller holds them.
    """
    check_out_free(out, overwrite, inputs=(rollout,), kind="file")
    specs = plan_rewards(specs)
    rollout = Path(rollout)
    here = join(runtime.device)
    with Rollout(rollout) as opened:
        if fns is None:
            fns = load_rewards(specs, replace(runtime, device=rank_device(runtime.device)))
        keys, image_of, scored = _score_images(opened, specs, fns, config.batch_size, progress, here)
        manifest_sha256 = opened.manifest_sha256
    scored = {key: value for part in gather(scored, here) for key, value in part.items()}  # every rank's images

    components = np.stack([scored[image_of[k]] for k in keys])  # (N, R)
    weights = np.asarray([s.weight for s in specs])
    total = components @ weights
    check_rewards(total, keys, f"the weighted total of {', '.join(s.name for s in specs)}")
    columns = {s.column: components[:, i] for i, s in enumerate(specs)}
    meta = {
        "rewards": [s.record() for s in specs],
        "rollout": str(rollout),
        "rollout_manifest_sha256": manifest_sha256,
    }
    if here.main:
        with atomic_output(out, overwrite=overwrite, inputs=(rollout,), kind="file") as tmp:
            write_scores(tmp, keys, total, columns, meta)

    named = {"reward": total, **{f"reward_{c}": v for c, v in columns.items()}}
    return ScoreResult(
        samples=len(keys), images=len(scored),
        mean={c: float(v.mean()) for c, v in named.items()}, std={c: float(v.std()) for c, v in named.items()},
    )


def _score_images(rollout: Rollout, specs: list[RewardSpec], fns: list, batch_size: int,
                  progress: Progress, here: Ranks = Ranks()) -> tuple[list[str], dict[str, str], dict[str, np.ndarray]]:
    """Every sample's key in order, the key of the sample holding its image, and the reward
    components ``(R,)`` of this rank's images (every ``world``-th, round robin; all in one process).
    Images of one rollout must share one size."""
    manifest = rollout.manifest
    keys: list[str] = []
    image_of: dict[str, str] = {}  # sample key -> key of the sample holding its image
    scored: dict[str, np.ndarray] = {}  # image key -> (components,)
    batch: list[tuple[str, np.ndarray, str]] = []

    def flush() -> None:
        images = np.stack([img for _, img, _ in batch])
        prompts = [p for _, _, p in batch]
        batch_keys = [k for k, _, _ in batch]
        scored.update(zip(batch_keys, score_batch(specs, fns, images, prompts, batch_keys)))
        progress("score", len(batch), manifest["samples"])
        batch.clear()

    images_seen = 0
    for sample in rollout.samples(fields=("meta.json", "image.png")):
        meta = sample.meta
        check_meta(sample.key, meta, manifest)
        keys.append(sample.key)
        if "image.png" in sample.fields:
            image_of[sample.key] = sample.key
            images_seen += 1
            if (images_seen - 1) % here.world != here.rank:  # another rank's image
                progress("score", 1, manifest["samples"])
                continue
            batch.append((sample.key, sample.image(), meta["prompt"]))  # of the manifest's size, 8-bit RGB
            if len(batch) == batch_size:
                flush()
        elif "image_key" in meta:
            image_of[sample.key] = meta["image_key"]
            progress("score", 1, manifest["samples"])
        else:
            raise TempflowError(f"{rollout.folder}: sample {sample.key} has neither image.png nor image_key; the rollout is damaged")
    if batch:
        flush()
    images = {key for key, owner in image_of.items() if key == owner}
    missing = sorted({owner for owner in image_of.values() if owner not in images})
    if missing:
        raise TempflowError(f"{rollout.folder}: image_key {missing[0]} names no sample with an image; the rollout is damaged")
    return keys, image_of, scored
