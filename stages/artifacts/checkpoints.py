"""Resumable checkpoint folders: ``DIR/state.safetensors`` (tensors) + ``DIR/state.json`` (the rest,
with its schema), written atomically beside a stage's output and deleted once that output is
complete. The folder is common to both kinds; what each holds is its own module's:
:mod:`~stages.artifacts.pretrain_checkpoint` and :mod:`~stages.artifacts.rec_checkpoint`.

A checkpoint folder is tempflow's only when it holds nothing but those two files and its
``state.json`` names a schema of the stage's own prefix: a folder that is not is never replaced
or deleted. A checkpoint of another schema, config or model is stale: the run starts afresh.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from torch import Tensor

from stages.artifacts.codecs import load_safetensors, loads_json, read_json, version_of, versioned, write_json
from stages.support.errors import TempflowError
from stages.support.outputs import atomic_output, check_out_free, within

# safetensors' writer is imported where a checkpoint is written, for start-up time.


def default_checkpoint(out: Path) -> Path:
    """``runs/base`` -> ``runs/base.ckpt``: beside the output, outside it (DVC deletes outputs before a run)."""
    out = Path(out)
    return out.parent / f"{out.name}.ckpt"


class CheckpointFolder:
    """One stage's checkpoint folder; ``prefix`` is its schemas' common start (e.g.
    ``tempflow.pretrain-checkpoint/``) and ``what`` names it in messages (e.g. ``pretraining``)."""

    FILES = frozenset({"state.json", "state.safetensors"})

    def __init__(self, path: Path, prefix: str, what: str) -> None:
        self.path, self.prefix, self.what = Path(path), prefix, what

    def check_path(self, out: Path) -> None:
        """Refuse a path that is not free for a checkpoint: one that would replace or sit inside the
        output, the working folder or an input, or an existing folder that is not a checkpoint of
        tempflow's (its saves replace the folder, and a finished run deletes it)."""
        if within(self.path.resolve(), out.resolve()):
            raise TempflowError(f"--checkpoint {self.path} is --out {out} or lies inside it; keep it beside, e.g. {default_checkpoint(out)}")
        check_out_free(self.path, overwrite=True, outputs=(out,))
        if (self.path.exists() or self.path.is_symlink()) and not self.is_ours():
            held = sorted(p.name for p in self.path.iterdir())[:3] if self.path.is_dir() else []
            raise TempflowError(
                f"--checkpoint {self.path} exists and is not a tempflow {self.what} checkpoint"
                f"{' (it holds ' + ', '.join(held) + ')' if held else ''}; tempflow writes and deletes only its own "
                f"checkpoints: give a new path such as {default_checkpoint(out)}"
            )

    def is_ours(self) -> bool:
        """A real folder holding only a checkpoint's files, its state.json naming one of our schemas."""
        if self.path.is_symlink() or not self.path.is_dir():
            return False
        if not {p.name for p in self.path.iterdir()} <= self.FILES or not (self.path / "state.json").is_file():
            return False
        try:
            info = loads_json((self.path / "state.json").read_bytes())
        except (ValueError, OSError):
            return False
        return str(version_of(info) or "").startswith(self.prefix)

    def remove(self) -> None:
        """Delete the checkpoint once its run is complete; anything that is not one stays."""
        if self.is_ours():
            for name in self.FILES:
                (self.path / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # something was put there meanwhile: it stays
                self.path.rmdir()

    def write(self, schema: str, tensors: dict[str, Tensor], info: dict[str, Any]) -> None:
        """Replace the checkpoint by ``tensors`` and ``info`` under ``schema``, atomically."""
        from safetensors.torch import save_file

        if self.path.exists() and not self.is_ours():
            raise TempflowError(f"--checkpoint {self.path} was replaced by something else while {self.what} ran; "
                                "stopped rather than delete it")
        with atomic_output(self.path, overwrite=True) as tmp:
            tmp.mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
            write_json(tmp / "state.json", versioned(schema, info))

    def read(self) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
        """``(info, tensors)``, or None when there is no checkpoint; a damaged one is an error."""
        info_path = self.path / "state.json"
        if not info_path.is_file():
            return None
        try:
            info = read_json(info_path, f"a {self.what} checkpoint's state")
            tensors = load_safetensors(self.path / "state.safetensors")
        except TempflowError as err:
            raise self.damaged(str(err)) from None
        if not isinstance(info, dict):
            raise self.damaged("state.json is not an object")
        return info, tensors

    def damaged(self, why: str) -> TempflowError:
        return TempflowError(f"{self.path}: {self.what} checkpoint is damaged ({why}); delete it to start over")
