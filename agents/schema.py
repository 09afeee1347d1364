"""Plain data (a task file, a run's saved config, command-line settings) checked against the
config dataclasses before anything is built.

Generic, driven by each dataclass's fields and type hints, so a field added later is checked
without touching this module: every value is validated by pydantic in strict mode against its
field's hint (``"400"`` is not an int, ``"ten"`` not a grid size; ranges come from
``Annotated[int, Field(ge=...)]`` in the hint), nested dataclasses are checked key by key,
unknown keys get a "did you mean", and every problem is reported at once with its key path
(``ppo.n_steps: ...``). The dataclass's own ``__post_init__`` checks (cross-field rules,
registries) run last, on values of the right types.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

__all__ = ["SchemaError", "build", "load_yaml", "set_dotted", "suggest"]


class SchemaError(ValueError):
    """Data that does not fit a config dataclass; ``problems`` lists each, with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4`` as a float (YAML 1.2) instead of a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML as plain data (safe), with ``1e-4`` read as the float it looks like."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def suggest(key: str, known: typing.Iterable[str]) -> str | None:
    """The known key closest to a mistyped ``key`` (difflib), or ``None``."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``dotted = "a.b"``, creating missing mappings (an
    unknown key is then reported by :func:`build`, with its suggestion)."""
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {} if node.get(p) is None else node[p]
        if not isinstance(node[p], dict):
            raise SchemaError([f"{dotted}: {p} is not a section of settings"])
        node = node[p]
    node[leaf] = value


@cache
def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """``name -> (field, resolved type hint with its Annotated metadata)``."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


@cache
def _adapter(cls: type, name: str) -> TypeAdapter:
    return TypeAdapter(_fields(cls)[name][1])


def _strip(hint: Any) -> Any:
    """``hint`` without ``Annotated`` metadata."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def _members(hint: Any) -> tuple[Any, ...]:
    """The alternatives of a union hint (``X | None`` -> ``(X, None)``), else ``(hint,)``."""
    hint = _strip(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(_strip(a) for a in typing.get_args(hint))
    return (hint,)


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a hint names (``X`` or ``X | None``), if any."""
    found = [m for m in _members(hint) if isinstance(m, type) and dataclasses.is_dataclass(m)]
    return found[0] if len(found) == 1 else None


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _kind(value: Any) -> str:
    name = {"str": "string", "NoneType": "null", "dict": "mapping", "list": "list"}.get(
        type(value).__name__, type(value).__name__
    )
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


#: Error types where a string was given for a number or a boolean.
_NOT_FROM_STRINGS = {"int_type", "float_type", "bool_type"}


def _describe(exc: ValidationError, where: str) -> list[str]:
    out = []
    for err in exc.errors(include_url=False):
        loc = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        msg = err["msg"]
        msg = msg[0].lower() + msg[1:]
        value = err.get("input")
        got = "" if err["type"] == "missing" else f", got {value!r} ({_kind(value)}"
        if got and isinstance(value, str) and err["type"] in _NOT_FROM_STRINGS:
            got += ": write numbers and true/false without quotes"
        out.append(f"{loc}: {msg}{got}{')' if got else ''}")
    return out


def _unknown(cls: type, key: str, where: str) -> str:
    known = _fields(cls)
    close = suggest(str(key), known)
    if close is None:  # a key of a nested section given one level too high, e.g. `grid`
        for name, (_, hint) in known.items():
            sub = _dataclass_of(hint)
            if sub is not None and key in _fields(sub):
                close = f"{name}.{key}"
                break
    hint = f"; did you mean {close!r}?" if close else ""
    return f"{where}: unknown key{hint} (known: {', '.join(sorted(known))})"


def _check(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """An instance of ``cls`` from ``data``, or ``None`` after appending to ``problems``."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        problems.append(
            f"{path or 'settings'}: expected a mapping of settings, got {data!r} ({_kind(data)})"
        )
        return None
    before = len(problems)
    fields = _fields(cls)
    for key in data:
        if key not in fields:
            problems.append(_unknown(cls, key, f"{path}.{key}" if path else str(key)))
    values: dict[str, Any] = {}
    for name, (f, hint) in fields.items():
        where = f"{path}.{name}" if path else name
        value = data.get(name, dataclasses.MISSING)
        sub = _dataclass_of(hint)
        if value is None and sub is not None and None not in _members(hint):
            value = dataclasses.MISSING  # `env:` left empty in YAML: the defaults
        if value is dataclasses.MISSING:
            if not _has_default(f):
                problems.append(f"{where}: missing (required)")
            continue
        if sub is not None and (isinstance(value, Mapping) or None not in _members(hint)):
            values[name] = _check(sub, value, where, problems)
            continue
        if isinstance(value, list) and tuple in {typing.get_origin(m) for m in _members(hint)}:
            value = tuple(value)  # YAML and JSON have lists only
        try:
            values[name] = _adapter(cls, name).validate_python(value, strict=True)
        except ValidationError as exc:
            problems.extend(_describe(exc, where))
    if len(problems) > before:
        return None
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # the dataclass's own checks (__post_init__)
        problems.append(f"{path}: {exc}" if path else str(exc))
        return None


def build(cls: type, data: Any, path: str = "") -> Any:
    """An instance of the dataclass ``cls`` from plain ``data``, every value checked.

    Args:
        cls: A config dataclass (nested dataclass fields are built from nested mappings).
        data: A mapping of its settings (or an instance, returned as is).
        path: Key path of ``data`` inside a larger document, prefixed to messages.

    Raises:
        SchemaError: Every problem found, each with its key path and, for an unknown key, the
            nearest known one.
    """
    problems: list[str] = []
    out = _check(cls, data, path, problems)
    if problems:
        raise SchemaError(problems)
    return out
