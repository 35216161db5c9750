"""Reading and writing HF checkpoint directories: ``config.json`` plus safetensors (single or sharded).

* :class:`HFCheckpointReader` indexes a directory from the safetensors *headers* only (names, dtypes,
  shapes), so every rank can validate the whole checkpoint cheaply and identically, then reads just
  the tensors it needs through ``safe_open`` (memory-mapped, lazy).
* :class:`HFCheckpointWriter` streams tensors into shards of bounded size inside a temporary
  directory next to the target and renames it into place on :meth:`~HFCheckpointWriter.commit`; a
  crash leaves the previous checkpoint untouched. The layout is what ``transformers`` and vLLM load:
  ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from megatron_cropi.checkpoint.hf_config import HFCheckpointError

__all__ = ["read_hf_config", "HFCheckpointReader", "HFCheckpointWriter", "hf_side_files", "DEFAULT_MAX_SHARD_BYTES"]

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # HF's default shard size
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".gguf")


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model directory.

    Raises:
        HFCheckpointError: the directory or its config.json is missing or not valid JSON.
    """
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise HFCheckpointError(f"{hf_dir}: HF checkpoint directory does not exist")
    if not path.is_file():
        raise HFCheckpointError(f"{path}: missing; an HF checkpoint directory needs config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFCheckpointError(f"{path}: not valid JSON ({err})") from None


def _read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (safetensors dtype, shape)}`` from a safetensors file's header, checking its size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as err:
        raise HFCheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise HFCheckpointError(f"{path}: truncated; the header describes {8 + n + end} bytes, the file has {size}")
    return {name: (info["dtype"], tuple(info["shape"])) for name, info in header.items()}


class HFCheckpointReader:
    """Lazy, validated access to the tensors of an HF safetensors checkpoint directory.

    Attributes:
        path: the directory.
        config: its parsed ``config.json``.
        weight_map: ``{tensor name: file name}``.

    Raises (on construction):
        HFCheckpointError: config.json missing, no safetensors, a shard named by the index missing or
            truncated, or a tensor the index names absent from its shard; the message names the file
            and a tensor.
    """

    def __init__(self, hf_dir: str | Path):
        self.path = Path(hf_dir)
        self.config = read_hf_config(self.path)
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                self.weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise HFCheckpointError(f"{index}: not a valid safetensors index ({err!r})") from None
            by_file: dict[str, list[str]] = {}
            for name, file in self.weight_map.items():
                by_file.setdefault(file, []).append(name)
            for file, names in sorted(by_file.items()):
                if not (self.path / file).is_file():
                    raise HFCheckpointError(f"{self.path / file}: shard missing; {INDEX_NAME} places "
                                            f"{len(names)} tensors there, e.g. {sorted(names)[0]!r}")
        else:
            files = [SINGLE_NAME] if (self.path / SINGLE_NAME).is_file() else sorted(
                p.name for p in self.path.glob("*.safetensors"))
            if not files:
                other = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
                hint = f" (found {other[:3]}; only safetensors are read: re-save with save_pretrained)" if other else ""
                raise HFCheckpointError(f"{self.path}: no *.safetensors weight files{hint}")
            self.weight_map = {}
        self._headers = {}
        for file in sorted(set(self.weight_map.values()) or files):
            self._headers[file] = _read_header(self.path / file)
            if not index.is_file():
                for name in self._headers[file]:
                    self.weight_map.setdefault(name, file)
        for name, file in self.weight_map.items():
            if name not in self._headers[file]:
                raise HFCheckpointError(f"{self.path / file}: tensor {name!r} is missing from this shard "
                                        f"({INDEX_NAME} says it is there)")

    def names(self) -> set[str]:
        """All tensor names in the checkpoint."""
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` from the header (no data read)."""
        self._check(name)
        return self._headers[self.weight_map[name]][name][1]

    def _check(self, name: str) -> None:
        if name not in self.weight_map:
            raise HFCheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype)."""
        return self.get_many([name])[name]

    def get_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read several tensors, opening each shard once."""
        from safetensors import safe_open

        names = list(names)
        for name in names:
            self._check(name)
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        for file, group in by_file.items():
            try:
                with safe_open(str(self.path / file), framework="pt", device="cpu") as f:
                    for name in group:
                        out[name] = f.get_tensor(name)
            except HFCheckpointError:
                raise
            except Exception as err:  # safetensors raises its own error types
                raise HFCheckpointError(f"{self.path / file}: reading {group[0]!r} failed ({err})") from None
        return out


def hf_side_files(hf_dir: str | Path) -> list[Path]:
    """Top-level files of an HF directory that are not weights or config.json (tokenizer, generation config)."""
    out = []
    for p in sorted(Path(hf_dir).iterdir()):
        if p.is_file() and p.name != "config.json" and not p.name.endswith(_WEIGHT_SUFFIXES):
            out.append(p)
    return out


class HFCheckpointWriter:
    """Stream tensors into an HF safetensors directory, atomically.

    Usage::

        with HFCheckpointWriter(out_dir) as w:
            for name, t in tensors:
                w.add(name, t)
            w.commit(config)

    Args:
        out_dir: the final directory; written only by :meth:`commit` (rename of a temp directory).
        max_shard_bytes: start a new shard before a tensor would make the current one larger.
        overwrite: replace an existing ``out_dir`` (it is removed only after the new one is in place).

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """

    def __init__(self, out_dir: str | Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir}: already exists; pass overwrite=True to replace it")
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
        self.max_shard_bytes = int(max_shard_bytes)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self._seen: set[str] = set()
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (copied to CPU); flushes the current shard when it would overflow."""
        if name in self._seen:
            raise ValueError(f"tensor {name!r} added twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # safetensors refuses tensors that share storage (views of one fused tensor): own a copy
        self._buffer[name] = tensor.detach().to("cpu", copy=True).contiguous()
        self._buffer_bytes += nbytes
        self._total_bytes += nbytes
        self._seen.add(name)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buffer:
            return
        file = f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._buffer, str(self._tmp / file), metadata={"format": "pt"})
        self._shards.append((file, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def commit(self, config: dict[str, Any], *, side_files: Iterable[Path] = ()) -> Path:
        """Write the last shard, the index (if several shards), ``config.json`` and ``side_files``,
        then move the directory into place. Returns ``out_dir``."""
        self._flush()
        if not self._shards:
            raise ValueError(f"{self.out_dir}: no tensors were added")
        n = len(self._shards)
        weight_map = {}
        for i, (file, names) in enumerate(self._shards):
            final = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self._tmp / file, self._tmp / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
            (self._tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for src in side_files:
            shutil.copy2(src, self._tmp / Path(src).name)
        (self._tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        old = None
        if self.out_dir.exists():
            old = self._tmp.with_name(self._tmp.name.replace(".tmp-", ".old-"))
            os.replace(self.out_dir, old)
        os.replace(self._tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._tmp = None
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far (``out_dir`` is untouched)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "HFCheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()  # no-op after commit
