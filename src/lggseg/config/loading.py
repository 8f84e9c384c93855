"""Reading params files into the section dataclasses: unknown keys and wrong types are errors."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from lggseg.config.sections import DERIVED_FROM_I, SECTIONS, LossConfig, is_int, is_number
from lggseg.errors import ConfigError


def from_dict(cls: type, data: Mapping[str, Any] | None, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping: unknown keys and wrong types are errors."""
    where = where or cls.__name__
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = coerce(hints[f.name], data[f.name], f"{where}.{f.name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a missing required field
        raise ConfigError(f"{where}: {exc}") from None


def coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` (as read from YAML) as the annotated type ``tp`` of a config field; ``where`` names it in errors."""
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(coerce(inner, v, where) for v in value)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        return coerce(rest[0], value, where)
    if tp is float:
        if not is_number(value):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if not is_int(value):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read a params file into a plain dict (clear error if missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_section(name: str, params: Mapping[str, Any] | str | Path = "params.yaml") -> Any:
    """The validated dataclass for section ``name`` of ``params`` (a dict or a params file)."""
    if not isinstance(params, Mapping):
        params = read_params(params)
    if name not in SECTIONS:
        raise ConfigError(f"unknown params section {name!r}; known: {sorted(SECTIONS)}")
    data = params.get(name)
    if isinstance(data, Mapping) or data is None:
        derived = [key for sec, key in DERIVED_FROM_I if sec == name and (data or {}).get(key) is None]
        if derived:
            i = from_dict(LossConfig, params.get("loss"), "loss").i
            data = {**(data or {}), **{key: DERIVED_FROM_I[name, key](i) for key in derived}}
    return from_dict(SECTIONS[name], data, name)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``override`` wins, lists are replaced whole."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
