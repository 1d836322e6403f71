"""Click options generated from a stage's config dataclass, so each field is documented once.

The docstring written under a dataclass field becomes the option's help; its default and type
become the option's; a registry dict given in ``choices`` becomes a ``click.Choice`` (a typo then
fails at parse time).

The dataclass is read from its module's source, not imported: ``tempflow --help``, every
``tempflow CMD --help`` and option errors never import torch (the stage modules do), so they
answer at once. Field defaults and the registries named as ``"module:NAME"`` must therefore be
literals; :func:`config_fields` refuses anything else, and a test compares what it reads with the
imported dataclasses. What is read is kept beside the bytecode, as Python keeps a ``.pyc``
(``__pycache__/tempflow-options.json``, by each source file's size and modification time), so that
a command reads the sources it needs once, not at every start.
"""

from __future__ import annotations

import ast
import bisect
import dataclasses
import functools
import importlib.util
import json
import os
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
_KINDS = {kind.__name__: kind for kind in (int, float, str, bool, list, tuple, dict)}
"""The types a field's option may take, by name (a kept reading names them)."""


@functools.cache
def _module_file(module: str) -> Path:
    """The file of ``module``, found on disk below its top-level package: no package of the path is
    imported (``stages/__init__.py`` holds a docstring; the others may load numpy or torch)."""
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
    return path


@functools.cache
def _source_lines(module: str) -> tuple[str, ...]:
    return tuple(_module_file(module).read_text(encoding="utf-8").splitlines())


def _defines(node: ast.stmt, name: str) -> bool:
    if isinstance(node, ast.ClassDef):
        return node.name == name
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return any(isinstance(t, ast.Name) and t.id == name for t in targets)


_HEAD = re.compile(r"(class\s+(\w+)\b)|((\w+)\s*[:=])")
"""A line that may start a top-level ``class NAME`` or ``NAME =`` / ``NAME:`` statement."""


@functools.cache
def _heads(module: str) -> tuple[dict[tuple[bool, str], list[int]], tuple[int, ...]]:
    """Where each name's class or assignment may start (``(is_class, name) -> line indices``), and
    every line that starts in column 0 (where a statement may end): one scan of the module."""
    heads: dict[tuple[bool, str], list[int]] = {}
    column_0 = []
    for i, line in enumerate(_source_lines(module)):
        if line[:1] in ("", " ", "\t", "#"):
            continue
        column_0.append(i)
        found = _HEAD.match(line)
        if found:
            key = (True, found.group(2)) if found.group(2) else (False, found.group(4))
            heads.setdefault(key, []).append(i)
    return heads, tuple(column_0)


@functools.cache
def _statement(module: str, name: str, kinds: tuple[type[ast.stmt], ...]) -> ast.stmt | None:
    """The module's top-level statement of one of ``kinds`` that defines ``name``. When exactly one
    line starts like that statement (``class name`` or ``name =`` / ``name:`` in column 0), that
    statement alone is parsed, since parsing a whole module would add that module's parse to
    ``--help``. The statement ends at the first line starting in column 0 where what came before
    parses; a line of a string or of brackets that starts there does not end it. Anything less
    plain (several such lines, e.g. an example in a docstring, or none, e.g. ``A = name = ...``)
    falls back to parsing the whole module."""
    lines = _source_lines(module)
    heads, column_0 = _heads(module)
    starts = heads.get((kinds == (ast.ClassDef,), name), [])
    if len(starts) == 1:
        after = bisect.bisect_right(column_0, starts[0])
        for end in (list(column_0[after:after + 20]) + [len(lines)])[:20]:
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


CACHE_FILE = Path(__file__).parent / "__pycache__" / "tempflow-options.json"
"""Where what was read from the sources is kept (a test points it elsewhere)."""
_CACHE_VERSION = 1


@functools.cache
def _cache() -> dict[str, Any]:
    """The kept readings: ``{module: {"stamp": [mtime_ns, size], "read": {what: value}}}``."""
    try:
        kept = json.loads(CACHE_FILE.read_text())
    except (OSError, ValueError):
        return {"version": _CACHE_VERSION, "modules": {}, "dirty": False}
    if not isinstance(kept, dict) or kept.get("version") != _CACHE_VERSION or not isinstance(kept.get("modules"), dict):
        return {"version": _CACHE_VERSION, "modules": {}, "dirty": False}
    return {**kept, "dirty": False}


def _stamp(module: str) -> list[int]:
    status = os.stat(_module_file(module))
    return [status.st_mtime_ns, status.st_size]


def _kept(what: str, ref: str, read: Callable[[], Any]) -> Any:
    """``read()`` of ``ref`` (``"module:NAME"``), from the kept readings when the module's file is
    the one they were taken from; a new reading is kept (when it survives JSON unchanged)."""
    module = _split(ref)[0]
    cache, stamp, key = _cache(), _stamp(module), f"{what}:{ref}"
    entry = cache["modules"].get(module)
    if not isinstance(entry, dict) or entry.get("stamp") != stamp:
        entry = cache["modules"][module] = {"stamp": stamp, "read": {}}
    if key in entry["read"]:
        return entry["read"][key]
    value = read()
    try:
        survives = json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):  # a field without a default, say
        survives = False
    if survives:
        entry["read"][key], cache["dirty"] = value, True
    return value


def save_readings() -> None:
    """Write what was read, if anything new was (atomically; a folder the process may not write in
    keeps nothing, and the sources are read again next time)."""
    cache = _cache()
    if not cache["dirty"]:
        return
    kept = {"version": _CACHE_VERSION, "modules": cache["modules"]}
    try:
        CACHE_FILE.parent.mkdir(exist_ok=True)
        partial = CACHE_FILE.with_name(f"{CACHE_FILE.name}.{os.getpid()}")
        partial.write_text(json.dumps(kept))
        os.replace(partial, CACHE_FILE)
        cache["dirty"] = False
    except OSError:
        pass


@functools.cache
def config_fields(ref: str) -> tuple[Field, ...]:
    """The fields of the dataclass ``ref`` (``"stages.artifacts.rollout_config:RolloutConfig"``), in
    order, read from its source: name, literal default, type and the string literal that follows
    each field."""
    rows = _kept("fields", ref, lambda: [[f.name, f.default, f.doc, f.kind.__name__] for f in _read_fields(ref)])
    return tuple(Field(name, default, doc, _KINDS[kind]) for name, default, doc, kind in rows)


def _read_fields(ref: str) -> list[Field]:
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


@functools.cache
def literal(ref: str) -> Any:
    """The literal value a module assigns to a name at its top level (``"stages.artifacts.rollout_config:ALGORITHMS"``)."""
    return _kept("literal", ref, lambda: _read_literal(ref))


def _read_literal(ref: str) -> Any:
    module, name = _split(ref)
    node = _statement(module, name, (ast.Assign, ast.AnnAssign))
    if node is not None and node.value is not None:
        return ast.literal_eval(node.value)
    raise ImportError(f"{module} assigns no literal {name}")


@functools.cache
def literal_keys(ref: str) -> tuple[str, ...]:
    """The string keys of a dict a module assigns to a name at its top level, whatever its values
    (``"stages.rewards.builtin:REWARDS"``, whose values are functions)."""
    return tuple(_kept("keys", ref, lambda: _read_keys(ref)))


def _read_keys(ref: str) -> list[str]:
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
