"""The built-in rewards: functions of the images alone (JPEG size) or of the shapes world."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np

from stages.worlds.shapes import shapes_reward, shapes_strict

# PIL is imported where a JPEG is encoded, for start-up time.

RewardFn = Callable[[np.ndarray, list[str]], Sequence[float]]


def jpeg_size_kb(images: np.ndarray) -> np.ndarray:
    """Size of each image as a quality-95 JPEG, in kB (1000 bytes), as DDPO defines it."""
    from PIL import Image

    sizes = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image, mode="RGB").save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    return np.asarray(sizes, dtype=np.float64)


def jpeg_compressibility(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Minus the JPEG size in kB: simpler, smoother images score higher."""
    return -jpeg_size_kb(images)


def jpeg_incompressibility(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """The JPEG size in kB: busier, more detailed images score higher."""
    return jpeg_size_kb(images)


REWARDS: dict[str, RewardFn] = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "shapes": shapes_reward,  # fraction of GenEval-style requirements met (stages.worlds.shapes)
    "shapes_strict": shapes_strict,  # 1 when all are met
}
