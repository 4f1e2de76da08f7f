"""The reference's public entry points: the pruned prefill (a Python loop over the decoder
layers, pruning at the configured ones), one decoding step over per-layer caches, and greedy
generation (SPEC §5 decode positions).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from sparsevlm_jax.reference.common import import_torch, merge_margins, note_margin
from sparsevlm_jax.reference.layers import (
    decoder_layer,
    is_qwen,
    language_model,
    mrope_positions,
    visual_embeddings,
)
from sparsevlm_jax.reference.params import RefPruneRecord, RefResult, RefSparseParams
from sparsevlm_jax.reference.prune import prune_step
from sparsevlm_jax.reference.scoring import select_raters

if TYPE_CHECKING:
    import torch


def reference_prefill(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    params: RefSparseParams | None = None,
    keep_layer_inputs: bool = False,
    track_margins: bool = True,
    image_sizes: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    **grids: Any,
) -> RefResult:
    """Prefill of LLaVA with SparseVLM pruning (SPEC §1-§6), batch 1, eager.

    Args:
      model: a `transformers.LlavaForConditionalGeneration` (Llama text model), in eval mode.
      input_ids: int64 [1, N], llava-hf style (the image token id repeated V0 times).
      pixel_values: [1, 3, H, W], already preprocessed.
      params: the method; default v1 at 192 (scale 13.5, layers 2, 6, 15, 19).
      keep_layer_inputs: also return what every layer ran on (tests).
      track_margins: compute the clustering margins too (turn off for timing; the cheap
        margins are always recorded).
      image_sizes: LLaVA-NeXT only, [1, 2] (height, width) of the image, with
        `pixel_values` [1, tiles, 3, H, W] (`LlavaNextForConditionalGeneration`).
      pixel_values_videos: LLaVA-NeXT-Video's [1, frames, 3, H, W] (`pixel_values` None
        for a prompt without an image).
      grids: Qwen-VL's `image_grid_thw`, `video_grid_thw` and (Qwen2.5) `second_per_grid_ts`;
        positions are then transformers' own (t, h, w) `get_rope_index` triples [N, 3], kept by
        every method (SPEC §9.5).
    Returns:
      RefResult; `logits` are float32 [N', vocab] for the final (pruned) sequence.
    """
    torch = import_torch()
    params = params or RefSparseParams()
    lm = language_model(model)
    n_layers = len(lm.layers)
    if params.method != "dense" and params.layers and params.layers[-1] >= n_layers:
        raise ValueError(f"pruning layer {params.layers[-1]} >= number of layers {n_layers}")
    prune_at = {} if params.method == "dense" else {l: i for i, l in enumerate(params.layers)}

    with torch.no_grad():
        h, vis_idx = visual_embeddings(  # [1, N, D]
            model, input_ids, pixel_values, image_sizes, pixel_values_videos,
            image_grid_thw=grids.get("image_grid_thw"),
            video_grid_thw=grids.get("video_grid_thw"),
        )  # fmt: skip
        p, v0 = int(vis_idx[0]), int(vis_idx.numel())
        # The text: every non-visual token after the first visual one (SPEC §9.1).
        is_text = torch.ones(h.shape[1], dtype=torch.bool)
        is_text[:p] = False
        is_text[vis_idx] = False
        text_idx = torch.nonzero(is_text).flatten()
        n_text = int(text_idx.numel())
        margins: dict[str, float] = {}
        raters: tuple[int, ...] = ()
        rater_scores = h.new_zeros(0, dtype=torch.float32)
        if prune_at:
            raters, rater_scores, rater_margin = select_raters(h[0, vis_idx], h[0, text_idx])
            if params.method not in ("fastv", "random"):
                note_margin(margins, "raters", rater_margin)

        if is_qwen(model):
            positions = mrope_positions(model, input_ids, **grids)
        else:
            positions = torch.arange(h.shape[1], device=h.device)
        next_position = int(positions.max()) + 1
        v = v0
        caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        prunes: list[RefPruneRecord] = []
        visual_counts: list[int] = []
        layer_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        head_dim = lm.layers[0].self_attn.head_dim
        for i, layer in enumerate(lm.layers):
            if keep_layer_inputs:
                layer_inputs.append((h, positions))
            h_out, probs, kv = decoder_layer(layer, lm.rotary_emb, h, positions)
            caches.append(kv)
            if i in prune_at:
                h, positions, record, vis_idx, text_idx = prune_step(
                    params,
                    index=prune_at[i],
                    layer_idx=i,
                    rotary_emb=lm.rotary_emb,
                    head_dim=head_dim,
                    h_out=h_out,
                    probs=probs,
                    positions=positions,
                    p=p,
                    vis_idx=vis_idx,
                    text_idx=text_idx,
                    raters=raters,
                    track_margins=track_margins,
                    v0=v0,
                )
                prunes.append(record)
                merge_margins(margins, record.margins)
                v = record.v_out
            else:
                h = h_out
            visual_counts.append(v)
        logits = model.lm_head(lm.norm(h))[0].float()  # [N', vocab]

    return RefResult(
        prefix_len=p,
        num_image_tokens=v0,
        num_text_tokens=n_text,
        raters=raters,
        rater_scores=rater_scores,
        prunes=prunes,
        visual_counts=tuple(visual_counts),
        equivalent_tokens=sum(visual_counts) / len(visual_counts),
        logits=logits,
        positions=positions,
        kv_caches=caches,
        margins=margins,
        min_margin=min(margins.values(), default=math.inf),
        layer_inputs=layer_inputs if keep_layer_inputs else None,
        next_position=next_position,
    )


def reference_decode_step(
    model: Any,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    token_id: int,
    return_layer_inputs: bool = False,
    position: int | None = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor] | None]:
    """One decoding step with per-layer caches (SPEC §5).

    The new token attends to every cached token of each layer plus itself. Its position is
    `position` at every layer when given (v2.0: N + t for the t-th generated token, N the
    unpruned prompt length), else at layer l that layer's cache length before appending
    (v1, v1.5: len_l).

    Args:
      kv_caches: per layer (k, v) [1, Hkv, len_l, head_dim]; not modified.
      token_id: the new token.
      position: one position for every layer, or None for the per-layer cache length.
    Returns:
      (logits float32 [vocab], new caches, per-layer inputs [1, 1, D] of the new token or None).
    """
    torch = import_torch()
    lm = language_model(model)
    device = kv_caches[0][0].device
    with torch.no_grad():
        h = lm.embed_tokens(torch.tensor([[token_id]], device=device))  # [1, 1, D]
        new_caches = []
        inputs = []
        for layer, past in zip(lm.layers, kv_caches, strict=True):
            inputs.append(h)
            pos = past[0].shape[2] if position is None else position
            position_ids = torch.tensor([pos], device=device)
            h, _, kv = decoder_layer(layer, lm.rotary_emb, h, position_ids, past, causal=False)
            new_caches.append(kv)
        logits = model.lm_head(lm.norm(h))[0, -1].float()
    return logits, new_caches, (inputs if return_layer_inputs else None)


def _greedy(logits: torch.Tensor) -> tuple[int, float]:
    """argmax (first maximum) and the top-1 minus top-2 gap."""
    torch = import_torch()
    token = int(torch.argmax(logits))
    top2 = torch.topk(logits, 2).values if logits.numel() > 1 else logits.repeat(2)
    return token, float(top2[0] - top2[1])


def reference_generate(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    params: RefSparseParams | None = None,
    max_new_tokens: int = 32,
    eos_token_ids: tuple[int, ...] | list[int] = (),
    track_margins: bool = True,
    image_sizes: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    **grids: Any,
) -> tuple[list[int], RefResult]:
    """Greedy generation: pruned prefill, then per-layer-cache decoding.

    Decode positions follow SPEC §5 / §9.5: v2.0 (kept positions) and every method on M-RoPE
    positions give the t-th generated token one past the original prompt's largest position,
    plus t, at every layer (N + t on 1-D positions), the other methods each layer's cache
    length; `result.decode_positions` records them.

    Stops after `max_new_tokens` tokens or after emitting a token in `eos_token_ids` (which is
    included in the output, as transformers' generate does). `result.greedy_gaps` holds the
    top-1 minus top-2 logit of every emitted token; `result.kv_caches` is left as after the
    prefill.

    Returns:
      (generated token ids, the prefill's RefResult).
    """
    params = params or RefSparseParams()
    result = reference_prefill(
        model,
        input_ids,
        pixel_values,
        params,
        track_margins=track_margins,
        image_sizes=image_sizes,
        pixel_values_videos=pixel_values_videos,
        **grids,
    )
    eos = set(int(t) for t in eos_token_ids)
    fixed = params.keeps_positions or result.positions.ndim == 2
    tokens: list[int] = []
    logits = result.logits[-1]
    caches = result.kv_caches
    for step in range(max_new_tokens):
        token, gap = _greedy(logits)
        tokens.append(token)
        result.greedy_gaps.append(gap)
        if token in eos or step == max_new_tokens - 1:
            break
        position = result.next_position + step if fixed else None
        result.decode_positions.append(
            tuple(k.shape[2] if position is None else position for k, _ in caches)
        )
        logits, caches, _ = reference_decode_step(model, caches, token, position=position)
    return tokens, result
