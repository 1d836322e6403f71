"""The commands that make a model folder from nothing: `tempflow init` (a policy, from a preset or on
a diffusers folder of the user's) and `tempflow make-tiny` (a toy model folder of a real layout).
Each has its config dataclass and a run function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.artifacts.policy import PolicyRecord
from stages.policies.base import Policy, save_policy
from stages.policies.pipeline import init_from
from stages.policies.tiny import PRESETS, model_config, preset_policy
from stages.policies.tiny_pipelines import KINDS as PIPELINE_KINDS
from stages.policies.tiny_pipelines import make_tiny_pipeline
from stages.rewards.tiny import make_tiny_reward
from stages.support.dtypes import DTYPES
from stages.support.outputs import atomic_output
from stages.support.rules import Rules


@dataclass
class InitConfig(Rules):
    """What `tempflow init` builds: a preset, or (with --from) a policy on a diffusers folder with a
    LoRA adapter or, with --full, the whole transformer. An option left out arrives as ``None``, so
    that an option of the other way can be refused; once the config is checked, the defaults fill in
    (preset tiny, image size 32, rank 32, sequence length 0, fp32)."""

    command = "init"

    base: str | None = None
    """The diffusers pipeline folder of --from, or None for a preset."""
    preset: str | None = None
    """Model to build (without --from); default tiny."""
    seed: int = 0
    """Seed of the random initial weights (a preset's model, or the LoRA adapter's A matrices)."""
    image_size: int | None = None
    """Image side in pixels (the tiny and shapes presets); default 32."""
    vocab_from: str | None = None
    """Prompts file whose words join the tokenizer's vocabulary (presets; words outside it become [UNK])."""
    lora_rank: int | None = None
    """With --from: rank r of the LoRA adapter that training changes (Flow-GRPO: 32 on SD3, 64 on FLUX); default 32."""
    lora_alpha: float | None = None
    """With --from: LoRA alpha; the adapter's output is scaled by alpha / r. Default: twice the rank."""
    lora_targets: str | None = None
    """With --from: comma-separated module-name suffixes the adapter wraps. Default: Flow-GRPO's for the kind."""
    full: bool = False
    """With --from: fine-tune the whole transformer instead of a LoRA adapter (float32 master weights;
    each update then writes the full transformer into its policy folder)."""
    max_sequence_length: int | None = None
    """With --from: T5 tokens per prompt; default 0, the pipeline's own (sd3 256, flux 512)."""
    dtype: str | None = None
    """With --from: dtype the transformer is loaded in to attach the adapter (the adapter itself is drawn
    in float32 either way, so this saves memory without changing it); default fp32."""

    PRESET_ONLY = ("preset", "image_size", "vocab_from")
    FROM_ONLY = ("lora_rank", "lora_alpha", "lora_targets", "full", "max_sequence_length", "dtype")
    LORA = ("lora_rank", "lora_alpha", "lora_targets")

    def __post_init__(self) -> None:
        self.seeds("seed")
        if self.base is None:
            for name in self.FROM_ONLY:
                self.require(getattr(self, name) in (None, False), name, "left out without --from (it applies to a "
                             "diffusers folder given with --from)")
            if self.preset is not None:
                self.choice("preset", PRESETS)
            self.preset, self.image_size = self.preset or "tiny", 32 if self.image_size is None else self.image_size
            return
        self._check_from()
        self.max_sequence_length = self.max_sequence_length or 0
        self.dtype = self.dtype or "fp32"
        if not self.full:
            self.lora_rank = 32 if self.lora_rank is None else self.lora_rank

    def _check_from(self) -> None:
        """With --from: no preset option; no adapter option with --full; the T5 length and dtype."""
        for name in self.PRESET_ONLY:
            self.require(getattr(self, name) is None, name, "left out with --from (it describes a preset; with "
                         "--from the model is the folder's)")
        if self.full:
            for name in self.LORA:
                self.require(getattr(self, name) is None, name, "left out with --full (it describes a LoRA adapter; "
                             "--full trains the whole transformer)")
        if self.max_sequence_length is not None:
            self.at_least(0, "max_sequence_length")
            self.at_most("max_sequence_length", 512, "the diffusers SD3 and FLUX pipelines refuse longer T5 prompts, "
                         "so an adapter trained on them would not reproduce in yours")
        if self.dtype is not None:
            self.choice("dtype", DTYPES)


@dataclass
class MakeTinyConfig(Rules):
    """How `tempflow make-tiny` draws its toy model's weights (which kind it writes is a choice of
    the command's registries, ``stages.policies.tiny_pipelines.KINDS`` and ``stages.rewards.tiny.KINDS``)."""

    command = "make-tiny"

    seed: int = 0
    """Seed of the random weights."""

    def __post_init__(self) -> None:
        self.seeds("seed")


def run_init(spec: InitConfig, out: Path, overwrite: bool = False) -> tuple[Policy, PolicyRecord]:
    """Create the policy folder ``out`` as ``spec`` says; the policy and its record (with its identity)."""
    if spec.base is not None:
        lora = None if spec.full else (spec.lora_rank, spec.lora_alpha, spec.lora_targets)
        policy = init_from(Path(spec.base), spec.seed, lora, spec.max_sequence_length, spec.dtype)
        record = PolicyRecord(kind=policy.kind, model=policy.model)
    else:
        policy = preset_policy(spec.preset, spec.seed, spec.image_size, spec.vocab_from)
        record = PolicyRecord(kind=policy.kind, model=model_config(policy))
    with atomic_output(out, overwrite=overwrite) as tmp:
        save_policy(policy, tmp, record)
    return policy, record


def run_make_tiny(kind: str, config: MakeTinyConfig, out: Path, overwrite: bool = False) -> str:
    """Write the toy folder ``out`` of ``kind``; what it is (``pipeline`` or ``reward model``)."""
    with atomic_output(out, overwrite=overwrite) as tmp:
        if kind in PIPELINE_KINDS:
            make_tiny_pipeline(kind, tmp, config.seed)
            return "pipeline"
        make_tiny_reward(kind, tmp, config.seed)
        return "reward model"
