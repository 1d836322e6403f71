"""Flow-matching pretraining of a tiny text-to-image policy on a built-in world's rendered images.

Rectified-flow objective (SD3): ``x_s = (1 - s) x_0 + s eps`` with ``s`` drawn logit-normal, the
model regresses the velocity ``eps - x_0``. The text encoder learns with the transformer (it starts
random); an EMA of both is what the policy folder receives.

Every step's data and noise come from ``(seed, step)`` alone, so a run interrupted and resumed from
its checkpoint ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stages.artifacts import atomic_output, check_out_free, write_json
from stages.errors import TempflowError
from stages.policy import (
    PRESETS,
    PolicyRecord,
    TinyPolicy,
    build_policy,
    model_config,
    save_policy,
)
from stages.progress import Progress, no_progress
from stages.rollout import derive_seed

WORLDS = {"shapes": "GenEval-like coloured squares, circles and triangles on black (stages.shapes)"}
CHECKPOINT_FORMAT = "tempflow.pretrain-checkpoint/1"


@dataclass
class PretrainConfig:
    world: str = "shapes"
    """Built-in world whose rendered images and prompts (its train split) the model learns."""
    preset: str = "shapes"
    """Model architecture to build (see `tempflow init --help`)."""
    image_size: int = 32
    """Image side in pixels (32 or 64)."""
    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 64
    """Rendered images per step."""
    learning_rate: float = 1e-3
    """AdamW peak learning rate (after warm-up, then cosine decay to a tenth)."""
    warmup: int = 100
    """Steps of linear learning-rate warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    sigma_shift: float = 1.0
    """Static shift applied to the logit-normal training noise levels (3 puts as much weight on high
    noise, where the layout is decided, as sampling at shift 3 does)."""
    ema: float = 0.999
    """Decay of the exponential moving average saved as the policy (0: save the raw weights)."""
    seed: int = 0
    """Seed of the initial weights, the rendered data and the noise."""
    checkpoint_every: int = 200
    """Write the resumable checkpoint every this many steps (0: never)."""

    def __post_init__(self) -> None:
        if self.world not in WORLDS:
            raise TempflowError(f"unknown world {self.world!r}; choose one of {', '.join(WORLDS)}")
        if self.preset not in PRESETS:
            raise TempflowError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        for name in ("steps", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise TempflowError(f"pretrain: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.image_size % 16:
            raise TempflowError(f"pretrain: --image-size {self.image_size} must be a multiple of 16, e.g. 32 or 64")
        if not self.sigma_shift > 0:
            raise TempflowError(f"pretrain: --sigma-shift must be > 0, got {self.sigma_shift}")
        if not 0.0 <= self.ema < 1.0:
            raise TempflowError(f"pretrain: --ema must be in [0, 1), got {self.ema}")
        if self.learning_rate <= 0 or self.warmup < 0 or self.checkpoint_every < 0:
            raise TempflowError("pretrain: --learning-rate must be > 0, --warmup and --checkpoint-every >= 0")

    def learning_rate_at(self, step: int) -> float:
        """Linear warm-up, then cosine from the peak down to a tenth of it."""
        if step < self.warmup:
            return self.learning_rate * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class PretrainResult:
    steps: int
    resumed_from: int
    final_loss: float
    seconds: float
    images: int


# --------------------------------------------------------------------------------------------
# Data: one batch per (seed, step)


def world_batch(config: PretrainConfig, step: int) -> tuple[list[str], Tensor]:
    """Prompts and images in [-1, 1], ``(B, 3, H, W)``, of training step ``step``."""
    from stages import shapes

    rng = np.random.default_rng([config.seed, step, 0])
    scenes = [shapes.sample_scene(rng, "train") for _ in range(config.batch_size)]
    images = shapes.render_batch(scenes, rng, config.image_size)  # (B, H, W, 3) uint8
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return [scene.prompt for scene in scenes], x0


def flow_matching_loss(policy: TinyPolicy, prompts: list[str], x0: Tensor, generator: torch.Generator,
                       sigma_shift: float = 1.0) -> Tensor:
    """Mean squared error of the predicted velocity against ``eps - x0`` at logit-normal ``s``
    (then shifted like the sampling schedule: ``shift*s / (1 + (shift-1)*s)``)."""
    eps = torch.randn(x0.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))  # (B,), SD3's logit-normal(0, 1)
    sigma = sigma_shift * sigma / (1 + (sigma_shift - 1) * sigma)
    eps, sigma = eps.to(policy.device), sigma.to(policy.device)
    x0 = x0.to(policy.device)
    s = sigma.view(-1, 1, 1, 1)
    x_s = (1 - s) * x0 + s * eps
    v = policy.velocity(x_s, sigma, policy.encode_with_grad(prompts))
    return torch.nn.functional.mse_loss(v, eps - x0)


# --------------------------------------------------------------------------------------------
# Checkpoint: everything a resumed run needs, written atomically


def _named_params(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    return {f"{prefix}.{n}": p for prefix, m in sorted(modules.items()) for n, p in m.named_parameters()}


class Checkpoint:
    """``DIR/state.safetensors`` (weights, EMA, AdamW moments) + ``DIR/state.json`` (step, config, losses)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def save(self, step: int, config: PretrainConfig, params: dict[str, Tensor], ema: dict[str, Tensor],
             optimizer: torch.optim.Optimizer, losses: list[float]) -> None:
        from safetensors.torch import save_file

        names = list(params)
        tensors = {f"param/{n}": t.detach().cpu().contiguous() for n, t in params.items()}
        tensors.update({f"ema/{n}": t.cpu().contiguous() for n, t in ema.items()})
        state = optimizer.state_dict()["state"]
        tensors.update({f"adam/{names[i]}/{k}": v.cpu().contiguous().reshape(v.shape)
                        for i, s in state.items() for k, v in s.items()})
        with atomic_output(self.path, overwrite=True) as tmp:
            tmp.mkdir()
            save_file(tensors, tmp / "state.safetensors")
            write_json(tmp / "state.json", {"format": CHECKPOINT_FORMAT, "step": step, "config": asdict(config),
                                            "losses": losses})

    def load(self, config: PretrainConfig) -> dict[str, Any] | None:
        """The saved state if it belongs to this config, else None (a stale checkpoint is ignored)."""
        from safetensors.torch import load_file

        info_path = self.path / "state.json"
        if not info_path.is_file():
            return None
        try:
            info = json.loads(info_path.read_text())
            tensors = load_file(self.path / "state.safetensors")
        except (OSError, ValueError, json.JSONDecodeError):
            raise TempflowError(f"{self.path}: pretraining checkpoint is damaged; delete it to start over") from None
        if info.get("format") != CHECKPOINT_FORMAT or info.get("config") != asdict(config):
            return None
        return {"step": int(info["step"]), "losses": list(info["losses"]), "tensors": tensors}


def _restore(state: dict[str, Any], params: dict[str, nn.Parameter], ema: dict[str, Tensor],
             optimizer: torch.optim.Optimizer) -> None:
    tensors, names = state["tensors"], list(params)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"])
            ema[n].copy_(tensors[f"ema/{n}"])
    adam: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("adam/"):
            name, _, slot = key[len("adam/"):].rpartition("/")
            adam.setdefault(names.index(name), {})[slot] = value
    optimizer.load_state_dict({"state": adam, "param_groups": optimizer.state_dict()["param_groups"]})


# --------------------------------------------------------------------------------------------
# The run


def default_checkpoint(out: Path) -> Path:
    """``runs/base`` -> ``runs/base.ckpt``: beside the output, outside it (DVC deletes outputs before a run)."""
    return out.parent / f"{out.name}.ckpt"


def run_pretrain(config: PretrainConfig, out: Path, checkpoint: Path | None = None, device: str = "cpu",
                 progress: Progress = no_progress, overwrite: bool = False) -> PretrainResult:
    """Train a fresh ``config.preset`` policy on ``config.world`` and write it to the policy folder ``out``.

    The checkpoint (default ``OUT.ckpt``) is written every ``checkpoint_every`` steps and resumed
    from when its config matches; it is removed once ``out`` is complete.
    """
    out = Path(out)
    check_out_free(out, overwrite)
    ckpt = Checkpoint(checkpoint or default_checkpoint(out))
    policy = build_policy(config.preset, config.seed, {"image_size": config.image_size})
    assert isinstance(policy, TinyPolicy)
    policy.to(device)
    modules = policy.modules()
    params = _named_params(modules)
    for module in modules.values():
        module.train().requires_grad_(True)
    ema = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.learning_rate, betas=(0.9, 0.99),
                                  weight_decay=config.weight_decay)
    start, losses = 0, []
    state = ckpt.load(config)
    if state is not None:
        _restore(state, params, ema, optimizer)
        start, losses = state["step"], state["losses"]
    progress("pretrain", start, config.steps)
    began = time.perf_counter()
    for step in range(start, config.steps):
        losses.append(_train_step(policy, config, step, params, ema, optimizer))
        progress("pretrain", 1, config.steps)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
            ckpt.save(step + 1, config, params, ema, optimizer, losses)
    seconds = time.perf_counter() - began

    if config.ema:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ema[n])
    for module in modules.values():
        module.eval().requires_grad_(False)
    policy.trainable().requires_grad_(True)  # the trainable part of a policy, as `init` leaves it
    record = PolicyRecord(kind=policy.kind, model=model_config(policy))
    tail = losses[-100:]
    report = {"world": config.world, "config": asdict(config), "steps": config.steps, "resumed_from": start,
              "final_loss": float(np.mean(tail)), "losses": losses, "seconds_this_run": seconds}
    with atomic_output(out, overwrite=overwrite) as tmp:
        save_policy(policy, tmp, record)
        write_json(tmp / "pretrain.json", report)
    if ckpt.path.exists():
        import shutil

        shutil.rmtree(ckpt.path, ignore_errors=True)
    return PretrainResult(steps=config.steps, resumed_from=start, final_loss=report["final_loss"], seconds=seconds,
                          images=(config.steps - start) * config.batch_size)


def _train_step(policy: TinyPolicy, config: PretrainConfig, step: int, params: dict[str, nn.Parameter],
                ema: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> float:
    prompts, x0 = world_batch(config, step)
    generator = torch.Generator().manual_seed(derive_seed("pretrain-noise", config.seed, step))
    for group in optimizer.param_groups:
        group["lr"] = config.learning_rate_at(step)
    loss = flow_matching_loss(policy, prompts, x0, generator, config.sigma_shift)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
    optimizer.step()
    decay = min(config.ema, (1 + step) / (10 + step))  # short memory early, when the weights move fast
    with torch.no_grad():
        for n, p in params.items():
            ema[n].lerp_(p.detach(), 1 - decay)
    return float(loss.detach())
