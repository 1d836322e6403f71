"""Pretraining of a tiny text-to-image policy on a built-in world's rendered images.

Two phases, as a latent diffusion model is built:

1. *autoencoder* (latent presets only): a small ``AutoencoderKL`` learns to reconstruct the rendered
   images of the whole grammar, held-out pairings included (they are held out of the text-to-image
   mapping, not out of what the codec can represent; ``shapes.ANY_SPLIT``) (L1 + L2, and a KL term so small that the latents stay an autoencoder's, only kept from
   drifting). Its latent statistics then set ``shift_factor`` and ``scaling_factor`` (SD3's
   convention: ``latent = (mean - shift) * scale`` has mean 0 and std 1 over the world).
2. *flow*: rectified flow matching (SD3) on the states (pixels, or the frozen autoencoder's latents):
   ``x_s = (1 - s) x_0 + s eps`` with ``s`` drawn logit-normal, the model regresses the velocity
   ``eps - x_0``. The text encoder learns with the denoiser (it starts random); an EMA of both is
   what the policy folder receives.

Every step's data and noise come from ``(seed, phase, step)`` alone, so a run interrupted and
resumed from its checkpoint ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stages.artifacts import atomic_output, check_out_free, write_json
from stages.checkpoints import CheckpointFolder, default_checkpoint
from stages.errors import TempflowError
from stages.policies import (
    PRESETS,
    PolicyRecord,
    TinyPolicy,
    build_policy,
    model_config,
    resolve_device,
    save_policy,
)
from stages.limits import check_at_most, check_seed
from stages.progress import Progress, no_progress
from stages.rollout import derive_seed

WORLDS = {"shapes": "GenEval-like coloured squares, circles and triangles on black (stages.shapes)"}
CHECKPOINT_FORMAT = "tempflow.pretrain-checkpoint/4"  # /2: phases; /3: the autoencoder's scenes of both splits; /4: model in the key


@dataclass
class PretrainConfig:
    world: str = "shapes"
    """Built-in world whose rendered images the autoencoder learns (every scene) and whose train
    prompts flow matching learns."""
    preset: str = "shapes"
    """Model architecture to build (see `tempflow init --help`)."""
    image_size: int = 32
    """Image side in pixels (32 or 64)."""
    steps: int = 3000
    """Optimizer steps of flow matching."""
    batch_size: int = 64
    """Rendered images per flow-matching step."""
    autoencoder_steps: int = 2000
    """Optimizer steps of the autoencoder, trained before the flow (latent presets only). At 1,000 the
    reconstructions of one seed in three still missed a requirement of 22 % of scenes (BENCHMARKS.md)."""
    autoencoder_batch_size: int = 16
    """Rendered images per autoencoder step."""
    autoencoder_learning_rate: float = 2e-3
    """AdamW peak learning rate of the autoencoder (warm-up of 50 steps, then cosine to a tenth)."""
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
    """Largest decay of the exponential moving average saved as the policy (0: save the raw weights).
    Step s (from 0) decays by min(ema, (1 + s) / (10 + s)): after 3,000 steps the warm-up has reached
    only 3000 / 3009 = 0.99701, so in a run that short any larger ema saves the same weights."""
    seed: int = 0
    """Seed of the initial weights, the rendered data and the noise."""
    checkpoint_every: int = 200
    """Write the resumable checkpoint every this many steps (0: never)."""

    def __post_init__(self) -> None:
        if self.world not in WORLDS:
            raise TempflowError(f"unknown world {self.world!r}; choose one of {', '.join(WORLDS)}")
        if self.preset not in PRESETS:
            raise TempflowError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        for name in ("steps", "batch_size", "image_size", "autoencoder_batch_size"):
            if getattr(self, name) < 1:
                raise TempflowError(f"pretrain: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.image_size % 16:
            raise TempflowError(f"pretrain: --image-size {self.image_size} must be a multiple of 16, e.g. 32 or 64")
        if not self.sigma_shift > 0:
            raise TempflowError(f"pretrain: --sigma-shift must be > 0, got {self.sigma_shift}")
        if not 0.0 <= self.ema < 1.0:
            raise TempflowError(f"pretrain: --ema must be in [0, 1), got {self.ema}")
        for name in ("learning_rate", "autoencoder_learning_rate"):
            if not getattr(self, name) > 0:
                raise TempflowError(f"pretrain: --{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("warmup", "checkpoint_every", "autoencoder_steps"):
            if getattr(self, name) < 0:
                raise TempflowError(f"pretrain: --{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        check_seed("seed", self.seed)
        check_at_most("image-size", self.image_size, 256, "the shapes world renders on a CPU; each image is rendered "
                      "and trained on at full size (the default run uses 32)")
        for name in ("steps", "autoencoder_steps"):
            check_at_most(name.replace("_", "-"), getattr(self, name), 10**7, "at a CPU's ~0.2 s a step that is months")
        for name in ("batch_size", "autoencoder_batch_size"):
            check_at_most(name.replace("_", "-"), getattr(self, name), 4096,
                          "each step renders and holds that many images and their activations")
        for name in ("learning_rate", "autoencoder_learning_rate"):
            check_at_most(name.replace("_", "-"), getattr(self, name), 1.0, "AdamW would move every weight by that much a step")
        check_at_most("weight-decay", self.weight_decay, 1.0, "AdamW would shrink the weights to nothing")
        check_at_most("sigma-shift", self.sigma_shift, 100.0, "training would see no noise level but the highest")

    def learning_rate_at(self, step: int) -> float:
        """Flow matching's: linear warm-up, then cosine from the peak down to a tenth of it."""
        return _warmup_cosine(self.learning_rate, step, self.warmup, self.steps)


def _warmup_cosine(peak: float, step: int, warmup: int, steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``peak`` down to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class PretrainResult:
    steps: int
    resumed_from: int
    """Flow-matching step the run resumed at (0: it started afresh or in the autoencoder phase)."""
    final_loss: float
    seconds: float
    images: int
    """Images rendered and trained on by this run, both phases."""
    resumed: str = ""
    """Where this run took up its checkpoint, e.g. ``autoencoder step 400``; empty for a fresh start."""


PHASES = ("flow", "autoencoder")  # index = the phase's stream of rendered data


# --------------------------------------------------------------------------------------------
# Data: one batch per (seed, phase, step)


def world_batch(config: PretrainConfig, step: int, phase: str = "flow") -> tuple[list[str], Tensor]:
    """Prompts and images in [-1, 1], ``(B, 3, H, W)``, of training step ``step`` of ``phase``."""
    from stages import shapes

    batch_size = config.batch_size if phase == "flow" else config.autoencoder_batch_size
    rng = np.random.default_rng([config.seed, step, PHASES.index(phase)])
    split = "train" if phase == "flow" else shapes.ANY_SPLIT  # the codec learns every image; the flow, train prompts
    scenes = [shapes.sample_scene(rng, split) for _ in range(batch_size)]
    images = shapes.render_batch(scenes, rng, config.image_size)  # (B, H, W, 3) uint8
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return [scene.prompt for scene in scenes], x0


def flow_matching_loss(policy: TinyPolicy, prompts: list[str], x0: Tensor, generator: torch.Generator,
                       sigma_shift: float = 1.0) -> Tensor:
    """Mean squared error of the predicted velocity against ``eps - x0`` at logit-normal ``s``
    (then shifted like the sampling schedule: ``shift*s / (1 + (shift-1)*s)``). ``x0``: states."""
    eps = torch.randn(x0.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))  # (B,), SD3's logit-normal(0, 1)
    sigma = sigma_shift * sigma / (1 + (sigma_shift - 1) * sigma)
    eps, sigma = eps.to(policy.device), sigma.to(policy.device)
    x0 = x0.to(policy.device)
    s = sigma.view(-1, 1, 1, 1)
    x_s = (1 - s) * x0 + s * eps
    v = policy.velocity(x_s, sigma, policy.encode_with_grad(prompts))
    return torch.nn.functional.mse_loss(v, eps - x0)


AUTOENCODER_KL_WEIGHT = 1e-4
"""Weight of the KL to N(0, I) per latent element: small enough to keep the reconstructions sharp (the
reward reads shapes off thresholded pixels), large enough that the latents do not drift in scale."""


def autoencoder_loss(autoencoder: nn.Module, images: Tensor, generator: torch.Generator) -> Tensor:
    """L1 + L2 reconstruction of ``images`` in [-1, 1] through a sampled latent, plus the small KL."""
    posterior = autoencoder.encode(images).latent_dist
    latent = posterior.sample(generator=generator)
    error = autoencoder.decode(latent).sample - images
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
    return error.abs().mean() + error.square().mean() + AUTOENCODER_KL_WEIGHT * kl


@torch.no_grad()
def set_latent_scaling(policy: TinyPolicy, config: PretrainConfig, images: int = 512) -> None:
    """SD3's ``shift_factor`` and ``scaling_factor`` from the trained autoencoder's latent means of
    ``images`` rendered scenes: the flow then starts from states of mean 0 and std 1, like its noise."""
    autoencoder = policy.autoencoder
    autoencoder.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    sample = replace(config, autoencoder_batch_size=images)
    held_back = config.autoencoder_steps  # the step after the last: a batch the autoencoder never trained on
    latents = policy.encode_images(world_batch(sample, held_back, "autoencoder")[1].to(policy.device))
    autoencoder.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))


# --------------------------------------------------------------------------------------------
# Checkpoint: everything a resumed run needs, written atomically


def _named_params(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    return {f"{prefix}.{n}": p for prefix, m in sorted(modules.items()) for n, p in m.named_parameters()}


@dataclass
class Phase:
    """One training phase's state: what it trains, its optimizer, its EMA (flow only), its losses."""

    name: str
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: dict[str, Tensor]
    losses: list[float]
    frozen: dict[str, nn.Parameter]
    """Weights trained by an earlier phase that this phase keeps fixed (saved with it, for a resume)."""
    extra: dict[str, Any]
    """JSON state besides tensors (the latent scaling set between the phases)."""
    step: int = 0


class Checkpoint(CheckpointFolder):
    """``DIR/state.safetensors`` (weights, EMA, AdamW moments, earlier phases' weights) + ``DIR/state.json``
    (phase, step, config, model, losses). A checkpoint resumes only the same options on the same model
    config: a preset changed in between (e.g. without the pooled text) starts afresh."""

    def __init__(self, path: Path, model: dict[str, Any]) -> None:
        super().__init__(path, "tempflow.pretrain-checkpoint/", "pretraining")
        self.model = model

    def save(self, phase: Phase, config: PretrainConfig) -> None:
        names = list(phase.params)
        tensors = {f"param/{n}": t for n, t in phase.params.items()}
        tensors.update({f"ema/{n}": t for n, t in phase.ema.items()})
        tensors.update({f"frozen/{n}": t for n, t in phase.frozen.items()})
        state = phase.optimizer.state_dict()["state"]
        tensors.update({f"adam/{names[i]}/{k}": v.reshape(v.shape) for i, s in state.items() for k, v in s.items()})
        self.write(tensors, {"format": CHECKPOINT_FORMAT, "phase": phase.name, "step": phase.step,
                             "config": asdict(config), "model": self.model, "losses": phase.losses,
                             "extra": phase.extra})

    def load(self, config: PretrainConfig) -> dict[str, Any] | None:
        """The saved state if it belongs to this config, else None (a stale checkpoint is ignored)."""
        saved = self.read()
        if saved is None:
            return None
        info, tensors = saved
        if (info.get("format") != CHECKPOINT_FORMAT or info.get("config") != asdict(config)
                or info.get("model") != self.model or info.get("phase") not in PHASES):
            return None
        return {"phase": info["phase"], "step": int(info["step"]), "losses": list(info["losses"]),
                "extra": dict(info.get("extra") or {}), "tensors": tensors}

    def restore(self, state: dict[str, Any], phase: Phase) -> None:
        """Put a saved state of ``phase`` back into its weights, EMA and optimizer."""
        tensors, names = state["tensors"], list(phase.params)
        wanted = {**{f"param/{n}": p for n, p in phase.params.items()}, **{f"ema/{n}": t for n, t in phase.ema.items()},
                  **{f"frozen/{n}": p for n, p in phase.frozen.items()}}
        for key, target in wanted.items():
            if key not in tensors or tensors[key].shape != target.shape or not torch.isfinite(tensors[key]).all():
                raise self.damaged(f"{key} is missing, misshapen or not finite")
        unknown = [key for key in tensors if key.startswith(("param/", "ema/", "frozen/")) and key not in wanted]
        unknown += [key for key in tensors if key.startswith("adam/") and key[5:].rpartition("/")[0] not in names]
        if unknown:
            raise self.damaged(f"{unknown[0]} is not a weight of this model")
        with torch.no_grad():
            for key, target in wanted.items():
                target.copy_(tensors[key])
        adam: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("adam/"):
                name, _, slot = key[len("adam/"):].rpartition("/")
                adam.setdefault(names.index(name), {})[slot] = value
        phase.optimizer.load_state_dict({"state": adam, "param_groups": phase.optimizer.state_dict()["param_groups"]})
        phase.step, phase.losses, phase.extra = state["step"], state["losses"], state["extra"]


# --------------------------------------------------------------------------------------------
# The run


def run_pretrain(config: PretrainConfig, out: Path, checkpoint: Path | None = None, device: str = "cpu",
                 progress: Progress = no_progress, overwrite: bool = False) -> PretrainResult:
    """Train a fresh ``config.preset`` policy on ``config.world`` and write it to the policy folder ``out``.

    The checkpoint (default ``OUT.ckpt``) is written every ``checkpoint_every`` steps of either phase
    and resumed from when its config matches; it is removed once ``out`` is complete.
    """
    out = Path(out)
    check_out_free(out, overwrite)
    resolve_device(device)
    policy = build_policy(config.preset, config.seed, {"image_size": config.image_size})
    assert isinstance(policy, TinyPolicy)
    ckpt = Checkpoint(checkpoint or default_checkpoint(out), model_config(policy))
    ckpt.check_path(out)
    policy.to(device)
    state = ckpt.load(config)
    began = time.perf_counter()
    autoencoder_losses: list[float] = []
    autoencoder_images = 0  # rendered for the autoencoder by this run (none when resumed past it)
    if policy.autoencoder is not None and (state is None or state["phase"] == "autoencoder"):
        phase = _autoencoder_phase(policy, config)
        if state is not None:
            ckpt.restore(state, phase)
        autoencoder_images = (config.autoencoder_steps - phase.step) * config.autoencoder_batch_size
        _train(phase, config, config.autoencoder_steps, ckpt, progress,
               lambda step: _autoencoder_step(policy, config, step, phase))
        set_latent_scaling(policy, config)
        autoencoder_losses = phase.losses

    flow = _flow_phase(policy, config, autoencoder_losses)
    if autoencoder_losses and config.checkpoint_every:
        ckpt.save(flow, config)  # the finished autoencoder: a stop before the first flow checkpoint keeps it
    if state is not None and state["phase"] == "flow":
        ckpt.restore(state, flow)  # the autoencoder's weights and latent scaling come back with it
        if policy.autoencoder is not None:
            policy.autoencoder.register_to_config(**flow.extra["latent_scaling"])
    resumed_from = flow.step
    _train(flow, config, config.steps, ckpt, progress, lambda step: _flow_step(policy, config, step, flow))
    seconds = time.perf_counter() - began

    if config.ema:
        with torch.no_grad():
            for n, p in flow.params.items():
                p.copy_(flow.ema[n])
    for module in policy.modules().values():
        module.eval().requires_grad_(False)
    policy.trainable().requires_grad_(True)  # the trainable part of a policy, as `init` leaves it
    record = PolicyRecord(kind=policy.kind, model=model_config(policy))
    report = {"world": config.world, "config": asdict(config), "steps": config.steps, "resumed_from": resumed_from,
              "final_loss": float(np.mean(flow.losses[-100:])), "losses": flow.losses, "seconds_this_run": seconds}
    if policy.autoencoder is not None:
        report["autoencoder"] = {"steps": config.autoencoder_steps, **flow.extra}
    with atomic_output(out, overwrite=overwrite) as tmp:
        save_policy(policy, tmp, record)
        write_json(tmp / "pretrain.json", report)
    ckpt.remove()
    images = (config.steps - resumed_from) * config.batch_size + autoencoder_images
    return PretrainResult(steps=config.steps, resumed_from=resumed_from, final_loss=report["final_loss"],
                          seconds=seconds, images=images,
                          resumed=f"{state['phase']} step {state['step']}" if state is not None else "")


def _autoencoder_phase(policy: TinyPolicy, config: PretrainConfig) -> Phase:
    params = _named_params({"vae": policy.autoencoder})
    policy.autoencoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.autoencoder_learning_rate, betas=(0.9, 0.99),
                                  weight_decay=0.0)
    return Phase("autoencoder", params, optimizer, ema={}, losses=[], frozen={}, extra={})


def _flow_phase(policy: TinyPolicy, config: PretrainConfig, autoencoder_losses: list[float]) -> Phase:
    """The denoiser and the text encoder learn; the autoencoder, if any, is frozen (and checkpointed
    with its latent scaling and its phase's losses)."""
    modules = {name: m for name, m in policy.modules().items() if m is not policy.autoencoder}
    params = _named_params(modules)
    for module in modules.values():
        module.train().requires_grad_(True)
    ema = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.learning_rate, betas=(0.9, 0.99),
                                  weight_decay=config.weight_decay)
    frozen, extra = {}, {}
    if policy.autoencoder is not None:
        policy.autoencoder.eval().requires_grad_(False)
        frozen = _named_params({"vae": policy.autoencoder})
        latent = policy.autoencoder.config
        extra = {"latent_scaling": {"shift_factor": latent.shift_factor, "scaling_factor": latent.scaling_factor},
                 "losses": autoencoder_losses}
    return Phase("flow", params, optimizer, ema, [], frozen, extra)


def _train(phase: Phase, config: PretrainConfig, steps: int, ckpt: Checkpoint, progress: Progress,
           step_fn: Callable[[int], float]) -> None:
    """Steps ``phase.step .. steps - 1`` of ``phase``, checkpointing every ``config.checkpoint_every``."""
    task = PROGRESS_TASKS[phase.name]
    progress(task, phase.step, steps)
    for step in range(phase.step, steps):
        phase.losses.append(step_fn(step))
        phase.step = step + 1
        progress(task, 1, steps)
        if config.checkpoint_every and phase.step % config.checkpoint_every == 0 and phase.step < steps:
            ckpt.save(phase, config)


PROGRESS_TASKS = {"autoencoder": "autoencoder", "flow": "pretrain"}


def _optimize(phase: Phase, loss: Tensor) -> float:
    phase.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(list(phase.params.values()), 1.0)
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        raise TempflowError(
            f"pretrain: {phase.name} step {phase.step + 1}: loss {float(loss.detach()):g}, gradient norm {float(grad_norm):g}; "
            "stopped before the weights became non-finite (the last checkpoint is kept). Lower the learning rate"
        )
    phase.optimizer.step()
    return float(loss.detach())


def _autoencoder_step(policy: TinyPolicy, config: PretrainConfig, step: int, phase: Phase) -> float:
    _, images = world_batch(config, step, "autoencoder")
    generator = torch.Generator().manual_seed(derive_seed("autoencoder-noise", config.seed, step))
    for group in phase.optimizer.param_groups:
        group["lr"] = _warmup_cosine(config.autoencoder_learning_rate, step, min(50, config.autoencoder_steps // 10),
                                     config.autoencoder_steps)
    return _optimize(phase, autoencoder_loss(policy.autoencoder, images.to(policy.device), generator))


def _flow_step(policy: TinyPolicy, config: PretrainConfig, step: int, phase: Phase) -> float:
    prompts, images = world_batch(config, step)
    generator = torch.Generator().manual_seed(derive_seed("pretrain-noise", config.seed, step))
    for group in phase.optimizer.param_groups:
        group["lr"] = config.learning_rate_at(step)
    loss = _optimize(phase, flow_matching_loss(policy, prompts, policy.encode_images(images), generator,
                                               config.sigma_shift))
    decay = min(config.ema, (1 + step) / (10 + step))  # short memory early, when the weights move fast
    with torch.no_grad():
        for n, p in phase.params.items():
            phase.ema[n].lerp_(p.detach(), 1 - decay)
    return loss
