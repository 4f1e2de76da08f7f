"""Pruning statistics as plain JSON: the `metadata` of answer records and `--json` output."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsevlm_jax.sparse.config import SparseConfig


def check_kept(layers: Sequence[dict[str, Any]], num_image_tokens: int) -> None:
    """Checks the per-layer `kept` lists index each layer's visual range, in original order.

    `kept` at pruning layer i holds indices into that layer's valid visual tokens: at the first
    pruning layer the image's tokens, later the previous layer's kept tokens (in original
    order) followed by its recycled tokens. So indices are increasing and below the previous
    layer's kept + recycled count (the image token count at the first layer).

    Raises:
      RuntimeError: an index outside that range (an internal inconsistency, not bad input).
    """
    size = num_image_tokens
    for layer in layers:
        kept = [int(k) for k in layer["kept"]]
        if any(not 0 <= k < size for k in kept) or kept != sorted(set(kept)):
            raise RuntimeError(
                f"layer {layer['layer']}: kept indices {kept} do not index a visual range of "
                f"{size} tokens in order"
            )
        size = len(kept) + int(layer["recycled"])


def jsonable(x: Any) -> Any:
    """Plain JSON values from nested dicts / lists / numpy scalars and arrays."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def stats_to_json(
    stats: dict[str, Any], sparse: SparseConfig, num_image_tokens: int
) -> dict[str, Any]:
    """A `Result.stats` dict as plain JSON (`layers[*].kept` checked with `check_kept`).

    Sparse runs always name their capacity policy: `capacity` = {"policy", "capacities",
    "recycled_capacities"} (per pruning layer) as the prefill reported it, else as `sparse`
    configured it (the capacities then only for `static`, where they are fixed in advance).
    SparseVLM's methods also name which of SparseVLM+'s ingredients ran: `ingredients` =
    {"top_heads", "gravity", "original_positions", "recycling": bool}.
    """
    out = jsonable(stats)
    if sparse.ingredients:
        out["ingredients"] = dict(sparse.ingredients)
    if "layers" in out:
        check_kept(out["layers"], int(out.get("visual_tokens", num_image_tokens)))
    if sparse.enabled and "capacity" not in out:
        static = sparse.capacity == "static"
        out["capacity"] = {
            "policy": sparse.capacity,
            "capacities": list(sparse.capacities) if static else None,
            "recycled_capacities": list(sparse.recycled_capacities) if static else None,
        }
    return out


def sparse_to_json(sparse: SparseConfig) -> dict[str, Any]:
    """The sparsity settings of a run (every `SparseConfig` field), for machine-readable output."""
    return jsonable(dataclasses.asdict(sparse))


def frames_kept(
    layers: Sequence[dict[str, Any]], frame_of: Sequence[Any], num_frames: int
) -> list[list[int]]:
    """Per pruning layer, how many of each video frame's tokens are still there after it.

    `frame_of[i]`: the frame of the example's i-th visual token (None for an image's tokens;
    a tuple of frames for a token that stands for several, Qwen-VL's frame pairs: it counts for
    each). Each layer's `kept` indexes the previous layer's kept tokens then its recycled ones
    (`check_kept`); recycled tokens belong to no frame.
    """
    current: list[Any] = list(frame_of)
    out = []
    for layer in layers:
        current = [current[int(k)] for k in layer["kept"]] + [None] * int(layer["recycled"])
        counts = [0] * num_frames
        for f in current:
            for g in () if f is None else f if isinstance(f, tuple) else (f,):
                counts[g] += 1
        out.append(counts)
    return out
