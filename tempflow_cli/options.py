"""Click options generated from a stage's config dataclass, so each field is documented once.

The docstring written under a dataclass field becomes the option's help; its default and type
become the option's; a registry dict given in ``choices`` becomes a ``click.Choice`` (a typo then
fails at parse time).

The dataclass is read from its module's source, not imported: ``tempflow --help``, every
``tempflow CMD --help`` and option errors never import torch (the stage modules do), so they
answer at once. Field defaults and the registries named as ``"module:NAME"`` must therefore be
literals; :func:`config_fields` refuses anything else, and a test compares what it reads with the
imported dataclasses.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    default: Any
    doc: str


@functools.cache
def _source_lines(module: str) -> tuple[str, ...]:
    spec = importlib.util.find_spec(module)  # imports the parent packages only (their __init__ stay light)
    if spec is None or spec.origin is None:
        raise ImportError(f"no module {module}")
    return tuple(Path(spec.origin).read_text(encoding="utf-8").splitlines())


def _defines(node: ast.stmt, name: str) -> bool:
    if isinstance(node, ast.ClassDef):
        return node.name == name
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return any(isinstance(t, ast.Name) and t.id == name for t in targets)


def _statement(module: str, name: str, kinds: tuple[type[ast.stmt], ...]) -> ast.stmt | None:
    """The module's top-level statement of one of ``kinds`` that defines ``name``. When exactly one
    line starts like that statement (``class name`` or ``name =`` / ``name:`` in column 0), that
    statement alone is parsed, since parsing a whole module would add that module's parse to
    ``--help``. The statement ends at the first line starting in column 0 where what came before
    parses; a line of a string or of brackets that starts there does not end it. Anything less
    plain (several such lines, e.g. an example in a docstring, or none, e.g. ``A = name = ...``)
    falls back to parsing the whole module."""
    lines = _source_lines(module)
    word = re.escape(name)
    head = re.compile(rf"class {word}\b" if kinds == (ast.ClassDef,) else rf"{word}\s*(:|=)")
    starts = [i for i, line in enumerate(lines) if head.match(line)]
    if len(starts) == 1:
        ends = [j for j in range(starts[0] + 1, len(lines)) if lines[j][:1] not in ("", " ", "\t", "#")]
        for end in (ends + [len(lines)])[:20]:
            try:
                body = ast.parse("\n".join(lines[starts[0]:end])).body
            except SyntaxError:
                continue
            if len(body) == 1 and isinstance(body[0], kinds) and _defines(body[0], name):
                return body[0]
            break
    tree = ast.parse("\n".join(lines))
    return next((n for n in tree.body if isinstance(n, kinds) and _defines(n, name)), None)


def _split(ref: str) -> tuple[str, str]:
    module, _, name = ref.partition(":")
    if not name:
        raise ValueError(f"{ref!r}: give a config as 'module:ClassName'")
    return module, name


def config_fields(ref: str) -> list[Field]:
    """The fields of the dataclass ``ref`` (``"stages.rollout:RolloutConfig"``), in order, read from
    its source: name, literal default, and the string literal that follows each field."""
    module, name = _split(ref)
    node = _statement(module, name, (ast.ClassDef,))
    if node is None:
        raise ImportError(f"{module} defines no class {name}")
    body, fields = node.body, []
    for node, after in zip(body, body[1:] + [None]):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        try:
            default = ast.literal_eval(node.value) if node.value is not None else dataclasses.MISSING
        except ValueError:
            raise TypeError(f"{ref}.{node.target.id}: its default must be a literal for the CLI to read it") from None
        doc = ""
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            doc = " ".join(after.value.value.split())
        fields.append(Field(node.target.id, default, doc))
    return fields


def literal(ref: str) -> Any:
    """The literal value a module assigns to a name at its top level (``"stages.rollout:ALGORITHMS"``)."""
    module, name = _split(ref)
    node = _statement(module, name, (ast.Assign, ast.AnnAssign))
    if node is not None and node.value is not None:
        return ast.literal_eval(node.value)
    raise ImportError(f"{module} assigns no literal {name}")


def config_options(ref: str, choices: dict[str, dict[str, str] | str] | None = None,
                   skip: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator adding one ``--field-name`` option per field of the dataclass ``ref``; a choice
    given as ``"module:NAME"`` is that module's literal registry."""
    resolved = {k: literal(v) if isinstance(v, str) else v for k, v in (choices or {}).items()}

    def decorate(fn: Callable) -> Callable:
        for f in reversed(config_fields(ref)):
            if f.name in skip:
                continue
            kind: Any = click.Choice(list(resolved[f.name])) if f.name in resolved else type(f.default)
            help_text = f.doc
            if f.name in resolved:
                help_text += " " + "; ".join(f"{k}: {v}" for k, v in resolved[f.name].items())
            fn = click.option(f"--{f.name.replace('_', '-')}", f.name, type=kind, default=f.default,
                              show_default=True, help=help_text)(fn)
        return fn

    return decorate


def pop_config(cls: type, kwargs: dict[str, Any]) -> Any:
    """Build ``cls`` from (and remove its fields from) a command's keyword arguments."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: kwargs.pop(name) for name in list(kwargs) if name in names})
