"""The update stage: one GRPO iteration on a scored rollout, written as a new policy folder.

1. Check that the rollout was sampled by this policy and that the scores belong to the rollout.
2. One pass over the shards' ``meta.json`` only: per-step group advantages and step weights.
3. ``inner_epochs`` passes streaming the shards (memory bounded by the batch and shuffle buffer,
   not by the rollout): recompute ``log p_new`` of each stored ``x_{k+1}`` given ``x_k``, clipped
   GRPO loss + ``beta`` * KL to the reference policy, AdamW, grad-norm clipping.
4. The very first step runs with the sampling policy's weights, so every ratio must be 1 up to float
   error; a drift there means the trainer is not scoring what the sampler sampled, and the update
   stops rather than train on a silently biased objective.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stages.artifacts.optimizer import load_optimizer, save_optimizer
from stages.artifacts.policy import PolicyRecord, read_policy_record, record_inputs
from stages.artifacts.rollout import STATE_FIELDS, Rollout, Sample, check_meta, read_rollout_seconds, seed_group
from stages.artifacts.scores import check_keys_match, read_scores, reward_column
from stages.artifacts.update_record import read_step_spread, write_metrics, write_update
from stages.flow import KL_FORMS, group_advantages, grpo_loss, kl_scale, kl_to_reference, noise_aware_weights, sde_step
from stages.policies.base import Cond, Policy, index_cond, load_policy, save_policy, with_negative
from stages.support.distributed import Ranks, gather, join, rank_device
from stages.support.errors import TempflowError
from stages.support.limits import check_memory
from stages.support.outputs import atomic_output, check_out_free
from stages.support.progress import Progress, no_progress
from stages.support.rules import Rules
from stages.support.threads import prefetched

# DistributedDataParallel is imported only when several processes train, for start-up time.


WEIGHTINGS = {
    "auto": "noise-aware on tempflow rollouts, uniform on flow-grpo ones (each paper's choice)",
    "noise-aware": "w_k = std_k / mean std (TempFlow-GRPO)",
    "uniform": "w_k = 1 (Flow-GRPO)",
}
ADV_GROUPS = {
    "rollout": "the rollout's own groups: (prompt, seed, step) for tempflow, prompt for flow-grpo",
    "seed": "(prompt, seed, step): branches sharing x_k",
    "prompt": "(prompt, step) across seeds",
}
ADV_STDS = {"group": "the group's std", "global": "the rollout's std"}


@dataclass
class UpdateConfig(Rules):
    """How to train on one rollout. Every field is also a ``tempflow update`` option."""

    command = "update"

    learning_rate: float = 3e-4
    """AdamW learning rate."""
    beta: float = 0.004
    """Weight of the KL to the reference policy (0 turns it off and skips the reference model). Its scale
    depends on --kl-form: 0.004 is TempFlow-GRPO's with the exact form; Flow-GRPO's 0.04 is meant for its own."""
    kl_form: str = "exact"
    """Which KL term beta weighs."""
    clip_range: float = 1e-4
    """eps, PPO clip range of the ratio (Flow-GRPO's 1e-4 at SD3 scale; the tiny preset wants ~1e-2)."""
    adv_clip: float = 5.0
    """Advantages are clipped to [-adv_clip, adv_clip]."""
    adv_group: str = "rollout"
    """Advantage groups: rollout, seed or prompt."""
    adv_std: str = "group"
    """Normalise by the group's std ('group') or the whole rollout's ('global', a Flow-GRPO option)."""
    weighting: str = "auto"
    """Per-step loss weights: auto, noise-aware or uniform."""
    inner_epochs: int = 1
    """Passes over the rollout."""
    batch_size: int = 32
    """Samples per optimizer step."""
    shuffle_buffer: int = 256
    """Samples held for shuffling while streaming (memory scales with it, not with the rollout)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    ratio_tolerance: float = 1e-3
    """Largest |ratio - 1| accepted on the first step, where the policy still equals the sampler."""
    seed: int = 0
    """Seed of the shuffling."""

    def __post_init__(self) -> None:
        self.choice("weighting", WEIGHTINGS)
        self.choice("adv_group", ADV_GROUPS)
        self.choice("kl_form", KL_FORMS)
        self.choice("adv_std", ADV_STDS)
        self.positive("learning_rate", "clip_range", "adv_clip", "max_grad_norm", "ratio_tolerance")
        self.non_negative("beta", "weight_decay")
        self.at_least(1, "inner_epochs", "batch_size", "shuffle_buffer")
        self.seeds("seed")
        self.at_most("learning_rate", 1.0, "AdamW moves every weight by about the learning rate each step, which "
                     "wrecks any model past 1")
        self.at_most("beta", 1e3, "the KL term would drown the reward; papers use 0.001-0.04, each in its own --kl-form")
        self.at_most("weight_decay", 1.0, "AdamW would shrink the weights to nothing")
        self.at_most("clip_range", 1.0, "a ratio clipped at 1 +- eps >= 1 is not clipped")
        self.at_most("ratio_tolerance", 1.0, "a first-step ratio off by more than 1 is never on-policy")
        self.at_most("adv_clip", 1e3, "normalised advantages past that are outliers, not signal")
        self.at_most("inner_epochs", 1000, "each pass reads the whole rollout again")
        self.at_most("batch_size", 65536, "a batch that size would need its activations many times over in memory")
        self.at_most("shuffle_buffer", 10**7, "the buffer holds that many samples in memory")


@dataclass
class Plan:
    """What the meta pass decides for every sample: its advantage, its policy-loss weight and the
    factor its KL term is reweighted by (:func:`draw_factors`)."""

    advantage: dict[str, float]
    weight: dict[str, float]
    kl_factor: dict[str, float]
    rewards: np.ndarray
    skipped_groups: int
    groups: int
    step_spread: list[float | None] | None = None
    """Per step of ``0..T-2``, :func:`step_reward_spread` of this rollout (tempflow only)."""
    trained_rewards: tuple[str, ...] = ()
    """The reward components (columns) the scores' total is made of, weight 0 left out (a component
    scored only to be watched): what this update trains toward."""

    @property
    def active(self) -> int:
        return sum(1 for a in self.advantage.values() if a != 0.0)


def resolved_weighting(config: UpdateConfig, algo: str) -> str:
    if config.weighting != "auto":
        return config.weighting
    return "noise-aware" if algo == "tempflow" else "uniform"


def group_label(meta: dict[str, Any], mode: str) -> str:
    """The advantage group of a sample under ``mode`` (see :data:`ADV_GROUPS`)."""
    if mode == "rollout":
        return str(meta["group"])
    if mode == "seed":
        return seed_group(meta["prompt_index"], meta["seed"], meta["step"])
    return f"p{meta['prompt_index']}-k{meta['step']}"


def draw_factors(manifest: dict[str, Any]) -> list[float]:
    """Per step ``k`` of ``0..T-2``, ``mean_j pi_j / pi_k`` when the rollout drew its steps at random
    (``step_inclusion``), else 1: the Horvitz-Thompson correction. A step drawn with chance ``pi_k``
    counts ``1 / pi_k`` times; the constant ``mean pi = N / (T-1)`` keeps a mean over the drawn steps'
    samples on the scale of the all-steps mean. Both loss terms take it: the policy loss through
    :func:`step_weights`, the KL through ``Plan.kl_factor``. For the same noise, the expected loss
    over the draws is then the all-steps loss, and so is its expected gradient, with ``--adv-std
    group`` (a global std would depend on the draw) and up to two things the estimator does not
    model: a minibatch averages over its samples with a non-zero advantage, and gradient clipping is
    not linear. ``sampled:N`` has equal chances: every factor is 1."""
    T = len(manifest["sigmas"]) - 1
    pi = manifest["step_inclusion"]
    if pi is None:
        return [1.0] * (T - 1)
    mean_pi = sum(pi) / len(pi)
    return [mean_pi / p for p in pi]


def step_weights(manifest: dict[str, Any], weighting: str) -> list[float]:
    """Each step's policy-loss weight: ``w_k`` (noise-aware or 1) times its :func:`draw_factors` entry."""
    T = len(manifest["sigmas"]) - 1
    if weighting == "noise-aware":
        weights = noise_aware_weights(torch.tensor(manifest["sigmas"]), manifest["config"]["noise_level"]).tolist()
    else:
        weights = [1.0] * (T - 1)
    return [w * f for w, f in zip(weights, draw_factors(manifest))]


def plan_update(rollout: Rollout, scores_path: Path, config: UpdateConfig) -> Plan:
    """Join scores to the rollout by key and compute per-sample advantages and weights."""
    manifest = rollout.manifest
    columns, score_meta = read_scores(scores_path)
    if score_meta["rollout_manifest_sha256"] != rollout.manifest_sha256:
        raise TempflowError(
            f"{scores_path} was computed for another rollout than {rollout.folder} (manifest hash differs); "
            f"run `tempflow score --rollout {rollout.folder}` again"
        )
    metas = {s.key: s.meta for s in rollout.samples(fields=("meta.json",))}
    for key, meta in metas.items():
        check_meta(key, meta, manifest)
    check_keys_match(columns["key"], metas, scores_path, rollout.folder)
    algo = manifest["config"]["algo"]
    if config.adv_group == "seed" and algo != "tempflow":
        raise TempflowError(
            f"--adv-group seed needs several branches per seed; a {algo} rollout has one trajectory per seed: "
            "use --adv-group prompt or rollout"
        )
    keys = list(columns["key"])
    rewards = columns["reward"].astype(np.float64)
    labels = [group_label(metas[k], config.adv_group) for k in keys]
    adv = group_advantages(torch.from_numpy(rewards), labels, clip=config.adv_clip,
                           global_std=config.adv_std == "global").numpy()
    per_step, factors = step_weights(manifest, resolved_weighting(config, algo)), draw_factors(manifest)
    weights = [per_step[metas[k]["step"]] for k in keys]
    groups = set(labels)
    trained_groups = {label for label, a in zip(labels, adv) if a != 0.0}
    spread = step_reward_spread([metas[k] for k in keys], rewards, len(per_step)) if algo == "tempflow" else None
    return Plan(
        advantage=dict(zip(keys, adv.tolist())), weight=dict(zip(keys, weights)),
        kl_factor={k: factors[metas[k]["step"]] for k in keys}, rewards=rewards,
        skipped_groups=len(groups - trained_groups), groups=len(groups), step_spread=spread,
        trained_rewards=tuple(reward_column(r["name"]) for r in score_meta["rewards"] if r["weight"] != 0),
    )


def step_reward_spread(metas: list[dict[str, Any]], rewards: np.ndarray, steps: int) -> list[float | None]:
    """Per step ``k`` of ``0..steps-1``: the mean over the rollout's branch groups at ``k`` (the K
    branches that share one ``x_k``) of their rewards' standard deviation; None where nothing branched.
    A step whose branches all score alike teaches nothing: this is what ``spread:N`` draws by."""
    by_group: dict[str, list[float]] = {}
    step_of: dict[str, int] = {}
    for meta, reward in zip(metas, rewards):
        by_group.setdefault(meta["group"], []).append(float(reward))
        step_of[meta["group"]] = meta["step"]
    per_step: dict[int, list[float]] = {}
    for group, values in by_group.items():
        per_step.setdefault(step_of[group], []).append(float(np.std(values)))
    return [float(np.mean(per_step[k])) if k in per_step else None for k in range(steps)]


def carried_spread(measured: list[float | None] | None, previous: list[float | None] | None) -> list[float | None] | None:
    """This update's spread per step, a step this rollout did not branch at keeping the estimate the
    sampling policy carried (so that ``spread:N``, which branches at N steps, keeps one for every step)."""
    if measured is None:
        return None
    previous = previous or [None] * len(measured)
    return [now if now is not None else before for now, before in zip(measured, previous)]


def shuffled(items: Iterable[Sample], buffer_size: int, rng: random.Random) -> Iterator[Sample]:
    """Streaming shuffle with a fixed-size buffer (holds at most ``buffer_size`` samples)."""
    buffer: list[Sample] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class Batch:
    state: Tensor  # (B, C, H, W) x_k
    next: Tensor  # (B, C, H, W) x_{k+1}
    sigma: Tensor  # (B,)
    sigma_next: Tensor  # (B,)
    log_prob_old: Tensor  # (B,)
    advantage: Tensor  # (B,)
    weight: Tensor  # (B,)
    kl_factor: Tensor  # (B,)
    prompt_index: list[int]
    scale: float = 1.0
    """world x (this rank's rows / the global batch's): the gradients all-reduced as a mean over ranks
    are the global batch's mean. 1 in one process; 0 for a rank's stand-in row that weighs nothing."""
    global_size: int = 0
    """Rows of the global batch (all ranks); 0: this batch's own."""


def make_batch(samples: list[Sample], plan: Plan, manifest: dict[str, Any]) -> Batch:
    metas = [s.meta for s in samples]
    for sample, meta in zip(samples, metas):
        check_meta(sample.key, meta, manifest)
    return Batch(
        state=torch.from_numpy(np.stack([s.state() for s in samples])).float(),
        next=torch.from_numpy(np.stack([s.next() for s in samples])).float(),
        sigma=torch.tensor([m["sigma"] for m in metas], dtype=torch.float32),
        sigma_next=torch.tensor([m["sigma_next"] for m in metas], dtype=torch.float32),
        log_prob_old=torch.tensor([m["log_prob"] for m in metas], dtype=torch.float32),
        advantage=torch.tensor([plan.advantage[s.key] for s in samples], dtype=torch.float32),
        weight=torch.tensor([plan.weight[s.key] for s in samples], dtype=torch.float32),
        kl_factor=torch.tensor([plan.kl_factor[s.key] for s in samples], dtype=torch.float32),
        prompt_index=[m["prompt_index"] for m in metas],
    )


# --------------------------------------------------------------------------------------------
# The training loop


@dataclass
class Stats:
    """Running sums of the per-step metrics."""

    steps: int = 0
    loss: float = 0.0
    policy_loss: float = 0.0
    kl: float = 0.0
    clipped: int = 0
    samples: int = 0
    ratio_min: float = float("inf")
    ratio_max: float = float("-inf")
    ratio_sum: float = 0.0
    grad_norms: list[float] = field(default_factory=list)
    first_step_ratio_deviation: float = 0.0


class Trainer:
    """GRPO steps on one policy. ``cond`` is the rollout's stored conditioning, one row per prompt;
    the KL reference is ``reference`` (another policy) or the policy's own built-in one (a LoRA
    adapter disabled)."""

    def __init__(self, policy: Policy, reference: Policy | None, cond: Cond, noise_level: float,
                 config: UpdateConfig, here: Ranks = Ranks()) -> None:
        self.policy, self.reference, self.config, self.noise_level = policy, reference, config, noise_level
        self.cond, self.here = cond, here
        policy.prepare_training()
        self.named_params = policy.trainable_parameters()
        self.params = [p for _, p in self.named_params]
        self.ddp = None
        if here.world > 1:  # gradients averaged over the ranks during the backward pass
            from torch.nn.parallel import DistributedDataParallel

            device = torch.device(policy.device)
            self.ddp = DistributedDataParallel(policy.trainable(), device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.stats = Stats()
        self.last: tuple[Tensor, Tensor, Cond] | None = None  # the last batch's inputs, for check_result

    def step(self, batch: Batch) -> None:
        cfg, device = self.config, self.policy.device
        cond = index_cond(self.cond, batch.prompt_index, device)
        shape = (-1,) + (1,) * (batch.state.ndim - 1)
        sigma, sigma_next = batch.sigma.reshape(shape).to(device), batch.sigma_next.reshape(shape).to(device)
        state, nxt = batch.state.to(device), batch.next.to(device)
        with self.policy.trainable_called_through(self.ddp) if self.ddp is not None else nullcontext():
            v = self.policy.velocity(state, batch.sigma.to(device), cond)
        new = sde_step(v, state, sigma, sigma_next, self.noise_level, prev_sample=nxt)
        log_prob_old = batch.log_prob_old.to(device)
        ratio = torch.exp(new.log_prob - log_prob_old).detach()
        if self.stats.steps == 0 and batch.scale > 0:  # every rank checks its own rows
            self._check_on_policy(ratio)
        policy_loss = grpo_loss(new.log_prob, log_prob_old, batch.advantage.to(device), batch.weight.to(device),
                                cfg.clip_range).mean()
        kl = torch.zeros((), device=device)
        if cfg.beta > 0:
            with torch.no_grad():
                v_ref = self._reference_velocity(state, batch.sigma.to(device), cond)
                ref = sde_step(v_ref, state, sigma, sigma_next, self.noise_level, prev_sample=nxt)
            scale = kl_scale(cfg.kl_form, sigma, sigma_next, self.noise_level)
            kl = (batch.kl_factor.to(device) * kl_to_reference(new.mean, ref.mean, scale)).mean()
        loss = policy_loss + cfg.beta * kl
        if batch.scale != 1.0:  # several ranks: each one's share of the global batch's mean
            loss, policy_loss, kl = batch.scale * loss, batch.scale * policy_loss, batch.scale * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            raise TempflowError(
                f"update step {self.stats.steps + 1}: loss {float(loss.detach()):g}, gradient norm {float(grad_norm):g} "
                f"(policy loss {float(policy_loss.detach()):g}, kl {float(kl.detach()):g} at --beta {cfg.beta:g}); nothing was "
                "written. Lower --learning-rate or --beta, or check the policy's weights"
            )
        self.optimizer.step()
        self._record(loss, policy_loss, kl, ratio if batch.scale > 0 else ratio[:0], grad_norm)
        self.last = (state, batch.sigma.to(device), cond)

    def _reference_velocity(self, state: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        if self.reference is not None:
            return self.reference.velocity(state, sigma, cond)
        builtin = self.policy.builtin_reference()
        if builtin is None:
            raise TempflowError("--beta > 0 needs a KL reference; this policy has no built-in one")
        with builtin:
            return self.policy.velocity(state, sigma, cond)

    @torch.no_grad()
    def check_result(self) -> None:
        """The trained weights, and the velocity they give on the last batch, must be finite: a
        policy that cannot sample is never written."""
        for name, param in self.named_params:
            if not torch.isfinite(param).all():
                raise TempflowError(f"the update made parameter {name} NaN or infinite; nothing was written. "
                                    f"Lower --learning-rate (now {self.config.learning_rate:g})")
        if self.last is not None and not torch.isfinite(self.policy.velocity(*self.last)).all():
            raise TempflowError(
                f"after the update the policy's velocity is NaN or infinite on its own training samples; nothing "
                f"was written. Lower --learning-rate (now {self.config.learning_rate:g})"
            )

    def _check_on_policy(self, ratio: Tensor) -> None:
        deviation = float((ratio - 1).abs().max())
        self.stats.first_step_ratio_deviation = deviation
        if not deviation <= self.config.ratio_tolerance:
            raise TempflowError(
                f"first-step importance ratio is off by {deviation:.3g} (tolerance {self.config.ratio_tolerance:g}): "
                "the trained policy does not reproduce the log-probs it sampled with. Causes: a different policy "
                "or dtype/device than the rollout's, or batch-size-dependent kernels; roll out and update with "
                "the same policy, dtype and device (or raise --ratio-tolerance if the drift is understood)"
            )

    def _record(self, loss: Tensor, policy_loss: Tensor, kl: Tensor, ratio: Tensor, grad_norm: Tensor) -> None:
        s = self.stats
        s.steps += 1
        s.loss += float(loss.detach())
        s.policy_loss += float(policy_loss.detach())
        s.kl += float(kl.detach())
        s.clipped += int(((ratio - 1).abs() > self.config.clip_range).sum())
        s.samples += ratio.numel()
        if ratio.numel():
            s.ratio_min = min(s.ratio_min, float(ratio.min()))
            s.ratio_max = max(s.ratio_max, float(ratio.max()))
        s.ratio_sum += float(ratio.sum())
        s.grad_norms.append(float(grad_norm))

    def metrics(self) -> dict[str, float]:
        """The run's metrics; with several ranks, over all of them (every rank must call this)."""
        s = merge_stats(gather(self.stats, self.here)) if self.here.world > 1 else self.stats
        n = max(s.steps, 1)
        return {
            "optimizer_steps": s.steps,
            "loss": s.loss / n,
            "policy_loss": s.policy_loss / n,
            "kl": s.kl / n,
            "clip_fraction": s.clipped / max(s.samples, 1),
            "ratio_min": s.ratio_min if s.samples else 1.0,
            "ratio_mean": s.ratio_sum / s.samples if s.samples else 1.0,
            "ratio_max": s.ratio_max if s.samples else 1.0,
            "first_step_ratio_deviation": s.first_step_ratio_deviation,
            "grad_norm": float(np.mean(s.grad_norms)) if s.grad_norms else 0.0,
            "grad_norm_max": max(s.grad_norms, default=0.0),
        }


def merge_stats(parts: list[Stats]) -> Stats:
    """The ranks' running sums as one run's: each rank's loss is its scaled share of the global
    mean, so the shares add up; the gradient norm is the all-reduced one, the same on every rank."""
    first = parts[0]
    world = len(parts)
    return Stats(
        steps=first.steps,
        loss=sum(p.loss for p in parts) / world, policy_loss=sum(p.policy_loss for p in parts) / world,
        kl=sum(p.kl for p in parts) / world,
        clipped=sum(p.clipped for p in parts), samples=sum(p.samples for p in parts),
        ratio_min=min(p.ratio_min for p in parts), ratio_max=max(p.ratio_max for p in parts),
        ratio_sum=sum(p.ratio_sum for p in parts), grad_norms=list(first.grad_norms),
        first_step_ratio_deviation=max(p.first_step_ratio_deviation for p in parts),
    )


@dataclass
class UpdateResult:
    metrics: dict[str, Any]
    record: PolicyRecord | None = None
    """The new policy's record (its identity): rank 0's; other ranks write nothing."""


def resolve_reference(policy_dir: Path, record: PolicyRecord, reference_dir: Path | None) -> tuple[Path, str]:
    """The KL reference's folder and identity: ``--reference``; else the one recorded in the policy
    (its path relative to the policy folder); else the policy itself (the run's first update)."""
    if reference_dir is not None:
        ref = read_policy_record(reference_dir)
        if (ref.kind, ref.model) != (record.kind, record.model):
            raise TempflowError(
                f"--reference {reference_dir} is another model than --policy {policy_dir} (kind or config differ); "
                "give the policy this run started from"
            )
        return Path(reference_dir), ref.identity
    if record.reference:
        return policy_dir / record.reference["path"], record.reference["identity"]
    return policy_dir, record.identity


def sample_as_recorded(policy: Policy, rollout: Rollout) -> None:
    """Set ``policy`` to sample as the rollout recorded: resolution, guidance, negative prompt."""
    manifest, where = rollout.manifest, rollout.folder / "manifest.json"
    sampling = manifest["sampling"]
    policy.configure_sampling(sampling["resolution"], sampling["guidance_scale"] or 0.0, sampling["negative_prompt"] or "")
    if list(policy.sample_shape) != manifest["sample_shape"] or policy.negative_prompt != sampling["negative_prompt"]:
        raise TempflowError(f"{where}: sampled states {manifest['sample_shape']} with {sampling}, which this policy "
                            f"cannot reproduce (its states are {list(policy.sample_shape)})")


def rollout_conditioning(policy: Policy, rollout: Rollout) -> Cond:
    """``policy`` set to sample as the rollout did, and the rollout's stored conditioning for it
    (text encoders never run in an update)."""
    sample_as_recorded(policy, rollout)
    cond, negative = rollout.embeddings()
    if (negative is None) != (policy.negative_prompt is None):
        raise TempflowError(f"{rollout.folder}: the stored embeddings {'lack' if negative is None else 'hold'} a "
                            "negative prompt's, unlike the manifest's sampling; the rollout is damaged")
    return with_negative(cond, negative)


def load_reference(ref_path: Path, ref_identity: str, policy_dir: Path, device: str, dtype: str = "fp32") -> Policy:
    """The frozen KL reference, refused when missing or no longer the policy the run started from."""
    if not (ref_path / "config.json").is_file():
        raise TempflowError(
            f"reference policy {ref_path} (recorded in {policy_dir}/config.json) not found; "
            "pass --reference with the policy the run started from, or --beta 0"
        )
    reference, loaded = load_policy(ref_path, device, dtype)  # checks the weights against loaded.identity
    if loaded.identity != ref_identity:
        raise TempflowError(f"reference policy {ref_path} changed since this run started from it; pass --reference")
    reference.trainable().eval().requires_grad_(False)
    return reference


def _batches(rollout: Rollout, plan: Plan, config: UpdateConfig, rng: random.Random,
             here: Ranks = Ranks()) -> Iterator[Batch]:
    """``inner_epochs`` streamed, shuffled passes over the samples with a non-zero advantage, in
    batches of ``batch_size`` (each pass's last one may be smaller). Every rank draws the same
    global batches and decodes its own rows of each."""
    for _ in range(config.inner_epochs):
        active = (s for s in rollout.samples(fields=("meta.json", *STATE_FIELDS))
                  if plan.advantage[s.key] != 0.0)
        batch: list[Sample] = []
        for sample in shuffled(active, config.shuffle_buffer, rng):
            batch.append(sample)
            if len(batch) == config.batch_size:
                yield _rank_batch(batch, plan, rollout.manifest, here)
                batch = []
        if batch:
            yield _rank_batch(batch, plan, rollout.manifest, here)


def _rank_batch(samples: list[Sample], plan: Plan, manifest: dict[str, Any], here: Ranks) -> Batch:
    """This rank's rows of a global batch. A rank left without rows (a last batch smaller than the
    world) computes the first row at scale 0, so that every rank takes part in every step."""
    mine = here.share(samples)
    batch = make_batch(mine or samples[:1], plan, manifest)
    batch.scale, batch.global_size = here.world * len(mine) / len(samples), len(samples)
    return batch


def _train(trainer: Trainer, rollout: Rollout, plan: Plan, progress: Progress, prefetch: bool = True) -> None:
    """Train on :func:`_batches`; with ``prefetch``, the next two are read and decoded on a thread
    while the current one trains (the same batches in the same order)."""
    config = trainer.config
    trainer.policy.trainable().train()
    torch.manual_seed(config.seed)
    batches = _batches(rollout, plan, config, random.Random(config.seed), trainer.here)
    total = plan.active * config.inner_epochs
    for batch in prefetched(batches, depth=2) if prefetch else batches:
        trainer.step(batch)
        progress("update", batch.global_size, total)
    trainer.policy.trainable().eval()
    trainer.check_result()


def run_update(
    policy_dir: Path,
    rollout: Path,
    scores: Path,
    out: Path,
    config: UpdateConfig,
    reference_dir: Path | None = None,
    metrics_path: Path | None = None,
    device: str = "cpu",
    progress: Progress = no_progress,
    overwrite: bool = False,
    prefetch: bool = True,
    held_policy: Policy | None = None,
    held_reference: Policy | None = None,
) -> UpdateResult:
    """Train ``policy_dir`` on ``rollout`` scored by ``scores``; write the new policy folder ``out``.
    The models run in the dtype the rollout sampled with: in any other, the first-step ratio would
    differ from 1 by less than its tolerance while biasing every step. With ``prefetch`` the next
    batches are read on a thread while one trains; the trained weights are the same either way.

    A caller that holds the models passes them instead of their folders being loaded:
    ``held_policy``, ``policy_dir``'s weights in the rollout's dtype on ``device`` (trained in place),
    and ``held_reference``, the KL reference :func:`load_reference` gave (never the same object)."""
    began = time.perf_counter()
    here, device = join(device), rank_device(device)
    policy_dir, rollout, scores, out = Path(policy_dir), Path(rollout), Path(scores), Path(out)
    own_record = read_policy_record(policy_dir)
    ref_path, ref_identity = resolve_reference(policy_dir, own_record, reference_dir)
    # the recorded KL reference is read too, and a real kind's base model folder
    inputs = (policy_dir, rollout, scores, ref_path, *record_inputs(own_record))
    check_out_free(out, overwrite, inputs)
    if metrics_path is not None:
        check_out_free(metrics_path, overwrite, inputs, kind="file", outputs=(out,))
    with Rollout(rollout) as opened:
        manifest = opened.manifest
        run_dtype = manifest["dtype"]
        policy, record = (held_policy, own_record) if held_policy is not None else load_policy(policy_dir, device, run_dtype)
        _check_sampled_by(opened, record, policy_dir)
        buffered = config.shuffle_buffer + 2 * config.batch_size  # and two prefetched batches
        check_memory(f"--shuffle-buffer {config.shuffle_buffer}",
                     3 * buffered * 4 * math.prod(opened.shape), "lower --shuffle-buffer")
        plan = plan_update(opened, scores, config)
        # read before training, so that a damaged metrics.json stops the update before its work
        previous_spread = read_step_spread(policy_dir, len(manifest["sigmas"]) - 1) if plan.step_spread else None
        cond = rollout_conditioning(policy, opened)
        reference = None
        builtin = policy.builtin_reference() is not None
        if config.beta > 0 and not builtin:
            reference = held_reference or load_reference(ref_path, ref_identity, policy_dir, device, run_dtype)
            sample_as_recorded(reference, opened)
        elif builtin and reference_dir is not None and read_policy_record(reference_dir).step != 0:
            raise TempflowError(f"--reference {reference_dir} is a trained policy; a LoRA policy's KL reference is its "
                                "base model (the adapter disabled): give the policy `tempflow init` made, or none")
        trainer = Trainer(policy, reference, cond, manifest["config"]["noise_level"], config, here)
        names = [n for n, _ in trainer.named_params]
        resumed = load_optimizer(trainer.optimizer, names, policy_dir)
        for group in trainer.optimizer.param_groups:  # this update's hyper-parameters win over stored ones
            group.update(lr=config.learning_rate, weight_decay=config.weight_decay)
        _train(trainer, opened, plan, progress, prefetch)

    metrics = {"step": record.step + 1, **_plan_metrics(plan, manifest, config), "dtype": run_dtype,
               "optimizer_resumed": resumed,
               "step_reward_spread": carried_spread(plan.step_spread, previous_spread),
               **trainer.metrics(), "rollout_seconds": read_rollout_seconds(rollout),
               "update_seconds": time.perf_counter() - began}
    provenance = {"config": asdict(config), "policy": str(policy_dir), "rollout": str(rollout),
                  "rollout_manifest_sha256": opened.manifest_sha256, "scores": str(scores)}
    new_record = PolicyRecord(
        kind=record.kind, model=record.model, step=record.step + 1,
        reference={"path": os.path.relpath(ref_path, out), "identity": ref_identity},
    )
    if not here.main:  # the same weights on every rank: rank 0 writes them
        return UpdateResult(metrics=metrics)
    with atomic_output(out, overwrite=overwrite, inputs=inputs) as tmp:
        save_policy(policy, tmp, new_record)
        save_optimizer(trainer.optimizer, names, tmp)
        write_update(tmp, metrics, provenance)
    if metrics_path is not None:
        with atomic_output(metrics_path, overwrite=overwrite, inputs=inputs, kind="file") as tmp:
            write_metrics(tmp, metrics)
    return UpdateResult(metrics=metrics, record=new_record)


def _plan_metrics(plan: Plan, manifest: dict[str, Any], config: UpdateConfig) -> dict[str, Any]:
    """What the update trained on: the rollout's algorithm, weighting, samples, groups and rewards."""
    algo = manifest["config"]["algo"]
    return {
        "algo": algo,
        "weighting": resolved_weighting(config, algo),
        "step_reweighting": "inclusion" if manifest["step_inclusion"] else "none",
        "kl_form": config.kl_form,
        "beta": config.beta,
        "samples": len(plan.advantage),
        "trained_samples": plan.active,
        "skipped_samples": len(plan.advantage) - plan.active,
        "groups": plan.groups,
        "skipped_groups": plan.skipped_groups,
        "reward_mean": float(plan.rewards.mean()),
        "reward_std": float(plan.rewards.std()),
        "trained_rewards": list(plan.trained_rewards),
        "rollout_nfe": manifest["nfe"],
    }


def _check_sampled_by(rollout: Rollout, record: PolicyRecord, policy_dir: Path) -> None:
    sampled_by = rollout.manifest["policy"]["identity"]
    if sampled_by != record.identity:
        raise TempflowError(
            f"{rollout.folder} was sampled by policy {sampled_by[:12]}, but --policy {policy_dir} is "
            f"{record.identity[:12]}: GRPO trains the policy that sampled; roll out with {policy_dir} first"
        )
