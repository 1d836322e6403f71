"""Evaluation of any policy on any prompts: deterministic ODE sampling, the rewards asked for, a captioned grid.

Sampling is the probability-flow ODE (no noise after the seeded start), usually with more steps than
training, so two evaluations of one policy agree exactly and a change between policies is the
policy's: the i-th image of a prompt starts from the same noise for every policy. ``metrics.json``
holds the mean, standard deviation and standard error of every reward component and of their
weighted total; with the shapes world's reward (the default) also strict accuracy (all requirements
met, GenEval's measure) and both per task type. ``results.jsonl`` holds every image's scores.
Rewards the policy was not trained on (a held-out "gold" reward) are scored the same way, so
``tempflow report`` can draw them beside the trained one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from stages.artifacts.evaluation import GRID_FILE, write_eval
from stages.artifacts.policy import PolicyRecord, read_policy_record
from stages.artifacts.prompts import read_prompts
from stages.artifacts.rollout_config import check_sampling
from stages.flow import ode_step
from stages.policies.base import Policy, load_policy, with_negative
from stages.rewards import RewardRuntime, RewardSpec, load_rewards, plan_rewards, score_batch
from stages.support.distributed import Ranks, gather, join, rank_device
from stages.support.errors import TempflowError
from stages.support.outputs import atomic_output, check_out_free
from stages.support.plots import image_grid
from stages.support.progress import Progress, no_progress
from stages.support.rules import Rules
from stages.support.seeds import derive_seed, seeded_normal
from stages.worlds import scoring_world, world
from stages.worlds.shapes import EVAL_SPLITS

# PIL is imported where the images are written, for start-up time.


@dataclass
class EvalConfig(Rules):
    """How to sample and score for an evaluation. Every field is also a ``tempflow eval`` option."""

    command = "eval"

    num_steps: int = 40
    """ODE steps (more than training uses: evaluation measures the policy, not the sampler's error)."""
    shift: float = 3.0
    """Static shift of the sigma schedule (as in training)."""
    images_per_prompt: int = 2
    """Seeds per prompt; the i-th image of every prompt starts from the same seed across policies."""
    seed: int = 0
    """Seed of the initial noise."""
    batch_size: int = 64
    """Images per forward pass."""
    grid_prompts: int = 24
    """Prompts shown in grid.png (first image of each, spread over the task types)."""
    resolution: int = 0
    """Image side in pixels, as for rollout; 0: the model's own."""
    guidance_scale: float = 0.0
    """Guidance, as for rollout; 0: the kind's default (sd3: CFG 4.5; FLUX dev-shaped: 3.5; tiny: none)."""
    negative_prompt: str = ""
    """The unconditional prompt of sd3's classifier-free guidance, as for rollout."""

    def __post_init__(self) -> None:
        self.at_least(1, "num_steps", "images_per_prompt", "batch_size")
        self.at_least(0, "grid_prompts")
        self.positive("shift")
        self.seeds("seed")
        self.at_most("num_steps", 1000, "every image makes one forward pass per step")
        self.at_most("shift", 100.0, "the schedule would spend all but the last step at full noise")
        self.at_most("images_per_prompt", 1024, "every image is sampled, kept and scored")
        self.at_most("batch_size", 65536, "one forward pass would hold that many states and activations")
        self.at_most("grid_prompts", 1024, "grid.png draws one tile per prompt")
        check_sampling(self)


@dataclass
class EvalPrompts(Rules):
    """Which prompts `tempflow eval` draws when no --prompts file is given: a task-balanced subset of
    a split of the world its reward belongs to."""

    command = "eval"

    split: str = "heldout"
    """World split to draw prompts from when --prompts is not given; validation and test are disjoint
    halves of heldout (choose settings on one, report the other)."""
    per_task: int = 16
    """Prompts per task type drawn from --split."""

    def __post_init__(self) -> None:
        self.choice("split", EVAL_SPLITS)
        self.at_least(1, "per_task")


@torch.no_grad()
def sample_ode(policy: Policy, prompts: list[str], seeds: list[int], config: EvalConfig,
               progress: Progress = no_progress) -> np.ndarray:
    """One image per ``(prompt, seed)`` pair, uint8 ``(N, H, W, 3)``, by Euler steps of the ODE on the
    policy's own schedule (with its guidance, configured by :meth:`Policy.configure_sampling`)."""
    sigmas = policy.sigmas(config.num_steps, config.shift)
    negative = policy.encode([policy.negative_prompt]) if policy.negative_prompt is not None else None
    images = []
    for lo in range(0, len(prompts), config.batch_size):
        batch, batch_seeds = prompts[lo:lo + config.batch_size], seeds[lo:lo + config.batch_size]
        cond = with_negative(policy.encode(batch), negative)
        x = seeded_normal(policy.sample_shape, batch_seeds).to(policy.device)  # (B, C, H, W)
        for i in range(config.num_steps):
            v = policy.velocity(x, sigmas[i].expand(len(batch)).to(x.device), cond)
            if not torch.isfinite(v).all():
                raise TempflowError(f"the policy's velocity is NaN or infinite at step {i} (prompt {batch[0]!r} "
                                    "or one batched with it); its weights are broken")
            x = ode_step(v, x, sigmas[i], sigmas[i + 1])
        images.append(policy.decode(x))
        progress("eval", len(batch) * config.num_steps, len(prompts) * config.num_steps)
    return np.concatenate(images)


def _per_task(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    tasks: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        tasks.setdefault(row["task"], []).append(row)
    return {task: {"reward": float(np.mean([r["met"] for r in group])),
                   "strict": float(np.mean([r["strict"] for r in group])), "images": len(group)}
            for task, group in sorted(tasks.items())}


def _grid_indices(rows: list[dict[str, Any]], count: int) -> list[int]:
    """The first image of up to ``count`` prompts, taken round-robin across task types (if any)."""
    by_task: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row["image"] == 0:
            by_task.setdefault(row.get("task", ""), []).append(i)
    picked, queues = [], [q for _, q in sorted(by_task.items())]
    while len(picked) < count and any(queues):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return picked


@dataclass
class EvalResult:
    metrics: dict[str, Any]


def run_eval(policy_dir: Path, prompts: list[str], out: Path, config: EvalConfig, device: str = "cpu",
             progress: Progress = no_progress, overwrite: bool = False, source: str = "",
             rewards: list[RewardSpec | str] | None = None, runtime: RewardRuntime | None = None,
             dtype: str = "fp32", save_images: bool = False, held: tuple[Policy, PolicyRecord] | None = None,
             fns: list | None = None) -> EvalResult:
    """Sample ``prompts`` with the policy at ``policy_dir``, score them with ``rewards`` (default: the
    shapes world's), write ``out/`` (metrics.json, results.jsonl, grid.png, and images/ with
    ``save_images``). A caller that holds the models passes them: ``held``, ``policy_dir``'s
    ``(policy, record)`` loaded in ``dtype`` on ``device``; ``fns``, the rewards loaded for ``rewards``."""
    out = Path(out)
    check_out_free(out, overwrite, (policy_dir,))
    specs = plan_rewards(rewards or ["shapes"])
    judged = scoring_world(s.name for s in specs)
    scenes = judged.parse_prompts(prompts, source) if judged else None  # refuses prompts outside it, before sampling
    read_policy_record(policy_dir)
    here, device = join(device), rank_device(device)
    if fns is None:
        fns = load_rewards(specs, runtime or RewardRuntime(device=device))  # a bad reward folder fails before sampling
    policy, record = held if held is not None else load_policy(policy_dir, device, dtype)
    sampling = policy.configure_sampling(config.resolution, config.guidance_scale, config.negative_prompt)
    pairs = [(p, i) for p in range(len(prompts)) for i in range(config.images_per_prompt)]
    seeds = [derive_seed("eval", config.seed, i, prompts[p]) for p, i in pairs]
    images, components, seconds = _sample_and_score(policy, [prompts[p] for p, _ in pairs], seeds, config,
                                                     specs, fns, progress, here)
    total = components @ np.asarray([s.weight for s in specs])

    rows = _rows(prompts, pairs, images, specs, components, total, judged, scenes, save_images)
    metrics = {
        "policy": {"path": str(policy_dir), "identity": record.identity, "step": record.step, "kind": record.kind},
        "prompts_source": source, "prompts": len(prompts), "images": len(rows), "config": asdict(config),
        "sampling": sampling, "dtype": dtype, "nfe": len(rows) * config.num_steps, "sampling_seconds": seconds,
        **_reward_stats(specs, components, total),
    }
    if scenes is not None:
        metrics.update({"strict": float(np.mean([r["strict"] for r in rows])), "per_task": _per_task(rows)})
    if here.main:
        _write_eval(out, overwrite, policy_dir, metrics, rows, images, config.grid_prompts, save_images)
    return EvalResult(metrics=metrics)


def _sample_and_score(policy: Policy, prompts: list[str], seeds: list[int], config: EvalConfig, specs: list[RewardSpec],
                      fns: list[Any], progress: Progress, here: Ranks) -> tuple[np.ndarray, np.ndarray, float]:
    """Every image and its reward components, in order, and the seconds sampling took (the slowest
    rank's). Under torchrun each rank samples and scores whole batches, round robin, so each image
    is the one a single process makes."""
    batches = here.share([list(range(lo, min(lo + config.batch_size, len(prompts))))
                          for lo in range(0, len(prompts), config.batch_size)])
    mine = [n for batch in batches for n in batch]
    began = time.perf_counter()
    images = sample_ode(policy, [prompts[n] for n in mine], [seeds[n] for n in mine], config, progress) if mine else None
    seconds = time.perf_counter() - began
    components = _score(specs, fns, images, [prompts[n] for n in mine], config.batch_size) if mine else None
    parts = [part for part in gather((mine, images, components, seconds), here) if part[0]]
    order = np.argsort(np.concatenate([part[0] for part in parts]), kind="stable")
    return (np.concatenate([part[1] for part in parts])[order], np.concatenate([part[2] for part in parts])[order],
            max(part[3] for part in parts))


def _rows(prompts: list[str], pairs: list[tuple[int, int]], images: np.ndarray, specs: list[RewardSpec],
          components: np.ndarray, total: np.ndarray, judged: ModuleType | None, scenes: list[Any] | None,
          save_images: bool) -> list[dict[str, Any]]:
    """One results row per image: its prompt, seed index, rewards, and the world's verdict when one
    of its rewards was scored."""
    rows = []
    for n, ((p, i), image) in enumerate(zip(pairs, images)):
        row = {"prompt": prompts[p], "image": i, "reward": float(total[n]),
               "rewards": {s.column: float(components[n, j]) for j, s in enumerate(specs)}}
        if judged is not None:
            row.update(judged.image_verdict(image, scenes[p]))
        if save_images:
            row["file"] = f"images/{n:05d}.png"
        rows.append(row)
    return rows


def _score(specs: list[RewardSpec], fns: list[Any], images: np.ndarray, prompts: list[str], batch: int) -> np.ndarray:
    """``(N, R)``: every component of every image, in batches."""
    keys = [f"image {n}" for n in range(len(images))]
    return np.concatenate([score_batch(specs, fns, images[lo:lo + batch], prompts[lo:lo + batch], keys[lo:lo + batch])
                           for lo in range(0, len(images), batch)])


def _reward_stats(specs: list[RewardSpec], components: np.ndarray, total: np.ndarray) -> dict[str, Any]:
    """``reward``, ``reward_std``, ``reward_se`` of the total, and under ``rewards`` each component's
    spec with its ``mean``, ``std`` and ``se``."""
    stats = _stats(total)
    per_component = {s.column: {**s.record(), **_stats(components[:, j])} for j, s in enumerate(specs)}
    return {"reward": stats["mean"], "reward_std": stats["std"], "reward_se": stats["se"], "rewards": per_component}


def _stats(values: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation (n - 1) and the standard error of the mean."""
    n = len(values)
    std = float(np.std(values, ddof=1)) if n > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "se": std / np.sqrt(n)}


def _write_eval(out: Path, overwrite: bool, policy_dir: Path, metrics: dict[str, Any], rows: list[dict[str, Any]],
                images: np.ndarray, grid_prompts: int, save_images: bool) -> None:
    from PIL import Image

    shown = _grid_indices(rows, grid_prompts)
    with atomic_output(out, overwrite=overwrite, inputs=(policy_dir,)) as tmp:
        tmp.mkdir()
        write_eval(tmp, metrics, rows)
        if shown:
            image_grid(images[shown], [_caption(rows[i]) for i in shown]).save(tmp / GRID_FILE)
        if save_images:
            (tmp / "images").mkdir()
            for row, image in zip(rows, images):
                Image.fromarray(image).save(tmp / row["file"])


def _caption(row: dict[str, Any]) -> str:
    """The prompt and its verdict: in the shapes world ``ok`` when every requirement is met, else the
    fraction met; elsewhere the total reward."""
    if "strict" in row:
        return f"{row['prompt']} [{'ok' if row['strict'] else format(row['met'], '.2f')}]"
    return f"{row['prompt']} [{row['reward']:.3g}]"


def read_eval_prompts(prompts_file: Path | None, choice: EvalPrompts, seed: int) -> tuple[list[str], str]:
    """The prompts to evaluate and where they came from: a file, or a balanced subset of a split of
    the shapes world (the default reward's)."""
    if prompts_file is not None:  # any text; a world's reward checks its grammar (run_eval)
        return read_prompts(prompts_file), str(prompts_file)
    return (world("shapes").eval_prompts(choice.split, per_task=choice.per_task, seed=seed),
            f"shapes:{choice.split}:{choice.per_task}-per-task")
