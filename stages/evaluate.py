"""Evaluation in the shapes world: deterministic ODE sampling, the ``shapes`` reward, a captioned grid.

Sampling is the probability-flow ODE (no noise after the seeded start), usually with more steps than
training, so two evaluations of one policy agree exactly and a change between policies is the
policy's. ``metrics.json`` holds the mean reward (fraction of requirements met), strict accuracy
(all met, GenEval's measure), both per task type; ``results.jsonl`` holds every image's verdict.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.artifacts import atomic_output, check_out_free, write_json
from stages.errors import TempflowError
from stages.flow import make_sigmas, ode_step
from stages.policies import Policy, load_policy, read_policy_record
from stages.limits import check_at_most, check_seed
from stages.progress import Progress, no_progress
from stages.rollout import derive_seed, seeded_normal

SPLITS = {
    "heldout": "pairings and compositions never trained on",
    "validation": "half of the held-out prompts, for choosing settings",
    "test": "the other half, for reporting at the chosen settings",
    "train": "the training split",
}


@dataclass
class EvalConfig:
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

    def __post_init__(self) -> None:
        for name in ("num_steps", "images_per_prompt", "batch_size"):
            if getattr(self, name) < 1:
                raise TempflowError(f"eval: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.shift > 0 or self.grid_prompts < 0:
            raise TempflowError("eval: --shift must be > 0 and --grid-prompts >= 0")
        check_seed("seed", self.seed)
        check_at_most("num-steps", self.num_steps, 1000, "every image makes one forward pass per step")
        check_at_most("shift", self.shift, 100.0, "the schedule would spend all but the last step at full noise")
        check_at_most("images-per-prompt", self.images_per_prompt, 1024, "every image is sampled, kept and scored")
        check_at_most("batch-size", self.batch_size, 65536, "one forward pass would hold that many states and activations")
        check_at_most("grid-prompts", self.grid_prompts, 1024, "grid.png draws one tile per prompt")


@torch.no_grad()
def sample_ode(policy: Policy, prompts: list[str], seeds: list[int], config: EvalConfig,
               progress: Progress = no_progress) -> np.ndarray:
    """One image per ``(prompt, seed)`` pair, uint8 ``(N, H, W, 3)``, by Euler steps of the ODE."""
    sigmas = make_sigmas(config.num_steps, config.shift)
    images = []
    for lo in range(0, len(prompts), config.batch_size):
        batch, batch_seeds = prompts[lo:lo + config.batch_size], seeds[lo:lo + config.batch_size]
        cond = policy.encode(batch)
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
    return {task: {"reward": float(np.mean([r["reward"] for r in group])),
                   "strict": float(np.mean([r["strict"] for r in group])), "images": len(group)}
            for task, group in sorted(tasks.items())}


def _grid_indices(rows: list[dict[str, Any]], count: int) -> list[int]:
    """The first image of up to ``count`` prompts, taken round-robin across task types."""
    by_task: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row["image"] == 0:
            by_task.setdefault(row["task"], []).append(i)
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
             progress: Progress = no_progress, overwrite: bool = False, source: str = "") -> EvalResult:
    """Sample ``prompts`` with the policy at ``policy_dir``, score them, write ``out/`` (metrics.json,
    results.jsonl, grid.png)."""
    from stages import shapes
    from stages.plots import image_grid

    out = Path(out)
    check_out_free(out, overwrite, (policy_dir,))
    scenes = [shapes.parse_prompt(p) for p in prompts]  # refuses prompts outside the world, before sampling
    kind = read_policy_record(policy_dir).kind
    if kind != "tiny":
        raise TempflowError(f"{policy_dir}: tempflow eval measures policies of the shapes world; a {kind} policy "
                            "draws other images: score its rollouts with `tempflow score` instead")
    policy, record = load_policy(policy_dir, device)
    pairs = [(p, i) for p in range(len(prompts)) for i in range(config.images_per_prompt)]
    seeds = [derive_seed("eval", config.seed, i, prompts[p]) for p, i in pairs]
    began = time.perf_counter()
    images = sample_ode(policy, [prompts[p] for p, _ in pairs], seeds, config, progress)
    seconds = time.perf_counter() - began

    rows = []
    for (p, i), image in zip(pairs, images):
        verdict = shapes.check(image, scenes[p])
        rows.append({"prompt": prompts[p], "task": scenes[p].task, "image": i, "reward": verdict.score, "clean": verdict.clean,
                     "strict": bool(verdict.strict),
                     "requirements": dict(zip(shapes.requirements(scenes[p]), map(bool, verdict.met)))})
    metrics = {
        "policy": {"path": str(policy_dir), "identity": record.identity, "step": record.step},
        "prompts_source": source, "prompts": len(prompts), "images": len(rows), "config": asdict(config),
        "nfe": len(rows) * config.num_steps, "sampling_seconds": seconds,
        "reward": float(np.mean([r["reward"] for r in rows])),
        "strict": float(np.mean([r["strict"] for r in rows])),
        "per_task": _per_task(rows),
    }
    shown = _grid_indices(rows, config.grid_prompts)
    with atomic_output(out, overwrite=overwrite, inputs=(policy_dir,)) as tmp:
        tmp.mkdir()
        write_json(tmp / "metrics.json", metrics)
        with open(tmp / "results.jsonl", "w") as f:
            f.writelines(_json_line(row) for row in rows)
        if shown:
            captions = [_caption(rows[i]) for i in shown]
            image_grid(images[shown], captions).save(tmp / "grid.png")
    return EvalResult(metrics=metrics)


def _caption(row: dict[str, Any]) -> str:
    """The prompt and its verdict: ``ok`` when every requirement is met, else the fraction met."""
    verdict = "ok" if row["strict"] else f"{row['reward']:.2f}"
    return f"{row['prompt']} [{verdict}]"


def _json_line(row: dict[str, Any]) -> str:
    import json

    return json.dumps(row, sort_keys=True) + "\n"


def read_eval_prompts(prompts_file: Path | None, split: str, per_task: int, seed: int) -> tuple[list[str], str]:
    """The prompts to evaluate and where they came from: a file, or a balanced subset of a split."""
    from stages import shapes
    from stages.prompts import read_prompts

    if prompts_file is not None:
        prompts = read_prompts(prompts_file)
        for line, prompt in enumerate(prompts, 1):
            try:
                shapes.parse_prompt(prompt)
            except TempflowError as err:
                raise TempflowError(f"{prompts_file}: prompt {line}: {err}") from None
        return prompts, str(prompts_file)
    if split not in SPLITS:
        raise TempflowError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return shapes.eval_prompts(split, per_task=per_task, seed=seed), f"shapes:{split}:{per_task}-per-task"
