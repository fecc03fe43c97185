"""Typed configuration: dataclasses with commented defaults and checked ``key=value`` overrides.

As in nanoGPT, a configuration is a plain dataclass whose defaults are commented::

    @dataclass(frozen=True)
    class SweepConfig:
        n_layer: int = 4            # transformer blocks
        lr: float = 3e-4            # AdamW peak learning rate
        widths: tuple[int, ...] = (64, 128, 256)  # d_model of each run
        compile: bool = False       # torch.compile the model
        out: str | None = None      # results folder (None: print only)

and a command line changes it with ``key=value`` strings, type-checked against the field types::

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     n_layer: int = 4
    ...     widths: tuple[int, ...] = (64, 128)
    ...     compile: bool = False
    >>> apply_overrides(C(), ["n_layer=6", "widths=32,64,128", "compile=yes"])
    C(n_layer=6, widths=(32, 64, 128), compile=True)

Unknown keys are rejected with the list of known ones and the closest match; a value that does not
parse names the key, the expected type and the string received. Nested dataclass fields are
reached with dots (``model.n_layer=6``). Save ``config_to_dict(config)`` next to every result
(:meth:`leanscale.core.io.JobState.write_config`) so a run can be reproduced.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import closest_name

__all__ = ["apply_overrides", "parse_value", "config_to_dict", "config_from_dict", "describe_config"]

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
_NONE = {"none", "null"}


class _ParseError(Exception):
    """Internal: a value does not parse as a type (the caller adds the key)."""


def _check_dataclass_instance(config: Any, func: str) -> None:
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise InvalidParameterError(
            f"The 'config' parameter of {func} must be a dataclass instance. Got {type(config).__name__} instead."
        )


def _check_dataclass_type(cls: Any, func: str) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise InvalidParameterError(
            f"The 'cls' parameter of {func} must be a dataclass type. Got {cls!r} instead."
        )


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved field types (string annotations from ``from __future__ import annotations`` too)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) is Union or isinstance(tp, types.UnionType)


def type_name(tp: Any) -> str:
    """A readable name for a type annotation: ``int``, ``tuple[int, ...]``, ``float | None``."""
    if tp is type(None):
        return "None"
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    if _is_union(tp):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            inner = f"{type_name(args[0])}, ..."
        else:
            inner = ", ".join(type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return getattr(tp, "__name__", str(tp))


def _parse_int(text: str) -> int:
    t = text.strip().replace("_", "")
    try:
        return int(t)
    except ValueError:
        pass
    # Budgets are written "1e9" or "2.5e6": accept them when the value is a whole number.
    try:
        v = float(t)
    except ValueError:
        raise _ParseError from None
    if not math.isfinite(v) or v != int(v):
        raise _ParseError
    return int(v)


def _parse_float(text: str) -> float:
    try:
        return float(text.strip().replace("_", ""))
    except ValueError:
        raise _ParseError from None


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise _ParseError


def _split(text: str) -> list[str]:
    t = text.strip()
    if len(t) >= 2 and t[0] + t[-1] in ("()", "[]"):
        t = t[1:-1]
    return [p.strip() for p in t.split(",")] if t.strip() else []


def _parse(text: str, tp: Any) -> Any:
    """Parse ``text`` as ``tp``; raise :class:`_ParseError` when it does not fit."""
    if tp is Any:
        return text
    if tp is type(None):
        if text.strip().lower() in _NONE:
            return None
        raise _ParseError
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and text.strip().lower() in _NONE:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse(text, arg)
            except _ParseError:
                continue
        raise _ParseError
    origin = typing.get_origin(tp) or (tp if tp in (tuple, list) else None)
    if origin is Literal:
        for option in typing.get_args(tp):
            try:
                if _parse(text, type(option)) == option:
                    return option
            except _ParseError:
                continue
        raise _ParseError
    if origin in (tuple, list):
        args = typing.get_args(tp)
        items = _split(text)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise _ParseError
            values = [_parse(i, a) for i, a in zip(items, args)]
        else:
            elem = args[0] if args else Any
            values = [_parse(i, elem) for i in items]
        return tuple(values) if origin is tuple else values
    if tp is bool:
        return _parse_bool(text)
    if tp is int:
        return _parse_int(text)
    if tp is float:
        return _parse_float(text)
    if tp is str:
        return text
    if tp is Path:
        return Path(text)
    raise _ParseError


def parse_value(text: str, tp: Any, *, key: str = "value", owner: str | None = None) -> Any:
    """Parse one override string as the annotation ``tp``.

    Booleans accept true/false, yes/no, on/off, 1/0; ints accept ``1_000`` and whole numbers in
    scientific notation (``2e9``); ``None`` is ``none`` or ``null``; tuples and lists are
    comma-separated (``32,64,128``, brackets optional, empty string for an empty one).

    Raises:
        InvalidParameterError: the text does not parse; the message names ``key``, the expected
            type and the string received.
    """
    try:
        return _parse(text, tp)
    except _ParseError:
        where = f" of {owner}" if owner else ""
        msg = f"The {key!r} parameter{where} must be {type_name(tp)}. Got {text!r} instead."
        if typing.get_origin(tp) is Literal:
            hint = closest_name(text, [str(o) for o in typing.get_args(tp)])
            if hint is not None:
                msg += f" Did you mean {hint!r}?"
        raise InvalidParameterError(msg) from None


def _unknown_key(key: str, known: Sequence[str], owner: str) -> InvalidParameterError:
    hint = closest_name(key, known)
    msg = f"Unknown config key {key!r} for {owner}. Known keys: {', '.join(known)}."
    if hint is not None:
        msg += f" Did you mean {hint!r}?"
    return InvalidParameterError(msg)


def _set_path(config: Any, path: list[str], text: str, full_key: str) -> Any:
    cls = type(config)
    types_ = _field_types(cls)
    head = path[0]
    if head not in types_:
        raise _unknown_key(full_key if len(path) == 1 else head, list(types_), cls.__name__)
    tp = types_[head]
    if len(path) > 1:
        child = getattr(config, head)
        if not dataclasses.is_dataclass(child):
            raise InvalidParameterError(
                f"Config key {full_key!r}: {cls.__name__}.{head} is {type_name(tp)}, which has no "
                f"field {'.'.join(path[1:])!r}."
            )
        return dataclasses.replace(config, **{head: _set_path(child, path[1:], text, full_key)})
    if dataclasses.is_dataclass(tp):
        raise InvalidParameterError(
            f"Config key {full_key!r} is a group of settings ({type_name(tp)}); set one of its "
            f"fields, e.g. {full_key}.{dataclasses.fields(tp)[0].name}=..."
        )
    value = parse_value(text, tp, key=full_key, owner=cls.__name__)
    return dataclasses.replace(config, **{head: value})


def apply_overrides(config: T, overrides: Sequence[str]) -> T:
    """A copy of ``config`` with ``key=value`` overrides applied (the original is unchanged).

    Args:
        config: a dataclass instance.
        overrides: strings ``key=value``; later ones win; ``a.b=value`` sets a nested field.

    Returns:
        A new instance (``dataclasses.replace``, so ``__post_init__`` checks run again).

    Raises:
        InvalidParameterError: a string has no ``=``, a key is unknown (the message lists the
            known keys and the closest match) or a value does not parse as the field's type.
    """
    _check_dataclass_instance(config, "apply_overrides")
    if isinstance(overrides, str):
        overrides = [overrides]
    if not isinstance(overrides, (list, tuple)):
        raise InvalidParameterError(
            f"The 'overrides' parameter of apply_overrides must be a list of 'key=value' strings. "
            f"Got {type(overrides).__name__} instead."
        )
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidParameterError(
                f"Overrides must look like key=value (e.g. n_layer=6). Got {item!r} instead. "
                f"Known keys: {', '.join(f.name for f in dataclasses.fields(config))}."
            )
        config = _set_path(config, key.split("."), text, key)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """The configuration as plain JSON-ready data (nested dataclasses as dicts, tuples as lists)."""
    _check_dataclass_instance(config, "config_to_dict")

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(config)


def _coerce(value: Any, tp: Any, key: str, owner: str) -> Any:
    """Check a value loaded from JSON against ``tp``, converting lists/dicts/paths back."""

    def bad() -> InvalidParameterError:
        return InvalidParameterError(
            f"The {key!r} parameter of {owner} must be {type_name(tp)}. Got {value!r} instead."
        )

    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise bad()
    if _is_union(tp):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, owner)
            except InvalidParameterError:
                continue
        raise bad()
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad()
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = typing.get_args(tp)
        try:
            if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
                if len(value) != len(args):
                    raise bad()
                items = [_coerce(v, a, key, owner) for v, a in zip(value, args)]
            else:
                elem = args[0] if args else Any
                items = [_coerce(v, elem, key, owner) for v in value]
        except InvalidParameterError:
            raise bad() from None
        return tuple(items) if (origin or tp) is tuple else items
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad()
        return config_from_dict(tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value in ("nan", "inf", "-inf"):  # see core.io.to_jsonable
            return float(value)
        raise bad()
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise bad()
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise bad()
    return value


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Rebuild a configuration saved with :func:`config_to_dict`.

    Keys missing from ``data`` take the dataclass defaults.

    Raises:
        InvalidParameterError: an unknown key (listing the known ones), a value of the wrong type,
            or a required field with no default that ``data`` lacks.
    """
    _check_dataclass_type(cls, "config_from_dict")
    if not isinstance(data, Mapping):
        raise InvalidParameterError(
            f"The 'data' parameter of config_from_dict must be a mapping. Got {type(data).__name__} instead."
        )
    types_ = _field_types(cls)
    for key in data:
        if key not in types_:
            raise _unknown_key(str(key), list(types_), cls.__name__)
    kwargs = {k: _coerce(v, types_[k], k, cls.__name__) for k, v in data.items()}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.name not in kwargs
        and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise InvalidParameterError(
            f"config_from_dict({cls.__name__}) needs the keys {', '.join(map(repr, missing))}, "
            f"which have no default."
        )
    return cls(**kwargs)


def describe_config(config: Any) -> list[dict[str, Any]]:
    """One row per (nested) field: ``key``, ``type``, ``value`` and ``default``, for a table."""
    _check_dataclass_instance(config, "describe_config")
    rows: list[dict[str, Any]] = []

    def walk(obj: Any, prefix: str) -> None:
        types_ = _field_types(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                walk(value, f"{prefix}{f.name}.")
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            rows.append({"key": prefix + f.name, "type": type_name(types_[f.name]),
                         "value": value, "default": default})

    walk(config, "")
    return rows
