"""The token sequence between decoder stages: hidden states, validity and positions.

Shared by the model (which runs stages over it) and by whatever rewrites it at a stage
boundary (the pruning in `sparsevlm_jax.sparse`), so neither has to import the other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class SeqState:
    """The sequence between stages: x [B,L,D], valid [B,L], positions [B,L] int32, or
    [B,L,3] (t, h, w) for M-RoPE families (Qwen-VL), whose every rewrite keeps them as they are.

    L = P + vis_cap + T; the visual region is slots [P, P + vis_cap). `num_prefix` and
    `vis_cap` are static (part of the compiled shape). `pinned` [B, S] int32 or None: region
    slots holding text between visual spans (ascending, -1 padded): valid, not visual, kept
    in place by any rewrite of the region. `origin_next` [B] int32 or None: where decoding
    continues when that is fixed by the original prompt (M-RoPE: one past its largest
    position, SPEC §9.5, whichever tokens a rewrite drops); rewrites carry it unchanged.
    """

    x: Array
    valid: Array
    positions: Array
    num_prefix: int = struct.field(pytree_node=False)
    vis_cap: int = struct.field(pytree_node=False)
    pinned: Array | None = None
    origin_next: Array | None = None

    def pinned_mask(self) -> Array | None:
        """[B, vis_cap] bool: the region slots that hold text (None when there are none)."""
        if self.pinned is None:
            return None
        hit = self.pinned[:, :, None] == jnp.arange(self.vis_cap)[None, None, :]
        return jnp.any(hit, axis=1)

    def visual_valid(self) -> Array:
        """[B, vis_cap] bool: the region's valid visual tokens (pinned text excluded)."""
        vis = self.valid[:, self.vis_slice]
        pinned = self.pinned_mask()
        return vis if pinned is None else vis & ~pinned

    @property
    def num_text(self) -> int:
        return self.x.shape[1] - self.num_prefix - self.vis_cap

    @property
    def vis_slice(self) -> slice:
        return slice(self.num_prefix, self.num_prefix + self.vis_cap)

    @property
    def text_slice(self) -> slice:
        return slice(self.num_prefix + self.vis_cap, None)


def positions_from_valid(valid: Array) -> Array:
    """Contiguous positions [B,L] over valid slots: the i-th valid slot gets position i."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)


def last_text_index(state: SeqState) -> Array:
    """[B] slot of each example's last valid token (the end of its text)."""
    text_len = jnp.sum(state.valid[:, state.text_slice], axis=1)
    return state.x.shape[1] - state.num_text + text_len - 1


def next_position(state: SeqState) -> Array:
    """[B] int32: the position of a token appended after the sequence (SPEC §5).

    One past the largest position of a valid slot: the valid count when positions are
    contiguous (dense, v1, v1.5, FastV), the original prompt length N when kept tokens keep
    their original positions (v2.0), so decoding continues them. With (t, h, w) positions:
    one past the largest of any stream (decoded tokens are text: (p, p, p)), of the original
    prompt (`origin_next`).
    """
    if state.origin_next is not None:
        return state.origin_next
    pos = state.positions
    valid = state.valid if pos.ndim == 2 else state.valid[..., None]
    pos = jnp.where(valid, pos, -1).reshape(pos.shape[0], -1)
    return (jnp.max(pos, axis=1) + 1).astype(jnp.int32)


def row_slots(state: SeqState) -> Array:
    """[B, S + T] int32: the slots of the text rows a pruning layer scores with: the text
    between visual spans (`state.pinned`; -1 padding points at slot 0), then the text."""
    length = state.x.shape[1]
    tail = jnp.broadcast_to(
        jnp.arange(length - state.num_text, length), (state.x.shape[0], state.num_text)
    )
    if state.pinned is None:
        return tail.astype(jnp.int32)
    pinned = state.num_prefix + jnp.maximum(state.pinned, 0)
    return jnp.concatenate([pinned, tail], axis=1).astype(jnp.int32)
