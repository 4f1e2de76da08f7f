"""The bucketed capacity policy: the ladder, exact decisions, bounded and reused programs.

Parity of the decisions with the PyTorch reference is in test_sparse_parity.py (every v1 case
runs `exact` and `bucketed`); this file checks what only the bucketed policy has.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_sparse_parity import EXAMPLES, model_and_params, pixels, v1

from sparsevlm_jax.batch import make_batch
from sparsevlm_jax.generate import compile_counts
from sparsevlm_jax.prefill import bucket_layer, capacity_bucket, prefill
from sparsevlm_jax.sparse.config import SparseConfig


def test_capacity_ladder() -> None:
    ladder = sorted({capacity_bucket(n, 576) for n in range(1, 577)})
    assert ladder[:8] == list(range(1, 9)) and ladder[-1] == 576
    assert len(ladder) == 33  # what prefill.py's docstring states
    for n in range(1, 3000):
        b = capacity_bucket(n, 10**6)
        assert b >= n and (n <= 8 or b <= 1.25 * n), (n, b)
    assert capacity_bucket(0, 64) == 1  # a buffer is never empty
    assert capacity_bucket(500, 300) == 300  # never above the incoming width


def test_bucket_layer_sizes_recycling_from_the_candidates() -> None:
    cap = bucket_layer(576, n_keep=70, n_candidates=152)
    assert (cap.vis_in, cap.kept, cap.candidates) == (576, 80, 160)
    assert cap.recycled == 160 // 10 + 1  # every cluster the candidates can form
    assert bucket_layer(64, 64, 0).recycled == 0  # nothing pruned: nothing to recycle


def batch_of(rows: list[int]):
    return make_batch(
        [EXAMPLES[i][0] for i in rows], [EXAMPLES[i][1] for i in rows], pixels()[rows]
    )


@pytest.mark.parametrize(("preset", "steps"), [("64", 4), ("192", 4), ("192", 1)])
def test_capacities_follow_the_batch_largest_budget(preset: str, steps: int) -> None:
    """Each pruning layer's buffer is the ladder bucket of the batch's largest kept count, on
    the ladder of `ladder_steps` steps per octave; the decisions do not depend on it."""
    _, params, cfg = model_and_params(0)
    batch, _ = batch_of([0, 1, 2, 3])
    sparse = v1(preset, capacity="bucketed").replace(ladder_steps=steps)
    logits, cache, stats, info = prefill(params, batch, cfg, sparse, 2)
    kept = np.asarray(stats["num_kept"]).max(axis=0)
    vis_in = cfg.num_image_tokens
    for i, k in enumerate(kept):
        assert info.capacities[i] == capacity_bucket(int(k), vis_in, steps)
        vis_in = info.capacities[i] + info.recycled_capacities[i]
    if steps != 4:  # other buffers, the same decisions as the default ladder's
        logits4, _, stats4, info4 = prefill(params, batch, cfg, v1(preset, capacity="bucketed"), 2)
        assert info != info4  # other buffers (here the recycled ones)
        for key in ("num_kept", "kept", "recycled", "budget"):
            np.testing.assert_array_equal(stats[key], stats4[key], err_msg=key)
        np.testing.assert_allclose(logits, logits4, atol=2e-5, rtol=1e-5)
    assert info.policy == "bucketed"
    assert (np.asarray(stats["overflow"]) == 0).all()
    assert (np.asarray(stats["recycled_overflow"]) == 0).all()
    # Later stages really are shorter: prefix + buffers + text slots.
    widths = [cache.prefill_len[s] for s in range(len(cache.prefill_len))]
    p, t = batch.prefix_ids.shape[1], batch.text_ids.shape[1]
    expect = [p + cfg.num_image_tokens + t] + [
        p + c + r + t for c, r in zip(info.capacities, info.recycled_capacities, strict=True)
    ]
    assert widths == expect


def test_programs_are_reused_across_calls() -> None:
    """Calls whose budgets fall into the same buckets compile nothing new."""
    _, params, cfg = model_and_params(0)
    sparse = v1("64", capacity="bucketed")
    batch, _ = batch_of([0, 1, 2, 3])
    _, _, _, first = prefill(params, batch, cfg, sparse, 2)
    before = compile_counts()
    for _ in range(2):
        _, _, _, again = prefill(params, batch, cfg, sparse, 2)
        assert again == first
    shuffled, _ = batch_of([3, 2, 1, 0])  # same examples, other rows: same largest budgets
    assert prefill(params, shuffled, cfg, sparse, 2)[3] == first
    assert compile_counts() == before


def test_dense_is_one_program_whatever_the_policy() -> None:
    _, params, cfg = model_and_params(0)
    batch, _ = batch_of([0])
    logits, _, stats, info = prefill(params, batch, cfg, SparseConfig(), 2)
    assert info is None and stats == {} and logits.shape[0] == 1


def test_layers_that_keep_almost_everything_widen_the_region() -> None:
    """A budget at V - 1 keeps all but one token and recycles it: the next stage's buffers are
    wider than the image's tokens (recycled slots), and every statistic still fits."""
    _, params, cfg = model_and_params(0)
    batch, _ = batch_of([0, 1])
    wide = v1("64", capacity="bucketed").replace(scale=100.0, bias=0.0)
    _, _, stats, info = prefill(params, batch, cfg, wide, 2)
    assert info.capacities[-1] + info.recycled_capacities[-1] > cfg.num_image_tokens
    _, _, want, _ = prefill(params, batch, cfg, wide.replace(capacity="exact"), 2)
    for key in ("num_kept", "kept", "recycled", "budget"):
        np.testing.assert_array_equal(stats[key], want[key], err_msg=key)
