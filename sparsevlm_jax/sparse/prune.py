"""SparseVLM at the stage boundaries of the compiled prefill (SPEC §1-§6, DESIGN.md).

The sequence is `[prefix P | visual region | text T]` (`sparsevlm_jax.model.sequence.SeqState`).
At a pruning layer the visual region (`vis_cap` slots, some invalid) is replaced by

    [ kept: C slots (top-k in original order) | recycled: Rc slots (cluster means) ]

whose validity masks carry the data-dependent counts k and c; positions are renumbered over
valid slots, so a valid token computes what it would in the reference's shorter sequence.
The static sizes of every pruning layer are fixed by `plan_capacities` before tracing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sparsevlm_jax.config import ConfigError, LlavaConfig, TextConfig
from sparsevlm_jax.flops import prefill_flops
from sparsevlm_jax.model import llama
from sparsevlm_jax.model.sequence import SeqState, positions_from_valid, row_slots
from sparsevlm_jax.sharding import PER_HEAD_ROWS, SMALL, constrain
from sparsevlm_jax.sparse.common import descending_order, gather_mask, iota_like
from sparsevlm_jax.sparse.config import SparseConfig, v2_num_heads
from sparsevlm_jax.sparse.rank import (
    budget_table,
    fixed_budget,
    matrix_rank,
    rank_budget,
    scaled_count,
)
from sparsevlm_jax.sparse.raters import rater_scores, text_raters
from sparsevlm_jax.sparse.recycle import (
    max_candidates_for,
    max_clusters_for,
    num_candidates,
    num_clusters,
    recycle,
)
from sparsevlm_jax.sparse.select import TopK, select_topk

Array = jax.Array


@dataclass(frozen=True)
class LayerCapacity:
    """Static sizes at one pruning layer: visual slots in, kept slots C, candidates, Rc."""

    vis_in: int
    kept: int
    candidates: int
    recycled: int
    pinned: int = 0  # slots for the text between visual spans, kept in place

    @property
    def vis_out(self) -> int:
        return self.kept + self.pinned + self.recycled


def plan_capacities(
    sparse: SparseConfig, num_image_tokens: int, pinned: int = 0
) -> list[LayerCapacity]:
    """Static buffer sizes per pruning layer.

    exact: C = the incoming visual capacity (holds every budget, including the keep-all case).
    static: C = `sparse.capacities[i]` (at most the incoming capacity).
    Candidate and recycled slots default to the most that can occur: every incoming visual
    token pruned (none for methods that do not recycle). `pinned`: slots of text between
    visual spans (part of `num_image_tokens`), kept at every layer.
    """
    plan, vis = [], num_image_tokens
    for i in range(len(sparse.layers)):
        if sparse.capacity == "exact":
            kept = vis
        else:
            kept = int(sparse.capacities[i])
            if kept < 1:
                raise ConfigError(f"static capacity must be >= 1, got {sparse.capacities}")
            kept = min(kept, vis)
        cand = max_candidates_for(vis)
        rec = sparse.recycled_capacities[i] if sparse.recycled_capacities else None
        rec = max_clusters_for(cand) if rec is None else min(int(rec), max_clusters_for(cand))
        if not sparse.recycles:
            cand, rec = 0, 0
        plan.append(LayerCapacity(vis, kept, cand, rec, pinned))
        vis = kept + pinned + rec
    return plan


def text_row_attention(q_text: Array, k_all: Array, valid: Array, rows: Array) -> Array:
    """Per-head attention probabilities [B, N, T, L] of the text rows.

    q_text [B,T,N,H] (rotated queries of the text rows), k_all [B,L,K,H], valid [B,L], rows
    [B,T] int32 the rows' slots (`row_slots`). Only the text rows are formed, never the full
    L x L matrix.
    """
    b, t, n, _ = q_text.shape
    length = k_all.shape[1]
    mask = (jnp.arange(length)[None, None, :] <= rows[:, :, None]) & valid[:, None, :]
    probs = llama.attention_probs(q_text, k_all, mask)  # [B, K, G, T, L]
    return probs.reshape(b, n, t, length)


def take_slots(positions: Array, idx: Array) -> Array:
    """positions [B, L] or [B, L, 3] at slots idx [B, n] -> [B, n] or [B, n, 3]."""
    if positions.ndim == 3:
        return jnp.take_along_axis(positions, idx[:, :, None], axis=1)
    return jnp.take_along_axis(positions, idx, axis=1)


def rope_gravity(cfg: TextConfig, text_pos: Array, vis_pos: Array) -> Array:
    """SparseVLM+'s RoPE bias [B, T, V]: RoPE(q=1) . RoPE(k=1) / sqrt(head_dim) (SPEC §6);
    positions [B, T] / [B, V], or [B, T, 3] / [B, V, 3] with the model's sectioned 3-D
    rotation (M-RoPE, SPEC §9.5)."""
    inv = llama.rope_inv_freq(cfg)
    ones = jnp.ones((1, 1, 1, cfg.head_dim), jnp.float32)

    def rotated_ones(pos: Array) -> Array:  # pos [B, n] or [B, n, 3] (M-RoPE)
        cos, sin = llama.rope_cos_sin(pos, inv, cfg.mrope_section)
        lead = pos.shape[:2]
        return llama.apply_rope(jnp.broadcast_to(ones, (*lead, 1, cfg.head_dim)), cos, sin)

    rq, rk = rotated_ones(text_pos)[:, :, 0], rotated_ones(vis_pos)[:, :, 0]
    bias = jnp.einsum("bth,bvh->btv", rq, rk, precision=jax.lax.Precision.HIGHEST)
    return bias / math.sqrt(cfg.head_dim)


def top_heads_mean(per_head: Array, raters: Array, vis_mask: Array, n_sel: int) -> Array:
    """Mean over the n_sel heads with the largest rater-to-visual mass (ties: lower head).

    per_head [B, N, T, V] -> [B, T, V].

    Under a mesh (`sparsevlm_jax.sharding`) per_head's heads are split over "model"; each
    device sums its heads' masses and the small [B, N] array of every head's mass is
    replicated over "model", so all devices rank all heads and choose the same ones; each then
    sums its own chosen heads and the sum over "model" (an all-reduce of [B, T, V]) gives the
    mean, replicated like the other small pruning arrays.
    """
    pair = raters[:, None, :, None] & vis_mask[:, None, None, :]
    mass = constrain(jnp.sum(jnp.where(pair, per_head, 0.0), axis=(2, 3)), SMALL)  # [B, N]
    order = descending_order(mass, jnp.ones_like(mass, bool))
    chosen = jnp.zeros_like(mass, bool)
    chosen = jnp.put_along_axis(chosen, order[:, :n_sel], True, axis=1, inplace=False)
    return jnp.sum(jnp.where(chosen[:, :, None, None], per_head, 0.0), axis=1) / n_sel


def keep_pinned(top: TopK, pinned: Array, pinned_mask: Array) -> tuple[Array, Array, Array]:
    """The kept buffer with the text between visual spans kept in place.

    top: the visual selection (capacity C); pinned [B, S] region slots of that text (-1
    padded), pinned_mask [B, V] the same as a mask. Returns (kept_idx [B, C+S] ascending
    region slots of the kept visual tokens and the text, kept_mask [B, C+S], the text's new
    slots [B, S] in that buffer, -1 padded).
    """
    keep = top.keep_mask_full | pinned_mask
    size = top.kept_idx.shape[1] + pinned.shape[1]
    kept_idx, kept_mask = gather_mask(keep, top.n_kept + jnp.sum(pinned >= 0, axis=1), size)
    new_slot = jnp.cumsum(keep.astype(jnp.int32), axis=1) - 1
    moved = jnp.take_along_axis(new_slot, jnp.maximum(pinned, 0), axis=1)
    return kept_idx, kept_mask, jnp.where(pinned >= 0, moved, -1).astype(jnp.int32)


@struct.dataclass
class PruneCarry:
    """What the pruning carries from one stage boundary to the next (a pytree).

    raters, text_mask [B,T]; num_prefix_valid [B]; n_vis: the visual count entering each
    stage so far ([B] each); layer_stats: one dict of [B, ...] arrays per pruned layer.
    """

    raters: Array
    text_mask: Array
    num_prefix_valid: Array
    n_vis: tuple[Array, ...]
    layer_stats: tuple[dict[str, Array], ...]


@struct.dataclass
class Decision:
    """What a pruning layer decided before anything is gathered (all [B] but scores).

    scores [B, Vcap] (-inf at invalid slots); rank (v1) or zeros; budget k (SPEC §3, §7);
    n_vis: valid visual tokens coming in; n_keep = min(k, n_vis), the tokens the layer keeps
    with unlimited capacity; n_candidates: recycling candidates that follows (0 when the
    method does not recycle). `n_keep` and `n_candidates` are what a host-side capacity
    policy needs to size the next stage exactly.
    """

    scores: Array
    rank: Array
    budget: Array
    n_vis: Array
    n_keep: Array
    n_candidates: Array


class Pruner:
    """SparseVLM at stage boundaries: `decide` (scores, budgets) then `apply` (gather).

    Static: the model and sparse configs. Everything data-dependent travels in a
    `PruneCarry`, so the two halves can run in one traced prefill (`prune`, the fused
    path of the `exact` and `static` policies) or in separate compiled programs with a host
    round trip in between (the `bucketed` policy, `sparsevlm_jax.staged`).
    """

    def __init__(self, cfg: LlavaConfig, sparse: SparseConfig, state: SeqState | None = None):
        self.cfg, self.sparse = cfg, sparse
        self.carry = self.init(state) if state is not None else None
        pinned = 0 if state is None or state.pinned is None else state.pinned.shape[1]
        self.plan = plan_capacities(sparse, state.vis_cap, pinned) if state is not None else None

    def init(self, state: SeqState) -> PruneCarry:
        """The carry before the first stage (raters from the input embeddings, SPEC §1)."""
        # Text rows: the text between visual spans (pinned), then the text (SPEC §9.1).
        slots = row_slots(state)
        rows_x = jnp.take_along_axis(state.x, slots[:, :, None], axis=1)
        text_mask = jnp.take_along_axis(state.valid, slots, axis=1)
        if state.pinned is not None:
            text_mask = text_mask.at[:, : state.pinned.shape[1]].set(state.pinned >= 0)
        vis_mask = state.visual_valid()
        return PruneCarry(
            raters=text_raters(state.x[:, state.vis_slice], rows_x, text_mask, vis_mask),
            text_mask=text_mask,
            num_prefix_valid=jnp.sum(state.valid[:, : state.num_prefix], axis=1),
            n_vis=(jnp.sum(vis_mask, axis=1).astype(jnp.int32),),
            layer_stats=(),
        )

    def prune(self, i: int, state: SeqState, q_text: Array, k_all: Array) -> SeqState:
        """The fused boundary step after pruning layer i, with the static plan's capacities
        (a `BoundaryStep` for `sparsevlm_jax.model.llava.run_prefill`)."""
        dec = self.decide(i, self.carry, state, q_text, k_all)
        state, self.carry = self.apply(i, self.carry, state, dec, self.plan[i])
        return state

    def decide(
        self, i: int, carry: PruneCarry, state: SeqState, q_text: Array, k_all: Array
    ) -> Decision:
        """Scores and budget at pruning layer i.

        state: the sequence with x = the pruning layer's output; q_text [B,T,N,H] and
        k_all [B,L,K,H]: that layer's text-row queries and all keys.
        """
        vis_mask = state.visual_valid()
        n_vis = jnp.sum(vis_mask, axis=1).astype(jnp.int32)
        rows = row_slots(state)
        per_head = text_row_attention(q_text, k_all, state.valid, rows)[..., state.vis_slice]
        per_head = constrain(per_head, PER_HEAD_ROWS)  # heads stay where they were computed
        scores, rank = self.score(i, carry, state, per_head, vis_mask)
        budget = self.budget(i, rank, n_vis, per_head.shape[2], state.vis_cap, carry.n_vis[0])
        n_keep = jnp.minimum(jnp.maximum(budget, 0), n_vis).astype(jnp.int32)
        n_cand = num_candidates(n_vis - n_keep) if self.sparse.recycles else jnp.zeros_like(n_vis)
        return Decision(scores, rank, budget, n_vis, n_keep, n_cand)

    def apply(
        self, i: int, carry: PruneCarry, state: SeqState, dec: Decision, cap: LayerCapacity
    ) -> tuple[SeqState, PruneCarry]:
        """Rebuilds the visual region as [kept: cap.kept | recycled: cap.recycled] slots."""
        assert cap.vis_in == state.vis_cap, (cap, state.vis_cap)
        vis = state.vis_slice
        vis_mask = state.visual_valid()
        valid_rank = jnp.cumsum(vis_mask.astype(jnp.int32), axis=1) - 1
        scores = dec.scores
        top = select_topk(scores, dec.budget, cap.kept, vis_mask)
        kept_idx, kept_mask, pinned = top.kept_idx, top.kept_mask, None
        if state.pinned is not None:  # text between spans stays, in place, among the kept
            kept_idx, kept_mask, pinned = keep_pinned(top, state.pinned, state.pinned_mask())
        if self.sparse.recycles and cap.recycled > 0:  # 0: no row pruned anything
            rec = recycle(
                state.x[:, vis], scores, vis_mask, top.keep_mask_full, cap.candidates, cap.recycled
            )
            recycled, rec_mask, n_rec = rec.recycled, rec.recycled_mask, rec.n_recycled
            rec_overflow = num_clusters(rec.n_candidates) - rec.n_recycled
            centres = rec.centre_slots
        else:
            b, d = state.x.shape[0], state.x.shape[-1]
            recycled, rec_mask = jnp.zeros((b, 0, d)), jnp.zeros((b, 0), bool)
            n_rec = rec_overflow = jnp.zeros((b,), jnp.int32)
            centres = jnp.zeros((b, 0), jnp.int32)

        x_vis = jnp.take_along_axis(state.x[:, vis], kept_idx[:, :, None], axis=1)
        x_vis = jnp.concatenate([x_vis, recycled.astype(state.x.dtype)], axis=1)
        vis_valid = jnp.concatenate([kept_mask, rec_mask], axis=1)
        p = state.num_prefix
        x = jnp.concatenate([state.x[:, :p], x_vis, state.x[:, vis.stop :]], axis=1)
        valid = jnp.concatenate([state.valid[:, :p], vis_valid, state.valid[:, vis.stop :]], 1)
        # v2.0 and every method on (t, h, w) positions (SPEC §9.5): kept tokens keep their
        # position ids (a recycled token takes its centre's)
        if self.sparse.keeps_positions or state.positions.ndim == 3:
            pos_vis = take_slots(state.positions[:, vis], jnp.concatenate([kept_idx, centres], 1))
            has_pos = jnp.concatenate([jnp.ones_like(kept_mask), rec_mask], axis=1)
            pos_vis = jnp.where(has_pos if pos_vis.ndim == 2 else has_pos[..., None], pos_vis, 0)
            positions = jnp.concatenate(
                [state.positions[:, :p], pos_vis, state.positions[:, vis.stop :]], axis=1
            )
        else:
            positions = positions_from_valid(valid)

        layer = {
            "rank": dec.rank,
            "budget": dec.budget,
            # slot -> index among the valid visual tokens (the reference's numbering)
            "kept": jnp.where(
                top.kept_mask, jnp.take_along_axis(valid_rank, top.kept_idx, axis=1), -1
            ),
            "num_kept": top.n_kept,
            "recycled": n_rec,
            "overflow": top.overflow,
            "recycled_overflow": rec_overflow,
        }
        carry = carry.replace(
            n_vis=(*carry.n_vis, top.n_kept + n_rec), layer_stats=(*carry.layer_stats, layer)
        )
        out = SeqState(x, valid, positions, p, x_vis.shape[1], pinned, state.origin_next)
        return out, carry

    def score(
        self, i: int, carry: PruneCarry, state: SeqState, per_head: Array, vis_mask: Array
    ) -> tuple[Array, Array]:
        """(scores [B, Vcap] with -inf at invalid slots, v1's rank [B] or zeros)."""
        sp, b = self.sparse, per_head.shape[0]
        no_rank = jnp.zeros((b,), jnp.int32)
        if sp.method == "fastv":  # the last prompt token's head-averaged attention
            pinned = carry.text_mask.shape[1] - state.num_text  # rows before the text's
            last = pinned + jnp.sum(state.valid[:, state.text_slice], axis=1) - 1
            mean = constrain(jnp.mean(per_head, axis=1), SMALL)  # sharding.py: [B, T, V]
            row = jnp.take_along_axis(mean, last[:, None, None], axis=1)
            return jnp.where(vis_mask, row[:, 0], -jnp.inf), no_rank
        if sp.method == "random":
            key = jax.random.fold_in(jax.random.PRNGKey(sp.seed), sp.layers[i])
            noise = jax.random.uniform(key, vis_mask.shape[1:])
            return jnp.where(vis_mask, noise[None], -jnp.inf), no_rank
        if sp.uses("gravity"):
            text_pos = take_slots(state.positions, row_slots(state))
            gravity = rope_gravity(self.cfg.text, text_pos, state.positions[:, state.vis_slice])
            per_head = per_head / gravity[:, None]
        if sp.uses("top_heads"):
            n_sel = v2_num_heads(per_head.shape[1], sp.v2_heads)
            relation = top_heads_mean(per_head, carry.raters, vis_mask, n_sel)
        else:
            relation = jnp.mean(per_head, axis=1)  # R [B, T, Vcap]
        # Under a mesh the head reduction ends here: rank, selection and recycling work on
        # this small array, replicated over "model" (`sparsevlm_jax.sharding`).
        relation = constrain(relation, SMALL)
        scores = rater_scores(relation, carry.raters, vis_mask)
        if sp.method != "v1":
            return scores, no_rank
        return scores, matrix_rank(relation, carry.raters, vis_mask)[0]

    def budget(
        self, i: int, rank: Array, n_vis: Array, num_text: int, vis_cap: int, n_vis0: Array
    ) -> Array:
        """k [B] per SPEC §3 / §7 (§9.3: schedules scaled to each example's first visual
        count `n_vis0` when `schedule_tokens` is set); k >= V means the layer prunes nothing."""
        sp = self.sparse
        scheduled = sp.schedule[i] if sp.schedule else 0
        if sp.schedule and sp.schedule_tokens:
            scheduled = scaled_count(sp.schedule[i], n_vis0, sp.schedule_tokens)
        if sp.method == "v1":
            table = budget_table(sp.scale, sp.bias, min(num_text, vis_cap))
            return rank_budget(rank, n_vis, table)
        if sp.method == "fastv":  # Python's round, as the reference: a host table over V
            table = np.asarray([round(v * (1 - sp.fastv_ratio)) for v in range(vis_cap + 1)])
            return jnp.minimum(jnp.asarray(table, jnp.int32)[n_vis], n_vis)
        if sp.method == "random":
            return jnp.minimum(scheduled, n_vis).astype(jnp.int32)
        return fixed_budget(n_vis, scheduled)  # v1.5, v2.0: min(schedule, V - 1)

    def stats(self, carry: PruneCarry | None = None) -> dict[str, Array]:
        """Per-example statistics, every array with a leading batch axis.

        raters [B,T] bool (relative to the text start); visual_tokens [B] (V0, the valid visual
        tokens the prefill started with); per pruning layer i (axis 1):
        rank, budget, num_kept, recycled, overflow [B, n_layers]; kept [B, n_layers, Cmax]
        (kept visual indices relative to that layer's visual range, -1 padded);
        visual_counts [B, num_layers] (after each decoder layer, recycled included);
        equivalent_tokens [B]; tokens_per_layer [B, num_layers] and dense_tokens [B] (valid
        tokens each layer processed, for SPEC §8 FLOPs: `analytic_flops`).
        """
        carry = self.carry if carry is None else carry
        num_layers = self.cfg.text.num_hidden_layers
        bounds = [*self.sparse.layers, num_layers - 1]
        # Visual count after layer j: the count entering layer j+1 (a pruning layer's own
        # count is the pruned one, as the authors count it).
        counts, start = [], 0
        for s, stop in enumerate(bounds):
            n_after = carry.n_vis[min(s + 1, len(carry.n_vis) - 1)]
            counts += [carry.n_vis[s]] * (stop - start) + [n_after]
            start = stop + 1
        visual_counts = jnp.stack(counts, axis=1)
        # Tokens processed by layer j: every valid token of its stage.
        other = carry.num_prefix_valid + jnp.sum(carry.text_mask, axis=1)
        processed, start = [], 0
        for s, stop in enumerate(bounds):
            processed += [carry.n_vis[s] + other] * (stop + 1 - start)
            start = stop + 1
        processed = jnp.stack(processed, axis=1)
        dense = jnp.broadcast_to(carry.n_vis[0] + other, processed.shape[:1])[:, None]
        raters = carry.raters
        # Rows are [text between spans (padded) | text (padded)]: valid rows first, so a
        # rater's index is its text token's rank in sequence order (SPEC §9.1).
        order = jax.lax.sort(
            ((~carry.text_mask).astype(jnp.int32), iota_like(raters.astype(jnp.int32))),
            dimension=-1,
            num_keys=1,
            is_stable=True,
        )[1]
        out = {
            "raters": jnp.take_along_axis(raters, order, axis=1),
            "visual_tokens": carry.n_vis[0],
            "visual_counts": visual_counts,
            "equivalent_tokens": jnp.mean(visual_counts.astype(jnp.float32), axis=1),
            "tokens_per_layer": processed,
            "dense_tokens": dense[:, 0],
        }
        width = max(s["kept"].shape[1] for s in carry.layer_stats)
        for key in carry.layer_stats[0]:
            vals = [s[key] for s in carry.layer_stats]
            if key == "kept":
                vals = [
                    jnp.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=-1) for v in vals
                ]
            out[key] = jnp.stack(vals, axis=1)
        return out


def analytic_flops(stats: dict[str, np.ndarray], cfg: LlavaConfig) -> dict[str, np.ndarray]:
    """SPEC §8 FLOPs of this run and of the dense prefill, from host stats."""
    per_layer = np.asarray(stats["tokens_per_layer"])
    dense = np.broadcast_to(np.asarray(stats["dense_tokens"])[:, None], per_layer.shape)
    return {
        "flops": prefill_flops(per_layer, cfg.text),
        "dense_flops": prefill_flops(dense, cfg.text),
    }
