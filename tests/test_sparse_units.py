"""Unit tests of the static-shape SparseVLM primitives (sparsevlm_jax.sparse)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsevlm_jax.sparse import (
    boundary_margin,
    budget_table,
    distinct_gap_margin,
    fixed_budget,
    gather_slots,
    matrix_rank,
    max_candidates_for,
    max_clusters_for,
    num_candidates,
    rank_budget,
    rater_scores,
    recycle,
    select_topk,
    text_raters,
    text_raters_with_margin,
)
from sparsevlm_jax.sparse.recycle import (
    density_delta,
    density_margin,
    knn_density,
    pairwise_distances,
)

EPS = float(np.finfo(np.float32).eps)

# Jitted entry points (eager op-by-op dispatch would dominate the test time).
recycle_jit = jax.jit(recycle, static_argnames=("max_candidates", "max_clusters"))
select_jit = jax.jit(select_topk, static_argnames=("capacity",))
rank_jit = jax.jit(matrix_rank)
raters_jit = jax.jit(text_raters)


def _b(x, dtype=None):
    """Add a leading batch axis of 1."""
    return jnp.asarray(np.asarray(x)[None], dtype)


# ---------------------------------------------------------------------------------------------
# Straightforward numpy version of SPEC §4 (dynamic shapes, loops), for one example.
# ---------------------------------------------------------------------------------------------


def np_recycle(hidden: np.ndarray, scores: np.ndarray, valid: np.ndarray, kept: np.ndarray):
    """Returns (recycled [c, D], centre slots [c], candidate slots [n_cand])."""
    d = hidden.shape[-1]
    pruned = [i for i in range(len(scores)) if valid[i] and not kept[i]]
    if not pruned:
        return np.zeros((0, d), np.float32), [], []
    n_cand = int(0.3 * len(pruned)) + 1
    cand = sorted(pruned, key=lambda i: (-float(scores[i]), i))[:n_cand]
    x = hidden[cand].astype(np.float32)
    m = len(cand)
    c = m // 10 + 1
    dist = np.zeros((m, m), np.float32)
    for i in range(m):
        for j in range(m):
            dist[i, j] = np.sqrt(np.sum((x[i] - x[j]) ** 2)) / np.float32(np.sqrt(d))
    density = np.array([np.exp(-np.mean(np.sort(dist[i])[:c] ** 2)) for i in range(m)])
    dmax = dist.max()

    def denser(j: int, i: int) -> bool:  # SPEC §4 [decision]: equal densities -> lower index
        return density[j] > density[i] or (density[j] == density[i] and j < i)

    delta = np.array(
        [min([dist[i, j] for j in range(m) if denser(j, i)], default=dmax) for i in range(m)]
    )
    score = delta * density
    centres = sorted(range(m), key=lambda i: (-float(score[i]), i))[:c]
    assign = [int(np.argmin([dist[ci, i] for ci in centres])) for i in range(m)]
    for r, ci in enumerate(centres):
        assign[ci] = r
    assign = np.array(assign)
    recycled = np.stack(
        [
            x[assign == r].sum(0) / (np.float32((assign == r).sum()) + np.float32(1e-6))
            for r in range(c)
        ]
    )
    return recycled, [cand[ci] for ci in centres], cand


def _run_recycle(hidden, scores, valid, kept, mc=None, rc=None):
    v = hidden.shape[1]
    mc = max_candidates_for(v) if mc is None else mc
    rc = max_clusters_for(mc) if rc is None else rc
    return recycle_jit(
        jnp.asarray(hidden, jnp.float32),
        jnp.asarray(scores, jnp.float32),
        jnp.asarray(valid, bool),
        jnp.asarray(kept, bool),
        max_candidates=mc,
        max_clusters=rc,
    )


# ---------------------------------------------------------------------------------------------
# matrix_rank / budgets
# ---------------------------------------------------------------------------------------------


def test_matrix_rank_known_rank_and_padding():
    rng = np.random.default_rng(0)
    t, v, r = 9, 30, 4
    a = (rng.normal(size=(t, r)) @ rng.normal(size=(r, v))).astype(np.float32)
    rank, margin = rank_jit(_b(a), jnp.ones((1, t), bool), jnp.ones((1, v), bool))
    assert int(rank[0]) == r == np.linalg.matrix_rank(a)
    assert float(margin[0]) > 10 * EPS

    # Embed in a larger padded matrix (garbage in padding rows / cols) at scattered positions.
    rows = np.sort(rng.choice(16, size=t, replace=False))
    cols = np.sort(rng.choice(50, size=v, replace=False))
    big = rng.normal(size=(16, 50)).astype(np.float32) * 100
    big[np.ix_(rows, cols)] = a
    rmask = np.zeros(16, bool)
    rmask[rows] = True
    cmask = np.zeros(50, bool)
    cmask[cols] = True
    rank_p, _ = rank_jit(_b(big), _b(rmask), _b(cmask))
    assert int(rank_p[0]) == r


def test_matrix_rank_full_and_zero():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5, 12)).astype(np.float32)
    rank, _ = rank_jit(_b(a), jnp.ones((1, 5), bool), jnp.ones((1, 12), bool))
    assert int(rank[0]) == 5
    z = np.zeros((5, 12), np.float32)
    rank, margin = rank_jit(_b(z), jnp.ones((1, 5), bool), jnp.ones((1, 12), bool))
    assert int(rank[0]) == 0 and np.isinf(float(margin[0]))
    # No valid rows at all.
    rank, _ = rank_jit(_b(a), jnp.zeros((1, 5), bool), jnp.ones((1, 12), bool))
    assert int(rank[0]) == 0


def test_matrix_rank_tolerance_uses_true_sizes():
    # Singular values 1, 1, 1, 10 eps: tol with the true 4x4 size is 4 eps -> rank 4;
    # with the padded 64x64 size it would be 64 eps -> rank 3.
    small = np.diag(np.float32([1.0, 1.0, 1.0, 10 * EPS]))
    assert np.linalg.matrix_rank(small) == 4
    big = np.zeros((64, 64), np.float32)
    big[:4, :4] = small
    rmask = np.arange(64) < 4
    rank, _ = rank_jit(_b(big), _b(rmask), _b(rmask))
    assert int(rank[0]) == 4
    rank_wrong, _ = rank_jit(_b(big), jnp.ones((1, 64), bool), jnp.ones((1, 64), bool))
    assert int(rank_wrong[0]) == 3
    # More valid columns than rows: cols drive the tolerance (rows 4, cols 20 -> 20 eps).
    cmask = np.arange(64) < 20
    rank_c, _ = rank_jit(_b(big), _b(rmask), _b(cmask))
    assert int(rank_c[0]) == 3


def test_matrix_rank_batched_equals_single():
    rng = np.random.default_rng(2)
    mats = []
    for r in (1, 3, 6):
        mats.append((rng.normal(size=(8, r)) @ rng.normal(size=(r, 20))).astype(np.float32))
    batch = jnp.asarray(np.stack(mats))
    ranks, _ = rank_jit(batch, jnp.ones((3, 8), bool), jnp.ones((3, 20), bool))
    assert ranks.tolist() == [1, 3, 6]


def test_budget_table_python_floats():
    t = budget_table(13.5, 0, 6)
    assert t.dtype == np.int32
    assert t.tolist() == [int(r * 13.5) for r in range(7)] == [0, 13, 27, 40, 54, 67, 81]
    assert budget_table(0.8, 0, 10).tolist() == [int(r * 0.8) for r in range(11)]
    assert budget_table(9, 6, 3).tolist() == [6, 15, 24, 33]
    assert budget_table(1.0, -3.5, 5).tolist() == [0, 0, 0, 0, 0, 1]


def test_rank_budget():
    table = budget_table(13.5, 0, 64)
    rank = jnp.array([4, 10, 20, 5], jnp.int32)
    n_vis = jnp.array([576, 100, 20, 200], jnp.int32)
    k = rank_budget(rank, n_vis, table)
    # 4 -> 54; 10 -> 135 capped at 99; V - r == 0 -> keep all 20; 5 -> 67.
    assert k.tolist() == [54, 99, 20, 67]
    assert fixed_budget(jnp.array([576, 100]), 300).tolist() == [300, 99]


def test_num_candidates_matches_python_float():
    n = np.arange(1, 20000)
    expected = np.array([int(0.3 * i) + 1 for i in n.tolist()])
    assert np.array_equal(np.asarray(num_candidates(jnp.asarray(n, jnp.int32))), expected)
    assert int(num_candidates(jnp.array([0]))[0]) == 0
    assert max_candidates_for(575) == 173 and max_clusters_for(173) == 18


# ---------------------------------------------------------------------------------------------
# raters / scores
# ---------------------------------------------------------------------------------------------


def test_text_raters_crafted():
    vis = np.zeros((3, 4), np.float32)
    vis[:, 0] = 1.0
    txt = np.zeros((5, 4), np.float32)
    txt[0, 0] = 10.0  # relevant text token
    txt[3, 0] = 100.0  # padding, would dominate if not masked
    txt[4, 0] = 5.0  # padding
    mask = np.array([True, True, True, False, False])
    raters = raters_jit(_b(vis), _b(txt), _b(mask))
    assert raters[0].tolist() == [True, False, False, False, False]

    # Two relevant tokens out of four.
    txt2 = np.zeros((4, 4), np.float32)
    txt2[1, 0] = 3.0
    txt2[2, 0] = 3.0
    raters2 = raters_jit(_b(vis), _b(txt2), jnp.ones((1, 4), bool))
    assert raters2[0].tolist() == [False, True, True, False]

    # A single text token is never a rater (m == mean).
    assert not bool(raters_jit(_b(vis), _b(txt[:1]), jnp.ones((1, 1), bool))[0, 0])


def _np_raters(vis, txt):
    m = vis.astype(np.float64) @ txt.astype(np.float64).T
    m = np.exp(m - m.max(1, keepdims=True))
    m = (m / m.sum(1, keepdims=True)).mean(0)
    return m > m.mean()


def test_text_raters_random_and_padding():
    rng = np.random.default_rng(3)
    vis = rng.normal(size=(2, 6, 8)).astype(np.float32)
    txt = rng.normal(size=(2, 10, 8)).astype(np.float32)
    lens = [10, 7]
    mask = np.arange(10)[None, :] < np.array(lens)[:, None]
    raters, margin = jax.jit(text_raters_with_margin)(
        jnp.asarray(vis), jnp.asarray(txt), jnp.asarray(mask)
    )
    assert np.all(np.asarray(margin) > 1e-4)
    for b, n in enumerate(lens):
        expected = _np_raters(vis[b], txt[b, :n])
        assert np.asarray(raters[b, :n]).tolist() == expected.tolist()
        assert not np.any(np.asarray(raters[b, n:]))
        single = raters_jit(
            jnp.asarray(vis[b : b + 1]), jnp.asarray(txt[b : b + 1, :n]), jnp.ones((1, n), bool)
        )
        assert np.asarray(single[0]).tolist() == expected.tolist()


def test_rater_scores():
    attn = np.arange(24, dtype=np.float32).reshape(1, 4, 6)
    raters = np.array([[True, False, True, False]])
    vmask = np.array([[True, True, True, True, False, True]])
    s = np.asarray(rater_scores(jnp.asarray(attn), jnp.asarray(raters), jnp.asarray(vmask)))
    expected = (attn[0, 0] + attn[0, 2]) / 2
    assert np.allclose(s[0, vmask[0]], expected[vmask[0]])
    assert s[0, 4] == -np.inf


# ---------------------------------------------------------------------------------------------
# select_topk
# ---------------------------------------------------------------------------------------------


def test_select_topk_ties_lower_index_and_ascending():
    scores = jnp.array([[0.5, 0.9, 0.5, 0.5, 0.1, 0.5]])
    out = select_jit(scores, jnp.array([3]), capacity=5)
    assert out.kept_idx.tolist() == [[0, 1, 2, 0, 0]]
    assert out.kept_mask.tolist() == [[True, True, True, False, False]]
    assert out.n_kept.tolist() == [3] and out.overflow.tolist() == [0]
    assert out.keep_mask_full.tolist() == [[True, True, True, False, False, False]]
    # Signed zeros tie too.
    z = select_jit(jnp.array([[-0.0, 0.0, -0.0, 1.0]]), jnp.array([2]), capacity=3)
    assert z.kept_idx.tolist() == [[0, 3, 0]]


def test_select_topk_invalid_never_chosen_and_overflow():
    scores = jnp.array([[0.1, 9.0, 0.3, 0.2, 0.4], [0.5, 0.4, 0.3, 0.2, 0.1]])
    vmask = jnp.array([[True, False, True, True, True], [True, True, True, False, False]])
    out = select_jit(scores, jnp.array([3, 5]), capacity=4, vis_mask=vmask)
    assert out.kept_idx.tolist() == [[2, 3, 4, 0], [0, 1, 2, 0]]
    assert out.n_kept.tolist() == [3, 3]
    assert out.overflow.tolist() == [0, 1]
    assert not bool(out.keep_mask_full[0, 1])
    # Capacity below k: top-C kept, overflow counted.
    out2 = select_jit(scores[:1], jnp.array([4]), capacity=2, vis_mask=vmask[:1])
    assert out2.kept_idx.tolist() == [[2, 4]] and out2.overflow.tolist() == [2]
    # -inf marks invalid slots by default (as rater_scores produces).
    inf_scores = jnp.where(vmask, scores, -jnp.inf)
    out3 = select_jit(inf_scores, jnp.array([3, 5]), capacity=4)
    assert out3.kept_idx.tolist() == out.kept_idx.tolist()
    # Capacity larger than V pads with 0 / False.
    out4 = select_jit(scores, jnp.array([2, 2]), capacity=7, vis_mask=vmask)
    assert out4.kept_idx.shape == (2, 7) and out4.kept_mask.sum(-1).tolist() == [2, 2]


def test_select_topk_matches_sorting_random():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 5, size=(4, 40)).astype(np.float32)  # many ties
    vmask = rng.random((4, 40)) < 0.8
    k = np.array([0, 5, 17, 40])
    out = select_jit(jnp.asarray(scores), jnp.asarray(k), capacity=30, vis_mask=jnp.asarray(vmask))
    for b in range(4):
        valid = [i for i in range(40) if vmask[b, i]]
        top = sorted(valid, key=lambda i: (-scores[b, i], i))[: min(k[b], 30)]
        n = len(top)
        assert np.asarray(out.kept_idx[b, :n]).tolist() == sorted(top)
        assert int(out.n_kept[b]) == n


def test_margins():
    bm = jax.jit(boundary_margin)
    m = bm(jnp.array([[3.0, 2.0, 2.0, 1.0]]), jnp.array([2]), jnp.array([4]))
    assert np.isclose(float(m[0]), 1 / 3)
    m = bm(jnp.array([[3.0, 2.0, 1.0, 0.5]]), jnp.array([2]), jnp.array([3]))
    assert np.isclose(float(m[0]), 1 / 3)
    m = bm(jnp.array([[2.0, 2.0, 2.0, 0.0]]), jnp.array([1]), jnp.array([3]))
    assert np.isinf(float(m[0]))  # exact ties only
    g = jax.jit(distinct_gap_margin)(
        jnp.array([[4.0, 1.0, 3.5, 1.0, 9.0]]), jnp.array([[1, 1, 1, 1, 0]], bool)
    )
    assert np.isclose(float(g[0]), 0.5 / 4)
    t = select_jit(jnp.array([[1.0, 0.9, 0.5, 0.1, 0.0, 0.0]]), jnp.array([1]), capacity=5)
    assert np.isclose(float(t.margin[0]), 0.1)


def test_gather_slots():
    x = jnp.arange(2 * 5 * 3).reshape(2, 5, 3)
    idx = jnp.array([[4, 0], [1, 1]])
    out = gather_slots(x, idx)
    assert out.shape == (2, 2, 3)
    assert np.array_equal(out[0, 0], x[0, 4]) and np.array_equal(out[1, 1], x[1, 1])


# ---------------------------------------------------------------------------------------------
# recycle
# ---------------------------------------------------------------------------------------------


def test_knn_density_with_a_bound_on_k_equals_numpy():
    # Only the max_k smallest distances per row are found (top_k); k <= max_k varies by row.
    rng = np.random.default_rng(3)
    b, m, d, max_k = 3, 40, 8, 5
    x = rng.normal(size=(b, m, d)).astype(np.float32)
    x[0, 1] = x[0, 0]  # a duplicated point: distance 0 off the diagonal
    n_valid = np.array([40, 23, 2])
    mask = np.arange(m)[None] < n_valid[:, None]
    k = np.array([5, 3, 2], np.int32)
    dist = pairwise_distances(jnp.asarray(x))
    got = np.asarray(jax.jit(knn_density, static_argnums=3)(dist, mask, k, max_k))
    dn = np.asarray(dist, np.float64)
    for i in range(b):
        for j in range(m):
            if not mask[i, j]:
                assert got[i, j] == 0.0
                continue
            row = np.sort(dn[i, j][mask[i]])[: k[i]]
            np.testing.assert_allclose(got[i, j], np.exp(-np.mean(row**2)), rtol=1e-5)
    assert got[0, 0] == got[0, 1]  # equal rows stay exactly equal (the tie rule needs it)
    full = np.asarray(jax.jit(knn_density)(dist, mask, k))  # max_k = M: the same values
    np.testing.assert_allclose(full, got, rtol=1e-6)


def test_dpc_knn_pieces_on_a_line():
    # Points 0, 1, 3 on a line (D = 1, so distances are not rescaled), k = 2 neighbours.
    @jax.jit
    def pieces(x, mask, k):
        dist = pairwise_distances(x)
        rho = knn_density(dist, mask, k)
        delta = density_delta(dist, rho, mask)
        return dist, rho, delta, density_margin(dist, rho, delta, mask)

    x = jnp.array([[[0.0], [1.0], [3.0], [50.0]]])
    mask = jnp.array([[True, True, True, False]])  # the far point is padding
    dist, rho, delta, margin = pieces(x, mask, jnp.array([2]))
    assert float(dist[0, 2, 2]) == 0.0 and float(dist[0, 0, 2]) == 3.0
    e = np.exp(np.float32([-0.5, -0.5, -2.0]))
    np.testing.assert_allclose(rho[0, :3], e, rtol=1e-6)
    assert float(rho[0, 0]) == float(rho[0, 1])  # exact tie: the lower index counts as denser
    # 0 has no denser point -> max valid distance 3 (not 50); 1 -> 0 at 1; 2 -> 1 at 2.
    assert delta[0, :3].tolist() == [3.0, 1.0, 2.0]
    np.testing.assert_allclose(float(margin[0]), (e[0] - e[2]) / e[0], rtol=1e-5)


def test_recycle_nothing_pruned():
    rng = np.random.default_rng(5)
    h = rng.normal(size=(1, 8, 4)).astype(np.float32)
    s = rng.random((1, 8)).astype(np.float32)
    valid = np.ones((1, 8), bool)
    out = _run_recycle(h, s, valid, valid)
    assert out.n_recycled.tolist() == [0] and out.n_pruned.tolist() == [0]
    assert not np.any(np.asarray(out.recycled_mask))
    assert np.all(np.asarray(out.recycled) == 0)


def test_recycle_single_pruned_token():
    rng = np.random.default_rng(6)
    h = rng.normal(size=(1, 8, 4)).astype(np.float32)
    s = rng.random((1, 8)).astype(np.float32)
    valid = np.ones((1, 8), bool)
    kept = valid.copy()
    kept[0, 5] = False
    out = _run_recycle(h, s, valid, kept)
    assert out.n_recycled.tolist() == [1] and out.n_candidates.tolist() == [1]
    assert out.recycled_mask[0].tolist() == [True] + [False] * (out.recycled.shape[1] - 1)
    np.testing.assert_allclose(out.recycled[0, 0], h[0, 5] / np.float32(1 + 1e-6), rtol=1e-7)
    assert int(out.centre_slots[0, 0]) == 5


def test_recycle_one_cluster_centre_is_best_candidate():
    # 8 pruned -> int(2.4) + 1 = 3 candidates -> 1 cluster. With c = 1 every density is
    # exp(-0) = 1 exactly; equal densities order by index, so the best-scored candidate is the
    # only one with no denser point, gets the largest delta and is the centre.
    rng = np.random.default_rng(13)
    h = rng.normal(size=(1, 8, 4)).astype(np.float32)
    s = np.array([[0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.6, 0.4]], np.float32)
    valid = np.ones((1, 8), bool)
    out = _run_recycle(h, s, valid, np.zeros((1, 8), bool))
    assert out.n_candidates.tolist() == [3] and out.n_recycled.tolist() == [1]
    assert out.candidate_slots[0, :3].tolist() == [1, 4, 6]
    assert int(out.centre_slots[0, 0]) == 1
    expected = h[0, [1, 4, 6]].sum(0) / np.float32(3 + 1e-6)
    np.testing.assert_allclose(out.recycled[0, 0], expected, rtol=1e-6)
    assert float(out.centre_margin[0]) > 0.1


def test_recycle_well_separated_clusters():
    rng = np.random.default_rng(7)
    v, d = 96, 16
    h = rng.normal(size=(v, d)).astype(np.float32) * 50  # non-candidates: anywhere
    s = np.linspace(1.0, 0.0, v).astype(np.float32)  # slot i has the i-th best score
    kept = np.zeros(v, bool)
    kept[:10] = True  # 86 pruned -> 26 candidates (slots 10..35) -> 3 clusters
    blob_centres = np.zeros((3, d), np.float32)
    blob_centres[0, 0] = 10.0
    blob_centres[1, 1] = 10.0
    blob_centres[2, :] = -10.0
    sizes = [12, 8, 6]
    labels = np.repeat(np.arange(3), sizes)
    rng.shuffle(labels)
    h[10:36] = blob_centres[labels] + rng.normal(size=(26, d)).astype(np.float32) * 0.05
    out = _run_recycle(h[None], s[None], np.ones((1, v), bool), kept[None])
    assert out.n_pruned.tolist() == [86] and out.n_candidates.tolist() == [26]
    assert out.n_recycled.tolist() == [3]
    recycled = np.asarray(out.recycled[0, :3])
    found = set()
    for j in range(3):
        lab = int(np.argmin(np.linalg.norm(blob_centres - recycled[j], axis=-1)))
        found.add(lab)
        members = h[10:36][labels == lab]
        expected = members.sum(0) / (np.float32(len(members)) + np.float32(1e-6))
        np.testing.assert_allclose(recycled[j], expected, rtol=1e-5, atol=1e-5)
        # Centre slot is a member of its own cluster.
        assert labels[int(out.centre_slots[0, j]) - 10] == lab
    assert found == {0, 1, 2}
    assert float(out.centre_margin[0]) > 1e-3


def _random_case(rng, v, d, n_keep_max):
    h = rng.normal(size=(v, d)).astype(np.float32)
    s = rng.random(v).astype(np.float32)
    valid = rng.random(v) < 0.85
    kept = np.zeros(v, bool)
    valid_idx = np.flatnonzero(valid)
    n_keep = rng.integers(0, min(n_keep_max, len(valid_idx)) + 1)
    kept[rng.choice(valid_idx, size=n_keep, replace=False)] = True
    return h, s, valid, kept


def test_recycle_matches_numpy_reference():
    rng = np.random.default_rng(8)
    v, d, bsz = 96, 16, 6
    compared = 0
    cache_sizes = []
    for _ in range(4):
        cases = [_random_case(rng, v, d, 40) for _ in range(bsz)]
        h, s, valid, kept = (np.stack(z) for z in zip(*cases, strict=True))
        out = _run_recycle(h, s, valid, kept)
        cache_sizes.append(recycle_jit._cache_size())
        for b in range(bsz):
            margins = [
                float(out.candidate_margin[b]),
                float(out.density_margin[b]),
                float(out.centre_margin[b]),
                float(out.assign_margin[b]),
            ]
            if min(margins) < 1e-4:
                continue
            ref, ref_centres, ref_cand = np_recycle(h[b], s[b], valid[b], kept[b])
            c = len(ref_centres)
            assert int(out.n_recycled[b]) == c
            assert np.asarray(out.candidate_slots[b, : len(ref_cand)]).tolist() == ref_cand
            assert np.asarray(out.centre_slots[b, :c]).tolist() == ref_centres
            np.testing.assert_allclose(np.asarray(out.recycled[b, :c]), ref, rtol=1e-5, atol=1e-6)
            assert not np.any(np.asarray(out.recycled_mask[b, c:]))
            compared += 1
    assert compared >= 16
    assert len(set(cache_sizes)) == 1  # new values, same shapes: no recompilation


def test_recycle_padded_slots_same_as_unpadded():
    rng = np.random.default_rng(9)
    v, d, v_pad, bsz = 60, 16, 96, 6
    h, s, valid, kept = _random_case(rng, v, d, 20)
    valid[:] = True
    kept[:] = False
    kept[rng.choice(v, size=15, replace=False)] = True
    # Scatter the 60 slots (in order) into 96, garbage in the padding slots.
    pos = np.sort(rng.choice(v_pad, size=v, replace=False))
    hp = rng.normal(size=(v_pad, d)).astype(np.float32) * 1e3
    sp = np.full(v_pad, 1e9, np.float32)
    vp = np.zeros(v_pad, bool)
    kp = rng.random(v_pad) < 0.5
    hp[pos], sp[pos], vp[pos], kp[pos] = h, s, valid, kept
    # Batch row 1 is the padded example; the other rows are unrelated examples.
    cases = [_random_case(rng, v_pad, d, 40) for _ in range(bsz)]
    cases[1] = (hp, sp, vp, kp)
    a = _run_recycle(h[None], s[None], valid[None], kept[None])
    p = _run_recycle(*(np.stack(z) for z in zip(*cases, strict=True)))
    c = int(a.n_recycled[0])
    assert c >= 2 and int(p.n_recycled[1]) == c
    assert (
        pos[np.asarray(a.centre_slots[0, :c])].tolist()
        == np.asarray(p.centre_slots[1, :c]).tolist()
    )
    np.testing.assert_array_equal(np.asarray(a.recycled[0, :c]), np.asarray(p.recycled[1, :c]))
    assert not np.any(np.asarray(p.recycled_mask[1, c:]))

    # Batched == alone for another row.
    h2, s2, valid2, kept2 = cases[3]
    alone = _run_recycle(h2[None], s2[None], valid2[None], kept2[None])
    assert int(alone.n_recycled[0]) == int(p.n_recycled[3])
    np.testing.assert_array_equal(np.asarray(alone.recycled[0]), np.asarray(p.recycled[3]))


def test_recycle_small_static_capacity_clips_candidates():
    rng = np.random.default_rng(10)
    h, s, valid, kept = _random_case(rng, 80, 8, 5)
    out = _run_recycle(h[None], s[None], valid[None], kept[None], mc=5, rc=1)
    n_full = int(num_candidates(out.n_pruned)[0])
    assert out.n_candidates.tolist() == [5]
    assert out.candidate_overflow.tolist() == [n_full - 5]
    assert out.n_recycled.tolist() == [1]


# ---------------------------------------------------------------------------------------------
# Whole chain under jit, no recompilation
# ---------------------------------------------------------------------------------------------


def test_pipeline_jit_no_recompile():
    traces = []
    table = jnp.asarray(budget_table(9.0, 6.0, 64))

    def step(vis, txt, tmask, attn, hidden, vmask):
        traces.append(1)
        raters = text_raters(vis, txt, tmask)
        scores = rater_scores(attn, raters, vmask)
        rank, _ = matrix_rank(attn, raters, vmask)
        k = rank_budget(rank, vmask.sum(-1), table)
        top = select_topk(scores, k, capacity=vmask.shape[1] - 1, vis_mask=vmask)
        mc = max_candidates_for(vmask.shape[1])
        rec = recycle(hidden, scores, vmask, top.keep_mask_full, mc, max_clusters_for(mc))
        return top.kept_idx, top.n_kept, rec.recycled, rec.n_recycled, rank

    fn = jax.jit(step)
    rng = np.random.default_rng(11)
    bsz, v, t, d = 2, 48, 10, 16
    outs = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        args = (
            rng.normal(size=(bsz, v, d)).astype(np.float32),
            rng.normal(size=(bsz, t, d)).astype(np.float32),
            np.arange(t)[None, :] < np.array([[t], [t - 3]]).reshape(bsz, 1),
            rng.dirichlet(np.ones(v), size=(bsz, t)).astype(np.float32) * 0.5,
            rng.normal(size=(bsz, v, d)).astype(np.float32),
            rng.random((bsz, v)) < 0.9,
        )
        outs.append(jax.block_until_ready(fn(*args)))
    assert len(traces) == 1 and fn._cache_size() == 1
    kept_idx, n_kept, _, n_rec, rank = outs[1]
    assert np.all(np.asarray(n_kept) > 0) and np.all(np.asarray(n_rec) >= 1)
    assert np.all(np.asarray(rank) > 0)


@pytest.mark.parametrize("capacity", [3, 8])
def test_select_topk_jit_no_recompile(capacity):
    fn = jax.jit(lambda s, k: select_topk(s, k, capacity))
    rng = np.random.default_rng(12)
    for _ in range(3):
        fn(jnp.asarray(rng.random((2, 10)), jnp.float32), jnp.array([2, 9]))
    assert fn._cache_size() == 1
