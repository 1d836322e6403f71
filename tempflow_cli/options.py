"""Click options generated from a stage's config dataclass, so each field is documented once.

The docstring written under a dataclass field becomes the option's help; its default and type
become the option's; a registry dict given in ``choices`` becomes a ``click.Choice`` (a typo then
fails at parse time).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

import click


def field_docs(cls: type) -> dict[str, str]:
    """The string literal that follows each annotated field in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def config_options(cls: type, choices: dict[str, dict[str, str]] | None = None,
                   skip: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator adding one ``--field-name`` option per field of dataclass ``cls``."""
    docs = field_docs(cls)
    choices = choices or {}

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            kind: Any = click.Choice(list(choices[f.name])) if f.name in choices else type(default)
            help_text = docs.get(f.name, "")
            if f.name in choices:
                help_text += " " + "; ".join(f"{k}: {v}" for k, v in choices[f.name].items())
            fn = click.option(f"--{f.name.replace('_', '-')}", f.name, type=kind, default=default,
                              show_default=True, help=help_text)(fn)
        return fn

    return decorate


def pop_config(cls: type, kwargs: dict[str, Any]) -> Any:
    """Build ``cls`` from (and remove its fields from) a command's keyword arguments."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: kwargs.pop(name) for name in list(kwargs) if name in names})
