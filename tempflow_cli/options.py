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
    kind: type
    """The option's type: the annotation's (``int | None`` is ``int``), else the default's."""


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


@functools.cache
def _source_lines(module: str) -> tuple[str, ...]:
    """The source of ``module``, found on disk below its top-level package: no package of the path
    is imported (``stages/__init__.py`` is empty; the others may load numpy or torch)."""
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or (rest and not spec.submodule_search_locations):
        raise ImportError(f"no module {module}")
    if rest:
        base = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest.split("."))
        path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    else:
        path = Path(spec.origin or "")
    if not path.is_file():
        raise ImportError(f"no module {module}")
    return tuple(path.read_text(encoding="utf-8").splitlines())


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
    """The fields of the dataclass ``ref`` (``"stages.artifacts.rollout_config:RolloutConfig"``), in order, read from
    its source: name, literal default, type and the string literal that follows each field."""
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
        fields.append(Field(node.target.id, default, doc, _annotated_type(ref, node.target.id, node.annotation, default)))
    return fields


def _annotated_type(ref: str, name: str, annotation: ast.expr, default: Any) -> type:
    """``int``, ``float``, ``str`` or ``bool`` from an annotation such as ``int`` or ``int | None``."""
    text = ast.unparse(annotation).replace(" ", "")
    base = text.removesuffix("|None")
    if base in _TYPES:
        return _TYPES[base]
    if default is not None and default is not dataclasses.MISSING:
        return type(default)
    raise TypeError(f"{ref}.{name}: annotation {text} is not one the CLI can parse (int, float, str, bool, or one of them | None)")


def literal(ref: str) -> Any:
    """The literal value a module assigns to a name at its top level (``"stages.artifacts.rollout_config:ALGORITHMS"``)."""
    module, name = _split(ref)
    node = _statement(module, name, (ast.Assign, ast.AnnAssign))
    if node is not None and node.value is not None:
        return ast.literal_eval(node.value)
    raise ImportError(f"{module} assigns no literal {name}")


def literal_keys(ref: str) -> list[str]:
    """The string keys of a dict a module assigns to a name at its top level, whatever its values
    (``"stages.rewards.builtin:REWARDS"``, whose values are functions)."""
    module, name = _split(ref)
    node = _statement(module, name, (ast.Assign, ast.AnnAssign))
    if node is not None and isinstance(node.value, ast.Dict):
        return [ast.literal_eval(key) for key in node.value.keys]
    raise ImportError(f"{module} assigns no dict {name}")


def listing(registry: dict[str, Any]) -> str:
    """A registry as help text: ``name: what it is; ...`` (lists joined by commas)."""
    return "; ".join(f"{k}: {','.join(v) if isinstance(v, list) else v}" for k, v in registry.items())


def config_options(ref: str, choices: dict[str, dict[str, str] | str] | None = None,
                   skip: tuple[str, ...] = (), listed: dict[str, str] | None = None) -> Callable[[Callable], Callable]:
    """Decorator adding one ``--field-name`` option per field of the dataclass ``ref``; a choice
    given as ``"module:NAME"`` is that module's literal registry, and ``listed`` registries are
    written into a field's help (e.g. the defaults a free-text option falls back to)."""
    resolved = {k: literal(v) if isinstance(v, str) else v for k, v in (choices or {}).items()}
    extra = {k: literal(v) for k, v in (listed or {}).items()}

    def decorate(fn: Callable) -> Callable:
        for f in reversed(config_fields(ref)):
            if f.name in skip:
                continue
            help_text = f.doc
            if f.name in resolved:
                help_text += " " + listing(resolved[f.name])
            if f.name in extra:
                help_text += " (" + listing(extra[f.name]) + ")"
            option = f"--{f.name.replace('_', '-')}"
            if f.kind is bool:
                fn = click.option(option, f.name, is_flag=True, default=f.default, help=help_text)(fn)
                continue
            kind: Any = click.Choice(list(resolved[f.name])) if f.name in resolved else f.kind
            fn = click.option(option, f.name, type=kind, default=f.default, show_default=f.default is not None,
                              help=help_text)(fn)
        return fn

    return decorate


def pop_config(cls: type, kwargs: dict[str, Any], **given: Any) -> Any:
    """Build ``cls`` from (and remove its fields from) a command's keyword arguments, plus ``given``."""
    names = {f.name for f in dataclasses.fields(cls)} - set(given)
    return cls(**{name: kwargs.pop(name) for name in list(kwargs) if name in names}, **given)
