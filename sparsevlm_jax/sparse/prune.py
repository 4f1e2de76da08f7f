"""SparseVLM at the stage boundaries of the compiled prefill (SPEC §1-§6, DESIGN.md).

The sequence is `[prefix P | visual region | text T]` (`sparsevlm_jax.model.llava.SeqState`).
At a pruning layer the visual region (`vis_cap` slots, some invalid) is replaced by

    [ kept: C slots (top-k in original order) | recycled: Rc slots (cluster means) ]

whose validity masks carry the data-dependent counts k and c; positions are renumbered over
valid slots, so a valid token computes what it would in the reference's shorter sequence.
The static sizes of every pruning layer are fixed by `plan_capacities` before tracing.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax.config import ConfigError, LlavaConfig, SparseConfig
from sparsevlm_jax.flops import prefill_flops
from sparsevlm_jax.model import llama
from sparsevlm_jax.model.llava import SeqState, positions_from_valid
from sparsevlm_jax.sparse.rank import budget_table, matrix_rank, rank_budget
from sparsevlm_jax.sparse.raters import rater_scores, text_raters
from sparsevlm_jax.sparse.recycle import (
    max_candidates_for,
    max_clusters_for,
    num_clusters,
    recycle,
)
from sparsevlm_jax.sparse.select import select_topk

Array = jax.Array


@dataclass(frozen=True)
class LayerCapacity:
    """Static sizes at one pruning layer: visual slots in, kept slots C, candidates, Rc."""

    vis_in: int
    kept: int
    candidates: int
    recycled: int

    @property
    def vis_out(self) -> int:
        return self.kept + self.recycled


def plan_capacities(sparse: SparseConfig, num_image_tokens: int) -> list[LayerCapacity]:
    """Static buffer sizes per pruning layer.

    exact: C = the incoming visual capacity (holds every budget, including the keep-all case).
    static: C = `sparse.capacities[i]` (at most the incoming capacity).
    Candidate and recycled slots default to the most that can occur: every incoming visual
    token pruned.
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
        plan.append(LayerCapacity(vis, kept, cand, rec))
        vis = kept + rec
    return plan


def head_mean_attention(q_text: Array, k_all: Array, valid: Array) -> Array:
    """Head-averaged attention probabilities [B, T, L] of the last T slots (the text rows).

    q_text [B,T,N,H] (rotated queries of the text slots), k_all [B,L,K,H], valid [B,L]. Only
    the text rows are formed, never the full L x L matrix.
    """
    b, t = q_text.shape[:2]
    length = k_all.shape[1]
    rows = jnp.arange(length - t, length)
    mask = (jnp.arange(length)[None, :] <= rows[:, None])[None] & valid[:, None, :]
    probs = llama.attention_probs(q_text, k_all, mask)  # [B, K, G, T, L]
    return jnp.mean(probs, axis=(1, 2))


class Pruner:
    """Runs the pruning of each stage boundary inside one traced prefill and collects stats."""

    def __init__(self, cfg: LlavaConfig, sparse: SparseConfig, state: SeqState):
        self.cfg, self.sparse = cfg, sparse
        self.plan = plan_capacities(sparse, state.vis_cap)
        text = slice(state.x.shape[1] - state.num_text, None)
        self.text_mask = state.valid[:, text]
        self.raters = text_raters(state.x[:, state.vis_slice], state.x[:, text], self.text_mask)
        self.num_prefix_valid = jnp.sum(state.valid[:, : state.num_prefix], axis=1)
        self.n_vis = [jnp.sum(state.valid[:, state.vis_slice], axis=1).astype(jnp.int32)]
        self.layer_stats: list[dict[str, Array]] = []

    def prune(self, i: int, state: SeqState, q_text: Array, k_all: Array) -> SeqState:
        """Prunes the visual region after pruning layer i.

        state: the sequence with x = the pruning layer's output; q_text [B,T,N,H] and
        k_all [B,L,K,H]: that layer's text-row queries and all keys.
        """
        cap = self.plan[i]
        assert cap.vis_in == state.vis_cap, (cap, state.vis_cap)
        vis = state.vis_slice
        vis_mask = state.valid[:, vis]
        n_vis = jnp.sum(vis_mask, axis=1).astype(jnp.int32)
        valid_rank = jnp.cumsum(vis_mask.astype(jnp.int32), axis=1) - 1

        attn = head_mean_attention(q_text, k_all, state.valid)[:, :, vis]  # [B, T, Vcap]
        scores = rater_scores(attn, self.raters, vis_mask)
        rank, _ = matrix_rank(attn, self.raters, vis_mask)
        table = budget_table(self.sparse.scale, self.sparse.bias, min(attn.shape[1], cap.vis_in))
        budget = rank_budget(rank, n_vis, table)
        top = select_topk(scores, budget, cap.kept, vis_mask)
        rec = recycle(
            state.x[:, vis], scores, vis_mask, top.keep_mask_full, cap.candidates, cap.recycled
        )

        x_vis = jnp.take_along_axis(state.x[:, vis], top.kept_idx[:, :, None], axis=1)
        x_vis = jnp.concatenate([x_vis, rec.recycled.astype(state.x.dtype)], axis=1)
        vis_valid = jnp.concatenate([top.kept_mask, rec.recycled_mask], axis=1)
        p = state.num_prefix
        x = jnp.concatenate([state.x[:, :p], x_vis, state.x[:, vis.stop :]], axis=1)
        valid = jnp.concatenate([state.valid[:, :p], vis_valid, state.valid[:, vis.stop :]], 1)

        self.n_vis.append(top.n_kept + rec.n_recycled)
        self.layer_stats.append(
            {
                "rank": rank,
                "budget": budget,
                # slot -> index among the valid visual tokens (the reference's numbering)
                "kept": jnp.where(
                    top.kept_mask, jnp.take_along_axis(valid_rank, top.kept_idx, axis=1), -1
                ),
                "num_kept": top.n_kept,
                "recycled": rec.n_recycled,
                "overflow": top.overflow,
                "recycled_overflow": num_clusters(rec.n_candidates) - rec.n_recycled,
            }
        )
        return SeqState(x, valid, positions_from_valid(valid), p, cap.vis_out)

    def stats(self, state: SeqState) -> dict[str, Array]:
        """Per-example statistics, every array with a leading batch axis.

        raters [B,T] bool (relative to the text start); per pruning layer i (axis 1):
        rank, budget, num_kept, recycled, overflow [B, n_layers]; kept [B, n_layers, Cmax]
        (kept visual indices relative to that layer's visual range, -1 padded);
        visual_counts [B, num_layers] (after each decoder layer, recycled included);
        equivalent_tokens [B]; tokens_per_layer [B, num_layers] and dense_tokens [B] (valid
        tokens each layer processed, for SPEC §8 FLOPs: `analytic_flops`).
        """
        num_layers = self.cfg.text.num_hidden_layers
        bounds = [*self.sparse.layers, num_layers - 1]
        # Visual count after layer j: the count entering layer j+1 (a pruning layer's own
        # count is the pruned one, as the authors count it).
        counts, start = [], 0
        for s, stop in enumerate(bounds):
            n_after = self.n_vis[min(s + 1, len(self.n_vis) - 1)]
            counts += [self.n_vis[s]] * (stop - start) + [n_after]
            start = stop + 1
        visual_counts = jnp.stack(counts, axis=1)
        # Tokens processed by layer j: every valid token of its stage.
        other = self.num_prefix_valid + jnp.sum(self.text_mask, axis=1)
        processed, start = [], 0
        for s, stop in enumerate(bounds):
            processed += [self.n_vis[s] + other] * (stop + 1 - start)
            start = stop + 1
        processed = jnp.stack(processed, axis=1)
        dense = jnp.broadcast_to(self.n_vis[0] + other, processed.shape[:1])[:, None]
        out = {
            "raters": self.raters,
            "visual_counts": visual_counts,
            "equivalent_tokens": jnp.mean(visual_counts.astype(jnp.float32), axis=1),
            "tokens_per_layer": processed,
            "dense_tokens": dense[:, 0],
        }
        width = max(s["kept"].shape[1] for s in self.layer_stats)
        for key in self.layer_stats[0]:
            vals = [s[key] for s in self.layer_stats]
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
