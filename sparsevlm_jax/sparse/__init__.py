"""SparseVLM selection primitives: pure, jit-able JAX functions with static shapes.

All functions are batched over a leading B axis, compute in float32 and express
data-dependent counts as int32 arrays plus boolean masks (SPEC §1-§4).
"""

from sparsevlm_jax.sparse.common import (
    boundary_margin,
    descending_order,
    distinct_gap_margin,
    gather_slots,
)
from sparsevlm_jax.sparse.rank import (
    budget_table,
    fixed_budget,
    matrix_rank,
    rank_budget,
)
from sparsevlm_jax.sparse.raters import (
    rater_scores,
    text_raters,
    text_raters_with_margin,
    text_relevance,
)
from sparsevlm_jax.sparse.recycle import (
    RecycleResult,
    max_candidates_for,
    max_clusters_for,
    num_candidates,
    num_clusters,
    recycle,
)
from sparsevlm_jax.sparse.select import TopK, select_topk

__all__ = [
    "RecycleResult",
    "TopK",
    "boundary_margin",
    "budget_table",
    "descending_order",
    "distinct_gap_margin",
    "fixed_budget",
    "gather_slots",
    "matrix_rank",
    "max_candidates_for",
    "max_clusters_for",
    "num_candidates",
    "num_clusters",
    "rank_budget",
    "rater_scores",
    "recycle",
    "select_topk",
    "text_raters",
    "text_raters_with_margin",
    "text_relevance",
]
