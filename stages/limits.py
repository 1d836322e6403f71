"""Upper bounds on sizes and rates: a value past them would exhaust memory or time, or wreck a model,
so the stage refuses it up front, in one line that says what it would have cost."""

from __future__ import annotations

import math
import os

from stages.errors import TempflowError


def check_at_most(option: str, value: float, limit: float, why: str) -> None:
    """Refuse ``--option value`` above ``limit``; ``why`` says what such a value would cost."""
    if not (isinstance(value, int) or math.isfinite(value)) or value > limit:
        shown = value if isinstance(value, int) else f"{value:g}"
        raise TempflowError(f"--{option} {shown} is above the limit {limit:g}: {why}")


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


def check_seed(option: str, seed: int) -> None:
    """Seeds feed ``torch.manual_seed`` and numpy's generators: 0 .. 2**63 - 1."""
    if not 0 <= seed < 2**63:
        raise TempflowError(f"--{option} {seed} is not a seed: use a whole number from 0 to 2**63 - 1")


def check_sampling(resolution: int, guidance_scale: float, negative_prompt: str) -> None:
    """The sampling options rollout and eval share: image side, guidance, the negative prompt."""
    check_at_most("resolution", resolution, 8192, "one latent state alone would fill a GPU")
    if resolution < 0:
        raise TempflowError(f"--resolution must be >= 0, 0 meaning the model's own (got {resolution})")
    if not (math.isfinite(guidance_scale) and 0 <= guidance_scale <= 100):
        raise TempflowError(f"--guidance-scale {guidance_scale:g} must lie in [0, 100] (0: the kind's default)")
    check_at_most("negative-prompt", len(negative_prompt), 10000, "characters make a prompt no tokenizer keeps")
