"""Source tensors read straight onto their devices, one block of one target parameter at a time.

`load_transformers` (after the plan has checked the whole checkpoint) builds every target
parameter with `sparsevlm_jax.sharding.array_from_shards`: each device's block of the target
(`index`, a tuple of slices of the target shape) is read by `read_block`, which touches only
the source tensors and the parts of them that the block covers:

    stacked target [L, a, b]   the layers of index[0], each from its own source tensor
    linear kernel  [in, out]   source weight [out, in]: rows index[out], columns index[in],
                               transposed on the way
    copy           [...]       the same block of the source tensor
    patch          [P*P*C, Dv] the whole (small, replicated) CLIP conv, reshaped, then cut

Host memory while reading a block is the block itself (in the target dtype) plus one layer's
part of it in the source dtype: about one shard, never the whole parameter nor the model.
`LoadStats` measures exactly that (the largest host array created, per block).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from convert.names import COPY, LINEAR, Target
from convert.names import transform as apply_transform
from convert.readers import BlockReader, Index, TensorInfo, block_shape, normalize_index

# One target parameter's sources: layer slot (0 when not stacked) -> (reader, tensor, target).
Parts = dict[int, tuple[BlockReader, TensorInfo, Target]]


@dataclass
class LoadStats:
    """What reading blocks cost on the host (filled in by `read_block` when given).

    largest: bytes of the largest host array created while reading any block.
    worst: the largest ratio, over blocks, of (largest array created for the block) /
        (the block's elements x the larger of the source and target item sizes): at most 1
        means no block ever needed more than one block's worth of memory at once.
    blocks: how many blocks were read.
    """

    largest: int = 0
    worst: float = 0.0
    blocks: int = 0
    _current: int = field(default=0, repr=False)

    def note(self, a: np.ndarray) -> None:
        self._current = max(self._current, a.nbytes)
        self.largest = max(self.largest, a.nbytes)

    def finish_block(self, elements: int, itemsize: int) -> None:
        if elements:
            self.worst = max(self.worst, self._current / (elements * itemsize))
        self.blocks, self._current = self.blocks + 1, 0


def read_block(
    parts: Parts,
    shape: tuple[int, ...],
    stacked: bool,
    index: tuple,
    dtype: np.dtype,
    stats: LoadStats | None = None,
) -> np.ndarray:
    """`target[index]` of one target parameter of `shape`, in `dtype`, read from its sources.

    parts: the parameter's source tensors by layer slot (slot 0 when not stacked).
    stacked: the target has a leading layer axis [L, ...] gathered from one tensor per layer.
    """
    index = normalize_index(index, shape)
    out = np.empty(block_shape(index), dtype)
    if stats is not None:
        stats.note(out)
    if stacked:
        for j, layer in enumerate(range(index[0].start, index[0].stop)):
            _read_into(out[j], *parts[layer], index[1:])
    else:
        _read_into(out, *parts[0], index)
    if stats is not None:
        src = max((info.dtype.itemsize for _, info, _ in parts.values()), default=1)
        stats.finish_block(out.size, max(src, out.dtype.itemsize))
    return out


def _read_into(
    dst: np.ndarray, reader: BlockReader, info: TensorInfo, target: Target, index: Index
) -> None:
    """dst[...] = transform(source)[index] for one source tensor (one layer of a stack)."""
    if target.kind == LINEAR:  # kernel[a, b] = weight[b, a]
        copy_into(dst, reader.read(info, index[::-1]), target)
    elif target.kind == COPY:
        copy_into(dst, reader.read(info, index), target)
    else:  # PATCH: the rows mix the conv's axes; read it whole (small, replicated)
        whole = apply_transform(target.kind, reader.read(info, ()))
        dst[...] = whole[index]


def copy_into(dst: np.ndarray, w: np.ndarray, target: Target, tile: int = 256) -> None:
    """`dst[...] = transform(w)`, casting; large transposes go tile by tile (2-3x faster)."""
    value = apply_transform(target.kind, w)
    if value.ndim != 2 or value.flags.c_contiguous or value.size < tile * tile * 16:
        dst[...] = value
        return
    rows, cols = value.shape
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            dst[i : i + tile, j : j + tile] = value[i : i + tile, j : j + tile]


def block_reader(
    parts: Parts,
    shape: tuple[int, ...],
    stacked: bool,
    dtype: np.dtype,
    stats: LoadStats | None = None,
) -> Callable[[tuple], np.ndarray]:
    """`index -> read_block(...)` for one target parameter (a `make_array_from_callback`
    style callback)."""

    def read(index: tuple) -> np.ndarray:
        return read_block(parts, shape, stacked, index, dtype, stats)

    return read
