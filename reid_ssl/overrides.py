"""Overrides onto typed dataclasses: YAML mappings and ``section.key=value`` pairs become checked values.

The machinery behind :func:`reid_ssl.config.load_config`, independent of what the sections hold: an unknown key
or a value of the wrong type is a :class:`~reid_ssl.errors.ConfigError` that names the key and the valid keys.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from reid_ssl.errors import ConfigError
from reid_ssl.fileio import require_file

_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ValueError("true/false")


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("an integer")
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("a number")
    number = float(value)
    if not math.isfinite(number):  # inf would train on (NaN weights, NaN in metrics.jsonl); nan fails every range
        raise ValueError("a finite number")
    return number


def _to_str(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError("a string")
    return str(value)


_SCALARS: dict[Any, tuple[Any, str]] = {
    bool: (_to_bool, "true/false"),
    int: (_to_int, "an integer"),
    float: (_to_float, "a finite number"),
    str: (_to_str, "a string"),
}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML / command-line value to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        args = typing.get_args(annotation)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key} expects a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if origin is Literal:  # membership is checked by validate()
        return _coerce(value, type(typing.get_args(annotation)[0]), key)
    if annotation not in _SCALARS:
        raise ConfigError(f"{key}: unsupported field type {annotation!r}")
    convert, what = _SCALARS[annotation]
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} expects {what}, got {value!r}") from None


def apply_overrides(obj: Any, overrides: dict[str, Any], prefix: str = "") -> Any:
    """A copy of dataclass ``obj`` with ``overrides`` (nested dicts) applied; unknown keys are errors."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"section {prefix.rstrip('.') or '<root>'} must be a mapping, got {overrides!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {full!r}; valid keys here: {', '.join(sorted(fields))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = apply_overrides(current, value, f"{full}.")
        else:
            changes[key] = _coerce(value, hints[key], full)
    return dataclasses.replace(obj, **changes)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.1", "train.epochs=3"]`` -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form section.key=value")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {key!r} must be section.key (e.g. optim.lr)")
        value = yaml.safe_load(raw) if raw.strip() else ""
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {first_line[key]})", key_node.start_mark
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML config file as nested dicts.

    Raises:
        MissingFileError: no such file. ConfigError: not valid YAML, or a key given twice in one mapping (the file
        and line named).
    """
    require_file(path, "config file")
    try:
        with path.open(encoding="utf-8") as f:  # a stream: YAML's messages then name the file
            loader = _UniqueKeyLoader(f)  # a SafeLoader: plain YAML types only
            try:
                return loader.get_single_data() or {}
            finally:
                loader.dispose()
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a UTF-8 text file ({e.reason} at byte {e.start}): save it as UTF-8") from None


def apply_yaml(obj: Any, path: Path) -> Any:
    """``obj`` with the YAML file at ``path`` applied (:func:`apply_overrides`); errors name the file."""
    values = read_yaml(path)  # its own errors name the file already
    try:
        return apply_overrides(obj, values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
