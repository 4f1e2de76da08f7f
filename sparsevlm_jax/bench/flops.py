"""Prefill FLOPs: XLA cost analysis of the compiled program vs SPEC §8's ideal counts; KV cache.

FLOPs (SPEC §8, "FLOPs = 2 x MACs, MACs/layer = 4nd^2 + 2n^2d + 3ndm"):
  * XLA: `cost_analysis()["flops"]` of the compiled prefill, lowered with the layer scans
    unrolled (XLA counts a scan body once) and abstract weights. The vision tower
    (`model.clip.image_features`, lowered alone) is subtracted: "decoder" = the rest (decoder
    layers, pruning, final norm and the last token's logits). Counted in float32 by default:
    XLA:CPU rewrites bfloat16 dots to float32 and its cost model then charges the convert of a
    layer's WHOLE stacked weight tensor to every layer that slices it (+2.5% on the 7B dense
    prefill, none of it executed work); the arithmetic is the same in every dtype.
  * ideal: SPEC §8's count for (u) the prompt plus the equivalent visual tokens in every
    layer (`ideal_uniform`, the paper's convention), (a) the valid tokens each layer really
    processes (`ideal_valid`: a pruning layer processes its whole input), (b) the valid prompt
    tokens plus the static visual slots (`ideal_capacity`) and (c) every slot the program
    processes, bucket padding included (`ideal_padded`). Abstract runs (no weights) assume
    budgets fill the buffers, so there (a) == (b).
  * waste = XLA decoder / ideal - 1, against each ideal: the differences between (a), (b) and
    (c) are bucket padding and unused capacity; XLA / (c) is the cost of everything that is
    not a decoder matmul (pruning, norms, softmax, logits).
  * LLaVA-NeXT (per-example visual counts, SPEC §9): a batch's ideals are the sums of its
    examples' (each over its own valid tokens); the program processes every row at the
    batch's visual slots (the largest count on the visual ladder) and, after each pruning
    layer, at the batch's largest kept + recycled count. Fixed schedules and FastV decide
    their counts from V0 alone (`expected_counts`: exact); v1's rank needs weights, so
    without them it keeps `V1_STATIC_SHAPES_7B`'s counts (its rule is absolute). The vision
    side subtracted is the tower on every tile plus the packing gather
    (`model.llava.VISUAL_TOKENS` of the family).
  * Qwen-VL: the same with the family's own tower (`qwen_vl.visual_tokens`:
    `qwen_vision.visual_features` on abstract `VisionInputs` at the bucket's patch capacity,
    then the gather into the visual slots). The tower runs its blocks in a `lax.scan` and its
    tiled attention in loops, which XLA's cost analysis counts once: the *vision* figure is
    that partial count, but the same ops appear in the prefill program, so the decoder (the
    difference) is exact.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax.batch import Batch
from sparsevlm_jax.bench.counts import expected_counts
from sparsevlm_jax.bench.workloads import Workload
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.flops import prefill_flops
from sparsevlm_jax.model import llama
from sparsevlm_jax.model.clip import image_features
from sparsevlm_jax.model.llava import VISUAL_TOKENS, KVCache, stage_bounds
from sparsevlm_jax.params import abstract_params
from sparsevlm_jax.prefill import prefill_jit
from sparsevlm_jax.presets import abstract_batch
from sparsevlm_jax.sparse.config import SparseConfig


def visual_slots_per_layer(
    cfg: LlavaConfig, sparse: SparseConfig, visual_slots: int | None = None
) -> list[int]:
    """Static visual slots each decoder layer processes (`visual_slots`: the program's visual
    input width, default the image's fixed count)."""
    n = cfg.text.num_hidden_layers
    v0 = cfg.num_image_tokens if visual_slots is None else visual_slots
    if not sparse.enabled:
        return [v0] * n
    from sparsevlm_jax.sparse.prune import plan_capacities

    plan = plan_capacities(sparse, v0)
    per_stage = [c.vis_in for c in plan] + [plan[-1].vis_out]
    out: list[int] = []
    for s, (start, stop) in enumerate(stage_bounds(n, sparse.layers if sparse.enabled else ())):
        out += [per_stage[s]] * (stop - start)
    return out


def counts_after_layers(processed: Sequence[int], layers: Sequence[int]) -> list[int]:
    """Visual count after each layer (SPEC §6): a pruning layer counts what it kept."""
    n = len(processed)
    return [int(processed[j + 1] if j in layers and j + 1 < n else processed[j]) for j in range(n)]


def ideal_flops(visual: Sequence[int], other: int, cfg: LlavaConfig) -> float:
    """SPEC §8 prefill FLOPs when layer j processes `other + visual[j]` tokens."""
    return float(prefill_flops(np.asarray(visual) + other, cfg.text))


def token_report(
    wl: Workload,
    sparse: SparseConfig,
    visual_valid: Sequence[int] | Sequence[Sequence[int]] | None = None,
    v1_kept: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Per-layer visual counts (valid and static) and the three SPEC §8 ideals.

    `visual_valid`: measured per-layer valid counts ([L], or [B][L] for a batch); without
    them an image of fixed size assumes budgets fill the buffers and a LLaVA-NeXT batch
    takes `expected_counts` (`v1_kept`: v1's assumed kept counts)."""
    if wl.variable:
        return batch_token_report(wl, sparse, visual_valid, v1_kept)
    slots = visual_slots_per_layer(wl.cfg, sparse)
    measured = visual_valid is not None
    valid = list(visual_valid) if measured else slots
    after = counts_after_layers(valid, sparse.layers if sparse.enabled else ())
    equivalent = float(np.mean(after))
    return {
        "visual_counts_source": "measured" if measured else "capacity (budgets fill buffers)",
        "visual_tokens_per_layer": [int(v) for v in valid],
        "visual_slots_per_layer": slots,
        "visual_counts_after_layer": after,
        "equivalent_tokens": equivalent,
        "mean_visual_processed": float(np.mean(valid)),
        "tokens_per_layer": [int(v) + wl.prompt_tokens for v in valid],
        "slots_per_layer": [s + wl.prompt_slots for s in slots],
        "ideal_uniform": ideal_flops([equivalent] * len(valid), wl.prompt_tokens, wl.cfg),
        "ideal_valid": ideal_flops(valid, wl.prompt_tokens, wl.cfg),
        "ideal_capacity": ideal_flops(slots, wl.prompt_tokens, wl.cfg),
        "ideal_padded": ideal_flops(slots, wl.prompt_slots, wl.cfg),
    }


def batch_token_report(
    wl: Workload,
    sparse: SparseConfig,
    visual_valid: Sequence[Sequence[int]] | None,
    v1_kept: Sequence[int] | None,
) -> dict[str, Any]:
    """`token_report` of a batch whose examples have their own visual counts: per-layer
    counts are means over the examples (`*_per_example` keeps them all), the ideals sums of
    the examples' (capacity and padded: every row at the program's slots)."""
    n_layers = wl.cfg.text.num_hidden_layers
    layers = sparse.layers if sparse.enabled else ()
    slots = visual_slots_per_layer(wl.cfg, sparse, wl.visual_slots)
    measured = visual_valid is not None
    if measured:
        rows = [[int(v) for v in row] for row in visual_valid]
    else:
        rows = [expected_counts(sparse, v0, n_layers, v1_kept)[0] for v0 in wl.visual_counts]
    after = [counts_after_layers(r, layers) for r in rows]
    eq = [float(np.mean(a)) for a in after]
    b = len(rows)
    mean = [float(np.mean(col)) for col in zip(*rows, strict=True)]
    return {
        "visual_counts_source": "measured"
        if measured
        else "expected (fixed schedules and FastV: exact; v1: assumed kept counts)",
        "visual_tokens_per_layer": mean,
        "visual_tokens_per_example": rows,
        "visual_slots_per_layer": slots,
        "visual_counts_after_layer": [float(np.mean(c)) for c in zip(*after, strict=True)],
        "equivalent_tokens": float(np.mean(eq)),
        "equivalent_tokens_per_example": eq,
        "mean_visual_processed": float(np.mean(mean)),
        "tokens_per_layer": [v + wl.prompt_tokens for v in mean],
        "slots_per_layer": [s + wl.prompt_slots for s in slots],
        "ideal_uniform": sum(ideal_flops([e] * n_layers, wl.prompt_tokens, wl.cfg) for e in eq),
        "ideal_valid": sum(ideal_flops(r, wl.prompt_tokens, wl.cfg) for r in rows),
        "ideal_capacity": b * ideal_flops(slots, wl.prompt_tokens, wl.cfg),
        "ideal_padded": b * ideal_flops(slots, wl.prompt_slots, wl.cfg),
    }


def count_config(wl: Workload) -> LlavaConfig:
    """The config whose program is counted: unrolled scans, in the count dtype."""
    return wl.cfg.replace(param_dtype=wl.count_dtype, dtype=wl.count_dtype, unroll_layers=True)


def abstract_inputs(wl: Workload, cfg: LlavaConfig) -> tuple[dict, Batch]:
    visual = wl.visual_slots if wl.variable else None
    tiles = wl.tiles if wl.variable and not cfg.qwen else None
    patches = wl.patch_capacity if cfg.qwen else None
    batch = abstract_batch(
        cfg, wl.batch, wl.prefix_bucket, wl.text_bucket, visual, tiles, patches=patches
    )
    return abstract_params(cfg), batch


def _cost(lowered: Any, compile_: bool) -> dict[str, float]:
    """FLOPs of a lowered program: pre-optimisation, and compiled unless `compile_` is off."""
    out = {"flops_lowered": float(lowered.cost_analysis()["flops"])}
    if compile_:
        t0 = time.perf_counter()
        compiled = lowered.compile()
        out["compile_s"] = time.perf_counter() - t0
        out["flops_compiled"] = float(compiled.cost_analysis()["flops"])
    out["flops"] = out.get("flops_compiled", out["flops_lowered"])
    return out


@contextlib.contextmanager
def unblocked_attention() -> Iterator[None]:
    """Programs traced inside run the prefill attention as one query block (`QUERY_BLOCKS =
    1`: the whole causal score matrix, as SPEC §8 counts it) instead of skipping the masked
    key blocks."""
    old = llama.QUERY_BLOCKS
    llama.QUERY_BLOCKS = 1
    try:
        yield
    finally:
        llama.QUERY_BLOCKS = old


def xla_full_attention_cost(wl: Workload, sparse: SparseConfig) -> float:
    """Lowered XLA FLOPs of the whole prefill with `unblocked_attention` (a fresh trace)."""
    cfg = count_config(wl)
    params, batch = abstract_inputs(wl, cfg)
    fn = prefill_jit.__wrapped__  # type: ignore[attr-defined]
    with unblocked_attention():
        lowered = jax.jit(lambda p, b: fn(p, b, cfg, sparse, 1)).lower(params, batch)
    return float(lowered.cost_analysis()["flops"])


def xla_prefill_cost(
    wl: Workload, sparse: SparseConfig, compile_: bool
) -> tuple[dict[str, float], dict[str, Any]]:
    """XLA FLOPs of the whole prefill (vision tower included), abstract weights; and the KV
    cache it builds, in the model dtype (`kv_report`)."""
    cfg = count_config(wl)
    params, batch = abstract_inputs(wl, cfg)
    t0 = time.perf_counter()
    lowered = prefill_jit.lower(params, batch, cfg, sparse, 1)
    out = {"lower_s": time.perf_counter() - t0, **_cost(lowered, compile_)}
    kv = kv_report(lowered.out_info[1], sparse, wl.cfg, wl.max_new_tokens)
    return out, kv


def xla_vision_cost(wl: Workload, compile_: bool) -> dict[str, float]:
    """XLA FLOPs of the vision tower + projector alone (subtracted from the prefill's); on
    LLaVA-NeXT every tile of every example and the packing gather."""
    cfg = count_config(wl)
    params, batch = abstract_inputs(wl, cfg)
    if wl.variable:
        fn = jax.jit(VISUAL_TOKENS[cfg.family], static_argnums=1)
        return _cost(fn.lower(params, cfg, batch.pixel_values, batch.visual_index), compile_)
    fn = jax.jit(image_features, static_argnums=1)
    return _cost(fn.lower(params, cfg, batch.pixel_values), compile_)


def flops_report(
    wl: Workload,
    prefill_cost: dict[str, float] | None,
    vision: dict[str, float] | None,
    tokens: dict,
) -> dict[str, Any]:
    """XLA vs ideal FLOPs of one method; waste = XLA decoder / ideal - 1. Without XLA counts
    (`--count none`, both None) the XLA fields and the waste are None."""
    if prefill_cost is None or vision is None:
        keys = ("xla_total", "xla_vision", "xla_decoder", "xla_total_lowered")
        out: dict[str, Any] = dict.fromkeys((*keys, "xla_decoder_lowered"))
        decoder = None
    else:
        decoder = prefill_cost["flops"] - vision["flops"]
        out = {
            "xla_total": prefill_cost["flops"],
            "xla_vision": vision["flops"],
            "xla_decoder": decoder,
            "xla_total_lowered": prefill_cost["flops_lowered"],
            "xla_decoder_lowered": prefill_cost["flops_lowered"] - vision["flops_lowered"],
        }
    if prefill_cost is not None and "flops_full_attention" in prefill_cost and vision is not None:
        out["xla_decoder_full_attention"] = (
            prefill_cost["flops_full_attention"] - vision["flops_lowered"]
        )
    out["ideal_uniform"] = tokens["ideal_uniform"]
    for kind in ("valid", "capacity", "padded"):
        ideal = tokens[f"ideal_{kind}"]
        out[f"ideal_{kind}"] = ideal
        out[f"waste_vs_{kind}"] = None if decoder is None else decoder / ideal - 1.0
    out["padding_overhead"] = tokens["ideal_padded"] / tokens["ideal_capacity"] - 1.0
    out["unused_capacity_overhead"] = tokens["ideal_capacity"] / tokens["ideal_valid"] - 1.0
    return out


def add_reductions(results: list[dict[str, Any]]) -> None:
    """FLOPs ratios and reductions vs the dense entry (in place)."""
    dense = results[0]["flops"]
    kinds = ("xla_total", "xla_decoder", "ideal_uniform", "ideal_valid", "ideal_padded")
    if "xla_decoder_full_attention" in dense:
        kinds += ("xla_decoder_full_attention",)
    for r in results:
        f = r["flops"]
        r["flops_ratio"] = {
            k: None if f.get(k) is None or dense[k] is None else f[k] / dense[k] for k in kinds
        }
        r["flops_reduction"] = {
            k: None if v is None else 1.0 - v for k, v in r["flops_ratio"].items()
        }


def kv_report(cache: KVCache, sparse: SparseConfig, cfg: LlavaConfig, max_new: int) -> dict:
    """KV-cache bytes in `cfg.dtype`, in total and per stage, for `max_new` decode slots.

    `cache` holds arrays or ShapeDtypeStructs (e.g. a lowered program's `out_info`) of any
    dtype and decode room: only the layer counts, prompt lengths and head shapes are read.
    """
    bounds = stage_bounds(cfg.text.num_hidden_layers, sparse.layers if sparse.enabled else ())
    itemsize = jnp.dtype(cfg.dtype).itemsize
    stages, total, prompt_total = [], 0, 0
    for (start, stop), kv, prompt in zip(bounds, cache.kv, cache.prefill_len, strict=True):
        layers, batch, _, heads, head_dim = kv.k.shape
        per_slot = 2 * layers * batch * heads * head_dim * itemsize  # k and v
        stage = {
            "layers": [start, stop],
            "prompt_slots": prompt,
            "bytes": per_slot * (prompt + max_new),
            "prompt_bytes": per_slot * prompt,
        }
        stages.append(stage)
        total, prompt_total = total + stage["bytes"], prompt_total + stage["prompt_bytes"]
    return {"bytes": total, "prompt_bytes": prompt_total, "decode_slots": max_new, "stages": stages}
