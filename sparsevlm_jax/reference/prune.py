"""One pruning step (SPEC §2-§5, §9): score the visual tokens of a pruning layer's output, keep
the top k, recycle (v1, v1.5) and compact the sequence to [prefix | kept (with the text between
visual spans in place) | recycled | text] with its new position ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparsevlm_jax.reference.common import import_torch, note_margin
from sparsevlm_jax.reference.params import RefPruneRecord, RefSparseParams
from sparsevlm_jax.reference.recycle import recycle_pruned
from sparsevlm_jax.reference.scoring import budget, select_top_k, visual_scores

if TYPE_CHECKING:
    import torch


def prune_step(
    params: RefSparseParams,
    index: int,
    layer_idx: int,
    rotary_emb: Any,
    head_dim: int,
    h_out: torch.Tensor,
    probs: torch.Tensor,
    positions: torch.Tensor,
    p: int,
    vis_idx: torch.Tensor,
    text_idx: torch.Tensor,
    raters: tuple[int, ...],
    track_margins: bool = True,
    v0: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, RefPruneRecord, torch.Tensor, torch.Tensor]:
    """Score, select, recycle and compact after pruning layer `layer_idx`.

    The visual tokens may sit in several spans (SPEC §9): the region from the first visual
    token to the last keeps its text in place, the kept visual tokens in original order, and
    the recycled tokens follow it (after the last span's kept tokens).

    Args:
      index: position of this layer in `params.layers`.
      h_out: [1, n, D] the layer's output. probs: float32 [1, H, n, n] its attention.
      positions: [n] the positions the layer ran with. p: the first visual token's index.
      vis_idx: [v] indices of the visual tokens, ascending. text_idx: indices of the text
        after the first visual token, ascending (`raters` index it).
      v0: the visual count the prefill started with (scaled schedules, SPEC §9.3).
      track_margins: compute the (costly) clustering margins.
    Returns:
      (new hidden [1, n', D], new positions [n'], record, new vis_idx, new text_idx).
    """
    torch = import_torch()
    margins: dict[str, float] = {}
    v = int(vis_idx.numel())
    text_start = int(vis_idx[-1]) + 1 if v else p  # the first index after the visual region
    unchanged = (h_out, positions)
    if v == 0:  # nothing left to prune (possible only after v2.0 / random emptied the image)
        record = RefPruneRecord(
            layer=layer_idx,
            v_in=0,
            text_start=text_start,
            scores=probs.new_zeros(0),
            rank=None,
            budget=0,
            pruned=False,
            kept=(),
        )
        return *unchanged, record, vis_idx, text_idx

    rows = text_idx[list(raters)]  # absolute rater rows
    scores, rank, heads = visual_scores(
        params, probs, positions, rows, vis_idx, rotary_emb, head_dim, margins
    )
    k = budget(params, index, rank, v, v0)
    if k >= v:  # the layer prunes nothing
        record = RefPruneRecord(
            layer=layer_idx,
            v_in=v,
            text_start=text_start,
            scores=scores,
            rank=rank,
            budget=v,
            pruned=False,
            kept=tuple(range(v)),
            v_out=v,
            heads=heads,
            margins=margins,
        )
        return *unchanged, record, vis_idx, text_idx

    if params.method == "random":
        kept, pruned = _random_subset(params.seed, layer_idx, v, k, h_out.device)
    else:
        kept, pruned, topk_margin = select_top_k(scores, k)
        note_margin(margins, "topk", topk_margin)

    candidates: tuple[int, ...] = ()
    centres: tuple[int, ...] = ()
    assignment: tuple[int, ...] = ()
    recycled = h_out.new_zeros(0, h_out.shape[-1])
    if params.recycles:
        recycled, candidates, centres, assignment = recycle_pruned(
            h_out[0, vis_idx],
            scores,
            pruned,
            params.density_ties,
            margins,
            with_margins=track_margins,
        )

    # Compaction: [prefix | region: kept visual tokens and the text between spans, in order |
    # recycled | text].
    dropped = set(int(i) for i in vis_idx[pruned])
    region = torch.tensor(
        [i for i in range(p, text_start) if i not in dropped], dtype=torch.long, device=h_out.device
    )
    c = int(recycled.shape[0])
    new_h = torch.cat(
        [h_out[:, :p], h_out[:, region], recycled[None].to(h_out.dtype), h_out[:, text_start:]],
        dim=1,
    )
    # v2.0, and every method on (t, h, w) positions (SPEC §9.5): kept tokens keep their ids
    if params.keeps_positions or positions.ndim == 2:
        # (recycling switched on too: a recycled token takes its centre's)
        centre_pos = positions[vis_idx[[candidates[j] for j in centres]]] if c else positions[:0]
        new_pos = torch.cat([positions[:p], positions[region], centre_pos, positions[text_start:]])
    else:
        new_pos = torch.arange(new_h.shape[1], device=positions.device)
    visual = set(int(i) for i in vis_idx)
    in_region = [j for j, i in enumerate(region.tolist()) if i in visual]
    new_vis = torch.tensor(
        [p + j for j in in_region] + [p + len(region) + j for j in range(c)], dtype=torch.long
    )
    shift = len(region) + c - (text_start - p)
    new_text = torch.tensor(
        [p + j for j, i in enumerate(region.tolist()) if i not in visual]
        + [int(i) + shift for i in text_idx if int(i) >= text_start],
        dtype=torch.long,
    )
    record = RefPruneRecord(
        layer=layer_idx,
        v_in=v,
        text_start=text_start,
        scores=scores,
        rank=rank,
        budget=k,
        pruned=True,
        kept=tuple(int(i) for i in kept),
        candidates=candidates,
        centres=centres,
        assignment=assignment,
        n_recycled=c,
        v_out=k + c,
        heads=heads,
        margins=margins,
    )
    return new_h, new_pos, record, new_vis, new_text


def _random_subset(
    seed: int, layer_idx: int, v: int, k: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The random method's (kept ascending [k], pruned ascending [v-k]), seeded per layer."""
    import numpy as np

    torch = import_torch()
    rng = np.random.default_rng([seed, layer_idx])
    chosen = np.sort(rng.choice(v, size=k, replace=False))
    kept = torch.as_tensor(chosen, dtype=torch.long, device=device)
    pruned = torch.as_tensor(np.setdiff1d(np.arange(v), chosen), dtype=torch.long, device=device)
    return kept, pruned
