"""Composing a config tree: ``extends:`` between files and ``key.path=value`` overrides.

A YAML config may start from another one::

    # qwen2.5-7b-instruct_2node.yaml
    extends: qwen2.5-7b-instruct_base.yaml       # relative to this file; the base may extend another
    run: {output_dir: runs/7b_2node}

The extending file is deep-merged over its base: mappings merge key by key, every other value (lists
included) replaces the base's. A chain of ``extends`` that comes back to a file already in it is a
:class:`~megatron_cropi.config.loader.ConfigError` naming the files in order.

Command-line overrides are applied last, in order, each as ``dotted.key=value``; the value is parsed
as one YAML scalar or flow collection (``3``, ``1e-6``, ``true``, ``null``, ``[0.2, 0.8]``,
``{path: a.jsonl}``), and ``key=`` sets the empty string. ``data.pool[0].path=x`` reaches into an
existing list item. The merged tree is then validated exactly like a file, by
:func:`~megatron_cropi.config.loader.from_dict`.

:class:`ComposedTree` remembers where each leaf was last set (a file or an override), so an error can
name its origin: :meth:`ComposedTree.origin`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from megatron_cropi.config.loader import ConfigError, expand_env, read_yaml_mapping

__all__ = ["ComposedTree", "compose_config", "deep_merge", "parse_override", "apply_override", "EXTENDS_KEY"]

EXTENDS_KEY = "extends"

_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")


@dataclass
class ComposedTree:
    """A merged config mapping and, for each leaf key path, where its value came from."""

    data: dict = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    """``{dotted leaf path: "in file.yaml" or "from command-line override 'k=v'"}``; lists are leaves."""
    files: list[str] = field(default_factory=list)
    """Every file read, the named one first, then its bases in ``extends`` order."""

    def origin(self, key: str) -> str:
        """Where the value at ``key`` (or its nearest set ancestor, or all its set descendants) came
        from: ``"in FILE"`` or ``"from command-line override 'k=v'"``; else the named file."""
        path = key
        while path:
            if path in self.sources:
                return self.sources[path]
            path = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", path) if re.search(r"[.\[]", path) else ""
        below = [s for k, s in self.sources.items() if k.startswith(key + ".") or k.startswith(key + "[")]
        if key and below and all(s == below[-1] for s in below):
            return below[-1]
        return f"in {self.files[0]}" if self.files else "in <no file>"


def deep_merge(base: Any, top: Any) -> Any:
    """``top`` over ``base``: mappings merge key by key (recursively); anything else is replaced."""
    if isinstance(base, Mapping) and isinstance(top, Mapping):
        out = dict(base)
        for key, value in top.items():
            out[key] = deep_merge(base[key], value) if key in base else value
        return out
    return top


def _leaf_paths(data: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(data, Mapping) and (data or not prefix):
        for key, value in data.items():
            yield from _leaf_paths(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix


def _load_chain(path: Path, chain: list[Path], environ: Mapping[str, str] | None, tree: ComposedTree) -> dict:
    """The mapping of ``path`` merged over its bases; records leaf sources in ``tree``."""
    resolved = path.resolve()
    if resolved in chain:
        names = " -> ".join(str(p) for p in [*chain, resolved])
        raise ConfigError(EXTENDS_KEY, f"extends cycle: {names}")
    if not path.is_file():
        if chain:
            raise ConfigError(EXTENDS_KEY, f"{chain[-1]} extends {str(path)!r}, which does not exist")
        raise ConfigError("", f"config file {str(path)!r} does not exist")
    tree.files.append(str(path))
    data = read_yaml_mapping(path)
    base_name = data.pop(EXTENDS_KEY, None)
    merged: dict = {}
    if base_name is not None:
        if not isinstance(base_name, str) or not base_name:
            raise ConfigError(EXTENDS_KEY, f"expected the path of a YAML file, got {base_name!r} (in {path})")
        base_path = Path(expand_env(base_name, environ, _key=EXTENDS_KEY))
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        merged = _load_chain(base_path, [*chain, resolved], environ, tree)
    for leaf in _leaf_paths(data):
        for known in [k for k in tree.sources if k == leaf or k.startswith(leaf + ".")]:
            del tree.sources[known]  # replaced wholesale by this file's value
        tree.sources[leaf] = f"in {path}"
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b[0].c=value"`` → ``("a.b[0].c", parsed value)``.

    Raises:
        ConfigError: no ``=``, a malformed key path, or a value that is not one YAML value.
    """
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(key if eq else "", f"override {text!r} is not of the form key.path=value")
    if not all(_SEGMENT.fullmatch(seg) for seg in key.split(".")):
        raise ConfigError(key, f"override {text!r}: the key must be dotted names with optional [index]")
    if key.split(".")[0].split("[")[0] == EXTENDS_KEY:
        raise ConfigError(key, "extends cannot be overridden on the command line; write it in the file")
    if raw == "":
        return key, ""
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(key, f"override value {raw!r} is not a YAML value: {err}") from None


def apply_override(data: dict, key: str, value: Any) -> dict:
    """``data`` with ``value`` set at ``key`` (a new mapping; intermediate mappings are created).

    Raises:
        ConfigError: a list index past the end, an index into something that is not a list, or a key
            below a value that is not a mapping.
    """
    out = dict(data)
    node: Any = out
    steps: list[str | int] = []
    for seg in key.split("."):
        name, indexes = _SEGMENT.fullmatch(seg).groups()
        steps.append(name)
        steps += [int(i) for i in re.findall(r"\d+", indexes)]
    walked = ""
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                size = f"a list of {len(node)} items" if isinstance(node, list) else f"{node!r}"
                raise ConfigError(f"{walked}[{step}]", f"no such list item to override ({walked} is {size})")
            walked += f"[{step}]"
            if last:
                node[step] = value
            else:
                node[step] = dict(node[step]) if isinstance(node[step], Mapping) else node[step]
                node = node[step]
            continue
        walked = f"{walked}.{step}" if walked else step
        if not isinstance(node, dict):
            raise ConfigError(walked, f"cannot set a key below a {type(node).__name__} value ({node!r})")
        if last:
            node[step] = value
        else:
            child = node.get(step)
            if isinstance(steps[i + 1], int):
                child = list(child) if isinstance(child, list) else child
            else:
                child = dict(child) if isinstance(child, Mapping) else ({} if child is None else child)
            node[step] = child
            node = child
    return out


def compose_config(path: str | Path, overrides: Iterable[str] = (),
                   environ: Mapping[str, str] | None = None) -> ComposedTree:
    """Read ``path`` with its ``extends`` chain, expand ``${VAR}`` references (in the merged tree, so
    a value replaced by the extending file needs no variable), then apply ``overrides`` in order.

    Raises:
        ConfigError: naming the key and file (or override) for a missing or malformed file, an
            ``extends`` cycle, or a malformed override.
    """
    tree = ComposedTree()
    merged = _load_chain(Path(path), [], environ, tree)
    try:
        merged = expand_env(merged, environ)
    except ConfigError as err:
        raise ConfigError(err.key, f"{err.message} ({tree.origin(err.key)})") from None
    for text in overrides:
        source = f"from command-line override {text!r}"
        try:
            key, value = parse_override(text)
            merged = apply_override(merged, key, value)
        except ConfigError as err:
            raise ConfigError(err.key, f"{err.message} ({source})") from None
        for known in [k for k in tree.sources if k == key or k.startswith(key + ".") or k.startswith(key + "[")]:
            del tree.sources[known]
        tree.sources[key] = source
    tree.data = merged
    return tree
