"""Pretraining's resumable checkpoint (`tempflow pretrain --checkpoint`, default ``OUT.ckpt``): a
checkpoint folder (:mod:`~stages.artifacts.checkpoints`) holding one phase's weights, their EMA, the
earlier phase's frozen weights and AdamW's moments, with the phase, step, losses, config and model in
its ``state.json``. Built, read and validated only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stages.artifacts.checkpoints import CheckpointFolder
from stages.artifacts.codecs import is_int, is_number, version_of

PRETRAIN_SCHEMA = "tempflow.pretrain-checkpoint/4"  # /2: phases; /3: the autoencoder's scenes of both splits; /4: model in the key
PRETRAIN_PHASES = ("flow", "autoencoder")
_GROUPS = ("param", "ema", "frozen")


@dataclass
class PretrainState:
    """A pretraining phase where a checkpoint left it: its weights (``param``), their EMA, the
    earlier phase's frozen weights, AdamW's moments by parameter name, and the JSON state."""

    phase: str
    step: int
    losses: list[float]
    extra: dict[str, Any]
    """JSON state besides tensors (the latent scaling set between the phases)."""
    tensors: dict[str, dict[str, Tensor]]
    """``param``, ``ema``, ``frozen``: name -> tensor; ``adam``: ``name/slot`` -> tensor."""


class PretrainCheckpoint(CheckpointFolder):
    """``state.safetensors`` (weights, EMA, AdamW moments, earlier phases' weights) + ``state.json``
    (schema, phase, step, config, model, losses). A checkpoint resumes only the same options on the
    same model config: a preset changed in between (e.g. without the pooled text) starts afresh."""

    def __init__(self, path: Path, model: dict[str, Any], config: dict[str, Any]) -> None:
        super().__init__(path, "tempflow.pretrain-checkpoint/", "pretraining")
        self.model, self.config = model, config

    def save(self, state: PretrainState) -> None:
        tensors = {f"{group}/{name}": t for group, named in state.tensors.items() for name, t in named.items()}
        self.write(PRETRAIN_SCHEMA, tensors, {"phase": state.phase, "step": state.step, "config": self.config,
                                              "model": self.model, "losses": state.losses, "extra": state.extra})

    def load(self) -> PretrainState | None:
        """The saved state if it is of this schema, config and model, else None (a stale checkpoint
        is ignored); a checkpoint of this run whose state does not parse is damaged."""
        saved = self.read()
        if saved is None:
            return None
        info, tensors = saved
        if (version_of(info) != PRETRAIN_SCHEMA or info.get("config") != self.config or info.get("model") != self.model
                or info.get("phase") not in PRETRAIN_PHASES):
            return None
        step, losses, extra = info.get("step"), info.get("losses"), info.get("extra") or {}
        if not (is_int(step) and step >= 0 and isinstance(losses, list) and all(is_number(v) for v in losses)
                and isinstance(extra, dict)):
            raise self.damaged("its step, losses or extra state are not a count, a list of numbers and an object")
        groups: dict[str, dict[str, Tensor]] = {group: {} for group in (*_GROUPS, "adam")}
        for key, value in tensors.items():
            group, _, name = key.partition("/")
            if group not in groups:
                raise self.damaged(f"{key} is not a weight, EMA, frozen weight or AdamW moment")
            groups[group][name] = value
        return PretrainState(info["phase"], step, list(losses), dict(extra), groups)

    def check_fits(self, state: PretrainState, shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
        """The saved tensors are exactly the phase's (``shapes``: group -> name -> shape), finite,
        and AdamW's moments name its trained weights."""
        for group in _GROUPS:
            for name, shape in shapes[group].items():
                t = state.tensors[group].get(name)
                if t is None or tuple(t.shape) != tuple(shape) or not torch.isfinite(t).all():
                    raise self.damaged(f"{group}/{name} is missing, misshapen or not finite")
        unknown = [f"{g}/{n}" for g in _GROUPS for n in state.tensors[g] if n not in shapes[g]]
        unknown += [f"adam/{n}" for n in state.tensors["adam"] if n.rpartition("/")[0] not in shapes["param"]]
        if unknown:
            raise self.damaged(f"{unknown[0]} is not a weight of this model")


