"""M-RoPE position ids for Qwen2-VL and Qwen2.5-VL, computed on the host (numpy only).

The decoder of both families rotates queries and keys by three position streams instead of
one: time ``t``, row ``h`` and column ``w``. This module builds those streams for a prompt,
equal to transformers 5.25's ``Qwen2VLModel.get_rope_index`` /
``Qwen2_5_VLModel.get_rope_index`` (the tests compare them on tiny random models).

Positions of one sequence (``rope_index``)
    The sequence is cut into runs of equal token type (text 0, image 1, video 2; a token is
    visual when it is the image / video placeholder id; ``<|vision_start|>`` and
    ``<|vision_end|>`` are text). A running position ``p`` starts at 0.

    - A text run of ``n`` tokens gets ``(p + i, p + i, p + i)`` for ``i < n``; ``p += n``.
    - A visual run takes the next grid ``(t, h, w)`` of its kind, in sequence order. With
      ``h' = h // m`` and ``w' = w // m`` (``m`` the spatial merge size) it holds
      ``t * h' * w'`` tokens in ``(time, row, col)`` order, and token ``(k, r, c)`` gets
      ``(p + trunc(k * dt), p + r, p + c)``. ``dt`` is 1 for images and for every Qwen2-VL
      video; for a Qwen2.5-VL video it is ``tokens_per_second * second_per_grid_t`` (the
      product computed in float32 and truncated toward zero, as torch does). Then
      ``p += max(h', w')``: the text after a group resumes at its start plus the larger
      spatial side, not at its start plus its token count.

      For images this equals "one past the group's largest position". For a video whose time
      positions pass ``max(h', w') - 1`` it does not: transformers <= 5.2, vLLM and Qwen's own
      code resume at the group's max + 1 instead. ``after_vision="max"`` gives that rule;
      the default ``"spatial"`` is transformers 5.25's.
    - Padding (``attention_mask == 0``, left or right) is skipped when counting and gets
      ``(0, 0, 0)``, as transformers writes it.

Where decoding continues
    ``next_position = max(positions of the non-padding tokens) + 1`` over all three streams
    (0 when every token is padding); every decoded token gets ``(q, q, q)`` with ``q``
    counting up from it. transformers stores ``rope_deltas = max + 1 - n_valid`` (``n_valid``
    = the number of non-padding tokens, ``L`` without padding) and positions its decoded token
    number ``j`` (0-based) at ``n_valid + j + rope_deltas``, so
    ``next_position == rope_deltas + n_valid`` (``rope_deltas + L`` without padding).

How the streams reach the rotary frequencies (the decoder's ``mrope_cos_sin``, not here)
    With head dimension ``H`` the rotary frequencies are ``f_j = theta ** (-2 j / H)`` for
    ``j < H / 2``. ``mrope_section`` (e.g. ``[16, 24, 24]`` for ``H = 128``) splits those
    ``H / 2`` frequencies into consecutive chunks; chunk ``i`` takes its angles from stream
    ``i % 3`` (``t``, ``h``, ``w``), so with ``[16, 24, 24]`` frequencies 0-15 rotate by
    the time position, 16-39 by the row, 40-63 by the column. The ``H / 2`` angles are then
    duplicated ``[a, a]`` over the head dimension (the rotate-half layout), exactly as
    transformers' ``recomposition_frequencies``. The section must therefore sum to ``H / 2``:
    ``mrope_section_check``. Text tokens have equal streams, so on text M-RoPE is plain RoPE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "TEXT",
    "IMAGE",
    "VIDEO",
    "mrope_section_check",
    "next_position_from_rope_deltas",
    "rope_index",
    "rope_index_batch",
    "text_positions",
    "token_types",
    "visual_positions",
]

TEXT, IMAGE, VIDEO = 0, 1, 2

AfterVision = Literal["spatial", "max"]


def mrope_section_check(section: Sequence[int], head_dim: int) -> None:
    """Raise ``ValueError`` unless ``section`` splits the ``head_dim // 2`` rotary frequencies.

    ``section``: the config's ``mrope_section`` (e.g. ``(16, 24, 24)``); ``head_dim``: the
    attention head dimension (e.g. 128). Entries must be non-negative integers summing to
    ``head_dim // 2``; ``head_dim`` must be even and positive.
    """
    sec = tuple(section)
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"mrope head_dim must be a positive even number, got {head_dim}")
    if not sec or any(int(s) != s or s < 0 for s in sec):
        raise ValueError(f"mrope_section must be non-negative integers, got {list(sec)}")
    if sum(sec) != head_dim // 2:
        raise ValueError(
            f"mrope_section {list(sec)} sums to {sum(sec)}, but it must sum to half the head "
            f"dimension ({head_dim} // 2 = {head_dim // 2})"
        )


def token_types(input_ids: np.ndarray, image_token_id: int, video_token_id: int) -> np.ndarray:
    """Modality of each token, as transformers' ``mm_token_type_ids``.

    ``input_ids``: any shape, int. Returns the same shape, int32: 0 text, 1 image, 2 video.
    """
    ids = np.asarray(input_ids)
    out = np.zeros(ids.shape, np.int32)
    out[ids == image_token_id] = IMAGE
    out[ids == video_token_id] = VIDEO
    return out


def text_positions(n: int, start: int = 0) -> np.ndarray:
    """Positions of ``n`` text (or decoded) tokens starting at ``start``: [n, 3] int32,
    row ``i`` = ``(start + i,) * 3``."""
    p = np.arange(start, start + n, dtype=np.int32)
    return np.repeat(p[:, None], 3, axis=1)


def visual_positions(
    grid_thw: Sequence[int],
    start: int,
    spatial_merge_size: int = 2,
    time_interval: float = 1.0,
) -> np.ndarray:
    """Positions of one image / video group that starts at ``start``.

    ``grid_thw``: the patch grid ``(t, h, w)`` (before the spatial merge). Returns
    [t * h' * w', 3] int32 in token order (time-major, then row, then column), with
    ``h' = h // spatial_merge_size``, ``w' = w // spatial_merge_size``; token ``(k, r, c)`` is
    ``(start + trunc(k * time_interval), start + r, start + c)``, the product in float32.
    """
    t, h, w = (int(x) for x in grid_thw)
    hm, wm = h // spatial_merge_size, w // spatial_merge_size
    tt = (np.arange(t, dtype=np.float32) * np.float32(time_interval)).astype(np.int64)
    tg, hg, wg = np.meshgrid(tt, np.arange(hm), np.arange(wm), indexing="ij")
    pos = np.stack([tg.ravel(), hg.ravel(), wg.ravel()], axis=1) + start
    return pos.astype(np.int32)


def _runs(types: np.ndarray) -> list[tuple[int, int, int]]:
    """(type, start, end) of the maximal runs of equal values in a 1-D array."""
    if types.size == 0:
        return []
    cut = np.flatnonzero(np.diff(types)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [types.size]])
    return [(int(types[s]), int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def _runs_of(types: np.ndarray, kind: int) -> list[tuple[int, int, int]]:
    return [r for r in _runs(types) if r[0] == kind]


def _as_grids(grids: Sequence[Sequence[int]] | np.ndarray | None, name: str) -> list[tuple]:
    if grids is None:
        return []
    arr = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
    if (arr < 1).any():
        raise ValueError(f"{name}: every (t, h, w) must be positive, got {arr.tolist()}")
    return [tuple(int(x) for x in g) for g in arr]


def _time_intervals(
    n_videos: int,
    second_per_grid_ts: Sequence[float] | np.ndarray | None,
    tokens_per_second: float | None,
) -> list[float]:
    """Per-video time step: 1 (Qwen2-VL) or tokens_per_second * second_per_grid_t (2.5)."""
    if tokens_per_second is None:
        if second_per_grid_ts is not None:
            raise ValueError(
                "second_per_grid_ts needs tokens_per_second (Qwen2.5-VL); Qwen2-VL has no "
                "time scaling"
            )
        return [1.0] * n_videos
    secs = [1.0] * n_videos if second_per_grid_ts is None else list(second_per_grid_ts)
    if len(secs) != n_videos:
        raise ValueError(f"{len(secs)} second_per_grid_ts for {n_videos} videos")
    # transformers: a float32 tensor of seconds times the config's tokens_per_second.
    return [float(np.float32(s) * np.float32(tokens_per_second)) for s in secs]


def _sequence_positions(
    types: np.ndarray,
    image_grids: list[tuple],
    video_grids: list[tuple],
    video_dt: list[float],
    spatial_merge_size: int,
    after_vision: AfterVision,
    starts_ok: np.ndarray | None,
) -> tuple[np.ndarray, int, int, int]:
    """Positions [n, 3] of the non-padding tokens, plus how many image / video grids used."""
    pieces = []
    p = 0
    used = {IMAGE: 0, VIDEO: 0}
    grids = {IMAGE: image_grids, VIDEO: video_grids}
    names = {IMAGE: "image", VIDEO: "video"}
    for kind, s, e in _runs(types):
        if kind == TEXT:
            pieces.append(text_positions(e - s, p))
            p += e - s
            continue
        if kind not in grids:
            raise ValueError(f"unknown token type {kind}")
        i = used[kind]
        if i >= len(grids[kind]):
            raise ValueError(
                f"more {names[kind]} spans in the sequence than {names[kind]} grids "
                f"({len(grids[kind])})"
            )
        if starts_ok is not None and not starts_ok[s]:
            raise ValueError(
                f"{names[kind]} span at token {s} is not preceded by the vision-start token"
            )
        g = grids[kind][i]
        dt = video_dt[i] if kind == VIDEO else 1.0
        pos = visual_positions(g, p, spatial_merge_size, dt)
        if len(pos) != e - s:
            raise ValueError(
                f"{names[kind]} span {i} has {e - s} tokens but its grid {list(g)} with merge "
                f"{spatial_merge_size} gives {len(pos)}"
            )
        pieces.append(pos)
        used[kind] += 1
        if after_vision == "spatial":
            p += max(g[1], g[2]) // spatial_merge_size
        else:
            p = int(pos.max()) + 1
    out = np.concatenate(pieces) if pieces else np.zeros((0, 3), np.int32)
    nxt = int(out.max()) + 1 if len(out) else 0
    return out, nxt, used[IMAGE], used[VIDEO]


def _check_after_vision(after_vision: str) -> None:
    if after_vision not in ("spatial", "max"):
        raise ValueError(f"after_vision must be 'spatial' or 'max', got {after_vision!r}")


def rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: Sequence[Sequence[int]] | np.ndarray | None,
    video_grid_thw: Sequence[Sequence[int]] | np.ndarray | None,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int | None,
    spatial_merge_size: int = 2,
    second_per_grid_ts: Sequence[float] | np.ndarray | None = None,
    tokens_per_second: float | None = None,
    after_vision: AfterVision = "spatial",
) -> tuple[np.ndarray, int]:
    """M-RoPE positions of one sequence, equal to transformers 5.25's ``get_rope_index``.

    Args:
      input_ids: [L] int token ids.
      attention_mask: [L] (1 = token, 0 = padding; left or right) or None (no padding).
      image_grid_thw: the ``(t, h, w)`` patch grid of each image span, in sequence order
        ([n_images, 3]); None or empty when there is none.
      video_grid_thw: the same for each video span ([n_videos, 3]).
      image_token_id / video_token_id: the placeholder ids (``<|image_pad|>``,
        ``<|video_pad|>``).
      vision_start_token_id: ``<|vision_start|>``. Positions do not depend on it (transformers
        5.25 reads spans from token types); when given, each visual span must directly follow
        one, else ``ValueError``. None skips that check.
      spatial_merge_size: the vision tower's ``spatial_merge_size`` (2 for both families).
      second_per_grid_ts: Qwen2.5-VL, seconds per temporal grid of each video ([n_videos]);
        None = 1.0 each. Needs ``tokens_per_second``.
      tokens_per_second: Qwen2.5-VL's ``vision_config.tokens_per_second``; None = Qwen2-VL
        (video time positions step by 1).
      after_vision: ``"spatial"`` (transformers 5.25: text after a group resumes at its start
        + max(h', w')) or ``"max"`` (transformers <= 5.2 / vLLM / Qwen: at the group's
        largest position + 1). They differ only for videos whose time positions pass the
        spatial extent.

    Returns:
      positions: [L, 3] int32, ``(t, h, w)`` per token; padding tokens get ``(0, 0, 0)``.
      next_position: int, ``max(positions of the non-padding tokens) + 1`` (0 if none): the
        position of the first decoded token. transformers' ``rope_deltas`` for this sequence
        is ``next_position - n_valid`` (``n_valid`` = number of non-padding tokens).

    Raises ``ValueError`` when the spans and the grids disagree (count or token number).
    """
    _check_after_vision(after_vision)
    ids = np.asarray(input_ids)
    if ids.ndim != 1:
        raise ValueError(f"input_ids must be 1-D [L], got shape {ids.shape}")
    valid = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) != 0
    if valid.shape != ids.shape:
        raise ValueError(f"attention_mask shape {valid.shape} != input_ids shape {ids.shape}")
    image_grids = _as_grids(image_grid_thw, "image_grid_thw")
    video_grids = _as_grids(video_grid_thw, "video_grid_thw")
    video_dt = _time_intervals(len(video_grids), second_per_grid_ts, tokens_per_second)
    v_ids = ids[valid]
    starts_ok = None
    if vision_start_token_id is not None:
        starts_ok = np.zeros(v_ids.shape, bool)
        starts_ok[1:] = v_ids[:-1] == vision_start_token_id
    pos, nxt, n_img, n_vid = _sequence_positions(
        token_types(v_ids, image_token_id, video_token_id),
        image_grids,
        video_grids,
        video_dt,
        spatial_merge_size,
        after_vision,
        starts_ok,
    )
    if n_img != len(image_grids) or n_vid != len(video_grids):
        raise ValueError(
            f"the sequence has {n_img} image and {n_vid} video spans, but "
            f"{len(image_grids)} image and {len(video_grids)} video grids were given"
        )
    out = np.zeros((ids.shape[0], 3), np.int32)
    out[valid] = pos
    return out, nxt


def rope_index_batch(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: Sequence[Sequence[int]] | np.ndarray | None,
    video_grid_thw: Sequence[Sequence[int]] | np.ndarray | None,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int | None,
    spatial_merge_size: int = 2,
    second_per_grid_ts: Sequence[float] | np.ndarray | None = None,
    tokens_per_second: float | None = None,
    after_vision: AfterVision = "spatial",
) -> tuple[np.ndarray, np.ndarray]:
    """``rope_index`` over a batch, with the grids laid out as transformers takes them.

    ``input_ids``: [B, L]; ``attention_mask``: [B, L] or None. ``image_grid_thw`` /
    ``video_grid_thw`` / ``second_per_grid_ts`` list every grid of the batch in order (row 0's
    spans first), as the processor returns them; each row takes the next ones it needs.
    Returns positions [B, L, 3] int32 and next_position [B] int64 (see ``rope_index``).
    """
    _check_after_vision(after_vision)
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D [B, L], got shape {ids.shape}")
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    image_grids = _as_grids(image_grid_thw, "image_grid_thw")
    video_grids = _as_grids(video_grid_thw, "video_grid_thw")
    _time_intervals(len(video_grids), second_per_grid_ts, tokens_per_second)  # validates
    secs = None if second_per_grid_ts is None else list(second_per_grid_ts)
    types = token_types(ids, image_token_id, video_token_id)
    positions = np.zeros(ids.shape + (3,), np.int32)
    nexts = np.zeros(ids.shape[0], np.int64)
    i_img = i_vid = 0
    for b in range(ids.shape[0]):
        valid_types = types[b][mask[b] != 0]
        n_img = len(_runs_of(valid_types, IMAGE))
        n_vid = len(_runs_of(valid_types, VIDEO))
        positions[b], nexts[b] = rope_index(
            ids[b],
            mask[b],
            image_grids[i_img : i_img + n_img],
            video_grids[i_vid : i_vid + n_vid],
            image_token_id,
            video_token_id,
            vision_start_token_id,
            spatial_merge_size,
            None if secs is None else secs[i_vid : i_vid + n_vid],
            tokens_per_second,
            after_vision,
        )
        i_img += n_img
        i_vid += n_vid
    if i_img != len(image_grids) or i_vid != len(video_grids):
        raise ValueError(
            f"the batch has {i_img} image and {i_vid} video spans, but {len(image_grids)} "
            f"image and {len(video_grids)} video grids were given"
        )
    return positions, nexts


def next_position_from_rope_deltas(rope_deltas: int, n_valid: int) -> int:
    """transformers' ``rope_deltas`` (per example) to our ``next_position``: ``rope_deltas +
    n_valid``, ``n_valid`` the example's non-padding token count."""
    return int(rope_deltas) + int(n_valid)
