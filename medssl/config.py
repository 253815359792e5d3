"""YAML (data only) -> frozen dataclasses, with dotted ``key.sub=value`` overrides.

Schemas are plain frozen dataclasses declared next to the code they configure; this module only knows how to
fill them. Unknown keys are rejected with a "did you mean" hint, values are checked against the type hints, and
the resolved config (``to_dict``) is what runs write to ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import yaml

from medssl.errors import InputError
from medssl.outputs import write_atomic
from medssl.registry import did_you_mean

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float as YAML 1.2 does (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=200"`` -> ``(["train", "steps"], 200)``; the value is parsed as YAML (lists too)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"override '{text}' is not of the form key.sub=value (e.g. train.steps=200)")
    try:
        parsed = _load_yaml(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise InputError(f"override '{text}': value is not valid YAML ({err.__class__.__name__})") from None
    return key.strip().split("."), parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with every ``key.sub=value`` override set (creating nested dicts as needed)."""
    result = _deep_copy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise InputError(f"override '{text}': '{key}' holds a value, not a section")
            node = child
        node[keys[-1]] = value
    return result


def from_dict(schema: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``schema`` from ``data``; unknown keys and wrong types raise ``InputError``."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise InputError(f"config section '{where or '<top>'}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(schema)
    for key in data:
        if key not in fields:
            raise InputError(
                f"unknown config key '{where}{key}'{did_you_mean(key, list(fields))}; "
                f"known keys here: {', '.join(fields)}"
            )
    values = {}
    for name, value in data.items():
        values[name] = _coerce(value, hints[name], f"{where}{name}")
    try:
        return schema(**values)
    except TypeError as err:  # a required field is missing
        raise InputError(f"config section '{where or '<top>'}': {err}") from None


def check_kwargs(fn: Callable, kwargs: dict[str, Any], where: str, reserved: Sequence[str] = ()) -> None:
    """Reject keys of ``kwargs`` that ``fn`` does not accept (``where`` is the config section, e.g. ``network``).

    ``reserved`` names parameters the caller fills itself, so they may not appear in the config section.
    A callable taking ``**kwargs`` accepts any other key.
    """
    params = inspect.signature(fn).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    known = [
        name for name, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) and name not in reserved
    ]
    for key in kwargs:
        if key in reserved:
            raise InputError(f"config key '{where}.{key}' is set by medssl itself; remove it from '{where}'")
        if key not in known and not open_ended:
            raise InputError(
                f"unknown config key '{where}.{key}'{did_you_mean(key, known)}; known keys here: {', '.join(known)}"
            )


def build_section(section: str, build: Callable[[], T]) -> T:
    """``build()`` (an object made from config section ``section``); an ``InputError`` it raises about one of its own
    parameters (``error.path`` = the parameter's name) is raised again naming the config key ``section.<name>``, one
    about several of them (no path) naming the section. Errors about files are raised as they are."""
    try:
        return build()
    except InputError as error:
        if error.path is None:
            raise InputError(f"config section '{section}': {error.message}") from None
        if not str(error.path).isidentifier():
            raise
        raise InputError(f"config key '{section}.{error.path}': {error.message}") from None


def to_dict(config: Any) -> Any:
    """The resolved config as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def flat_config(config: Any, ignore: Sequence[str] = ()) -> dict[str, Any]:
    """``to_dict(config)`` as one level of dotted keys (``train.lr``), without the keys at or under ``ignore``."""
    def flatten(data: Any, prefix: str) -> dict[str, Any]:
        if isinstance(data, dict):
            return {k: v for key, value in data.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: data}

    return {key: value for key, value in flatten(to_dict(config), "").items()
            if not any(key == skip or key.startswith(f"{skip}.") for skip in ignore)}


def config_differences(first: Any, second: Any, ignore: Sequence[str] = ()) -> list[str]:
    """The sorted dotted keys whose values differ between two configs, the keys at or under ``ignore`` left out."""
    a, b = flat_config(first, ignore), flat_config(second, ignore)
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


def shipped_configs() -> dict[str, Path]:
    """The configs shipped with medssl, name (file stem, e.g. ``infoguided_2d``) -> file: the package data
    ``medssl/configs/*.yaml`` (``configs/`` at the top of a source checkout links to that folder)."""
    folder = Path(str(importlib.resources.files("medssl") / "configs"))
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def _shipped_names(name: str) -> str:
    names = list(shipped_configs())
    return f"{did_you_mean(name, names)}; the shipped configs: {', '.join(names)}"


def shipped_config(name: str) -> Path:
    """The shipped config ``name`` (e.g. ``infoguided_2d``); an ``InputError`` listing the names otherwise."""
    path = shipped_configs().get(name)
    if path is None:
        raise InputError(f"no shipped config is named '{name}'{_shipped_names(name)}")
    return path


def find_config(config: str | Path) -> Path:
    """The YAML file ``config`` names: an existing file, else a shipped config by name (``infoguided_2d``,
    ``infoguided_2d.yaml`` or ``configs/infoguided_2d.yaml``, so the documented paths work outside a checkout too);
    otherwise an ``InputError`` listing the shipped names."""
    path = Path(config)
    if path.is_file():
        return path
    name = path.stem if path.suffix == ".yaml" else path.name
    if path.parent in (Path("."), Path("configs")) and name in shipped_configs():
        return shipped_config(name)
    raise InputError(f"config file not found; pass your own YAML or the name of a shipped config{_shipped_names(name)}",
                     path=config)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (``find_config`` locates it); a missing or malformed file is an ``InputError`` naming it."""
    path = find_config(path)
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError("not a text file (not UTF-8); pass a YAML config", path=path) from None
    except yaml.YAMLError as err:
        raise InputError(f"not valid YAML: {err}", path=path) from None
    if not isinstance(data, dict):
        raise InputError("a config file must hold a mapping of keys to values", path=path)
    return data


def load_config(path: str | Path, schema: type[T], overrides: Sequence[str] = (),
                check: Callable[[T], T | None] | None = None) -> T:
    """Read ``path``, apply ``overrides``, build ``schema`` and run ``check`` (cross-field rules; it may return a
    completed config); errors name the file. ``path`` may name a shipped config (``find_config``)."""
    path = find_config(path)
    data = apply_overrides(read_yaml(path), overrides)
    try:
        config = from_dict(schema, data)
        if check is not None:
            config = check(config) or config
        return config
    except InputError as err:
        raise InputError(err.message, path=path) from None


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against type ``hint`` (recursing into dataclasses, tuples, lists, dicts, unions)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where=f"{where}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except InputError as err:
                errors.append(err.message)
        raise InputError(errors[0] if len(errors) == 1 else f"config key '{where}': value {value!r} fits none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise InputError(
                f"config key '{where}' must be one of {', '.join(map(repr, args))}, got {value!r}"
                f"{did_you_mean(str(value), [str(a) for a in args])}"
            )
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            value = [value] if origin is tuple and args and args[-1] is Ellipsis else value
        if not isinstance(value, (list, tuple)):
            raise InputError(f"config key '{where}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise InputError(f"config key '{where}' must have {len(args)} entries, got {len(value)}")
            items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_hint = args[0] if args else Any
            items = [_coerce(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"config key '{where}' must be a mapping, got {value!r}")
        value_hint = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"config key '{where}' must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"config key '{where}' must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(f"config key '{where}' must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise InputError(f"config key '{where}' must be a string, got {value!r}")
        return value
    return value
