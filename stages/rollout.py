"""The rollout stage: sample trajectories with the current policy and write trained transitions.

Algorithms (DESIGN.md §2-§3):

* ``tempflow`` — walk each (prompt, seed) *main path* by ODE; at each branch step ``k`` draw ``K``
  SDE samples of ``x_{k+1}`` from the main path's ``x_k`` and finish each branch by ODE. A branch's
  reward belongs to step ``k`` alone. The branch step reuses the main path's velocity (no extra
  forward); finishing costs ``T - k - 1`` forwards. Continuations of every branch of a chunk of
  main paths are batched together, whatever their step, with a per-sample sigma.
* ``flow-grpo`` — ``G`` trajectories per prompt, SDE at every step ``0 .. T-2``; each transition of a
  trajectory shares its final image.
* ``flow-grpo-fast`` — ODE, an SDE window of ``w`` steps starting at a step drawn in
  ``[0, T/2 - w]``, then ODE; only the window's transitions are written.

All randomness comes from seeds derived from ``(config.seed, prompt, seed index, step, branch)``, so
the noise does not depend on batching, and the same config (batch size included: CPU kernels round
differently for other batch shapes, by ~1e-7) gives byte-identical shards.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stages.artifacts.rollout import (
    next_state,
    sample_fields,
    seed_group,
    shard_writer,
    state_digest,
    write_embeddings,
    write_manifest,
    write_timing,
)
from stages.artifacts.rollout_config import RolloutConfig, StepPlan
from stages.artifacts.shards import ShardWriter
from stages.artifacts.update_record import read_step_spread
from stages.flow import ode_step, sde_step
from stages.policies.base import Cond, Policy, dtype_name, index_cond, with_negative
from stages.support.distributed import Ranks, gather, join
from stages.support.errors import TempflowError
from stages.support.limits import check_memory
from stages.support.outputs import check_out_free, shared_output
from stages.support.progress import Progress, no_progress
from stages.support.seeds import derive_seed, seeded_normal
from stages.support.threads import Worker


def select_prompts(prompts: list[str], config: RolloutConfig) -> list[str]:
    """The prompts of this rollout: all of them, or ``prompts_per_rollout`` drawn with the seed (in file order)."""
    n = config.prompts_per_rollout
    if n == 0 or n >= len(prompts):
        return list(prompts)
    picked = random.Random(derive_seed(config.seed, "prompts")).sample(range(len(prompts)), n)
    return [prompts[i] for i in sorted(picked)]


@dataclass
class Trajectory:
    prompt_index: int
    seed_index: int
    seed: int  # the seed of the initial noise


@dataclass
class Transition:
    """One SDE step ``x_k -> x_{k+1} = mean + std * noise``, the noise drawn from ``noise_seed``, and
    the sampler's log-prob of it."""

    state: Tensor
    mean: Tensor
    std: float
    noise_seed: int
    next: Tensor
    log_prob: float


@dataclass
class Branch:
    """A tempflow branch waiting to be finished by ODE."""

    traj: Trajectory
    step: int  # k, the branch step
    branch: int  # b
    move: Transition
    x: Tensor  # current state of the continuation
    path: list[int]  # sigma indices still ahead of it, the first being the one x is at


def sde_transitions(out: Any, state: Tensor, mean: Tensor, noise_seeds: list[int]) -> list[Transition]:
    """The rows of one batched :func:`~stages.flow.sde_step` (``mean``: the one its rows share, or its own)."""
    std = out.std.reshape(-1).expand(len(noise_seeds))
    return [Transition(state[n], mean[n], float(std[n]), seed, out.prev_sample[n], float(out.log_prob[n]))
            for n, seed in enumerate(noise_seeds)]


def sample_key(traj: Trajectory, step: int, branch: int) -> str:
    return f"p{traj.prompt_index:05d}_s{traj.seed_index:03d}_k{step:03d}_b{branch:02d}"


@dataclass
class RolloutResult:
    samples: int
    nfe: int
    shards: int
    trained_steps: list[int] = field(default_factory=list)
    prompts: int = 0
    decodes: int = 0


class _Sampler:
    """Shared plumbing of the algorithms: model calls with NFE counting, and sample writing."""

    def __init__(self, policy: Policy, prompts: list[str], config: RolloutConfig, writer: ShardWriter,
                 sigmas: Tensor, plan: StepPlan, progress: Progress, jobs: Worker | None = None,
                 share: float = 1.0) -> None:
        self.policy, self.prompts, self.config, self.writer, self.jobs = policy, prompts, config, writer, jobs
        self.sigmas, self.steps = sigmas, plan.steps
        self.sigma_values = [float(v) for v in sigmas]
        # every trajectory costs the same: this process's part of the plan is its part of the trajectories
        self.total_nfe = round(share * planned_nfe(config, len(prompts), plan.steps))
        self.total_decodes = round(share * planned_decodes(config, len(prompts), plan.steps))
        self.progress = progress
        self.nfe = self.decodes = 0
        self.cond, self.negative = encode_prompts(policy, prompts)
        self.cond_all = with_negative(self.cond, self.negative)

    @torch.no_grad()
    def velocity(self, x: Tensor, at: Tensor, prompt_index: list[int]) -> Tensor:
        """Velocity for states ``x`` at sigma indices ``at`` (one per row)."""
        device = self.policy.device
        v = self.policy.velocity(x.to(device), self.sigmas[at].to(device), index_cond(self.cond_all, prompt_index, device))
        if not torch.isfinite(v).all():
            row = int((~torch.isfinite(v)).flatten(1).any(1).nonzero()[0])
            raise TempflowError(
                f"the policy's velocity is NaN or infinite at step {int(at[row])} for prompt "
                f"{self.prompts[prompt_index[row]]!r}; its weights are broken (was it trained at too high a "
                "learning rate?). Nothing was written"
            )
        self.nfe += x.shape[0]
        self.progress("rollout", x.shape[0], self.total_nfe)
        return v.cpu()

    def sigma_pair(self, at: Tensor, to: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(s_at, s_to)`` per row (``to`` defaults to ``at + 1``), shaped to broadcast against ``(B, C, H, W)``."""
        shape = (-1,) + (1,) * len(self.policy.sample_shape)
        return self.sigmas[at].reshape(shape), self.sigmas[at + 1 if to is None else to].reshape(shape)

    def decode(self, x: Tensor) -> np.ndarray:
        """Final states to images (the VAE decode each reward call reads), counted."""
        self.decodes += x.shape[0]
        return self.policy.decode(x)

    def initial_noise(self, trajs: list[Trajectory]) -> Tensor:
        return seeded_normal(self.policy.sample_shape, [t.seed for t in trajs])

    def write(self, traj: Trajectory, step: int, branch: int, move: Transition, group: str, image: np.ndarray | None,
              image_key: str | None = None, state_key: str | None = None, state_refs: int = 0) -> str:
        """Write one sample; it holds ``x_k`` and the mean unless ``state_key`` names the (earlier)
        sample that does, and says in ``state_refs`` how many later samples will name it."""
        key = sample_key(traj, step, branch)
        if not (math.isfinite(move.log_prob) and torch.isfinite(move.state).all() and torch.isfinite(move.next).all()):
            raise TempflowError(f"sample {key} (step {step}): its log-prob or states are NaN or infinite; nothing "
                                f"was written. Check --shift ({self.config.shift:g}) and --noise-level "
                                f"({self.config.noise_level:g}), or the policy's weights")
        meta = {
            "prompt": self.prompts[traj.prompt_index], "prompt_index": traj.prompt_index,
            "seed": traj.seed, "seed_index": traj.seed_index, "group": group, "step": step, "branch": branch,
            "sigma": self.sigma_values[step], "sigma_next": self.sigma_values[step + 1],
            "log_prob": float(move.log_prob), "algo": self.config.algo,
            "noise_seed": move.noise_seed, "std": move.std,
        }
        if image_key is not None:
            meta["image_key"] = image_key
        if state_key is not None:
            meta["state_key"] = state_key
        else:
            meta["state_refs"] = state_refs
        if self.jobs is None:
            self._store(key, meta, move, state_key is None, image)
        else:  # encoded and written on the writer thread, in this order, while the model goes on
            self.jobs.submit(self._store, key, meta, move, state_key is None, image)
        return key

    def _store(self, key: str, meta: dict[str, Any], move: Transition, holds_state: bool,
               image: np.ndarray | None) -> None:
        nxt = move.next.numpy()
        meta["next_sha256"] = state_digest(nxt)
        # what a reader will make of the mean and the noise seed, checked here once, bit for bit
        if not np.array_equal(next_state(move.mean.numpy(), move.std, move.noise_seed), nxt):
            raise TempflowError(f"sample {key}: x_(k+1) is not its mean plus std times the noise of its seed, bit for "
                                "bit; the rollout cannot be stored (a bug: please report it)")
        state = (move.state.numpy(), move.mean.numpy()) if holds_state else None
        self.writer.write(key, sample_fields(meta, state, image))


def encode_prompts(policy: Policy, prompts: list[str]) -> tuple[Cond, Cond | None]:
    """Each prompt's conditioning (float32, CPU), 64 prompts per text-encoder call, and the negative
    prompt's when the policy's guidance uses one: the text encoders run once per rollout."""
    chunks = [policy.encode(prompts[i:i + 64]) for i in range(0, len(prompts), 64)]
    cond = {name: torch.cat([c[name].float().cpu() for c in chunks]) for name in chunks[0]}
    negative = None
    if policy.negative_prompt is not None:
        negative = {name: t.float().cpu() for name, t in policy.encode([policy.negative_prompt]).items()}
    policy.release_text_encoders()
    return cond, negative


def policy_sigmas(policy: Policy, config: RolloutConfig) -> Tensor:
    """The policy's schedule for this config (FLUX's depends on the resolution), strictly falling to 0."""
    sigmas = policy.sigmas(config.num_steps, config.shift).to(torch.float32)
    if sigmas.shape != (config.num_steps + 1,) or float(sigmas[0]) != 1.0 or float(sigmas[-1]) != 0.0 \
            or not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise TempflowError(f"the {policy.kind} policy's schedule for {config.num_steps} steps is not {config.num_steps + 1} "
                            "sigmas falling from 1 to 0; use more or fewer --num-steps")
    return sigmas


def _trajectories(config: RolloutConfig, num_prompts: int) -> list[Trajectory]:
    return [
        Trajectory(p, j, derive_seed(config.seed, "noise", p, j))
        for p in range(num_prompts) for j in range(config.seeds_per_prompt)
    ]


def planned_nfe(config: RolloutConfig, num_prompts: int, steps: list[int]) -> int:
    """Forward passes the rollout will make (the cost the benchmark compares), for its trained ``steps``."""
    n, T = num_prompts * config.seeds_per_prompt, config.num_steps
    if config.algo != "tempflow":
        return n * T
    main = n * (steps[-1] + 1)  # the main path stops at the last branch step
    return main + n * config.branches * sum(len(config.finish_path(k)) - 1 for k in steps)


def planned_decodes(config: RolloutConfig, num_prompts: int, steps: list[int]) -> int:
    """Images the rollout decodes, one per reward call: one per branch (tempflow), per trajectory (flow-grpo)."""
    n = num_prompts * config.seeds_per_prompt
    return n * config.branches * len(steps) if config.algo == "tempflow" else n


def _tempflow(s: _Sampler, chunks: list[list[Trajectory]]) -> None:
    cfg = s.config
    steps = s.steps
    for chunk in chunks:
        pool: list[Branch] = []
        x = s.initial_noise(chunk)  # (B, C, H, W)
        pis = [t.prompt_index for t in chunk]
        for i in range(steps[-1] + 1):
            at = torch.full((len(chunk),), i)
            v = s.velocity(x, at, pis)
            sigma, sigma_next = s.sigma_pair(at)
            if i in steps:
                mean = None  # the SDE mean depends on x_k alone: the branches share branch 0's
                for b in range(cfg.branches):
                    seeds = [derive_seed(t.seed, "branch", i, b) for t in chunk]
                    out = sde_step(v, x, sigma, sigma_next, cfg.noise_level, noise=seeded_normal(s.policy.sample_shape, seeds))
                    mean = out.mean if mean is None else mean
                    pool += [Branch(t, i, b, move, move.next, cfg.finish_path(i))
                             for t, move in zip(chunk, sde_transitions(out, x, mean, seeds))]
                _advance_branches(s, pool, drain=False)  # keeps at most a batch plus one step's branches
            x = ode_step(v, x, sigma, sigma_next)
        _advance_branches(s, pool, drain=True)


def _advance_branches(s: _Sampler, pool: list[Branch], drain: bool) -> None:
    """Run pending branches to s_T = 0 by ODE along their finish paths, ``batch_size`` rows at a
    time across groups and steps (per-row sigmas), writing each as it finishes. Works while a full
    batch is pending, or until ``pool`` (mutated in place) is empty when ``drain``."""
    size = s.config.batch_size
    while len(pool) >= size or (drain and pool):
        batch = pool[:size]
        del pool[:size]
        at, to = torch.tensor([br.path[0] for br in batch]), torch.tensor([br.path[1] for br in batch])
        x = torch.stack([br.x for br in batch])
        v = s.velocity(x, at, [br.traj.prompt_index for br in batch])
        x = ode_step(v, x, *s.sigma_pair(at, to))
        for n, br in enumerate(batch):
            br.x, br.path = x[n], br.path[1:]
        done = [n for n, br in enumerate(batch) if len(br.path) == 1]
        for img, n in zip(s.decode(x[done]) if done else [], done):
            # branch 0 holds the group's x_k and finishes first (the pool keeps its order): the others name it
            br = batch[n]
            group = seed_group(br.traj.prompt_index, br.traj.seed, br.step)
            holder = sample_key(br.traj, br.step, 0) if br.branch else None
            s.write(br.traj, br.step, br.branch, br.move, group, img, state_key=holder,
                    state_refs=0 if br.branch else s.config.branches - 1)
        pool[:0] = [br for br in batch if len(br.path) > 1]  # unfinished rows keep their place in the batch


def _flow_grpo(s: _Sampler, chunks: list[list[Trajectory]]) -> None:
    cfg = s.config
    window = set(s.steps)
    for chunk in chunks:
        pis = [t.prompt_index for t in chunk]
        x = s.initial_noise(chunk)
        transitions: list[tuple[int, list[Transition]]] = []  # (step, one per trajectory)
        for i in range(cfg.num_steps):
            at = torch.full((len(chunk),), i)
            v = s.velocity(x, at, pis)
            sigma, sigma_next = s.sigma_pair(at)
            if i in window:
                seeds = [derive_seed(t.seed, "sde", i) for t in chunk]
                out = sde_step(v, x, sigma, sigma_next, cfg.noise_level, noise=seeded_normal(s.policy.sample_shape, seeds))
                transitions.append((i, sde_transitions(out, x, out.mean, seeds)))
                x = out.prev_sample
            else:
                x = ode_step(v, x, sigma, sigma_next)
        images = s.decode(x)
        for n, traj in enumerate(chunk):
            owner = None
            for step, moves in transitions:
                # the trajectory's image is stored once, on its first transition; each holds its own x_k
                key = s.write(traj, step, 0, moves[n], f"p{traj.prompt_index}",
                              images[n] if owner is None else None, image_key=owner)
                owner = owner or key


def run_rollout(
    policy: Policy,
    prompts: list[str],
    config: RolloutConfig,
    out: Path,
    policy_info: dict[str, Any],
    progress: Progress = no_progress,
    overwrite: bool = False,
    background_writes: bool = True,
) -> RolloutResult:
    """Sample with ``policy`` on ``prompts`` and write the rollout folder ``out`` atomically.

    Samples are encoded and written on a writer thread unless ``background_writes`` is False; the
    shards' bytes are the same either way.

    ``policy_info`` (at least ``identity``) goes into the manifest, so that the update can check that
    it trains the policy that sampled.
    """
    inputs = (*(p for p in [policy_info.get("path")] if p), *policy.input_folders())  # the base model is read too
    check_out_free(out, overwrite, inputs)
    if not prompts:
        raise TempflowError("no prompts to roll out")
    sampling = policy.configure_sampling(config.resolution, config.guidance_scale, config.negative_prompt)
    state_bytes = 4 * math.prod(policy.sample_shape)
    pending = config.batch_size * (config.branches + 2) if config.algo == "tempflow" else config.batch_size * config.num_steps
    pending += 2 * config.batch_size  # samples waiting for the writer thread
    check_memory(f"--batch-size {config.batch_size} with --branches {config.branches}", 3 * pending * state_bytes,
                 "lower --batch-size or --branches")
    prompts = select_prompts(prompts, config)
    sigmas = policy_sigmas(policy, config)
    spread = read_step_spread(policy_info.get("path"), config.num_steps) if config.draws_by_spread else None
    plan = config.step_plan(sigmas, spread)  # drawn once: every count and record below uses this one
    began = time.perf_counter()
    here = join(str(policy.device))
    trajs = _trajectories(config, len(prompts))
    # whole batches per rank, so that every batch is the one a single process computes
    chunks = here.share([trajs[i:i + config.batch_size] for i in range(0, len(trajs), config.batch_size)])
    share = sum(map(len, chunks)) / len(trajs)
    with shared_output(out, here, overwrite, inputs) as tmp:
        # two batches of samples may wait for the writer thread: it encodes one while the model makes the next
        with shard_writer(tmp, config.samples_per_shard, _shard_prefix(here)) as writer, \
                Worker(2 * config.batch_size, "tempflow-shard-writer") if background_writes else nullcontext() as jobs:
            sampler = _Sampler(policy, prompts, config, writer, sigmas, plan, progress, jobs, share)
            (_tempflow if config.algo == "tempflow" else _flow_grpo)(sampler, chunks)
        shards = writer.close()
        # the documented costs: the forward passes and decodes the rollout was planned to make
        assert sampler.nfe == sampler.total_nfe, (sampler.nfe, sampler.total_nfe)
        assert sampler.decodes == sampler.total_decodes, (sampler.decodes, sampler.total_decodes)
        parts = gather((shards, writer.count, sampler.nfe, sampler.decodes), here)  # every rank has written
        shards = [shard for part in parts for shard in part[0]]
        samples, nfe, decodes = (sum(part[i] for part in parts) for i in (1, 2, 3))
        assert nfe == planned_nfe(config, len(prompts), plan.steps), nfe
        if here.main:
            embeddings = write_embeddings(tmp, sampler.cond, sampler.negative)
            write_manifest(tmp, {
                "config": asdict(config),
                "trained_steps": plan.steps,
                "step_inclusion": plan.inclusion,
                "step_spread": plan.spread,
                "sigmas": [float(v) for v in sigmas],
                "prompts": prompts,
                "policy": policy_info,
                "sample_shape": list(policy.sample_shape),
                "sampling": sampling,
                "dtype": dtype_name(policy.dtype),
                "embeddings": embeddings,
                "samples": samples,
                "nfe": nfe,
                "decodes": decodes,
                "shards": shards,
            })
            write_timing(tmp, time.perf_counter() - began)
    return RolloutResult(samples=samples, nfe=nfe, shards=len(shards), trained_steps=plan.steps,
                         prompts=len(prompts), decodes=decodes)


def _shard_prefix(here: Ranks) -> str:
    """``shard`` for one process (``shard-000000.tar``, ...); ``shard-rNNN`` per rank under torchrun."""
    return "shard" if here.world == 1 else f"shard-r{here.rank:03d}"
