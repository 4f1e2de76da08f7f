"""Streaming readers for checkpoint directories: safetensors (single or sharded) and torch `.bin`.

A directory is opened with `open_weights(dir)`, which finds its weight files and returns a
`WeightFiles`. `entries()` lists every tensor's name, shape and dtype without reading the data
(safetensors headers; `.bin` files through a memory-mapped `torch.load`), and `tensors()` yields
`(name, np.ndarray)` one tensor at a time, so a converter holds at most one source tensor.
`blocks()` opens random access to blocks of tensors (`BlockReader.read(info, index)` =
`tensor[index]`): safetensors blocks are read by their header offsets, row range by row range,
so a block costs about its own size in memory, never the whole tensor.

safetensors files are parsed directly (8-byte header length, JSON header, raw little-endian
data): this reads bf16 without torch (as `ml_dtypes.bfloat16`) and needs no framework at all.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from convert.errors import ConversionError

# safetensors dtype tag -> numpy dtype (little-endian, as the format stores it).
_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


class WeightsError(ConversionError):
    """A weights directory that cannot be read (no weight files, a broken index or header)."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor in a weight file, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of one checkpoint directory, all of one format."""

    root: Path
    files: tuple[Path, ...]
    format: str  # "safetensors" | "torch"

    def entries(self) -> list[TensorInfo]:
        """Every tensor's name, shape and dtype, in file order, without reading tensor data."""
        reader = _safetensors_entries if self.format == "safetensors" else _torch_entries
        return [info for f in self.files for info in reader(f)]

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields `(name, array)` one tensor at a time, in the order of `entries()`."""
        reader = _safetensors_tensors if self.format == "safetensors" else _torch_tensors
        for f in self.files:
            yield from reader(f)

    def blocks(self, note: Callable[[np.ndarray], None] | None = None) -> BlockReader:
        """Random access to blocks of this directory's tensors (close it, or use `with`).

        note: called with every host array the reader creates (for measurements).
        """
        cls = _SafetensorsBlocks if self.format == "safetensors" else _TorchBlocks
        return cls(note or _ignore)


Index = tuple[slice, ...]


def _ignore(_: np.ndarray) -> None:
    pass


def normalize_index(index: tuple, shape: tuple[int, ...]) -> Index:
    """`index` (slices with None ends, possibly fewer than `shape` has dims) as explicit
    `slice(start, stop)` per dimension; steps other than 1 are refused."""
    out = []
    for i, d in enumerate(shape):
        s = index[i] if i < len(index) else slice(None)
        start, stop, step = s.indices(d)
        if step != 1:
            raise ValueError(f"index {index}: only unit steps are supported")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def block_shape(index: Index) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in index)


@dataclass
class BlockReader:
    """`read(info, index)`: `tensor[index]` of one tensor of `entries()`, as a new array."""

    note: Callable[[np.ndarray], None]

    def read(self, info: TensorInfo, index: tuple) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_weights(root: str | Path) -> WeightFiles:
    """Finds the weight files of a checkpoint directory.

    Looked for in this order: `model.safetensors.index.json`, `model.safetensors`, any
    `*.safetensors`, `pytorch_model.bin.index.json`, `pytorch_model.bin`, `pytorch_model*.bin`.

    Raises:
        WeightsError: no weight files, or an index naming a file that is not there.
    """
    root = Path(root)
    if not root.is_dir():
        raise WeightsError(f"{root}: not a directory")
    for fmt, index, single, pattern in (
        ("safetensors", "model.safetensors.index.json", "model.safetensors", "*.safetensors"),
        ("torch", "pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin"),
    ):
        if (root / index).is_file():
            return WeightFiles(root, _files_from_index(root / index), fmt)
        if (root / single).is_file():
            return WeightFiles(root, (root / single,), fmt)
        found = tuple(sorted(root.glob(pattern)))
        if found:
            return WeightFiles(root, found, fmt)
    raise WeightsError(
        f"{root}: no weights found (expected model.safetensors, model-*-of-*.safetensors "
        "with model.safetensors.index.json, or pytorch_model*.bin)"
    )


def _files_from_index(index: Path) -> tuple[Path, ...]:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{index}: unreadable index ({e})") from e
    files = tuple(index.parent / name for name in sorted(set(weight_map.values())))
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise WeightsError(f"{index}: names shard files that are missing: {', '.join(absent)}")
    return files


# --- safetensors -----------------------------------------------------------------------------


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where tensor data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise WeightsError(f"{path}: not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise WeightsError(f"{path}: not a safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def _st_dtype(path: Path, name: str, tag: str) -> np.dtype:
    if tag not in _ST_DTYPES:
        raise WeightsError(f"{path}: tensor {name} has unsupported dtype {tag}")
    return _ST_DTYPES[tag]


def _safetensors_entries(path: Path) -> list[TensorInfo]:
    header, _ = _read_header(path)
    return [
        TensorInfo(name, tuple(h["shape"]), _st_dtype(path, name, h["dtype"]), path)
        for name, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    ]


def _safetensors_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    header, base = _read_header(path)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    with open(path, "rb") as f:
        for name, h in items:
            dtype = _st_dtype(path, name, h["dtype"])
            start, end = h["data_offsets"]
            shape = tuple(h["shape"])
            if end - start != dtype.itemsize * int(np.prod(shape)):
                raise WeightsError(f"{path}: tensor {name} has inconsistent offsets")
            out = np.empty(shape, dtype)
            f.seek(base + start)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - start:
                raise WeightsError(f"{path}: tensor {name} is truncated")
            yield name, out


@dataclass
class _SafetensorsBlocks(BlockReader):
    """Blocks read straight from the files: a block's row range is one contiguous run of
    bytes; a block that also cuts the other dimensions is read in row chunks no larger than
    the block itself (or one row), each cut down as it arrives."""

    headers: dict[Path, tuple[dict[str, Any], int]] = field(default_factory=dict)
    handles: dict[Path, Any] = field(default_factory=dict)

    def read(self, info: TensorInfo, index: tuple) -> np.ndarray:
        path = info.file
        if path not in self.headers:
            self.headers[path] = _read_header(path)
            self.handles[path] = open(path, "rb")  # noqa: SIM115 (closed in close())
        header, base = self.headers[path]
        h = header[info.name]
        dtype, shape = _st_dtype(path, info.name, h["dtype"]), tuple(h["shape"])
        start, end = h["data_offsets"]
        if end - start != dtype.itemsize * int(np.prod(shape)):
            raise WeightsError(f"{path}: tensor {info.name} has inconsistent offsets")
        index = normalize_index(index, shape)
        out = np.empty(block_shape(index), dtype)
        self.note(out)
        if out.size:
            self._fill(out, path, info.name, base + start, shape, index)
        return out

    def _fill(
        self, out: np.ndarray, path: Path, name: str, offset: int, shape: tuple, index: Index
    ) -> None:
        """out[...] = tensor[index] for the tensor whose data starts at byte `offset`."""
        if not shape:
            self._pread(out, path, name, offset)
            return
        row = out.dtype.itemsize * int(np.prod(shape[1:]))
        rows, rest = index[0], index[1:]
        if all(s == slice(0, d) for s, d in zip(rest, shape[1:], strict=True)):
            self._pread(out, path, name, offset + rows.start * row)
            return
        step = max(1, out.nbytes // max(row, 1))
        chunk = np.empty((min(step, rows.stop - rows.start), *shape[1:]), out.dtype)
        self.note(chunk)
        for r in range(rows.start, rows.stop, step):
            n = min(step, rows.stop - r)
            self._pread(chunk[:n], path, name, offset + r * row)
            out[r - rows.start : r - rows.start + n] = chunk[(slice(0, n), *rest)]

    def _pread(self, dst: np.ndarray, path: Path, name: str, offset: int) -> None:
        f = self.handles[path]
        f.seek(offset)
        if f.readinto(memoryview(dst.reshape(-1).view(np.uint8))) != dst.nbytes:
            raise WeightsError(f"{path}: tensor {name} is truncated")

    def close(self) -> None:
        for f in self.handles.values():
            f.close()
        self.handles.clear()
        self.headers.clear()


# --- torch .bin ------------------------------------------------------------------------------


def _torch_load(path: Path) -> dict[str, Any]:
    """`torch.load` of a state dict, memory-mapped where the file format allows it."""
    try:
        import torch
    except ImportError as e:
        raise WeightsError(
            f"{path}: reading pytorch_model*.bin needs torch (pip install torch), "
            "or convert the checkpoint to safetensors first"
        ) from e
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a broken or unsafe pickle
        detail = " ".join(str(e).split())[:300]
        raise WeightsError(f"{path}: cannot load ({type(e).__name__}: {detail})") from e
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def _torch_np_dtype(t: Any) -> np.dtype:
    import torch

    if t.dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(torch.empty((), dtype=t.dtype).numpy().dtype)


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def _torch_entries(path: Path) -> list[TensorInfo]:
    sd = _torch_load(path)
    return [TensorInfo(k, tuple(v.shape), _torch_np_dtype(v), path) for k, v in sd.items()]


def _torch_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    sd = _torch_load(path)
    for name in list(sd):
        yield name, _torch_to_numpy(sd.pop(name))


@dataclass
class _TorchBlocks(BlockReader):
    """Blocks sliced from memory-mapped state dicts (one `torch.load` per file, kept open)."""

    dicts: dict[Path, dict[str, Any]] = field(default_factory=dict)

    def read(self, info: TensorInfo, index: tuple) -> np.ndarray:
        if info.file not in self.dicts:
            self.dicts[info.file] = _torch_load(info.file)
        t = self.dicts[info.file][info.name]
        index = normalize_index(index, tuple(t.shape))
        out = _torch_to_numpy(t[index])
        self.note(out)
        return out

    def close(self) -> None:
        self.dicts.clear()
