"""Recipes: YAML files with `base:` chains, a model preset, `--set a.b=value` overrides, and the
architecture of a weight source, loaded into the typed config tree (trainer/config.py).

Merge order (later wins): field defaults < model preset < base recipe(s) < recipe < --set, and
then the architecture of model.init_from / an hf: peft.base (trainer/adapt/sources.py).
Types, choices and ranges are checked by pydantic against the dataclasses' annotations and field
metadata (pydantic over OmegaConf: it enforces `Literal` choices and numeric ranges declared on
the fields, which OmegaConf's structured configs cannot express); its errors become one-line
`ConfigError`s that name the full dotted key. Then `validate` runs the rules between fields.
No torch is imported: a bad recipe is refused in well under a second.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from typing import Any

import yaml

from models.config import ConfigError
from trainer.atomic import write_atomic
from trainer.config import Config, config_to_dict, validate

class _RecipeLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `3e-4` (no dot) is a string: read it as the number users mean."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"recipe file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_RecipeLoader)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"{path}: malformed YAML{line}: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    return raw


def _merge(under: dict, over: dict) -> dict:
    out = dict(under)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _with_bases(path: str, seen: tuple[str, ...] = ()) -> dict:
    """A recipe with its `base:` chain resolved (paths relative to the recipe file)."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: recipe `base:` chain loops back to itself")
    raw = _read_yaml(path)
    bases = raw.pop("base", None)
    if bases is None:
        return raw
    merged: dict = {}
    for base in bases if isinstance(bases, list) else [bases]:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: `base` must be a path or a list of paths")
        merged = _merge(merged, _with_bases(os.path.join(os.path.dirname(path), base), seen + (path,)))
    return _merge(merged, raw)


def _override(item: str) -> dict:
    """`a.b=value` as {"a": {"b": value}}, the value read as YAML (a list, a number, a bool...)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
    key, text = item.split("=", 1)
    try:
        value = yaml.load(text, Loader=_RecipeLoader) if text != "" else ""
    except yaml.YAMLError:
        value = text
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name)
    return value if isinstance(value, dict) else {}


def load_config(recipe: str | None, overrides: list[str] | tuple[str, ...] = (),
                world_size: int | None = None) -> Config:
    """Load a recipe (with bases, model preset, --set overrides and sources) and validate it.

    Args:
        recipe: YAML path, or None for the defaults alone.
        overrides: `a.b=value` strings; values are parsed as YAML, then type-checked.
        world_size: when given, the parallel layout is checked against it.
    """
    cfg = read_config(recipe, overrides)
    validate(cfg, world_size)
    return cfg


def read_config(recipe: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """`load_config` without the rules between fields (types and ranges are checked): for a tool
    that derives further overrides from a config before validating the result."""
    raw = _with_bases(recipe) if recipe else {}
    for item in overrides:
        raw = _merge(raw, _override(item))
    preset = _section(raw, "model").get("preset")
    if preset:
        from models.registry import preset_overrides  # plain Python, no torch

        try:
            raw = _merge(preset_overrides(preset), raw)
        except KeyError as e:
            raise ConfigError(f"model.preset: {e.args[0]}") from None
    raw = _with_source_architecture(raw)
    return _typed(raw)


def checkpoint_config(path: str, key: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config checkpoint `path` of ours was saved with (its config.yaml), loaded like a
    recipe with `overrides`; a problem is one ConfigError line naming `key` and the file."""
    config_path = os.path.join(path, "config.yaml")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{key}: {path} has no config.yaml")
    try:
        return load_config(config_path, overrides)
    except ConfigError as e:
        raise ConfigError(f"{key}: {config_path}: {e}") from None


def _with_source_architecture(raw: dict) -> dict:
    """The architecture keys of model.init_from, or of an hf: peft.base, win over the recipe's."""
    from trainer.adapt.sources import source_architecture

    init_from = _section(raw, "model").get("init_from")
    if init_from and isinstance(init_from, str):
        raw = _merge(raw, source_architecture(init_from))
    peft = _section(raw, "peft")
    base = peft.get("base")
    if isinstance(base, str) and base.startswith("hf:") and peft.get("method", "none") != "none":
        raw = _merge(raw, source_architecture(base, "peft.base"))
    return raw


def _typed(raw: dict) -> Config:
    """The dict as a `Config`: pydantic checks every key, type, choice and range (how strictly:
    `ConfigSection`, models/config.py)."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(Config).validate_python(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e.errors()[0])) from None


def _field_at(loc: tuple) -> tuple[type | None, dataclasses.Field | None, Any]:
    """(the dataclass holding the key at `loc`, its field or None, the field's annotation)."""
    cls, fld, typ = None, None, Config
    for part in loc:
        if not (isinstance(part, str) and dataclasses.is_dataclass(typ)):
            break  # a list index: the element of a list field
        cls, fld = typ, {f.name: f for f in dataclasses.fields(typ)}.get(part)
        if fld is None:
            break
        typ = typing.get_type_hints(cls)[part]
    return cls, fld, typ


# pydantic error type -> what the key expected, in our words.
_EXPECTED = {"int_type": "int", "int_parsing": "int", "int_from_float": "int", "float_type": "float",
             "float_parsing": "float", "bool_type": "bool", "bool_parsing": "bool", "string_type": "str",
             "list_type": "a list", "dict_type": "a mapping", "dataclass_type": "a mapping of keys"}
_BOUNDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _describe(error: dict) -> str:
    """One line for a pydantic error: the full dotted key, then what is wrong with its value."""
    loc, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    path = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in loc).lstrip(".")
    cls, fld, typ = _field_at(loc)
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        near = difflib.get_close_matches(str(loc[-1]), [f.name for f in dataclasses.fields(cls)], n=1, cutoff=0.5)
        parent = ".".join(str(p) for p in loc[:-1])
        return f"unknown config key {path}" + (f"; did you mean {parent + '.' if parent else ''}{near[0]}?" if near else "")
    if kind == "literal_error":
        return f"{path}: {value!r} is not one of {', '.join(str(c) for c in typing.get_args(typ))}"
    if kind in _BOUNDS and fld is not None:
        return f"{path}: must be {_range_text(fld.metadata)}, got {float(value) if typ is float else value}"
    expected = _EXPECTED.get(kind, error["msg"])
    return f"{path}: expected {expected}, got {type(value).__name__} {value!r}"


def _range_text(bounds: typing.Mapping) -> str:
    """'> 0', '>= 1', or an interval such as '(0, 1]' when both ends are bounded."""
    low = next(((op, bounds[op]) for op in ("gt", "ge") if op in bounds), None)
    high = next(((op, bounds[op]) for op in ("lt", "le") if op in bounds), None)
    if low and high:
        return f"in {'(' if low[0] == 'gt' else '['}{low[1]}, {high[1]}{')' if high[0] == 'lt' else ']'}"
    op, limit = low or high
    return {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}[op] + f" {limit}"


_YAML_CACHE: dict[str, str] = {}  # the config's repr -> its YAML (a checkpoint writes the same one every save)


def save_config(cfg: Config, path: str) -> None:
    """Write atomically through a temporary file of our own, so concurrent writers (every node
    of a multi-node launch on a shared file system) never rename each other's file."""
    key = repr(cfg)  # dataclass reprs hold every field: cheap next to PyYAML's dump (~15 ms)
    text = _YAML_CACHE.get(key)
    if text is None:
        if len(_YAML_CACHE) > 32:  # many configs in one process (tests): start again
            _YAML_CACHE.clear()
        text = _YAML_CACHE.setdefault(key, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    write_atomic(path, lambda f: f.write(text), binary=False)
