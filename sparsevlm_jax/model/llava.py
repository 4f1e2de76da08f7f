"""The whole LLaVA model: image features spliced into the prompt, staged decoder, KV caches.

Sequence layout (see `sparsevlm_jax.batch`): `[prefix P | visual region | text T]`. The visual
region starts with the image's `V0` slots; a stage-boundary step handed in by the caller may
rebuild it between stages (SparseVLM's pruning, `sparsevlm_jax.sparse.prune`). Prefix and
text are static slices, so a boundary step only ever rebuilds the visual region. This module
knows nothing of pruning: it runs stages.

The decoder runs as stages: the layers between two cuts (a cut after layer l closes the stage
that ends with l). Each stage is one `lax.scan` and owns a KV cache of its own length plus
`max_new_tokens` decode slots. A stage can also run on its own (`run_stage`), which is how a
caller that must look at data on the host between stages (the bucketed capacity policy)
drives the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from sparsevlm_jax.batch import Batch
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.model import llama, llava_next, qwen_vl, video_llava
from sparsevlm_jax.model.clip import image_features
from sparsevlm_jax.model.sequence import (
    SeqState,
    last_text_index,
    next_position,
    positions_from_valid,
    row_slots,
)
from sparsevlm_jax.sharding import HEADS, HIDDEN, KV_CACHE, constrain

Array = jax.Array
Params = dict[str, Any]
# (stage index, state whose x is the stage's output, text-row queries [B,T,N,H] of the
# stage's last layer, that layer's keys [B,L,K,H]) -> the sequence the next stage runs on.
BoundaryStep = Callable[[int, SeqState, Array, Array], SeqState]


@struct.dataclass
class StageCache:
    """One stage's decode cache.

    kv: k, v [L_s, B, S_s, K, H] with S_s = prefill length of the stage + max_new_tokens.
    valid: [B, S_s] slots that may be attended to.
    position: [B] int32, the position of the next token at this stage (SPEC §5).
    """

    kv: llama.KV
    valid: Array
    position: Array


@struct.dataclass
class KVCache:
    """Per-stage decoder caches.

    kv[s]: k, v [L_s, B, S_s, K, H] with S_s = prefill length of stage s + max_new_tokens.
    valid[s]: [B, S_s] slots that may be attended to.
    position[s]: [B] int32 position of the next token at stage s: one past the largest
      position in the stage (its valid length when positions are contiguous; the original
      prompt length + decoded tokens for v2.0, whose kept tokens keep their positions).
    step: scalar int32, how many tokens were decoded; the next goes to slot prefill_len[s]+step.
    prefill_len: static per-stage prefill lengths.
    """

    kv: tuple[llama.KV, ...]
    valid: tuple[Array, ...]
    position: tuple[Array, ...]
    step: Array
    prefill_len: tuple[int, ...] = struct.field(pytree_node=False)

    def nbytes(self) -> int:
        return sum(int(x.k.nbytes + x.v.nbytes) for x in self.kv)

    @classmethod
    def from_stages(cls, stages: Sequence[StageCache], max_new_tokens: int) -> KVCache:
        """The decode cache of a prefill's stages, in order."""
        return cls(
            tuple(s.kv for s in stages),
            tuple(s.valid for s in stages),
            tuple(s.position for s in stages),
            jnp.zeros((), jnp.int32),
            tuple(s.valid.shape[1] - max_new_tokens for s in stages),
        )


# Families whose visual count varies per example: (params, cfg, pixel_values, visual_index)
# -> visual tokens [B, V, D]; the batch's `visual_index` says which slots are padding.
VISUAL_TOKENS: dict[str, Callable[..., Array]] = {
    "llava_next": llava_next.visual_tokens,
    "llava_next_video": llava_next.visual_tokens,
    "video_llava": video_llava.visual_tokens,
    "qwen2_vl": qwen_vl.visual_tokens,
    "qwen2_5_vl": qwen_vl.visual_tokens,
}


def embed_inputs(params: Params, cfg: LlavaConfig, batch: Batch) -> SeqState:
    """Input embeddings with the visual tokens spliced between prefix and text.

    Padded visual slots (`Batch.visual_mask`) are invalid: never keys, no position.
    """
    dtype = jnp.dtype(cfg.dtype)
    table = params["text"]["embed_tokens"]
    prefix = jnp.take(table, batch.prefix_ids, axis=0).astype(dtype)
    text = jnp.take(table, batch.text_ids, axis=0).astype(dtype)
    if batch.visual_index is None:
        image = image_features(params, cfg, batch.pixel_values).astype(dtype)
        vis_valid = jnp.ones(image.shape[:2], bool)
    else:
        visual = VISUAL_TOKENS[cfg.family]
        image = visual(params, cfg, batch.pixel_values, batch.visual_index).astype(dtype)
        vis_valid = batch.region_valid()
    if batch.span_text_slots is not None:  # text between visual spans, in its region slots
        words = jnp.take(table, batch.span_text_ids, axis=0).astype(dtype)
        slots = jnp.where(batch.span_text_slots >= 0, batch.span_text_slots, image.shape[1])
        rows = jnp.arange(image.shape[0])[:, None]
        image = image.at[rows, slots].set(words, mode="drop")
    x = constrain(jnp.concatenate([prefix, image, text], axis=1), HIDDEN)  # sharding.py
    valid = jnp.concatenate(
        [batch.prefix_mask.astype(bool), vis_valid, batch.text_mask.astype(bool)], 1
    )
    p, v = batch.prefix_ids.shape[1], image.shape[1]
    if batch.positions is None:
        return SeqState(x, valid, positions_from_valid(valid), p, v, batch.span_text_slots)
    state = SeqState(x, valid, batch.positions, p, v, batch.span_text_slots)
    return state.replace(origin_next=next_position(state))  # M-RoPE: fixed by the prompt


def stage_bounds(num_layers: int, cuts: Sequence[int] = ()) -> list[tuple[int, int]]:
    """[(start, stop), ...]: stages of consecutive layers; a stage ends after each cut layer."""
    edges = [0, *(layer + 1 for layer in cuts), num_layers]
    return list(zip(edges[:-1], edges[1:], strict=True))


def run_stage(
    params: Params,
    cfg: LlavaConfig,
    state: SeqState,
    start: int,
    stop: int,
    max_new_tokens: int,
    query_tail: int = 0,
) -> tuple[SeqState, StageCache, Array | None, Array]:
    """Layers [start, stop) over `state` as one scan.

    Returns (state with x = the stage's output, the stage's cache with room for
    `max_new_tokens`, the last layer's queries of the text rows [B, S + T, N, H] (`row_slots`:
    the pinned text between visual spans, then the last `query_tail` slots) or None, the last
    layer's keys [B,L,K,H]).
    """
    x, kv, q_tail = llama.prefill_stage(
        params["text"]["layers"],
        cfg.text,
        start,
        stop,
        state.x,
        state.positions,
        state.valid,
        query_tail=query_tail,
        unroll=cfg.unroll_layers,
        query_slots=row_slots(state)[:, : state.pinned.shape[1]]
        if query_tail and state.pinned is not None
        else None,
    )
    pad = ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0))
    # Layouts under a mesh (`sparsevlm_jax.sharding`; no-ops without one).
    x, k_last = constrain(x, HIDDEN), constrain(kv.k[-1], HEADS)
    q_tail = None if q_tail is None else constrain(q_tail, HEADS)
    cache = StageCache(
        llama.KV(constrain(jnp.pad(kv.k, pad), KV_CACHE), constrain(jnp.pad(kv.v, pad), KV_CACHE)),
        jnp.pad(state.valid, ((0, 0), (0, max_new_tokens))),
        next_position(state),
    )
    return state.replace(x=x), cache, q_tail, k_last


def final_logits(params: Params, cfg: LlavaConfig, state: SeqState, all_logits: bool) -> Array:
    """[B, vocab] float32 at each example's last prompt token, or [B, L, vocab] for all slots."""
    if all_logits:
        return llama.lm_head(params["text"], cfg.text, state.x)
    idx = last_text_index(state)
    last = jnp.take_along_axis(state.x, idx[:, None, None], axis=1)[:, 0]
    return llama.lm_head(params["text"], cfg.text, last)


def run_prefill(
    params: Params,
    cfg: LlavaConfig,
    state: SeqState,
    max_new_tokens: int,
    cuts: Sequence[int] = (),
    boundary: BoundaryStep | None = None,
    all_logits: bool = False,
) -> tuple[Array, KVCache, SeqState]:
    """Runs the embedded prompt through every stage, calling `boundary` between stages.

    cuts: layers after which a stage ends; `boundary(s, state, q_text, k_last)` rewrites the
    sequence after stage s (s < len(cuts)); without one the sequence passes unchanged.
    Returns (logits as `final_logits`, the per-stage caches, the final sequence).
    """
    bounds = stage_bounds(cfg.text.num_hidden_layers, cuts)
    stages = []
    for s, (start, stop) in enumerate(bounds):
        last = s == len(bounds) - 1
        tail = state.num_text if boundary is not None and not last else 0
        state, cache, q_text, k_last = run_stage(
            params, cfg, state, start, stop, max_new_tokens, tail
        )
        stages.append(cache)
        if boundary is not None and not last:
            state = boundary(s, state, q_text, k_last)
    logits = final_logits(params, cfg, state, all_logits)
    return logits, KVCache.from_stages(stages, max_new_tokens), state


def prefill(
    params: Params, cfg: LlavaConfig, batch: Batch, max_new_tokens: int, all_logits: bool = False
) -> tuple[Array, KVCache]:
    """The dense prefill: (logits as `final_logits`, the KV cache with one stage)."""
    state = embed_inputs(params, cfg, batch)
    logits, cache, _ = run_prefill(params, cfg, state, max_new_tokens, all_logits=all_logits)
    return logits, cache


def decode_step(params: Params, cfg: LlavaConfig, cache: KVCache, tokens: Array):
    """One decode step for tokens [B] int32: returns (logits [B, vocab] float32, new cache).

    At every stage the new token attends to all valid cached slots of that stage, at the
    stage's next position (`KVCache.position`, SPEC §5).
    """
    tcfg = cfg.text
    layers = params["text"]["layers"]
    x = jnp.take(params["text"]["embed_tokens"], tokens, axis=0).astype(jnp.dtype(cfg.dtype))
    x = constrain(x[:, None], HIDDEN)  # sharding.py
    kvs, valids, positions = [], [], []
    start = 0
    for s, kv in enumerate(cache.kv):
        slot = cache.prefill_len[s] + cache.step
        valid = jax.lax.dynamic_update_slice(
            cache.valid[s], jnp.ones((x.shape[0], 1), bool), (0, slot)
        )
        pos = cache.position[s][:, None]
        x, kv = llama.decode_stage(layers, tcfg, start, x, pos, kv, valid, slot, cfg.unroll_layers)
        kvs.append(llama.KV(constrain(kv.k, KV_CACHE), constrain(kv.v, KV_CACHE)))  # sharding.py
        valids.append(valid)
        positions.append(cache.position[s] + 1)
        start += kv.k.shape[0]
    logits = llama.lm_head(params["text"], tcfg, x[:, 0])
    new = cache.replace(
        kv=tuple(kvs), valid=tuple(valids), position=tuple(positions), step=cache.step + 1
    )
    return logits, new
