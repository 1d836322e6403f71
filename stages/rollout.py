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

import hashlib
import json
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

from stages.artifacts import (
    ShardWriter,
    check_out_free,
    npy_bytes,
    png_bytes,
    read_step_spread,
    seed_group,
    write_embeddings,
    write_manifest,
    write_timing,
)
from stages.errors import TempflowError
from stages.flow import (
    inclusion_probabilities,
    make_sigmas,
    noise_aware_weights,
    ode_step,
    sde_step,
    spread_weights,
    systematic_sample,
)
from stages.policies import Cond, Policy, dtype_name, index_cond, with_negative
from stages.limits import check_at_most, check_memory, check_sampling, check_seed
from stages.progress import Progress, no_progress
from stages.distributed import Ranks, gather, join, shared_output
from stages.threads import Worker

ALGORITHMS = {
    "tempflow": "branch K SDE samples off an ODE main path at chosen steps; per-step process rewards",
    "flow-grpo": "SDE at every step, G trajectories per prompt, one advantage per trajectory",
    "flow-grpo-fast": "ODE with an SDE window of w steps at a random early position",
}


@dataclass
class RolloutConfig:
    """How to sample. Every field is also a ``tempflow rollout`` option."""

    algo: str = "tempflow"
    """Sampling algorithm: tempflow, flow-grpo or flow-grpo-fast."""
    num_steps: int = 10
    """T, sampling steps from pure noise to the image."""
    shift: float = 3.0
    """Static timestep shift of the sigma schedule (SD3 and SD3.5 use 3). FLUX policies ignore it and
    use their scheduler's own (resolution-dependent for dev-shaped models); the manifest records the sigmas."""
    noise_level: float = 0.7
    """a, the SDE noise level of Flow-GRPO (0 would make the SDE an ODE, with nothing to learn)."""
    seeds_per_prompt: int = 2
    """Initial noises per prompt: tempflow's main paths, or flow-grpo's G trajectories."""
    branches: int = 4
    """K, SDE samples per branch step (tempflow)."""
    branch_steps: str = "all"
    """Where tempflow branches: 'all' (0..T-2), 'first:N', 'sampled:N' (N distinct steps drawn per
    rollout from the seed, uniformly), 'weighted:N' (N steps drawn with chance proportional to the
    noise-aware weight, capped at 1; the update divides each step's policy loss and KL by its chance,
    so the expected loss over the draws is the all-steps one), 'spread:N' (as weighted, with chance
    proportional to the within-group reward spread of each step's branches that the update which made
    the sampling policy measured, see `tempflow update`'s step_reward_spread; the noise-aware weight while
    none is measured), or an explicit comma list such as '0,2,5'."""
    finish_steps: int = 0
    """tempflow: finish each branch from s_{k+1} to 0 in at most this many ODE steps, on a coarser
    schedule taken from the rollout's own (evenly spaced in its indices); 0: every remaining step. A
    finish is only scored, never trained: fewer steps cost fewer NFE and give the reward a rougher image."""
    window: int = 2
    """w, SDE window length of flow-grpo-fast."""
    batch_size: int = 32
    """Rows per model forward pass."""
    seed: int = 0
    """Root of all randomness of the rollout."""
    prompts_per_rollout: int = 0
    """Draw this many distinct prompts from the file for this rollout (with --seed); 0: use them all."""
    samples_per_shard: int = 256
    """Samples per webdataset shard."""
    resolution: int = 0
    """Image side in pixels; 0: the model's own (tiny: its image size; sd3: the transformer's sample
    size x the VAE factor, 1024 for SD3.5; flux: 1024). sd3: a multiple of VAE factor x patch size;
    flux: of 2 x VAE factor x patch size (its 2x2 packing); 16 for SD3.5 and FLUX.1."""
    guidance_scale: float = 0.0
    """Guidance; 0: the kind's default (sd3: classifier-free guidance 4.5, as Flow-GRPO; FLUX dev-shaped:
    the guidance embedding 3.5; tiny and FLUX schnell-shaped: none). 1 turns sd3's guidance off."""
    negative_prompt: str = ""
    """The unconditional branch's prompt of sd3's classifier-free guidance (FLUX takes none)."""

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise TempflowError(f"unknown algo {self.algo!r}; choose one of {', '.join(ALGORITHMS)}")
        if self.num_steps < 2:
            raise TempflowError(f"num_steps must be >= 2 (got {self.num_steps})")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise TempflowError(f"shift must be a finite number > 0 (got {self.shift})")
        if not (math.isfinite(self.noise_level) and self.noise_level > 0):
            raise TempflowError(f"noise_level must be > 0 for GRPO to have something to learn (got {self.noise_level})")
        if self.prompts_per_rollout < 0:
            raise TempflowError(f"prompts-per-rollout must be >= 0, 0 meaning all (got {self.prompts_per_rollout})")
        if self.finish_steps < 0:
            raise TempflowError(f"finish-steps must be >= 0, 0 meaning every remaining step (got {self.finish_steps})")
        for name in ("seeds_per_prompt", "branches", "batch_size", "samples_per_shard", "window"):
            if getattr(self, name) < 1:
                raise TempflowError(f"{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.algo in ("flow-grpo", "flow-grpo-fast") and self.seeds_per_prompt < 2:
            raise TempflowError(f"{self.algo} compares trajectories of one prompt: seeds-per-prompt must be >= 2")
        if self.algo == "tempflow" and self.branches < 2:
            raise TempflowError("tempflow compares the branches of one step: branches must be >= 2")
        if self.algo == "flow-grpo-fast" and self.num_steps // 2 - self.window < 0:
            raise TempflowError(
                f"flow-grpo-fast: window {self.window} does not fit in the first half of {self.num_steps} steps; "
                "use a smaller --window or more --num-steps"
            )
        self._check_limits()
        self.branch_steps = str(self.branch_steps).replace(" ", "")
        self._branch_spec = parse_branch_steps(self.branch_steps, self.num_steps)
        if self.finish_steps and self.algo != "tempflow":
            raise TempflowError(f"--finish-steps shortens tempflow's branch finishes; {self.algo} trains every step "
                                "of its trajectories, so it has none")
        sigmas = make_sigmas(self.num_steps, self.shift)
        if not bool((sigmas[:-1] > sigmas[1:]).all()):
            raise TempflowError(f"--shift {self.shift:g} with {self.num_steps} steps gives equal neighbouring "
                                "sigmas in float32 (a step with no noise to learn from); use a shift nearer 3")

    def _check_limits(self) -> None:
        """Upper bounds: each says what a larger value would cost."""
        check_seed("seed", self.seed)
        check_at_most("num-steps", self.num_steps, 1000, "every trajectory makes one forward pass per step")
        check_at_most("shift", self.shift, 100.0, "the schedule would leave no noise in all but the last step")
        if self.shift < 1e-2:
            raise TempflowError(f"--shift {self.shift:g} is below 0.01: the schedule would fall to no noise in its "
                                "first step (SD3 uses 3)")
        check_at_most("noise-level", self.noise_level, 10.0, "the SDE's noise would swamp the velocity")
        if self.noise_level < 1e-3:
            raise TempflowError(f"--noise-level {self.noise_level:g} is below 1e-3: the SDE's std underflows "
                                "float32 and its log-probs are not finite (Flow-GRPO uses 0.7)")
        check_at_most("seeds-per-prompt", self.seeds_per_prompt, 4096, "each seed is one more trajectory per prompt")
        check_at_most("branches", self.branches, 1024, "each branch step holds K x batch states in memory and "
                      "finishing them costs K forward passes per remaining step (the papers use K = 4-6)")
        check_at_most("batch-size", self.batch_size, 65536, "one forward pass would hold that many states and their activations")
        check_at_most("finish-steps", self.finish_steps, 1000, "a finish never has more steps than the schedule")
        check_at_most("samples-per-shard", self.samples_per_shard, 10**6, "a shard is written and hashed whole")
        check_at_most("prompts-per-rollout", self.prompts_per_rollout, 10**7, "every prompt's embedding is held in memory")
        check_sampling(self.resolution, self.guidance_scale, self.negative_prompt)

    def step_plan(self, sigmas: Tensor | None = None, spread: list[float | None] | None = None) -> StepPlan:
        """The steps this rollout trains: tempflow's branch set B, flow-grpo's SDE steps. Drawn ones
        (``sampled:N``, ``weighted:N``, ``spread:N``, flow-grpo-fast's window) come from the seed;
        ``weighted:N`` weighs by ``sigmas``' noise-aware weights (default: the static-shift schedule),
        ``spread:N`` by :func:`~stages.flow.spread_weights` of ``spread`` (per step, from
        :func:`~stages.artifacts.read_step_spread`), falling back to the noise-aware ones."""
        T = self.num_steps
        if self.algo == "flow-grpo":
            return StepPlan(list(range(T - 1)))
        rng = random.Random(derive_seed(self.seed, "window" if self.algo == "flow-grpo-fast" else "branch-steps"))
        if self.algo == "flow-grpo-fast":
            start = rng.randint(0, T // 2 - self.window)
            return StepPlan(list(range(start, start + self.window)))
        kind, value = self._branch_spec
        if kind == "all":
            return StepPlan(list(range(T - 1)))
        if kind == "list":
            return StepPlan(list(value))
        if kind == "sampled":
            return StepPlan(sorted(rng.sample(range(T - 1), value)), [value / (T - 1)] * (T - 1))
        by_spread = spread_weights(spread) if kind == "spread" and spread is not None else None
        weights = self._noise_aware_weights(sigmas) if by_spread is None else by_spread
        pi = inclusion_probabilities(weights, value)
        return StepPlan(systematic_sample(pi, rng.random()), pi, by_spread)

    def _noise_aware_weights(self, sigmas: Tensor | None) -> list[float]:
        """``weighted:N``'s draw weights (and ``spread:N``'s before a spread is measured)."""
        sigmas = make_sigmas(self.num_steps, self.shift) if sigmas is None else sigmas
        return noise_aware_weights(sigmas, self.noise_level).tolist()

    @property
    def draws_steps(self) -> bool:
        """Whether the trained steps are drawn at random with recorded chances (tempflow's
        ``sampled:N``, ``weighted:N`` and ``spread:N``; :meth:`step_plan` then returns them)."""
        return self.algo == "tempflow" and self._branch_spec[0] in ("sampled", "weighted", "spread")

    @property
    def draws_by_spread(self) -> bool:
        """``spread:N``: the draw needs the sampling policy's measured reward spread per step."""
        return self.algo == "tempflow" and self._branch_spec[0] == "spread"

    def finish_path(self, step: int) -> list[int]:
        """The sigma indices a branch of ``step`` is finished along by ODE, from ``k + 1`` to ``T``:
        every one, or ``finish_steps + 1`` of them evenly spaced."""
        T, first = self.num_steps, step + 1
        if self.finish_steps == 0 or T - first <= self.finish_steps:
            return list(range(first, T + 1))
        return [first + round(i * (T - first) / self.finish_steps) for i in range(self.finish_steps + 1)]


@dataclass
class StepPlan:
    """The trained steps of a rollout, and when they were drawn at random each step's chance of
    being drawn (``inclusion[k]`` for every ``k`` in ``0..T-2``), which the update reweighs by."""

    steps: list[int]
    inclusion: list[float] | None = None
    spread: list[float] | None = None
    """Under ``spread:N``, the drawing weights the chances were made from (None: the noise-aware ones)."""


def parse_branch_steps(spec: str, num_steps: int) -> tuple[str, Any]:
    """``--branch-steps`` as ``(kind, value)``: ``("all", None)``, ``("list", steps)`` (``first:N``
    and explicit lists), ``("sampled", N)``, ``("weighted", N)`` or ``("spread", N)``."""
    last = num_steps - 2
    try:
        if spec == "all":
            return "all", None
        if spec.startswith("first:"):
            kind, value = "list", list(range(int(spec[6:])))
        elif spec.startswith(("sampled:", "weighted:", "spread:")):
            kind, _, n = spec.partition(":")
            value = int(n)
            if not 1 <= value <= last + 1:
                raise ValueError
            return kind, value
        else:
            kind, value = "list", sorted({int(s) for s in spec.split(",")})
    except ValueError:
        raise TempflowError(
            f"branch-steps {spec!r}: use 'all', 'first:N', 'sampled:N', 'weighted:N', 'spread:N' or a list like '0,2,5' "
            f"with steps in 0..{last} (N between 1 and {last + 1})"
        ) from None
    if not value or value[0] < 0 or value[-1] > last:
        raise TempflowError(f"branch-steps {spec!r}: steps must lie in 0..{last} (T = {num_steps}); the last step is never trained")
    return kind, value


def select_prompts(prompts: list[str], config: RolloutConfig) -> list[str]:
    """The prompts of this rollout: all of them, or ``prompts_per_rollout`` drawn with the seed (in file order)."""
    n = config.prompts_per_rollout
    if n == 0 or n >= len(prompts):
        return list(prompts)
    picked = random.Random(derive_seed(config.seed, "prompts")).sample(range(len(prompts)), n)
    return [prompts[i] for i in sorted(picked)]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of values; stable across runs, platforms and Python versions."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded_normal(shape: tuple[int, ...], seeds: list[int]) -> Tensor:
    """One standard normal tensor of ``shape`` per seed, stacked: ``(len(seeds), *shape)``, float32."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@dataclass
class Trajectory:
    prompt_index: int
    seed_index: int
    seed: int  # the seed of the initial noise


@dataclass
class Branch:
    """A tempflow branch waiting to be finished by ODE."""

    traj: Trajectory
    step: int  # k, the branch step
    branch: int  # b
    state: Tensor  # x_k
    next: Tensor  # x_{k+1}, the SDE sample
    log_prob: float
    x: Tensor  # current state of the continuation
    path: list[int]  # sigma indices still ahead of it, the first being the one x is at


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

    def write(self, traj: Trajectory, step: int, branch: int, state: Tensor, nxt: Tensor, log_prob: float,
              group: str, image: np.ndarray | None, image_key: str | None = None) -> str:
        key = f"p{traj.prompt_index:05d}_s{traj.seed_index:03d}_k{step:03d}_b{branch:02d}"
        if not (math.isfinite(log_prob) and torch.isfinite(state).all() and torch.isfinite(nxt).all()):
            raise TempflowError(f"sample {key} (step {step}): its log-prob or states are NaN or infinite; nothing "
                                f"was written. Check --shift ({self.config.shift:g}) and --noise-level "
                                f"({self.config.noise_level:g}), or the policy's weights")
        meta = {
            "prompt": self.prompts[traj.prompt_index], "prompt_index": traj.prompt_index,
            "seed": traj.seed, "seed_index": traj.seed_index, "group": group, "step": step, "branch": branch,
            "sigma": self.sigma_values[step], "sigma_next": self.sigma_values[step + 1],
            "log_prob": float(log_prob), "algo": self.config.algo,
        }
        if image_key is not None:
            meta["image_key"] = image_key
        if self.jobs is None:
            self._store(key, meta, state, nxt, image)
        else:  # encoded and written on the writer thread, in this order, while the model goes on
            self.jobs.submit(self._store, key, meta, state, nxt, image)
        return key

    def _store(self, key: str, meta: dict[str, Any], state: Tensor, nxt: Tensor, image: np.ndarray | None) -> None:
        fields = {
            "meta.json": json.dumps(meta, sort_keys=True).encode(),
            "state.npy": npy_bytes(state.numpy()),
            "next.npy": npy_bytes(nxt.numpy()),
        }
        if image is not None:
            fields["image.png"] = png_bytes(image)
        self.writer.write(key, fields)


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
                for b in range(cfg.branches):
                    eps = seeded_normal(s.policy.sample_shape, [derive_seed(t.seed, "branch", i, b) for t in chunk])
                    out = sde_step(v, x, sigma, sigma_next, cfg.noise_level, noise=eps)
                    pool += [
                        Branch(t, i, b, x[n], out.prev_sample[n], float(out.log_prob[n]), out.prev_sample[n],
                               cfg.finish_path(i))
                        for n, t in enumerate(chunk)
                    ]
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
            br = batch[n]
            group = seed_group(br.traj.prompt_index, br.traj.seed, br.step)
            s.write(br.traj, br.step, br.branch, br.state, br.next, br.log_prob, group, img)
        pool[:0] = [br for br in batch if len(br.path) > 1]  # unfinished rows keep their place in the batch


def _flow_grpo(s: _Sampler, chunks: list[list[Trajectory]]) -> None:
    cfg = s.config
    window = set(s.steps)
    for chunk in chunks:
        pis = [t.prompt_index for t in chunk]
        x = s.initial_noise(chunk)
        transitions: list[tuple[int, Tensor, Tensor, Tensor]] = []  # (step, x_k, x_{k+1}, log p)
        for i in range(cfg.num_steps):
            at = torch.full((len(chunk),), i)
            v = s.velocity(x, at, pis)
            sigma, sigma_next = s.sigma_pair(at)
            if i in window:
                eps = seeded_normal(s.policy.sample_shape, [derive_seed(t.seed, "sde", i) for t in chunk])
                out = sde_step(v, x, sigma, sigma_next, cfg.noise_level, noise=eps)
                transitions.append((i, x, out.prev_sample, out.log_prob))
                x = out.prev_sample
            else:
                x = ode_step(v, x, sigma, sigma_next)
        images = s.decode(x)
        for n, traj in enumerate(chunk):
            owner = None
            for step, state, nxt, log_prob in transitions:
                # the trajectory's image is stored once, on its first transition
                key = s.write(traj, step, 0, state[n], nxt[n], float(log_prob[n]), f"p{traj.prompt_index}",
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
        with ShardWriter(tmp, config.samples_per_shard, _shard_prefix(here)) as writer, \
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
