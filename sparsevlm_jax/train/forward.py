"""The packed forward pass: every question block attends to the shared prefix and image and
causally to itself, so it computes what the lone prompt would; optionally head 0's attention
from the answer and word slots, which the attention loss supervises."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.model import llama
from sparsevlm_jax.model.clip import image_features
from sparsevlm_jax.params import Params
from sparsevlm_jax.train.batches import BLOCK_LEN

Array = jax.Array


def packed_mask(prefix_len: int, num_image: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Static attention structure [L, L] and relative positions [L] of a packed sequence."""
    shared = prefix_len + num_image
    length = shared + q * BLOCK_LEN
    block = np.full(length, -1)
    block[shared:] = np.repeat(np.arange(q), BLOCK_LEN)
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    causal = j <= i
    same = (block[:, None] == block[None, :]) & (block[None, :] >= 0)
    allowed = (block[None, :] < 0) & ((block[:, None] >= 0) | causal)
    allowed |= same & causal
    pos = np.arange(length)
    pos[shared:] = shared + np.tile(np.arange(BLOCK_LEN), q)
    return allowed, pos


def packed_forward(
    params: Params, cfg: LlavaConfig, batch: dict[str, Array], with_attn: bool = False
) -> tuple[Array, Array] | tuple[Array, Array, Array]:
    """(logits [B,Q,BLOCK_LEN,vocab] of the question blocks, image features [B,Np,D]).

    with_attn: also return log attention probabilities of head 0: from each block's answer
    slot at layer `attn_layer(cfg)` to the BOS token and the image patches [B,Q,1+Np], and from
    its word slots at layer 0 to the image patches [B,Q,2,Np].
    """
    tcfg = cfg.text
    feats = image_features(params, cfg, batch["pixel_values"])
    b, nimg, d = feats.shape
    q = batch["block_ids"].shape[1]
    table = params["text"]["embed_tokens"]
    prefix = jnp.take(table, batch["prefix_ids"], axis=0)
    p = prefix.shape[0]
    x = jnp.concatenate(
        [
            jnp.broadcast_to(prefix, (b, p, d)),
            feats,
            jnp.take(table, batch["block_ids"].reshape(b, q * BLOCK_LEN), axis=0),
        ],
        axis=1,
    )
    allowed, pos = packed_mask(p, nimg, q)
    key_valid = jnp.concatenate(
        [jnp.ones((b, p + nimg), bool), batch["block_valid"].reshape(b, q * BLOCK_LEN)], axis=1
    )
    mask = jnp.asarray(allowed)[None] & key_valid[:, None, :]
    # Valid block slots are contiguous from the block start, so relative positions are exact.
    positions = jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (b, x.shape[1]))
    layers = params["text"]["layers"]

    def body(h, i):
        out, _, _, _ = llama.prefill_layer(llama.layer_params(layers, i), tcfg, h, positions, mask)
        return out, None

    if not with_attn:
        x, _ = jax.lax.scan(body, x, jnp.arange(tcfg.num_hidden_layers))
        logits = llama.lm_head(params["text"], tcfg, x[:, p + nimg :])
        return logits.reshape(b, q, BLOCK_LEN, -1), feats
    layer = attn_layer(cfg)
    x, q_w, k_w, _ = llama.prefill_layer(llama.layer_params(layers, 0), tcfg, x, positions, mask)
    x, _ = jax.lax.scan(body, x, jnp.arange(1, layer))
    x, q_a, k_a, _ = llama.prefill_layer(
        llama.layer_params(layers, layer), tcfg, x, positions, mask
    )
    x, _ = jax.lax.scan(body, x, jnp.arange(layer + 1, tcfg.num_hidden_layers))
    logits = llama.lm_head(params["text"], tcfg, x[:, p + nimg :])
    starts = p + nimg + jnp.arange(q)[None] * BLOCK_LEN  # [1,Q]
    first = jnp.argmax(batch["targets"] >= 0, axis=-1)  # [B,Q] the answer slot of each block
    answer = slot_logp(q_a, k_a, mask, starts + first, tcfg.head_dim)
    answer = jnp.concatenate([answer[..., :1], answer[..., p : p + nimg]], axis=-1)
    words = (starts[..., None] + batch["word_slots"]).reshape(b, q * 2)
    words = slot_logp(q_w, k_w, mask, words, tcfg.head_dim)[..., p : p + nimg]
    return logits.reshape(b, q, BLOCK_LEN, -1), feats, answer, words.reshape(b, q, 2, nimg)


def slot_logp(qs: Array, ks: Array, mask: Array, slots: Array, head_dim: int) -> Array:
    """Log attention probabilities [B,S,L] of head 0 from query slots [B,S]."""
    q0 = jnp.take_along_axis(qs[:, :, 0], slots[..., None], axis=1)  # [B,S,H]
    scores = jnp.einsum("bsh,bkh->bsk", q0, ks[:, :, 0], preferred_element_type=jnp.float32)
    row_mask = jnp.take_along_axis(mask, slots[..., None], axis=1)
    scores = jnp.where(row_mask, scores / math.sqrt(head_dim), llama.NEG_INF)
    return jax.nn.log_softmax(scores, axis=-1)


def attn_layer(cfg: LlavaConfig) -> int:
    """The decoder layer whose head 0 is taught where to look (a third of the way up)."""
    return max(cfg.text.num_hidden_layers // 4, 1) if cfg.text.num_hidden_layers > 1 else 0
