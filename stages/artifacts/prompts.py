"""Prompt files: plain text, one prompt per line. Blank lines and lines starting with ``#`` are skipped."""

from __future__ import annotations

from pathlib import Path

from stages.support.errors import TempflowError


def read_prompts(path: Path | str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise TempflowError(f"{path}: no such prompts file; give a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise TempflowError(f"{path}: not UTF-8 text; a prompts file is plain text, one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise TempflowError(f"{path}: no prompts found; write one prompt per line")
    return prompts
