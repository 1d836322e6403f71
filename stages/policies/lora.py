"""LoRA adapters through peft, stored in diffusers' own LoRA file format.

A policy's adapter file *is* what a user loads into their pipeline: ``pipe.load_lora_weights(POLICY)``
reads ``pytorch_lora_weights.safetensors`` with its keys under ``transformer.`` and the adapter's
config (rank, alpha, targets) in the file's metadata — without that metadata diffusers would assume
alpha = rank and scale the adapter wrongly, silently.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stages.artifacts.codecs import sort_safetensors_metadata
from stages.support.errors import TempflowError
from stages.support.rules import Rules

# peft and safetensors are imported where an adapter is made, saved or read, for start-up time.

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"

DEFAULT_TARGETS = {  # Flow-GRPO's choice per kind (DESIGN §6); a literal, so that `init --help` lists it
    "sd3": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"],
    "flux": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
}


@dataclass
class LoraSpec(Rules):
    """What the adapter is: rank, alpha (scale alpha / rank) and the module-name suffixes it wraps
    (`tempflow init`'s --lora-* options, or a policy's recorded adapter)."""

    command = "init"
    option_prefix = "lora-"

    rank: int = 32
    alpha: float = 64.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS["sd3"]))

    def __post_init__(self) -> None:
        self.at_least(1, "rank")
        self.at_most("rank", 1024, "Flow-GRPO uses 32 on SD3, 64 on FLUX")
        self.within("alpha", 0.0, 1e4, low_open=True)  # default: twice the rank
        self.require(bool(self.targets) and all(isinstance(t, str) and t for t in self.targets), "targets",
                     "at least one module name, e.g. attn.to_q,attn.to_v")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets),
                          init_lora_weights="gaussian", lora_dropout=0.0)


def add_adapter(transformer: nn.Module, spec: LoraSpec) -> None:
    """Freeze the transformer and wrap its target layers with a LoRA adapter (float32, trainable).

    Gaussian init: A ~ N(0, 1/r), B = 0, so the adapted model computes exactly the base's function."""
    transformer.requires_grad_(False)
    try:
        transformer.add_adapter(spec.peft_config())
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise TempflowError(f"--lora-targets {','.join(spec.targets)}: {' '.join(str(err).split())[:300]}") from None
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    with torch.no_grad():  # peft drew A in the base layer's dtype: draw it again in float32, so the
        for name, param in sorted(transformer.named_parameters()):  # adapter does not depend on --dtype
            if "lora_A" in name:
                param.normal_(0.0, 1.0 / spec.rank)
            elif "lora_B" in name:
                param.zero_()


def adapter_state(transformer: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors, named as peft and diffusers save them (no ``transformer.`` prefix)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def save_adapter(pipeline_class: Any, folder: Path, transformer: nn.Module, spec: LoraSpec) -> None:
    """Write the adapter with diffusers' own writer, its config (alpha!) in the file's metadata."""
    metadata = spec.peft_config().to_dict()
    # peft keeps the targets as a set, whose order changes from process to process: sorted, the same
    # adapter is the same file
    metadata["target_modules"] = sorted(metadata["target_modules"])
    pipeline_class.save_lora_weights(folder, transformer_lora_layers=adapter_state(transformer),
                                     transformer_lora_adapter_metadata=metadata, safe_serialization=True)
    sort_safetensors_metadata(Path(folder) / ADAPTER_FILE)


def read_adapter(folder: Path) -> tuple[dict[str, Tensor], LoraSpec]:
    """The adapter's tensors (prefix removed) and the spec recorded in its metadata, each checked."""
    from safetensors import safe_open

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise TempflowError(f"{folder}: no {ADAPTER_FILE}; the LoRA policy folder is incomplete")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error kinds on a damaged file
        raise TempflowError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        packed = json.loads(metadata[METADATA_KEY])
        fields = {k.split(".", 1)[1]: v for k, v in packed.items() if k.startswith(PREFIX + ".")}
        spec = LoraSpec(rank=fields["r"], alpha=fields["lora_alpha"], targets=sorted(fields["target_modules"]))
    except (KeyError, ValueError, TypeError, IndexError):
        raise TempflowError(f"{path}: no LoRA config (rank, alpha, targets) in its metadata; tempflow writes "
                            "one with every adapter") from None
    state = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX + ".") or not value.is_floating_point():
            raise TempflowError(f"{path}: tensor {key!r} is not a float tensor of the transformer's adapter")
        state[key[len(PREFIX) + 1:]] = value
    return state, spec


def load_adapter(transformer: nn.Module, state: dict[str, Tensor], spec: LoraSpec, where: Path) -> None:
    """Add ``spec``'s adapter to ``transformer`` and load ``state`` into it; every key must match."""
    from peft.utils import set_peft_model_state_dict

    add_adapter(transformer, spec)
    expected = adapter_state(transformer)
    if set(state) != set(expected):
        extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise TempflowError(f"{where}: the adapter does not fit the base model ("
                            f"{'unexpected ' + extra[0] if extra else 'missing ' + missing[0]})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise TempflowError(f"{where}: adapter tensor {key} has shape {tuple(value.shape)}, the base model "
                                f"needs {tuple(expected[key].shape)}")
    set_peft_model_state_dict(transformer, {k: v.float() for k, v in state.items()})


def spec_record(spec: LoraSpec) -> dict[str, Any]:
    return asdict(spec)
