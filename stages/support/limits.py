"""What a machine can hold: a stage refuses work whose buffers alone would exceed its memory, in one
line that says what it would have cost and how to lower it. (Upper bounds on options are the configs'
rules, :mod:`stages.support.rules`; this is about the machine a stage runs on.)"""

from __future__ import annotations

import os

from stages.support.errors import TempflowError


def machine_memory() -> int:
    """Bytes of physical memory on this machine (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(what: str, needed: int, fix: str) -> None:
    """Refuse work whose buffers alone (``needed`` bytes) exceed this machine's memory."""
    total = machine_memory()
    if total and needed > total:
        raise TempflowError(f"{what} would hold {gib(needed)} in memory, more than this machine's {gib(total)}; {fix}")


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"
