"""The rollout's config: the options of `tempflow rollout` and the config its manifest records, one
dataclass validated here for both (the rollout artifact reads its manifest's config back through it,
so it sits below :mod:`stages.artifacts.rollout` and the rollout stage alike). Each field's docstring
is its option's ``--help``; refusals read ``rollout: --<option> must be …, got …``. Also the sampling
rules rollout and eval share, and the trained steps a config draws (:class:`StepPlan`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from stages.flow import inclusion_probabilities, make_sigmas, noise_aware_weights, spread_weights, systematic_sample
from stages.support.rules import Rules
from stages.support.seeds import derive_seed

ALGORITHMS = {
    "tempflow": "branch K SDE samples off an ODE main path at chosen steps; per-step process rewards",
    "flow-grpo": "SDE at every step, G trajectories per prompt, one advantage per trajectory",
    "flow-grpo-fast": "ODE with an SDE window of w steps at a random early position",
}


@dataclass
class RolloutConfig(Rules):
    """How to sample. Every field is also a ``tempflow rollout`` option."""

    command = "rollout"

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
        self.choice("algo", ALGORITHMS)
        self.at_least(2, "num_steps")
        self.at_least(1, "seeds_per_prompt", "branches", "batch_size", "samples_per_shard", "window")
        self.at_least(0, "prompts_per_rollout", "finish_steps")
        self.positive("shift", "noise_level")  # a noise level of 0 would make the SDE an ODE, with nothing to learn
        self.not_below("shift", 1e-2, "the schedule would fall to no noise in its first step; SD3 uses 3")
        self.not_below("noise_level", 1e-3, "the SDE's std underflows float32 and its log-probs are not finite; "
                       "Flow-GRPO uses 0.7")
        self.seeds("seed")
        self._check_sizes()
        check_sampling(self)
        self._check_algo()
        self.branch_steps = str(self.branch_steps).replace(" ", "")
        self._branch_spec = parse_branch_steps(self, self.branch_steps, self.num_steps)
        sigmas = make_sigmas(self.num_steps, self.shift)
        self.require(bool((sigmas[:-1] > sigmas[1:]).all()), "shift", f"a shift whose {self.num_steps} sigmas differ in "
                     "float32 (equal neighbours leave a step with no noise to learn from; use a shift nearer 3)")

    def _check_sizes(self) -> None:
        """Upper bounds: each says what a larger value would cost."""
        self.at_most("num_steps", 1000, "every trajectory makes one forward pass per step")
        self.at_most("shift", 100.0, "the schedule would leave no noise in all but the last step")
        self.at_most("noise_level", 10.0, "the SDE's noise would swamp the velocity")
        self.at_most("seeds_per_prompt", 4096, "each seed is one more trajectory per prompt")
        self.at_most("branches", 1024, "each branch step holds K x batch states in memory and finishing them "
                     "costs K forward passes per remaining step; the papers use K = 4-6")
        self.at_most("batch_size", 65536, "one forward pass would hold that many states and their activations")
        self.at_most("finish_steps", 1000, "a finish never has more steps than the schedule")
        self.at_most("samples_per_shard", 10**6, "a shard is written and hashed whole")
        self.at_most("prompts_per_rollout", 10**7, "every prompt's embedding is held in memory")

    def _check_algo(self) -> None:
        """What each algorithm needs of the other options."""
        if self.algo in ("flow-grpo", "flow-grpo-fast"):
            self.require(self.seeds_per_prompt >= 2, "seeds_per_prompt",
                         f">= 2 with --algo {self.algo}, which compares trajectories of one prompt")
        if self.algo == "tempflow":
            self.require(self.branches >= 2, "branches", ">= 2 with --algo tempflow, which compares the branches of one step")
        if self.algo == "flow-grpo-fast":
            self.require(self.window <= self.num_steps // 2, "window",
                         f"at most half of --num-steps {self.num_steps} with --algo flow-grpo-fast (its window starts "
                         "in the first half)")
        if self.algo != "tempflow":
            self.require(self.finish_steps == 0, "finish_steps",
                         f"0 with --algo {self.algo}, which trains every step of its trajectories (no finishes)")

    def step_plan(self, sigmas: Tensor | None = None, spread: list[float | None] | None = None) -> StepPlan:
        """The steps this rollout trains: tempflow's branch set B, flow-grpo's SDE steps. Drawn ones
        (``sampled:N``, ``weighted:N``, ``spread:N``, flow-grpo-fast's window) come from the seed;
        ``weighted:N`` weighs by ``sigmas``' noise-aware weights (default: the static-shift schedule),
        ``spread:N`` by :func:`~stages.flow.spread_weights` of ``spread`` (per step, from
        :func:`~stages.artifacts.update_record.read_step_spread`), falling back to the noise-aware ones."""
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


def parse_branch_steps(config: Rules, spec: str, num_steps: int) -> tuple[str, Any]:
    """``--branch-steps`` as ``(kind, value)``: ``("all", None)``, ``("list", steps)`` (``first:N``
    and explicit lists), ``("sampled", N)``, ``("weighted", N)`` or ``("spread", N)``."""
    last = num_steps - 2
    usage = (f"'all', 'first:N', 'sampled:N', 'weighted:N', 'spread:N' or a list like '0,2,5', with steps in "
             f"0..{last} and N in 1..{last + 1} (T = {num_steps}; the last step is never trained)")
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
        raise config.refuse("branch_steps", usage) from None
    config.require(bool(value) and value[0] >= 0 and value[-1] <= last, "branch_steps", usage)
    return kind, value


def check_sampling(config: Any) -> None:
    """The sampling options rollout and eval share: image side, guidance, the negative prompt."""
    config.at_least(0, "resolution")  # 0: the model's own
    config.at_most("resolution", 8192, "one latent state alone would fill a GPU")
    config.within("guidance_scale", 0.0, 100.0)  # 0: the kind's default
    config.at_most("negative_prompt", 10000, "characters make a prompt no tokenizer keeps",
                   value=len(config.negative_prompt))
