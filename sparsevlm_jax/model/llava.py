"""The whole LLaVA model: image features spliced into the prompt, staged decoder, KV caches.

Sequence layout (see `sparsevlm_jax.batch`): `[prefix P | visual region | text T]`. The visual
region starts with the image's `V0` slots; after a pruning layer it becomes `C` kept slots
followed by `Rc` recycled slots (`sparsevlm_jax.sparse.prune`). Prefix and text are static
slices, so pruning only ever rebuilds the visual region.

The decoder runs as stages: the layers between two pruning layers (a pruning layer closes its
stage, since it runs on the unpruned sequence). Each stage is one `lax.scan` and owns a KV
cache of its own length plus `max_new_tokens` decode slots.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from sparsevlm_jax.batch import Batch
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.model import llama
from sparsevlm_jax.model.clip import image_features
from sparsevlm_jax.sparse.config import SparseConfig

Array = jax.Array
Params = dict[str, Any]


@struct.dataclass
class KVCache:
    """Per-stage decoder caches.

    kv[s]: k, v [L_s, B, S_s, K, H] with S_s = prefill length of stage s + max_new_tokens.
    valid[s]: [B, S_s] slots that may be attended to.
    length[s]: [B] int32 number of valid slots = the position of the next token at stage s.
    step: scalar int32, how many tokens were decoded; the next goes to slot prefill_len[s]+step.
    prefill_len: static per-stage prefill lengths.
    """

    kv: tuple[llama.KV, ...]
    valid: tuple[Array, ...]
    length: tuple[Array, ...]
    step: Array
    prefill_len: tuple[int, ...] = struct.field(pytree_node=False)

    def nbytes(self) -> int:
        return sum(int(x.k.nbytes + x.v.nbytes) for x in self.kv)


@struct.dataclass
class SeqState:
    """The sequence between stages: x [B,L,D], valid [B,L], positions [B,L] int32.

    L = P + vis_cap + T; the visual region is slots [P, P + vis_cap).
    """

    x: Array
    valid: Array
    positions: Array
    num_prefix: int = struct.field(pytree_node=False)
    vis_cap: int = struct.field(pytree_node=False)

    @property
    def num_text(self) -> int:
        return self.x.shape[1] - self.num_prefix - self.vis_cap

    @property
    def vis_slice(self) -> slice:
        return slice(self.num_prefix, self.num_prefix + self.vis_cap)


def positions_from_valid(valid: Array) -> Array:
    """Contiguous positions over valid slots: the i-th valid slot gets position i."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def embed_inputs(params: Params, cfg: LlavaConfig, batch: Batch) -> SeqState:
    """Input embeddings with the image features spliced between prefix and text."""
    dtype = jnp.dtype(cfg.dtype)
    table = params["text"]["embed_tokens"]
    prefix = jnp.take(table, batch.prefix_ids, axis=0).astype(dtype)
    text = jnp.take(table, batch.text_ids, axis=0).astype(dtype)
    image = image_features(params, cfg, batch.pixel_values).astype(dtype)
    b, v0 = image.shape[0], image.shape[1]
    x = jnp.concatenate([prefix, image, text], axis=1)
    valid = jnp.concatenate(
        [batch.prefix_mask.astype(bool), jnp.ones((b, v0), bool), batch.text_mask.astype(bool)], 1
    )
    return SeqState(x, valid, positions_from_valid(valid), batch.prefix_ids.shape[1], v0)


def stage_bounds(num_layers: int, sparse: SparseConfig) -> list[tuple[int, int]]:
    """[(start, stop), ...]: stages of consecutive layers; a pruning layer ends its stage."""
    cuts = [layer + 1 for layer in sparse.layers] if sparse.enabled else []
    edges = [0, *cuts, num_layers]
    return list(zip(edges[:-1], edges[1:], strict=True))


def last_text_index(state: SeqState) -> Array:
    """[B] slot of each example's last valid token (the end of its text)."""
    text_len = jnp.sum(state.valid[:, -state.num_text :], axis=1)
    return state.x.shape[1] - state.num_text + text_len - 1


def prefill(
    params: Params,
    cfg: LlavaConfig,
    sparse: SparseConfig,
    batch: Batch,
    max_new_tokens: int,
    all_logits: bool = False,
) -> tuple[Array, KVCache, dict[str, Array]]:
    """Runs the prompt through the model, pruning visual tokens at `sparse.layers`.

    Returns:
      logits: [B, vocab] float32 at each example's last prompt token, or [B, L_final, vocab]
        for every slot of the final sequence with `all_logits`.
      cache: the per-stage KV caches with room for `max_new_tokens`.
      stats: per-example statistics of the pruning (empty dict for dense); see
        `sparsevlm_jax.sparse.prune`.
    """
    tcfg = cfg.text
    layers = params["text"]["layers"]
    state = embed_inputs(params, cfg, batch)
    bounds = stage_bounds(tcfg.num_hidden_layers, sparse)
    pruner = None
    if sparse.enabled:
        from sparsevlm_jax.sparse.prune import Pruner  # sparse/ imports this module

        pruner = Pruner(cfg, sparse, state)

    kvs, valids, lengths, prefill_len = [], [], [], []
    for s, (start, stop) in enumerate(bounds):
        prunes = pruner is not None and s < len(bounds) - 1
        x, kv, q_text = llama.prefill_stage(
            layers,
            tcfg,
            start,
            stop,
            state.x,
            state.positions,
            state.valid,
            query_tail=state.num_text if prunes else 0,
            unroll=cfg.unroll_layers,
        )
        pad = ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0))
        kvs.append(llama.KV(jnp.pad(kv.k, pad), jnp.pad(kv.v, pad)))
        valids.append(jnp.pad(state.valid, ((0, 0), (0, max_new_tokens))))
        lengths.append(jnp.sum(state.valid, axis=1).astype(jnp.int32))
        prefill_len.append(state.x.shape[1])
        state = state.replace(x=x)
        if prunes:
            state = pruner.prune(s, state, q_text, kv.k[-1])

    if all_logits:
        logits = llama.lm_head(params["text"], tcfg, state.x)
    else:
        idx = last_text_index(state)
        last = jnp.take_along_axis(state.x, idx[:, None, None], axis=1)[:, 0]
        logits = llama.lm_head(params["text"], tcfg, last)
    cache = KVCache(
        tuple(kvs), tuple(valids), tuple(lengths), jnp.zeros((), jnp.int32), tuple(prefill_len)
    )
    stats = pruner.stats(state) if pruner is not None else {}
    return logits, cache, stats


def decode_step(params: Params, cfg: LlavaConfig, cache: KVCache, tokens: Array):
    """One decode step for tokens [B] int32: returns (logits [B, vocab] float32, new cache).

    At every stage the new token attends to all valid cached slots of that stage, and its
    position is the stage's valid length before it is appended (SPEC §5).
    """
    tcfg = cfg.text
    layers = params["text"]["layers"]
    x = jnp.take(params["text"]["embed_tokens"], tokens, axis=0).astype(jnp.dtype(cfg.dtype))
    x = x[:, None]
    kvs, valids, lengths = [], [], []
    start = 0
    for s, kv in enumerate(cache.kv):
        slot = cache.prefill_len[s] + cache.step
        valid = jax.lax.dynamic_update_slice(
            cache.valid[s], jnp.ones((x.shape[0], 1), bool), (0, slot)
        )
        pos = cache.length[s][:, None]
        x, kv = llama.decode_stage(layers, tcfg, start, x, pos, kv, valid, slot, cfg.unroll_layers)
        kvs.append(kv)
        valids.append(valid)
        lengths.append(cache.length[s] + 1)
        start += kv.k.shape[0]
    logits = llama.lm_head(params["text"], tcfg, x[:, 0])
    new = cache.replace(
        kv=tuple(kvs), valid=tuple(valids), length=tuple(lengths), step=cache.step + 1
    )
    return logits, new
