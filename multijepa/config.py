"""Typed, strict conversion of nested YAML data to frozen dataclasses (the machinery under recipes).

``build(cls, raw, prefix, where)`` checks every key and value of ``raw`` against the dataclass'
annotations (Literal choices, tuples, numbers as people write them, nested sections) and raises
:class:`RecipeError` naming ``where`` and the dotted key; ``apply_overrides`` sets ``a.b=value``
strings into nested data first.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal, Optional, Union

import yaml

from multijepa.errors import RecipeError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    return getattr(tp, "__name__", str(tp))


# A number as people write it: 1e-3, 3E-4, 1_000, .5, -2.5e+3 (YAML 1.1 reads the exponent forms
# without a dot as strings, so the schema parses them where it asks for a number).
_NUMBER = re.compile(r"[-+]?(\d(_?\d)*(\.(\d(_?\d)*)?)?|\.\d(_?\d)*)([eE][-+]?\d+)?")


def _number(value: Any) -> Optional[Union[int, float]]:
    """``value`` as an int or float if it is one or a string spelling one (finite), else None.

    >>> _number("1e-3"), _number("1_000"), _number(".5"), _number(7), _number("x"), _number(True)
    (0.001, 1000, 0.5, 7, None, None)
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        text = value.strip().replace("_", "")
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    return None


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in the dataclass's form."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: '{key}' must be a mapping of keys, got {value!r}")
        return build(tp, value, key, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise RecipeError(f"{where}: '{key}' must be one of {', '.join(map(repr, choices))}, "
                              f"got {value!r}{extra}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{where}: '{key}' must be {_type_name(tp)}, got {len(value)} values")
        return tuple(_convert(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        number = _number(value)
        if number is None or not math.isfinite(number) or number != int(number):
            raise RecipeError(f"{where}: '{key}' must be an integer, got {value!r}")
        return int(number)
    if tp is float:
        number = _number(value)
        if number is None:
            raise RecipeError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"recipe schema uses an unsupported type {tp!r} at {key}")  # a bug in this file


def build(cls: type, raw: dict, prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            hint = difflib.get_close_matches(str(key), names, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(names)})"
            raise RecipeError(f"{where}: unknown key '{dotted}'{extra}")
    kwargs = {}
    for name in names:
        if name in raw:
            dotted = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _convert(raw[name], hints[name], dotted, where)
    return cls(**kwargs)


def plain(value: Any) -> Any:
    """Dataclasses as YAML-ready data: nested dicts, lists for tuples."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(x) for x in value]
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set ``a.b.c=value`` strings into a nested dict; the value is parsed as YAML."""
    raw = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"command line: override {item!r} must look like key.sub=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = _list_entry(node, part, dotted) if isinstance(node, list) else node.setdefault(part, {})
            if not isinstance(child, (dict, list)):
                raise RecipeError(f"command line: '{dotted}' goes inside '{part}', which is not a section")
            node = child
        if isinstance(node, list):
            raise RecipeError(f"command line: '{dotted}' names an entry of a list; set one of its keys, "
                              f"e.g. {dotted}.path=...")
        try:
            node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise RecipeError(f"command line: cannot parse the value of '{dotted}': {e}") from None
    return raw


def _list_entry(entries: list, part: str, dotted: str) -> dict:
    """The entry of a list section (``sources``) that an override names by index or by modality:
    ``sources.0.path=...`` or ``sources.audio.path=...``."""
    if part.isdigit() and int(part) < len(entries):
        return entries[int(part)]
    named = [e for e in entries if isinstance(e, dict) and e.get("modality") == part]
    if len(named) == 1:
        return named[0]
    names = [str(e.get("modality")) for e in entries if isinstance(e, dict)]
    raise RecipeError(f"command line: '{dotted}': no entry '{part}' in the list (entries 0-{len(entries) - 1}: "
                      f"{', '.join(names)}); name one by index or modality")


def _deep_copy(d):
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return {k: _deep_copy(v) for k, v in d.items()} if isinstance(d, dict) else d
