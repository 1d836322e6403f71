"""An example reward plugin: colourfulness (Hasler and Süsstrunk 2003), in plain numpy.

A plugin is any importable function ``f(images, prompts) -> N floats``: ``images`` is a uint8 array
``(N, H, W, 3)``, ``prompts`` the N prompts. Put its folder on PYTHONPATH and name it as
``module:function``:

    PYTHONPATH=examples/rewards tempflow score --rollout r --reward colorfulness:colorfulness --out s.parquet

A plugin that needs a model loads it once, on its first call, and keeps it (see ``_model`` below),
so that a stage pays the load once. Its exceptions end the stage with one line naming it
(``tempflow --debug`` keeps the traceback). A scorer that cannot be installed beside tempflow's
diffusers and transformers (ImageReward's package does not import under transformers 5; PaddleOCR
downloads its models at start-up) runs in its own environment behind ``server.py`` here, and
tempflow reaches it with ``--reward-url``.
"""

from __future__ import annotations

from functools import cache

import numpy as np


@cache
def _model() -> dict[str, float]:
    """Where a real plugin would load its weights (once per process); here, the metric's constants."""
    return {"std": 1.0, "mean": 0.3}


def colorfulness(images: np.ndarray, prompts: list[str]) -> np.ndarray:
    """``sqrt(std_rg^2 + std_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2)`` over each image's pixels, with
    ``rg = R - G`` and ``yb = (R + G) / 2 - B``: 0 for grey images, about 100 for vivid ones."""
    weights = _model()
    rgb = images.astype(np.float64)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    spread = np.hypot(rg.std(axis=(1, 2)), yb.std(axis=(1, 2)))
    centre = np.hypot(rg.mean(axis=(1, 2)), yb.mean(axis=(1, 2)))
    return weights["std"] * spread + weights["mean"] * centre
