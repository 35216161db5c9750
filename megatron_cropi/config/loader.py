"""Strict YAML → frozen-dataclass loading.

Every ``*Config`` in the package is a ``@dataclass(frozen=True, kw_only=True)``. :func:`from_dict`
builds one from a plain mapping and rejects what a typo or a wrong value would otherwise let through
silently: unknown keys, wrong types, out-of-range values. Each error names the dotted key path, the
value and what was expected, e.g.::

    ConfigError: model.hidden_size: expected int, got '64x' (str)
    ConfigError: parallel.tensor_model_parallel_size: must be >= 1, got 0

Range checks live in each dataclass's ``__post_init__`` through :func:`require`; the loader prefixes
the path of the section being built.

String values of a YAML file may name environment variables, as in a shell: ``${DATA_DIR}`` (must be
set) and ``${OUT:-runs/default}`` (the default when unset or empty); ``$${`` writes a literal ``${``.
An unset variable without a default is a :class:`ConfigError` naming the key and the variable.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ["ConfigError", "from_dict", "to_dict", "load_yaml", "read_yaml_mapping", "expand_env", "require", "non_default_keys",
           "prune_unknown_keys"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    Attributes:
        key: dotted key path (``"model.hidden_size"``), empty for the whole document.
        message: what was wrong and what was expected.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix`` prepended to its key path."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``ok``; ``expected`` says what is allowed."""
    if not ok:
        raise ConfigError(key, f"{expected}, got {value!r}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", repr(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert containers; raise ConfigError."""
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {value!r} ({type(value).__name__})")
        return from_dict(tp, value, _prefix=key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r} ({type(value).__name__})")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(value) != len(args):
                raise ConfigError(key, f"expected a list of {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            items = [_convert(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {value!r} ({type(value).__name__})")
        kt, vt = get_args(tp) or (str, Any)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, _prefix: str = "") -> T:
    """Build the dataclass ``cls`` from ``data``, strictly.

    Args:
        cls: a (frozen) dataclass type.
        data: the mapping read from YAML; ``None`` means all defaults.

    Raises:
        ConfigError: naming the dotted key for an unknown key, a missing required key, a wrong type,
            or a value rejected by the dataclass's ``__post_init__``.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(_prefix, f"expected a mapping, got {data!r} ({type(data).__name__})")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{_prefix}.{unknown[0]}" if _prefix else str(unknown[0])
        raise ConfigError(key, f"unknown key; {cls.__name__} accepts: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{_prefix}.{name}" if _prefix else name)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = f"{_prefix}.{missing[0]}" if _prefix else missing[0]
        raise ConfigError(key, f"required key is missing ({cls.__name__})")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.under(_prefix) from None


def to_dict(obj: Any) -> Any:
    """Plain-data form of a config (tuples become lists), for YAML/JSON dumps and hashing."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def non_default_keys(obj: Any, reference: Any = None, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of the config ``obj`` that differs from ``reference``
    (default: ``type(obj)()``, the dataclass's defaults); lists are leaves. For "this key is ignored
    here" checks: a key set to its default is as good as absent."""
    if reference is None:
        reference = type(obj)()
    mine, theirs = to_dict(obj), to_dict(reference)

    def walk(a: Any, b: Any, path: str) -> list[tuple[str, Any]]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [kv for k in a for kv in walk(a[k], b.get(k), f"{path}.{k}" if path else str(k))]
        return [] if a == b else [(path, a)]

    return walk(mine, theirs, prefix)


def _dataclass_in(tp: Any) -> Any:
    """The dataclass a value annotated ``tp`` holds as a mapping (``X``, ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        return next((a for a in get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def prune_unknown_keys(cls: type, data: Any) -> Any:
    """``data`` without the keys the dataclass ``cls`` (recursively, lists of dataclasses included)
    does not accept: a config written by an older schema read by this one."""
    if not isinstance(data, Mapping):
        return data
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    out = {}
    for key, value in data.items():
        if key not in names:
            continue
        tp = hints[key]
        inner = _dataclass_in(tp)
        if inner is not None:
            value = prune_unknown_keys(inner, value)
        elif get_origin(tp) in (tuple, list) and isinstance(value, list) and get_args(tp):
            item = _dataclass_in(get_args(tp)[0])
            value = [prune_unknown_keys(item, v) for v in value] if item is not None else value
        out[key] = value
    return out


_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _expand_string(value: str, key: str, environ: Mapping[str, str]) -> str:
    def sub(match: re.Match) -> str:
        if match.group(0) == "$${":
            return "${"
        name, has_default, default = match.group(1).partition(":-")
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(key, f"{match.group(0)!r} in {value!r} is not a variable reference; expected "
                                   "${NAME} or ${NAME:-default} with NAME of letters, digits and _")
        got = environ.get(name)
        if has_default and not got:
            return default
        if got is None:
            raise ConfigError(key, f"environment variable {name} is not set (used in {value!r}); export it "
                                   f"or write ${{{name}:-default}}")
        return got

    return _ENV_REF.sub(sub, value)


def expand_env(data: Any, environ: Mapping[str, str] | None = None, *, _key: str = "") -> Any:
    """``data`` with ``${VAR}`` / ``${VAR:-default}`` in every string value replaced from ``environ``.

    Mapping keys are left alone; lists and nested mappings are walked (key paths ``a.b[0].c``).

    Raises:
        ConfigError: naming the dotted key path and the variable, for an unset variable without a
            default or a malformed reference.
    """
    environ = os.environ if environ is None else environ
    if isinstance(data, str):
        return _expand_string(data, _key, environ)
    if isinstance(data, Mapping):
        return {k: expand_env(v, environ, _key=f"{_key}.{k}" if _key else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, environ, _key=f"{_key}[{i}]") for i, v in enumerate(data)]
    return data


def load_yaml(path: str | Path, environ: Mapping[str, str] | None = None) -> dict:
    """Read a YAML mapping from ``path`` with environment references expanded (:func:`expand_env`,
    from ``environ``, default ``os.environ``); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file {str(path)!r} does not exist")
    return expand_env(read_yaml_mapping(path), environ)


def read_yaml_mapping(path: Path) -> dict:
    """The YAML mapping at ``path`` as written (``{}`` for an empty file); errors name the file."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data

