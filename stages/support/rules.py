"""The words config rules are written in, so that every refusal reads the same:

    <command>: --<option> must be <what it must be>, got <the value>

A config dataclass mixes in :class:`Rules`, names its command (``rollout``) and states each rule once
in its ``__post_init__`` with these helpers. A config shared by several commands (the reward runtime
of ``score`` and ``eval``, the training options of ``rec pretrain`` and ``rec train``) is named by the
command that builds it (:func:`naming`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

from stages.support.errors import TempflowError

_NAMING: contextvars.ContextVar[str | None] = contextvars.ContextVar("tempflow_naming", default=None)
_GIVEN = object()

SEED_LIMIT = 2**63
"""Seeds feed ``torch.manual_seed`` and numpy's generators: 0 .. 2**63 - 1."""


@contextlib.contextmanager
def naming(command: str) -> Iterator[None]:
    """Configs built inside this block name ``command`` in their refusals (the CLI builds each
    command's configs so)."""
    token = _NAMING.set(command)
    try:
        yield
    finally:
        _NAMING.reset(token)


def shown(value: Any) -> str:
    """A value as a refusal shows it: numbers plainly, strings quoted."""
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Rules:
    """Helpers a config's ``__post_init__`` states its rules with; each raises one
    :class:`~stages.support.errors.TempflowError` in the common form."""

    command: ClassVar[str] = ""
    """The command whose options the config holds (``rollout``), unless :func:`naming` says another."""
    option_prefix: ClassVar[str] = ""
    """What a field's option name starts with besides the field's (``reward-`` for ``--reward-timeout``)."""
    flag: ClassVar[str] = "--"
    """How a refusal names a field: as an option (``--num-steps``), or, for a config that is no command's
    options (a model's architecture), by its own name (``""``: ``image_size``)."""

    def refuse(self, option: str, must: str, got: Any = _GIVEN) -> TempflowError:
        """The error for the field ``option`` and its value (or ``got``)."""
        value = getattr(self, option) if got is _GIVEN else got
        command = _NAMING.get() or self.command
        name = f"{self.flag}{self.option_prefix}{option.replace('_', '-')}" if self.flag else option
        return TempflowError(f"{command}: {name} must be {must}, got {shown(value)}")

    def require(self, ok: bool, option: str, must: str, got: Any = _GIVEN) -> None:
        if not ok:
            raise self.refuse(option, must, got)

    def at_least(self, low: int, *options: str) -> None:
        """Whole numbers of at least ``low``."""
        for option in options:
            value = getattr(self, option)
            self.require(isinstance(value, int) and not isinstance(value, bool) and value >= low, option, f">= {low}")

    def positive(self, *options: str) -> None:
        """Finite numbers above 0."""
        for option in options:
            value = getattr(self, option)
            self.require(is_finite(value) and value > 0, option, "a finite number > 0")

    def non_negative(self, *options: str) -> None:
        """Finite numbers of at least 0."""
        for option in options:
            value = getattr(self, option)
            self.require(is_finite(value) and value >= 0, option, "a finite number >= 0")

    def at_most(self, option: str, limit: float, why: str, value: Any = _GIVEN) -> None:
        """At most ``limit``; ``why`` says what a larger value would cost (memory, time, a wrecked model)."""
        value = getattr(self, option) if value is _GIVEN else value
        self.require(is_finite(value) and value <= limit, option, f"at most {limit:g} ({why})", value)

    def not_below(self, option: str, low: float, why: str) -> None:
        """At least ``low``; ``why`` says what a smaller value would break."""
        value = getattr(self, option)
        self.require(is_finite(value) and value >= low, option, f"at least {low:g} ({why})")

    def within(self, option: str, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
        """A finite number in the interval ``[low, high]`` (ends open as said)."""
        value = getattr(self, option)
        ok = is_finite(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        self.require(ok, option, f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")

    def seeds(self, *options: str) -> None:
        """Seeds (0 .. 2**63 - 1)."""
        for option in options:
            value = getattr(self, option)
            self.require(isinstance(value, int) and not isinstance(value, bool) and 0 <= value < SEED_LIMIT, option,
                         "a whole number from 0 to 2**63 - 1")

    def choice(self, option: str, choices: Iterable[str]) -> None:
        """One of a registry's names."""
        names = list(choices)
        self.require(getattr(self, option) in names, option, f"one of {', '.join(names)}")
