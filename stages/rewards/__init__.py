"""Rewards: functions from images and prompts to one score per image.

A reward takes ``images``, a uint8 array ``(N, H, W, 3)``, and ``prompts``, a list of N strings, and
returns N finite floats (higher is better). Four kinds, each named in ``--reward NAME[:WEIGHT]``:

- built-in functions (:data:`REWARDS`, ``stages.rewards.builtin``);
- model rewards (:data:`MODEL_REWARDS`, ``stages.rewards.models``), loaded once per stage from the
  local folder that ``--reward-model NAME=DIR`` names;
- remote rewards (``stages.rewards.remote``): ``--reward-url NAME=URL`` names a server that scores
  batches over HTTP, and NAME is then a reward;
- plugins: any importable ``module:function`` with the signature above.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from stages.artifacts.scores import MAX_REWARD_WEIGHT, check_rewards, reward_column

# The model and remote kinds are imported when such a reward is asked for, for start-up time: the CLI
# reads this module to parse --reward, and those kinds load transformers or an HTTP client.
from stages.rewards.builtin import REWARDS, RewardFn, jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb
from stages.support.dtypes import DTYPES
from stages.support.errors import TempflowError
from stages.support.rules import Rules

__all__ = ["MODEL_REWARDS", "REWARDS", "RewardFn", "RewardRuntime", "RewardSpec", "score_batch", "call_reward", "jpeg_compressibility",
           "jpeg_incompressibility", "jpeg_size_kb", "load_rewards", "parse_reward_spec", "parse_source",
           "plan_rewards", "resolve_reward"]

MODEL_REWARDS: dict[str, str] = {
    "pickscore": "PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences",
    "clipscore": "CLIPScore (Hessel et al. 2021): 2.5 max(cos, 0) of any CLIP model",
    "hpsv2": "HPSv2 (Wu et al. 2023): an open_clip ViT-H/14 fine-tuned on human preference pairs",
    "aesthetic": "LAION aesthetic predictor v2: an MLP on CLIP ViT-L/14 image embeddings, 1 to 10",
}
"""Rewards computed by a model from a local folder (``--reward-model NAME=DIR``)."""


@dataclass(frozen=True)
class RewardRuntime(Rules):
    """How model and remote rewards run: model rewards on ``device`` in ``dtype``; a remote reward
    waits ``timeout`` seconds a try and tries ``retries`` more times (score's and eval's
    ``--reward-*`` options)."""

    command = "score"
    option_prefix = "reward-"

    device: str = "cpu"
    dtype: str = "fp32"
    timeout: float = 120.0
    retries: int = 3

    def __post_init__(self) -> None:
        self.choice("dtype", DTYPES)
        self.positive("timeout")
        self.at_least(0, "retries")
        self.at_most("retries", 20, "each retry waits twice as long as the one before, up to a minute")


@dataclass(frozen=True)
class RewardSpec:
    """One component of the reward: its name, its weight, and where a model or remote reward comes
    from (the model's folder or the server's URL; empty for built-ins and plugins)."""

    name: str
    weight: float = 1.0
    source: str = ""
    processor: str = ""
    """A model reward's tokenizer and image processor folder, when they are not in its own folder."""

    @property
    def column(self) -> str:
        """Suffix of the component's ``reward_<name>`` column (``module.function`` for user rewards)."""
        return reward_column(self.name)

    def record(self) -> dict[str, Any]:
        """What the scores' metadata keeps of this component."""
        return {"name": self.name, "weight": self.weight, **({"source": self.source} if self.source else {}),
                **({"processor": self.processor} if self.processor else {})}


_PLUGIN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
"""A plugin reward's name: a dotted module path, a colon, a function name. Only such a name, and
never a built-in's, is imported."""
_REMOTE = re.compile(r"^[A-Za-z_][\w-]*$")
"""A remote reward's name, as ``--reward-url NAME=URL`` gives it."""


def parse_reward_spec(text: str, remote: Sequence[str] = ()) -> RewardSpec:
    """``NAME``, ``NAME:WEIGHT``, ``module:function`` or ``module:function:WEIGHT``; NAME is a
    built-in, a model reward, or one of ``remote`` (the names ``--reward-url`` gives)."""
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
    if text not in REWARDS and text not in MODEL_REWARDS and text not in remote and not _PLUGIN.match(text):
        raise TempflowError(
            f"unknown reward {text!r}; choose one of {', '.join([*REWARDS, *MODEL_REWARDS])}, name a server "
            f"with --reward-url {text}=URL, or give a plugin as module:function (e.g. my_rewards:brightness)"
        )
    return RewardSpec(text, weight)


def parse_source(text: str, option: str) -> tuple[str, str]:
    """``NAME=VALUE`` of ``--reward-model``, ``--reward-processor`` or ``--reward-url``."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise TempflowError(f"{option} {text!r}: expected NAME={'URL' if option == '--reward-url' else 'DIR'}")
    return name, value


def plan_rewards(texts: Sequence[str], models: Mapping[str, str] | None = None,
                 urls: Mapping[str, str] | None = None, processors: Mapping[str, str] | None = None) -> list[RewardSpec]:
    """The reward components of ``--reward`` options, each with its folder or URL (and a model reward's
    processor folder) attached; refuses a model reward without a folder, a folder, URL or processor for
    no component, and a component given twice."""
    models = {name: str(Path(folder).expanduser()) for name, folder in (models or {}).items()}
    processors = {name: str(Path(folder).expanduser()) for name, folder in (processors or {}).items()}
    urls = dict(urls or {})
    for name in processors:
        if name not in models:
            raise TempflowError(f"--reward-processor {name}=...: a processor folder goes with a model reward's "
                                f"--reward-model {name}=DIR")
    for name in models:
        if name not in MODEL_REWARDS:
            raise TempflowError(f"--reward-model {name}=...: {name!r} is not a model reward; "
                                f"choose one of {', '.join(MODEL_REWARDS)}")
    for name in urls:
        if name in REWARDS or name in MODEL_REWARDS or not _REMOTE.match(name):
            raise TempflowError(f"--reward-url {name}=...: name the server's reward with letters, digits, _ or -, "
                                "and not as a built-in or model reward")
        if not re.match(r"^https?://", urls[name]):
            raise TempflowError(f"--reward-url {name}={urls[name]}: the URL must start with http:// or https://")
    specs = [parse_reward_spec(text, remote=tuple(urls)) if isinstance(text, str) else text for text in texts]
    if not specs:
        raise TempflowError("no reward given; pass --reward NAME[:WEIGHT] at least once")
    if len({s.column for s in specs}) != len(specs):
        raise TempflowError("the same reward is given twice; give each --reward once, with a weight")
    given = {s.name for s in specs}
    for name, option in [*((n, "--reward-model") for n in models), *((n, "--reward-url") for n in urls)]:
        if name not in given:
            raise TempflowError(f"{option} {name}=... names no --reward; add --reward {name}[:WEIGHT]")
    missing = [s.name for s in specs if s.name in MODEL_REWARDS and s.name not in models and not s.source]
    if missing:
        raise TempflowError(f"reward {missing[0]} is a model: name its folder with --reward-model {missing[0]}=DIR")
    return [replace(s, source=str(models.get(s.name) or urls.get(s.name) or s.source),
                    processor=processors.get(s.name, s.processor)) for s in specs]


def resolve_reward(spec: RewardSpec, runtime: RewardRuntime = RewardRuntime()) -> RewardFn:
    """The callable behind a spec, loaded once: a built-in, the model of its folder, a client of its
    server, or a plugin. A plugin (``module:function``) is imported here, which runs the module's
    code: a plugin reward is code you run, like any Python you import."""
    if spec.name in REWARDS:
        return REWARDS[spec.name]
    if spec.name in MODEL_REWARDS:
        if not spec.source:
            raise TempflowError(f"reward {spec.name} is a model: name its folder with --reward-model {spec.name}=DIR")
        from stages.rewards.models import load_model_reward

        return load_model_reward(spec.name, Path(spec.source), runtime.device, runtime.dtype,
                                 Path(spec.processor) if spec.processor else None)
    if spec.source:
        from stages.rewards.remote import RemoteReward

        return RemoteReward(spec.name, spec.source, timeout=runtime.timeout, retries=runtime.retries)
    if not _PLUGIN.match(spec.name):
        raise TempflowError(f"reward {spec.name!r} is neither a built-in nor module:function")
    return _import_plugin(spec.name)


def _import_plugin(name: str) -> RewardFn:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise TempflowError(
            f"reward {name}: cannot import module {module_name!r} ({err}); is it on PYTHONPATH?"
        ) from None
    except Exception as err:  # the plugin's own code failed while importing: its bug, named in one line
        raise TempflowError(f"reward {name}: importing {module_name!r} raised {type(err).__name__}: {err} "
                            "(`tempflow --debug` shows the traceback)") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TempflowError(f"reward {name}: module {module_name!r} has no function {attr!r}")
    return fn


def load_rewards(specs: Sequence[RewardSpec], runtime: RewardRuntime = RewardRuntime()) -> list[RewardFn]:
    """Every component's callable, each model loaded once, before any image is read."""
    return [resolve_reward(s, runtime) for s in specs]


def score_batch(specs: Sequence[RewardSpec], fns: Sequence[RewardFn], images: np.ndarray, prompts: list[str],
                keys: list[str]) -> np.ndarray:
    """Every component on one batch, ``(N, R)``, each checked by :func:`call_reward`."""
    return np.stack([call_reward(s, fn, images, prompts, keys) for s, fn in zip(specs, fns)], axis=1)


def call_reward(spec: RewardSpec, fn: RewardFn, images: np.ndarray, prompts: list[str], keys: list[str]) -> np.ndarray:
    """Run one reward on a batch and check what came back: N finite floats."""
    try:
        returned = fn(images, prompts)
    except TempflowError:
        raise
    except Exception as err:  # the plugin's bug, named in one line; --debug keeps its traceback
        raise TempflowError(f"reward {spec.name} raised {type(err).__name__}: {err} "
                            "(`tempflow --debug` shows the traceback)") from err
    try:
        values = np.asarray(returned, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise TempflowError(f"reward {spec.name} did not return numbers ({err})") from None
    if values.shape[0] != len(keys):
        raise TempflowError(f"reward {spec.name} returned {values.shape[0]} scores for {len(keys)} images")
    check_rewards(values, keys, f"reward {spec.name}" + (f" ({spec.source})" if spec.source else ""))
    return values

