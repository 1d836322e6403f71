"""Seeds derived from names: every random draw of a stage comes from a seed made of what it is for
(the rollout's noise of prompt p and seed j, a branch's SDE noise, an evaluation image), so the
draws do not depend on batching, process count or order."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of values; stable across runs, platforms and Python versions."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seeded_normal(shape: tuple[int, ...], seeds: list[int]) -> Tensor:
    """One standard normal tensor of ``shape`` per seed, stacked: ``(len(seeds), *shape)``, float32."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
