"""Typed config fields: validators that raise ValueError naming the field and what it allows,
and building nested config dataclasses from plain (YAML-loaded) dicts.

Every config dataclass calls these from ``__post_init__``, so a bad value fails at construction
with a message a user can act on (``rho must be in (0.0, 1.0]; got 1.5``).
"""

from __future__ import annotations

import dataclasses
import keyword
import math
from collections.abc import Mapping
from typing import Any, get_type_hints


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def number(name: str, value: Any, *, low: float, high: float = float("inf"),
           low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is a finite real number in the interval low..high (open or closed at each end);
    NaN and +-inf are refused whatever the interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number; got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}; got {value!r}")


def integer(name: str, value: Any, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false; got {value!r}")


def instance(name: str, value: Any, cls: type) -> None:
    if not isinstance(value, cls):
        raise ValueError(f"{name} must be a {cls.__name__}; got {value!r}")


def key_of(field_name: str) -> str:
    """A field's key in YAML: its name, less the trailing underscore PEP 8 adds to a Python
    keyword (field ``async_`` is the key ``async``)."""
    stem = field_name[:-1] if field_name.endswith("_") else field_name
    return stem if keyword.iskeyword(stem) else field_name


def from_dict(cls: type, data: Any, path: str = ""):
    """Dataclass ``cls`` from a mapping (keys: ``key_of`` each field), recursing into nested
    dataclass fields.

    Unknown keys and invalid values raise ValueError naming the field by its dotted ``path``.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{path.rstrip('.') or 'config'} must be a mapping; got {data!r}")
    hints = get_type_hints(cls)
    fields = {key_of(f.name): f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{path}{unknown[0]} is not a field; allowed: {', '.join(fields)}")
    kwargs = {}
    for key, value in data.items():
        name = fields[key]
        nested = hints[name]
        if dataclasses.is_dataclass(nested) and isinstance(value, Mapping):
            value = from_dict(nested, value, f"{path}{key}.")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise ValueError(f"{path}{error}") from None


def to_plain(config) -> dict:
    """A (nested) dataclass as plain dicts keyed by ``key_of``, e.g. to save the resolved
    config."""
    return {key_of(f.name): (to_plain(v) if dataclasses.is_dataclass(v) else v)
            for f in dataclasses.fields(config) for v in [getattr(config, f.name)]}


def merge(base: dict, override: Mapping) -> dict:
    """``base`` with ``override`` merged in, recursively for nested mappings."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
