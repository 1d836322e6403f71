"""The recommender's training checkpoint (`tempflow rec pretrain|train --checkpoint`): a checkpoint
folder (:mod:`~stages.artifacts.checkpoints`) holding a fit's whole state under the key of what the
fit is of. Built and read only here; the fit itself puts its state in and takes it back out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from stages.artifacts.checkpoints import CheckpointFolder
from stages.artifacts.codecs import version_of

REC_TRAIN_SCHEMA = "tempflow.recsys-checkpoint/1"


class RecTrainCheckpoint(CheckpointFolder):
    """A recommender fit's whole state (weights, target network, Adam's moments, both random
    generators, where in which epoch it stands, the losses so far) under the ``key`` of what the fit
    is of, so that a resumed fit ends with the same weights as one that never stopped."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "tempflow.recsys-checkpoint/", "recommender training")

    def save(self, key: dict[str, Any], tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        self.write(REC_TRAIN_SCHEMA, tensors, {"key": key, **info})

    def load(self, key: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        """The saved ``(info, tensors)`` of a fit of ``key``, else None (another fit's is ignored)."""
        saved = self.read()
        if saved is None or version_of(saved[0]) != REC_TRAIN_SCHEMA or saved[0].get("key") != key:
            return None
        return saved
