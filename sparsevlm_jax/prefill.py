"""The prefill under each capacity policy (DESIGN.md, "Capacity policies").

- `exact` / `static`: one compiled program (`prefill_jit`); the pruning runs as the model's
  stage-boundary step with capacities fixed before tracing (`Pruner.prune`).
- `bucketed` (the default for rank-adaptive v1): one compiled program per stage
  (`prefill_bucketed`). After each pruning layer the host reads how many tokens every
  example keeps and how many recycling candidates follow, rounds the batch's largest up to
  the capacity ladder (`capacity_bucket`) and calls the next stage compiled for that size.
  The decisions are exactly those of `exact` (no budget can overflow), while compute follows
  the rounded budget. Programs are cached per (stage, incoming visual width, kept bucket,
  candidate bucket) and nothing of earlier stages, so the number of programs is bounded by
  the ladder, not by the inputs or the paths through it.

Dense runs are one program whatever the policy.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax.batch import Batch, ladder_size
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.model.llava import (
    KVCache,
    embed_inputs,
    final_logits,
    run_prefill,
    run_stage,
    stage_bounds,
)
from sparsevlm_jax.model.sequence import SeqState
from sparsevlm_jax.sparse.config import SparseConfig
from sparsevlm_jax.sparse.prune import LayerCapacity, Pruner, plan_capacities
from sparsevlm_jax.sparse.recycle import max_candidates_for, max_clusters_for

Array = jax.Array


def capacity_bucket(n: int, limit: int, steps: int = 4) -> int:
    """The smallest capacity on the ladder that holds `n`, at most `limit` (and >= 1).

    Ladder: 1..8, then `steps` steps per octave (p, p(1 + 1/steps), ... for p = 8, 16, 32,
    ...). The default four (p, 1.25p, 1.5p, 1.75p: at most 25% above what a bucket holds, 33
    buckets for 576 tokens) was chosen by `benchmarks/compile_once.py` on the decisions of 40
    diverse questions (mini shape, v1 @192): 4.8% mean padding FLOPs over exact sizes and 68
    stage programs; two steps: 10.5% for 48, one: 23% for 36, eight: 2.3% for 89.
    Every data-dependent static size of the prefill takes its bucket from this ladder
    (`sparsevlm_jax.batch.ladder_size`; the visual buckets use it with `VISUAL_STEPS`).
    """
    return min(ladder_size(n, steps), limit)


def bucket_layer(vis_in: int, n_keep: int, n_candidates: int, steps: int = 4) -> LayerCapacity:
    """Static sizes of one pruning layer for the batch's largest kept / candidate counts, on
    the ladder of `steps` steps per octave (`SparseConfig.ladder_steps`).

    The candidate buffer is derived from the kept bucket: the bucket of the most candidates
    any kept count in that bucket can leave (`max_candidates_for(vis_in - smallest count of
    the bucket)`), so one kept bucket means one program (a batch row that keeps fewer than the
    bucket's smallest count can raise it). On 40 diverse questions of the mini shape this
    compiled 68 stage programs instead of 80 for +0.25 points of padding FLOPs
    (`benchmarks/compile_once.py`). Buffers still hold every count: decisions are `exact`'s.
    """
    kept = capacity_bucket(n_keep, vis_in, steps)
    if n_candidates <= 0:  # nothing pruned in any row: nothing to recycle
        return LayerCapacity(vis_in, kept, 0, 0)
    limit = max_candidates_for(vis_in)
    smallest = kept  # the smallest count whose bucket is `kept`
    while smallest > 1 and capacity_bucket(smallest - 1, vis_in, steps) == kept:
        smallest -= 1
    most = capacity_bucket(max_candidates_for(vis_in - smallest), limit, steps)
    cand = max(most, capacity_bucket(n_candidates, limit, steps))
    return LayerCapacity(vis_in, kept, cand, max_clusters_for(cand))


@dataclass(frozen=True)
class CapacityInfo:
    """The capacity policy that ran and the static sizes per pruning layer."""

    policy: str
    capacities: tuple[int, ...]
    recycled_capacities: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "capacities": list(self.capacities),
            "recycled_capacities": list(self.recycled_capacities),
        }

    @classmethod
    def of(cls, policy: str, plan: list[LayerCapacity]) -> CapacityInfo:
        return cls(policy, tuple(c.kept for c in plan), tuple(c.recycled for c in plan))


@functools.partial(jax.jit, static_argnames=("cfg", "sparse", "max_new_tokens", "all_logits"))
def prefill_jit(
    params: dict,
    batch: Batch,
    cfg: LlavaConfig,
    sparse: SparseConfig,
    max_new_tokens: int,
    all_logits: bool = False,
) -> tuple[Array, KVCache, dict[str, Array]]:
    """The prefill as one compiled program: dense, or pruning with the `exact` / `static`
    policy. Returns (logits, cache, stats) as `prefill`."""
    state = embed_inputs(params, cfg, batch)
    if not sparse.enabled:
        logits, cache, _ = run_prefill(params, cfg, state, max_new_tokens, all_logits=all_logits)
        return logits, cache, {}
    if sparse.capacity == "bucketed":
        raise ValueError("the bucketed policy runs stage by stage: call `prefill`, not prefill_jit")
    pruner = Pruner(cfg, sparse, state)
    logits, cache, _ = run_prefill(
        params, cfg, state, max_new_tokens, sparse.layers, pruner.prune, all_logits
    )
    return logits, cache, pruner.stats()


@functools.partial(jax.jit, static_argnames=("cfg", "sparse", "max_new_tokens"))
def _first_stage(
    params: dict, batch: Batch, cfg: LlavaConfig, sparse: SparseConfig, max_new_tokens: int
):
    """Embedding, stage 0 and the decision of the first pruning layer."""
    state = embed_inputs(params, cfg, batch)
    pruner = Pruner(cfg, sparse)
    carry = pruner.init(state)
    start, stop = stage_bounds(cfg.text.num_hidden_layers, sparse.layers)[0]
    state, cache, q_text, k_last = run_stage(
        params, cfg, state, start, stop, max_new_tokens, state.num_text
    )
    return state, cache, carry, pruner.decide(0, carry, state, q_text, k_last)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "sparse", "max_new_tokens", "stage", "cap", "all_logits", "width"),
)
def _next_stage(
    params,
    state,
    carry,
    decision,
    cfg: LlavaConfig,
    sparse: SparseConfig,
    max_new_tokens: int,
    stage: int,
    cap: LayerCapacity,
    all_logits: bool,
    width: int,
):
    """Pruning after stage-1 with the given capacities, then stage `stage` and either the next
    decision or, for the last stage, the logits and statistics.

    History-free: a program's inputs are shaped by its own stage only (the incoming width,
    `cap`), never by earlier stages' capacities, so one program serves every path that
    reaches it. The layer's kept indices are padded to `width` for that reason (the widest
    kept buffer any path can have: `stats_width`).
    """
    pruner = Pruner(cfg, sparse)
    state, carry = pruner.apply(stage - 1, carry, state, decision, cap)
    *earlier, layer = carry.layer_stats
    kept = layer["kept"]
    kept = jnp.pad(kept, ((0, 0), (0, width - kept.shape[1])), constant_values=-1)
    carry = carry.replace(layer_stats=(*earlier, {**layer, "kept": kept}))
    bounds = stage_bounds(cfg.text.num_hidden_layers, sparse.layers)
    start, stop = bounds[stage]
    last = stage == len(bounds) - 1
    state, cache, q_text, k_last = run_stage(
        params, cfg, state, start, stop, max_new_tokens, 0 if last else state.num_text
    )
    if last:
        return final_logits(params, cfg, state, all_logits), cache, pruner.stats(carry)
    return state, cache, carry, pruner.decide(stage, carry, state, q_text, k_last)


def stats_width(sparse: SparseConfig, state: SeqState) -> int:
    """The widest kept buffer of any pruning layer on any bucketed path: `exact`'s widest
    (a bucketed width never exceeds `exact`'s at the same layer, which grows by the recycled
    slots of every layer: a layer that keeps everything hands on more than it took)."""
    pinned = 0 if state.pinned is None else state.pinned.shape[1]
    exact = sparse.replace(capacity="exact", capacities=(), recycled_capacities=())
    return max(c.kept for c in plan_capacities(exact, state.vis_cap, pinned))


def prefill_bucketed(
    params: dict,
    batch: Batch,
    cfg: LlavaConfig,
    sparse: SparseConfig,
    max_new_tokens: int,
    all_logits: bool = False,
) -> tuple[Array, KVCache, dict[str, Array], CapacityInfo]:
    """The `bucketed` policy: stage programs with a host round trip at each pruning layer."""
    state, cache, carry, decision = _first_stage(params, batch, cfg, sparse, max_new_tokens)
    caches, plan = [cache], []
    width = stats_width(sparse, state)
    for stage in range(1, len(sparse.layers) + 1):
        n_keep, n_cand = jax.device_get((decision.n_keep, decision.n_candidates))
        cap = bucket_layer(
            state.vis_cap, int(np.max(n_keep)), int(np.max(n_cand)), sparse.ladder_steps
        )
        if state.pinned is not None:  # text between visual spans keeps its slots
            cap = dataclasses.replace(cap, pinned=state.pinned.shape[1])
        plan.append(cap)
        out = _next_stage(
            params, state, carry, decision, cfg, sparse, max_new_tokens, stage, cap, all_logits,
            width,
        )  # fmt: skip
        if stage < len(sparse.layers):
            state, cache, carry, decision = out
        else:
            logits, cache, stats = out
        caches.append(cache)
    return (
        logits,
        KVCache.from_stages(caches, max_new_tokens),
        stats,
        CapacityInfo.of("bucketed", plan),
    )


def prefill(
    params: dict,
    batch: Batch,
    cfg: LlavaConfig,
    sparse: SparseConfig,
    max_new_tokens: int,
    all_logits: bool = False,
) -> tuple[Array, KVCache, dict[str, Array], CapacityInfo | None]:
    """The prefill under `sparse.capacity`.

    Returns:
      logits: [B, vocab] float32 at each example's last prompt token, or [B, L_final, vocab]
        for every slot of the final sequence with `all_logits`.
      cache: the per-stage KV caches with room for `max_new_tokens`.
      stats: per-example statistics of the pruning (empty for dense); see
        `sparsevlm_jax.sparse.prune.Pruner.stats`.
      capacity: the policy that ran and its static sizes (None for dense).
    """
    if not sparse.enabled:
        return (*prefill_jit(params, batch, cfg, sparse, max_new_tokens, all_logits), None)
    if sparse.capacity == "bucketed":
        return prefill_bucketed(params, batch, cfg, sparse, max_new_tokens, all_logits)
    logits, cache, stats = prefill_jit(params, batch, cfg, sparse, max_new_tokens, all_logits)
    vis0 = cfg.num_image_tokens if batch.visual_index is None else batch.visual_index.shape[1]
    plan = plan_capacities(sparse, vis0)
    return logits, cache, stats, CapacityInfo.of(sparse.capacity, plan)


def compiled_programs() -> dict[str, int]:
    """Programs held by the jitted prefill functions (fused, and the bucketed stages)."""
    return {
        "prefill": prefill_jit._cache_size(),
        "prefill_stages": _first_stage._cache_size() + _next_stage._cache_size(),
    }
