"""Typed configuration: nested frozen dataclasses loaded from YAML, then dotted `key=value` overrides.

A config class is a `@dataclass(frozen=True)` whose fields carry defaults and a docstring-like
comment; nested sections are dataclass-typed fields. `load_config(Cls, path, overrides)` returns a
frozen instance; unknown keys and ill-typed values stop with `file: key: what is wrong`.
"""
from __future__ import annotations

import dataclasses
import keyword
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its schema; the message names where and what."""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return types.MappingProxyType({_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}")
                                       for k, v in value.items()})
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _field_name(key: str) -> str:
    """The dataclass field of a config key: a Python keyword (`async`) is spelt with a trailing `_`."""
    return f"{key}_" if keyword.iskeyword(key) else key


def _key(field_name: str) -> str:
    """The config key of a dataclass field (the inverse of `_field_name`)."""
    return field_name[:-1] if field_name.endswith("_") and keyword.iskeyword(field_name[:-1]) else field_name


def _build(cls: type[T], data: dict, where: str) -> T:
    hints = typing.get_type_hints(cls)
    data = {_field_name(k) if isinstance(k, str) else k: v for k, v in data.items()}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key {_key(unknown[0])!r} (known: {', '.join(sorted(map(_key, fields)))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{_key(k)}" if where else _key(k)) for k, v in data.items()}
    try:
        return cls(**kwargs)   # a section's own checks (__post_init__) name keys relative to it
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def _merge(base: dict, path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (['a', 'b'], 3); the value is read as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _read_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Read YAML at `path` (optional), apply dotted overrides, build and return a frozen `cls`."""
    data: dict = {}
    where = ""
    if path is not None:
        where = str(path)
        data = _read_yaml(path)
    for o in overrides:
        keys, value = parse_override(o)
        _merge(data, keys, value)
    try:
        return _build(cls, data, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def load_section(cls: type[T], path: str | Path | None, overrides: list[str] = (),
                 sections: tuple[str, ...] = ()) -> tuple[T, str]:
    """(`cls` built from one section of the YAML at `path`, the section's dotted key): the first of
    `sections` the file holds (e.g. "reward" of an RL config, "rl.reward" of a pipeline config), else
    the whole file ("" ). Overrides are relative to the section; errors name the section's keys."""
    data, key = (_read_yaml(path) if path is not None else {}), ""
    for dotted in sections:
        node: Any = data
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: {dotted}: expected a mapping, got {type(node).__name__}")
            data, key = node, dotted
            break
    for o in overrides:
        keys, value = parse_override(o)
        _merge(data, keys, value)
    try:
        return _build(cls, data, key), key
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def check_input(key: str, path: str | None, *, kind: Literal["model", "data"], required: bool = True) -> None:
    """ConfigError naming `key` when an input path is required but not set, or set but missing: a
    model folder must hold config.json; data is a file or a folder (a saved dataset)."""
    if not path:
        if required:
            raise ConfigError(f"{key}: not set (the {'model folder' if kind == 'model' else 'data file'} to read)")
        return
    p = Path(path)
    if kind == "model" and not (p / "config.json").is_file():
        raise ConfigError(f"{key}: {path}: " + ("not a model folder (no config.json)" if p.exists() else "not found"))
    if kind == "data" and not p.exists():
        raise ConfigError(f"{key}: {path}: not found")


def to_dict(cfg: Any) -> Any:
    """Plain dict/list form of a config (for saving next to a run)."""
    if dataclasses.is_dataclass(cfg):
        return {_key(f.name): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, (dict, types.MappingProxyType)):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def config_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The settings that differ between two plain config dicts (`to_dict` form), as `key: old -> new`
    lines with dotted keys, in key order; a key only one side has shows `(unset)` on the other."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                lines.append(f"{key}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}")
            else:
                lines += config_changes(old[k], new[k], key)
        return lines
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]
