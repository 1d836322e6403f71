"""Built-in worlds: prompt grammars with a renderer of ground-truth images and a weight-free reward,
for pretraining and evaluating without downloads. A world module offers the hooks the generic
stages call: ``training_batch`` (`tempflow pretrain`), ``eval_prompts``, ``parse_prompts`` and
``image_verdict`` (`tempflow eval`, when one of its ``WORLD_REWARDS`` is scored), ``EVAL_SPLITS``.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

from stages.worlds import shapes

WORLDS = {"shapes": "GenEval-like coloured squares, circles and triangles on black (stages.worlds.shapes)"}
"""The built-in worlds by name (`tempflow pretrain --world`)."""
_MODULES: dict[str, ModuleType] = {"shapes": shapes}


def world(name: str) -> ModuleType:
    """The module of a built-in world (``name`` is checked by the config that names it)."""
    return _MODULES[name]


def scoring_world(rewards: Iterable[str]) -> ModuleType | None:
    """The world one of whose own rewards is among ``rewards`` (its prompts must then follow its
    grammar, and its verdicts are written too), or None."""
    names = set(rewards)
    return next((module for module in _MODULES.values() if names & set(module.WORLD_REWARDS)), None)
