"""Pretraining of a tiny text-to-image policy on a built-in world's rendered images.

Two phases, as a latent diffusion model is built:

1. *autoencoder* (latent presets only): a small ``AutoencoderKL`` learns to reconstruct the rendered
   images of the whole grammar, held-out pairings included (they are held out of the text-to-image
   mapping, not out of what the codec can represent; ``stages.worlds.shapes.ANY_SPLIT``), by L1 + L2
   and a KL term so small that the latents stay an autoencoder's, only kept from drifting. Its latent statistics then set ``shift_factor`` and ``scaling_factor`` (SD3's
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

from stages.artifacts.checkpoints import default_checkpoint
from stages.artifacts.policy import PolicyRecord, write_pretrain_record
from stages.artifacts.pretrain_checkpoint import PRETRAIN_PHASES, PretrainCheckpoint, PretrainState
from stages.policies.base import resolve_device, save_policy
from stages.policies.tiny import PRESETS, TinyPolicy, build_policy, model_config
from stages.support.errors import TempflowError
from stages.support.outputs import atomic_output, check_out_free
from stages.support.progress import Progress, no_progress
from stages.support.rules import Rules
from stages.support.seeds import derive_seed
from stages.worlds import WORLDS, world


@dataclass
class PretrainConfig(Rules):
    """How to pretrain a preset on a built-in world. Every field is also a ``tempflow pretrain`` option."""

    command = "pretrain"

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
        self.choice("world", WORLDS)
        self.choice("preset", PRESETS)
        self.at_least(1, "steps", "batch_size", "image_size", "autoencoder_batch_size")
        self.at_least(0, "warmup", "checkpoint_every", "autoencoder_steps")
        self.require(self.image_size % 16 == 0, "image_size", "a multiple of 16, e.g. 32 or 64")
        self.positive("sigma_shift", "learning_rate", "autoencoder_learning_rate")
        self.non_negative("weight_decay")
        self.within("ema", 0.0, 1.0, high_open=True)
        self.seeds("seed")
        self.at_most("image_size", 256, "the shapes world renders on a CPU; each image is rendered and trained on "
                     "at full size (the default run uses 32)")
        for name in ("steps", "autoencoder_steps"):
            self.at_most(name, 10**7, "at a CPU's ~0.2 s a step that is months")
        for name in ("batch_size", "autoencoder_batch_size"):
            self.at_most(name, 4096, "each step renders and holds that many images and their activations")
        for name in ("learning_rate", "autoencoder_learning_rate"):
            self.at_most(name, 1.0, "AdamW would move every weight by that much a step")
        self.at_most("weight_decay", 1.0, "AdamW would shrink the weights to nothing")
        self.at_most("sigma_shift", 100.0, "training would see no noise level but the highest")

    def learning_rate_at(self, step: int) -> float:
        """Flow matching's: linear warm-up, then cosine from the peak down to a tenth of it."""
        return warmup_cosine(self.learning_rate, step, self.warmup, self.steps)


def warmup_cosine(peak: float, step: int, warmup: int, steps: int) -> float:
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


# --------------------------------------------------------------------------------------------
# Data: one batch per (seed, phase, step)


def world_batch(config: PretrainConfig, step: int, phase: str = "flow") -> tuple[list[str], Tensor]:
    """Prompts and images in [-1, 1], ``(B, 3, H, W)``, of training step ``step`` of ``phase``: the
    codec learns every scene of the world, the flow its train prompts (the world's ``training_batch``)."""
    batch_size = config.batch_size if phase == "flow" else config.autoencoder_batch_size
    rng = np.random.default_rng([config.seed, step, PRETRAIN_PHASES.index(phase)])  # one data stream a phase
    prompts, images = world(config.world).training_batch(rng, batch_size, config.image_size, codec=phase != "flow")
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, H, W, 3) uint8 -> (B, 3, H, W)
    return prompts, x0


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


def phase_state(phase: Phase) -> PretrainState:
    """What a checkpoint keeps of a phase: its weights, EMA, frozen weights, AdamW moments, losses."""
    names = list(phase.params)
    adam = {f"{names[i]}/{k}": v for i, slots in phase.optimizer.state_dict()["state"].items() for k, v in slots.items()}
    tensors = {"param": dict(phase.params), "ema": dict(phase.ema), "frozen": dict(phase.frozen), "adam": adam}
    return PretrainState(phase.name, phase.step, phase.losses, phase.extra, tensors)


def restore_phase(ckpt: PretrainCheckpoint, state: PretrainState, phase: Phase) -> None:
    """Put a saved state of ``phase`` back into its weights, EMA and optimizer (checked to fit first)."""
    ckpt.check_fits(state, {group: {n: tuple(t.shape) for n, t in named.items()}
                            for group, named in (("param", phase.params), ("ema", phase.ema), ("frozen", phase.frozen))})
    with torch.no_grad():
        for group, named in (("param", phase.params), ("ema", phase.ema), ("frozen", phase.frozen)):
            for name, target in named.items():
                target.copy_(state.tensors[group][name])
    names = list(phase.params)
    adam: dict[int, dict[str, Tensor]] = {}
    for key, value in state.tensors["adam"].items():
        name, _, slot = key.rpartition("/")
        adam.setdefault(names.index(name), {})[slot] = value
    phase.optimizer.load_state_dict({"state": adam, "param_groups": phase.optimizer.state_dict()["param_groups"]})
    phase.step, phase.losses, phase.extra = state.step, state.losses, state.extra


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
    ckpt = PretrainCheckpoint(checkpoint or default_checkpoint(out), model_config(policy), asdict(config))
    ckpt.check_path(out)
    policy.to(device)
    saved = ckpt.load()
    began = time.perf_counter()
    autoencoder_losses, autoencoder_images = _train_autoencoder(policy, config, ckpt, saved, progress)
    flow = flow_phase(policy, config, autoencoder_losses)
    if autoencoder_losses and config.checkpoint_every:
        ckpt.save(phase_state(flow))  # the finished autoencoder: a stop before the first flow checkpoint keeps it
    if saved is not None and saved.phase == "flow":
        restore_phase(ckpt, saved, flow)  # the autoencoder's weights and latent scaling come back with it
        if policy.autoencoder is not None:
            if not isinstance(flow.extra.get("latent_scaling"), dict):
                raise ckpt.damaged("its flow phase lacks the autoencoder's latent scaling")
            policy.autoencoder.register_to_config(**flow.extra["latent_scaling"])
    resumed_from = flow.step
    _train(flow, config, config.steps, ckpt, progress, lambda step: flow_step(policy, config, step, flow))
    seconds = time.perf_counter() - began
    final_loss = _write_pretrained(policy, flow, config, out, overwrite, resumed_from, seconds)
    ckpt.remove()
    images = (config.steps - resumed_from) * config.batch_size + autoencoder_images
    return PretrainResult(steps=config.steps, resumed_from=resumed_from, final_loss=final_loss,
                          seconds=seconds, images=images,
                          resumed=f"{saved.phase} step {saved.step}" if saved is not None else "")


def _train_autoencoder(policy: TinyPolicy, config: PretrainConfig, ckpt: PretrainCheckpoint,
                       saved: PretrainState | None, progress: Progress) -> tuple[list[float], int]:
    """A latent preset's autoencoder phase (unless the checkpoint is past it) and its latent scaling;
    its losses and the images rendered for it by this run."""
    if policy.autoencoder is None or (saved is not None and saved.phase != "autoencoder"):
        return [], 0
    phase = autoencoder_phase(policy, config)
    if saved is not None:
        restore_phase(ckpt, saved, phase)
    images = (config.autoencoder_steps - phase.step) * config.autoencoder_batch_size
    _train(phase, config, config.autoencoder_steps, ckpt, progress,
           lambda step: autoencoder_step(policy, config, step, phase))
    set_latent_scaling(policy, config)
    return phase.losses, images


def _write_pretrained(policy: TinyPolicy, flow: Phase, config: PretrainConfig, out: Path, overwrite: bool,
                      resumed_from: int, seconds: float) -> float:
    """The policy folder: the EMA weights (or the raw ones), trainable as `init` leaves them, with its
    ``pretrain.json``; returns the final loss (mean of the last 100 steps)."""
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
        write_pretrain_record(tmp, report)
    return report["final_loss"]


def autoencoder_phase(policy: TinyPolicy, config: PretrainConfig) -> Phase:
    params = _named_params({"vae": policy.autoencoder})
    policy.autoencoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.autoencoder_learning_rate, betas=(0.9, 0.99),
                                  weight_decay=0.0)
    return Phase("autoencoder", params, optimizer, ema={}, losses=[], frozen={}, extra={})


def flow_phase(policy: TinyPolicy, config: PretrainConfig, autoencoder_losses: list[float]) -> Phase:
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


def _train(phase: Phase, config: PretrainConfig, steps: int, ckpt: PretrainCheckpoint, progress: Progress,
           step_fn: Callable[[int], float]) -> None:
    """Steps ``phase.step .. steps - 1`` of ``phase``, checkpointing every ``config.checkpoint_every``."""
    task = PROGRESS_TASKS[phase.name]
    progress(task, phase.step, steps)
    for step in range(phase.step, steps):
        phase.losses.append(step_fn(step))
        phase.step = step + 1
        progress(task, 1, steps)
        if config.checkpoint_every and phase.step % config.checkpoint_every == 0 and phase.step < steps:
            ckpt.save(phase_state(phase))


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


def autoencoder_step(policy: TinyPolicy, config: PretrainConfig, step: int, phase: Phase) -> float:
    _, images = world_batch(config, step, "autoencoder")
    generator = torch.Generator().manual_seed(derive_seed("autoencoder-noise", config.seed, step))
    for group in phase.optimizer.param_groups:
        group["lr"] = warmup_cosine(config.autoencoder_learning_rate, step, min(50, config.autoencoder_steps // 10),
                                    config.autoencoder_steps)
    return _optimize(phase, autoencoder_loss(policy.autoencoder, images.to(policy.device), generator))


def flow_step(policy: TinyPolicy, config: PretrainConfig, step: int, phase: Phase) -> float:
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
