"""How stages report progress without knowing who listens (the CLI draws rich bars from it)."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
"""``progress(task, advance, total)``: ``advance`` more units of ``task`` are done, out of ``total``."""


def no_progress(task: str, advance: int, total: int) -> None:
    """The default listener: ignores everything."""
