"""Visual-token counts a method decides without weights (SPEC §3, §4, §9.3): per example from
its visual count, and the static capacities that hold a batch of them. Shared by the FLOPs
counting (`bench.flops`) and the workloads' sparse configs (`bench.workloads`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sparsevlm_jax.model.llava import stage_bounds
from sparsevlm_jax.sparse.config import SparseConfig
from sparsevlm_jax.sparse.rank import scaled_count


def scaled_entry(k: int, v0: int, reference: int | None) -> int:
    """`sparse.rank.scaled_count` for one example: round(k * v0 / reference), halves to even,
    at least 1; `k` itself without a reference."""
    if not reference:
        return k
    return int(scaled_count(k, np.asarray([v0], np.int32), reference)[0])


def expected_counts(
    sparse: SparseConfig, v0: int, num_layers: int, v1_kept: Sequence[int] | None = None
) -> tuple[list[int], list[tuple[int, int]]]:
    """Visual tokens each layer processes for an example with `v0` visual tokens, and (kept,
    recycled) per pruning layer, as the prefill decides them (`Pruner.budget`, SPEC §3/§4/
    §9.3). Exact for fixed schedules and FastV; v1 keeps `min(v1_kept[i], V - 1)` (its rank
    needs weights)."""
    if not sparse.enabled:
        return [v0] * num_layers, []
    n, per_stage, decided = v0, [v0], []
    for i in range(len(sparse.layers)):
        if sparse.method == "v1":
            if v1_kept is None:
                raise ValueError("v1 needs assumed kept counts without weights")
            k = min(int(v1_kept[i]), n - 1)
        elif sparse.method == "fastv":
            k = min(round(n * (1 - sparse.fastv_ratio)), n)
        else:
            k = scaled_entry(sparse.schedule[i], v0, sparse.schedule_tokens)
            k = min(k, n) if sparse.method == "random" else min(k, n - 1)
        k = min(max(k, 0), n)
        rec = 0
        if sparse.recycles and n - k > 0:
            rec = ((3 * (n - k)) // 10 + 1) // 10 + 1
        decided.append((k, rec))
        n = k + rec
        per_stage.append(n)
    out: list[int] = []
    for s, (start, stop) in enumerate(stage_bounds(num_layers, sparse.layers)):
        out += [per_stage[s]] * (stop - start)
    return out, decided


def static_capacities(
    sparse: SparseConfig, visual_counts: Sequence[int], v1_kept: Sequence[int] | None = None
) -> SparseConfig:
    """`sparse` as one static program for a batch with these visual counts: at each pruning
    layer the batch's largest kept and recycled counts (no budget overflows, none is
    rounded up)."""
    if not sparse.enabled:
        return sparse
    per_row = [
        expected_counts(sparse, v, 1 + max(sparse.layers), v1_kept)[1] for v in visual_counts
    ]
    kept = tuple(max(max(r[i][0] for r in per_row), 1) for i in range(len(sparse.layers)))
    rec = tuple(max(max(r[i][1] for r in per_row), 1) for i in range(len(sparse.layers)))
    return sparse.replace(capacity="static", capacities=kept, recycled_capacities=rec)
