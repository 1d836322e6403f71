"""Rewards: functions from images and prompts to one score per image.

A reward function takes ``images``, a uint8 array ``(N, H, W, 3)``, and ``prompts``, a list of N
strings, and returns N finite floats (higher is better). Built-ins live in :data:`REWARDS`; any
importable ``module:function`` with that signature works too.
"""

from __future__ import annotations

import importlib
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from stages.artifacts import MAX_REWARD_WEIGHT, check_rewards
from stages.errors import TempflowError
from stages.shapes import shapes_reward, shapes_strict

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
    "shapes": shapes_reward,  # fraction of GenEval-style requirements met (stages.shapes)
    "shapes_strict": shapes_strict,  # 1 when all are met
}


@dataclass(frozen=True)
class RewardSpec:
    """One component of the reward: a built-in name or ``module:function``, and its weight."""

    name: str
    weight: float = 1.0

    @property
    def column(self) -> str:
        """Suffix of the component's ``reward_<name>`` column (``module.function`` for user rewards)."""
        return self.name.replace(":", ".")


def parse_reward_spec(text: str) -> RewardSpec:
    """``NAME``, ``NAME:WEIGHT``, ``module:function`` or ``module:function:WEIGHT``."""
    head, sep, tail = text.rpartition(":")
    weight = 1.0
    # a tail that is a number (and not a name such as `nan` or `inf`) is the weight
    if sep and not tail.isidentifier():
        try:
            weight = float(tail)
            text = head
        except ValueError:
            pass
    if not (np.isfinite(weight) and abs(weight) <= MAX_REWARD_WEIGHT):
        raise TempflowError(f"reward {text!r}: weight must be a finite number within ±{MAX_REWARD_WEIGHT:g}")
    if text not in REWARDS and not _PLUGIN.match(text):
        raise TempflowError(
            f"unknown reward {text!r}; choose one of {', '.join(REWARDS)} or give a plugin as module:function "
            "(e.g. my_rewards:brightness)"
        )
    return RewardSpec(text, weight)


_PLUGIN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
"""A plugin reward's name: a dotted module path, a colon, a function name. Only such a name, and
never a built-in's, is imported."""


def resolve_reward(spec: RewardSpec) -> RewardFn:
    """The callable behind a spec. A plugin (``module:function``) is imported here, which runs the
    module's code: a plugin reward is code you run, like any Python you import."""
    if spec.name in REWARDS:
        return REWARDS[spec.name]
    if not _PLUGIN.match(spec.name):
        raise TempflowError(f"reward {spec.name!r} is neither a built-in nor module:function")
    module_name, _, attr = spec.name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise TempflowError(
            f"reward {spec.name}: cannot import module {module_name!r} ({err}); is it on PYTHONPATH?"
        ) from None
    except Exception as err:  # the plugin's own code failed while importing: its bug, named in one line
        raise TempflowError(f"reward {spec.name}: importing {module_name!r} raised {type(err).__name__}: {err} "
                            "(`tempflow --debug` shows the traceback)") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TempflowError(f"reward {spec.name}: module {module_name!r} has no function {attr!r}")
    return fn


def call_reward(spec: RewardSpec, fn: RewardFn, images: np.ndarray, prompts: list[str], keys: list[str]) -> np.ndarray:
    """Run one reward on a batch and check what came back: N finite floats."""
    try:
        returned = fn(images, prompts)
    except Exception as err:  # the plugin's bug, named in one line; --debug keeps its traceback
        raise TempflowError(f"reward {spec.name} raised {type(err).__name__}: {err} "
                            "(`tempflow --debug` shows the traceback)") from err
    try:
        values = np.asarray(returned, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TempflowError(f"reward {spec.name} did not return numbers ({err})") from None
    if values.shape[0] != len(keys):
        raise TempflowError(f"reward {spec.name} returned {values.shape[0]} scores for {len(keys)} images")
    check_rewards(values, keys, f"reward {spec.name}")
    return values
