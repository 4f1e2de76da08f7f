"""Static capacities from a calibration set (DESIGN.md, capacity policy "static").

Runs the method in `exact` mode over some inputs, records per pruning layer how many tokens
were kept and recycled, and returns a `static` SparseConfig whose capacities hold a chosen
percentile of what was observed. Inputs whose budget exceeds a capacity later report it as
overflow (kept) or recycled_overflow (recycled) in the prefill statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from sparsevlm_jax.batch import Batch
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.sparse.config import SparseConfig


def calibrate(
    params: dict,
    cfg: LlavaConfig,
    sparse: SparseConfig,
    batches: Iterable[tuple[Batch, int]],
    percentile: float = 100.0,
) -> SparseConfig:
    """A `static` copy of `sparse` with capacities from the observed kept / recycled counts.

    Args:
      batches: (batch, number of real rows) pairs, e.g. from `Processor.__call__`.
      percentile: of the observed counts per layer (100 = never overflow on this set).
    Returns:
      `sparse` with capacity="static", capacities and recycled_capacities set (each >= 1).
    """
    from sparsevlm_jax.prefill import prefill_jit

    exact = sparse.replace(capacity="exact", capacities=(), recycled_capacities=())
    kept, recycled = [], []
    for batch, n in batches:
        _, _, stats = prefill_jit(params, batch, cfg, exact, 1)
        kept.append(np.asarray(stats["num_kept"])[:n])
        recycled.append(np.asarray(stats["recycled"])[:n])
    if not kept:
        raise ValueError("calibration needs at least one batch")

    def cap(counts: list[np.ndarray]) -> tuple[int, ...]:
        values = np.percentile(np.concatenate(counts), percentile, axis=0, method="higher")
        return tuple(max(int(v), 1) for v in values)

    return sparse.replace(
        capacity="static", capacities=cap(kept), recycled_capacities=cap(recycled)
    )
