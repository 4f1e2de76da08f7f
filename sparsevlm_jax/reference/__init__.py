"""Eager PyTorch reference implementation of SparseVLM (SPEC.md) on transformers' LLaVA.

This package is the oracle the JAX implementation is tested against decision for decision,
and the PyTorch side of the speed benchmarks. It is deliberately plain: batch 1, dynamic
shapes, one Python loop over the decoder layers, no compilation. It runs on the modules of a
`transformers.LlavaForConditionalGeneration` (their weights, norms, MLPs, projections and
rotary embedding) but computes self-attention itself, because the pruning layers need the
attention probabilities and every layer keeps a KV cache of its own length.

Modules, side by side with the JAX ones:
  params     RefSparseParams, RefPruneRecord, RefResult      (sparse/config.py)
  layers     embeddings and decoder layers written out       (model/)
  scoring    raters, rank, top-k, SparseVLM+ heads, budget   (sparse/raters, rank, select)
  recycle    DPC-KNN clustering and merging                  (sparse/recycle.py)
  prune      one pruning step                                (sparse/prune.py)
  generate   prefill, decode step, greedy generation         (generate.py)

torch and transformers are imported inside the functions, so importing `sparsevlm_jax` (or
this package) never needs them; nothing in the library imports this package.

Conventions (all indices are Python ints, all tensors are batch-1 and live on the model's
device):
  p   number of tokens before the image (index of the first image token),
  V0  number of image tokens, V the current visual count (recycled tokens included),
  the visual range is [p, p+V), the text range [p+V, n) where n is the current length.

Decisions are made in float32 whatever the model dtype: attention probabilities are the
float32 softmax output; raters, ranks and clustering use float32 copies.

Every discrete decision also records a *margin*: how far (relative) the deciding quantity is
from flipping. `RefResult.min_margin` is the smallest of them; a test comparing another
implementation with this one should only trust cases where it is well above float32 noise.
Kinds (per pruning layer in `RefPruneRecord.margins`, overall minimum in `RefResult.margins`):
  raters      min_j |m_j - mean(m)| / mean(m)                       (SPEC §1)
  rank        min_i |sigma_i - tol| / sigma_max                     (v1, SPEC §3)
  topk        (s_kth kept - s_best pruned) / max|s|                 (top-k boundary)
  heads       same boundary on the v2.0 per-head masses
  candidates  (s_last candidate - s_next pruned) / max|s|           (recycling, SPEC §4)
  centres     consecutive gaps of delta*rho among the top c (+1) / top score
  assignment  (2nd nearest - nearest centre distance) / max distance, non-centres
  density     smallest density gap of a pair whose swap would change the centres / max rho
              (pairs >= 1e-2 apart are not tried: 1e-2 then means "at least 1e-2")
Exact ties in DPC-KNN (structural: c = 1, or mutual nearest neighbours when c = 2) are
resolved by the index rules and not counted; c = 1 records no clustering margins at all.
"""

from sparsevlm_jax.reference.common import descending_order
from sparsevlm_jax.reference.generate import (
    reference_decode_step,
    reference_generate,
    reference_prefill,
)
from sparsevlm_jax.reference.layers import input_embeddings
from sparsevlm_jax.reference.params import (
    METHODS,
    V1_5_SCHEDULES,
    V1_BUDGETS,
    V2_0_SCHEDULES,
    RefPruneRecord,
    RefResult,
    RefSparseParams,
)
from sparsevlm_jax.reference.recycle import density_order, dpc_knn_cluster
from sparsevlm_jax.reference.scoring import (
    float32_rank,
    select_raters,
    select_top_k,
    v2_head_count,
)

__all__ = [
    "METHODS",
    "V1_5_SCHEDULES",
    "V1_BUDGETS",
    "V2_0_SCHEDULES",
    "RefPruneRecord",
    "RefResult",
    "RefSparseParams",
    "density_order",
    "descending_order",
    "dpc_knn_cluster",
    "float32_rank",
    "input_embeddings",
    "reference_decode_step",
    "reference_generate",
    "reference_prefill",
    "select_raters",
    "select_top_k",
    "v2_head_count",
]
