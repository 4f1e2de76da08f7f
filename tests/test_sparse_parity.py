"""SparseVLM v1 in JAX (`exact` and `static` capacity) against the PyTorch reference.

Tiny float32 LLaVAs (24 layers so the default pruning layers 2, 6, 15, 19 apply, 64 visual
tokens) with q/k projections drawn at std 0.3, token embeddings at std 1 and projector
weights at std 0.5: at the usual 0.02 attention is nearly uniform, text and image embeddings
nearly alike, and two implementations flip decisions on rounding. Every case asserts that its
decisions are clear of float32 noise and that pruning and recycling happened.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import IMAGE_TOKEN, random_pixels, save_tiny_llava, tiny_llava

from sparsevlm_jax.batch import make_batch
from sparsevlm_jax.generate import compile_counts, decode_jit, prefill, prefill_jit
from sparsevlm_jax.sparse.config import SparseConfig

torch = pytest.importorskip("torch")
ref = pytest.importorskip("sparsevlm_jax.reference")

LAYERS = (2, 6, 15, 19)
IMAGE = 112  # 8x8 patches = 64 visual tokens
PRESETS = {  # name -> (scale, bias): SPEC §6's three named budgets and two more
    "192": (13.5, 0.0),
    "128": (9.0, 6.0),
    "64": (0.8, 0.0),
    "scale2": (2.0, 0.0),
    "half": (0.5, 0.0),  # drives V below the number of raters, so rank < #raters
}
EXAMPLES = [  # (prefix, text) token ids around the image; one bucket (P=8, T=16)
    ([1, 7, 8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
    ([1, 30], [31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44]),
    ([1, 50, 51, 52], [53, 54, 55, 56, 57, 58, 59, 60]),
    ([1, 61, 62], list(range(70, 86))),
]
MODEL_SEEDS = (0, 1)
NEW_TOKENS = 8
# Relative margins below these would let float32 rounding decide (SPEC §3 tolerance for rank).
DECISION_MARGIN = 1e-4
RANK_MARGIN = 1e-6


@functools.cache
def model_and_params(seed: int):
    import tempfile

    from convert import load_transformers

    model = tiny_llava(
        num_layers=24, image_size=IMAGE, seed=seed, qk_std=0.3, embed_std=1.0, projector_std=0.5
    )
    d = save_tiny_llava(model, tempfile.mkdtemp(prefix="parity-") + "/hf")
    params, cfg = load_transformers(d, dtype="float32")
    return model, params, cfg


def v1(name: str, **kw) -> SparseConfig:
    """v1 at a preset, `exact` capacity unless `kw` says otherwise."""
    scale, bias = PRESETS[name]
    kw = {"capacity": "exact", **kw}
    return SparseConfig(method="v1", layers=LAYERS, scale=scale, bias=bias, **kw)


def pixels() -> np.ndarray:
    return random_pixels(len(EXAMPLES), IMAGE, seed=42)


# The other methods (SPEC §3-§7) on the same models, schedules sized for 64 visual tokens.
FIXED_LAYERS = (2, 6, 15)
SCHEDULE = (40, 20, 8)
METHODS = {
    "v1_5": (
        SparseConfig(method="v1_5", layers=FIXED_LAYERS, schedule=SCHEDULE),
        ref.RefSparseParams(method="v1_5", layers=FIXED_LAYERS, schedule=SCHEDULE),
    ),
    "v2_0": (
        SparseConfig(method="v2_0", layers=FIXED_LAYERS, schedule=SCHEDULE),
        ref.RefSparseParams(method="v2_0", layers=FIXED_LAYERS, schedule=SCHEDULE),
    ),
    "fastv": (
        SparseConfig(method="fastv", layers=(1,), fastv_ratio=0.5),
        ref.RefSparseParams(method="fastv", layers=(1,), fastv_ratio=0.5),
    ),
}


def ref_params(preset: str):
    if preset in METHODS:
        return METHODS[preset][1]
    scale, bias = PRESETS[preset]
    return ref.RefSparseParams(method="v1", layers=LAYERS, scale=scale, bias=bias)


@functools.cache
def reference(seed: int, preset: str, i: int):
    model, _, cfg = model_and_params(seed)
    prefix, text = EXAMPLES[i]
    ids = torch.tensor([prefix + [IMAGE_TOKEN] * cfg.num_image_tokens + text])
    pix = torch.tensor(pixels()[i : i + 1]).permute(0, 3, 1, 2)
    return ref.reference_generate(model, ids, pix, ref_params(preset), max_new_tokens=NEW_TOKENS)


def run_jax(params, cfg, sparse: SparseConfig, rows: list[int]):
    """(final-sequence logits per example [n_valid, vocab], greedy tokens, host stats)."""
    batch, n = make_batch(
        [EXAMPLES[i][0] for i in rows], [EXAMPLES[i][1] for i in rows], pixels()[rows]
    )
    logits, cache, stats, _ = prefill(params, batch, cfg, sparse, NEW_TOKENS, True)
    valid = np.asarray(cache.valid[-1][:, : cache.prefill_len[-1]])
    per_example = [np.asarray(logits[j])[valid[j]] for j in range(n)]
    last = jnp.stack([logits[j, np.flatnonzero(valid[j])[-1]] for j in range(logits.shape[0])])
    tokens, _, _ = decode_jit(
        params, cache, last, jax.random.PRNGKey(0), 0.0, 1.0, cfg, NEW_TOKENS, ()
    )
    return per_example, np.asarray(tokens)[:n], {k: np.asarray(v)[:n] for k, v in stats.items()}


def boundary_gap(scores: np.ndarray, n: int, among: list[int]) -> float:
    """Relative gap between the n-th and (n+1)-th best of `among` (relative to those two
    scores: a score's float32 error is relative to itself, not to the largest score)."""
    if n == 0 or n >= len(among):
        return np.inf
    ranked = sorted(among, key=lambda i: (-scores[i], i))
    a, b = float(scores[ranked[n - 1]]), float(scores[ranked[n]])
    return (a - b) / max(abs(a), abs(b))


def assert_clear_decisions(r) -> None:
    """The reference's margins (SPEC decisions) are far above float32 rounding."""
    m = r.margins
    assert m.get("rank", 1.0) > RANK_MARGIN, m
    for kind in ("raters", "heads", "centres", "assignment", "density"):
        assert m.get(kind, 1.0) > DECISION_MARGIN, (kind, m)
    for rec in r.prunes:
        s = rec.scores.numpy()
        assert boundary_gap(s, rec.budget, list(range(rec.v_in))) > DECISION_MARGIN
        if not rec.candidates:
            continue
        pruned = sorted(set(range(rec.v_in)) - set(rec.kept))
        assert boundary_gap(s, len(rec.candidates), pruned) > DECISION_MARGIN


def assert_same_decisions(stats: dict, j: int, r, check_raters: bool = True) -> None:
    if check_raters:
        assert np.flatnonzero(stats["raters"][j]).tolist() == list(r.raters)
    for li, rec in enumerate(r.prunes):
        if rec.rank is not None:
            assert int(stats["rank"][j, li]) == rec.rank, (li, rec.layer)
        assert int(stats["budget"][j, li]) == rec.budget, (li, rec.layer)
        kept = [int(x) for x in stats["kept"][j, li] if x >= 0]
        assert kept == list(rec.kept), (li, rec.layer)
        assert int(stats["recycled"][j, li]) == rec.n_recycled, (li, rec.layer)
        assert int(stats["overflow"][j, li]) == 0
        assert int(stats["recycled_overflow"][j, li]) == 0
    assert stats["visual_counts"][j].tolist() == list(r.visual_counts)
    assert np.isclose(float(stats["equivalent_tokens"][j]), r.equivalent_tokens)


@pytest.mark.parametrize("capacity", ["exact", "bucketed"])
@pytest.mark.parametrize("seed", MODEL_SEEDS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_exact_and_bucketed_match_reference(seed, preset, capacity):
    """4 examples per (model seed, preset): 40 cases in all, batched (one program for
    `exact`; stage programs sized by the batch's largest budget for `bucketed`)."""
    _, params, cfg = model_and_params(seed)
    sparse = v1(preset, capacity=capacity)
    logits, tokens, stats = run_jax(params, cfg, sparse, list(range(len(EXAMPLES))))
    for j in range(len(EXAMPLES)):
        toks, r = reference(seed, preset, j)
        assert_clear_decisions(r)
        assert_same_decisions(stats, j, r)
        assert logits[j].shape == tuple(r.logits.shape)
        np.testing.assert_allclose(logits[j], r.logits.numpy(), atol=1e-4, rtol=0)
        assert tokens[j].tolist() == toks


@pytest.mark.parametrize("method", list(METHODS))
def test_other_methods_match_reference(method):
    """v1.5, v2.0 (gravity-corrected top heads, original positions) and FastV, static
    capacities equal to what they keep: identical kept indices per layer, logits, tokens."""
    sparse, _ = METHODS[method]
    _, params, cfg = model_and_params(0)
    sparse = sparse.with_static_shape(
        sparse.schedule or (round(cfg.num_image_tokens * (1 - sparse.fastv_ratio)),),
        cfg.num_image_tokens,
    )
    logits, tokens, stats = run_jax(params, cfg, sparse, list(range(len(EXAMPLES))))
    for j in range(len(EXAMPLES)):
        toks, r = reference(0, method, j)
        assert_clear_decisions(r)
        assert all(rec.pruned for rec in r.prunes)
        assert_same_decisions(stats, j, r, check_raters=method != "fastv")
        np.testing.assert_allclose(logits[j], r.logits.numpy(), atol=1e-4, rtol=0)
        assert tokens[j].tolist() == toks
    if method == "v2_0":  # nothing recycled, and later layers' caches hold original positions
        assert (stats["recycled"] == 0).all()


def test_random_keeps_the_scheduled_counts():
    """The random baseline draws with JAX's RNG (the reference uses numpy's), so only the
    counts are comparable: kept = min(schedule, V), nothing recycled, seeded."""
    _, params, cfg = model_and_params(0)
    sparse = SparseConfig(method="random", layers=FIXED_LAYERS, schedule=SCHEDULE, seed=3)
    _, _, a = run_jax(params, cfg, sparse.with_static_shape(SCHEDULE, 64), [0, 1])
    _, _, b = run_jax(params, cfg, sparse.with_static_shape(SCHEDULE, 64), [0, 1])
    np.testing.assert_array_equal(a["kept"], b["kept"])
    assert a["num_kept"].tolist() == [list(SCHEDULE)] * 2
    assert (a["recycled"] == 0).all()
    _, _, c = run_jax(params, cfg, sparse.replace(seed=4).with_static_shape(SCHEDULE, 64), [0])
    assert not np.array_equal(a["kept"][0], c["kept"][0])


def test_cases_cover_the_edge_cases():
    """Across the parity cases: pruning and recycling at every layer of some case, the keep-all
    branch (V == rank), k = V - 1 (one token pruned, recycled alone), rank < #raters."""
    seen = {"keep_all": 0, "one_pruned": 0, "rank_below_raters": 0, "all_layers_recycle": 0}
    for seed in MODEL_SEEDS:
        for preset in PRESETS:
            for i in range(len(EXAMPLES)):
                _, r = reference(seed, preset, i)
                recs = r.prunes
                seen["all_layers_recycle"] += all(x.pruned and x.n_recycled > 0 for x in recs)
                seen["keep_all"] += any(not x.pruned and x.rank == x.v_in for x in recs)
                seen["one_pruned"] += any(x.pruned and x.budget == x.v_in - 1 for x in recs)
                seen["rank_below_raters"] += any(x.rank < len(r.raters) for x in recs)
    assert all(v > 0 for v in seen.values()), seen


def test_batched_equals_per_example():
    _, params, cfg = model_and_params(0)
    sparse = v1("128")
    batched = run_jax(params, cfg, sparse, [0, 1, 2])
    for j in range(3):
        single = run_jax(params, cfg, sparse, [j])
        np.testing.assert_allclose(single[0][0], batched[0][j], atol=1e-5)
        assert single[1][0].tolist() == batched[1][j].tolist()
        for key in ("raters", "rank", "budget", "kept", "recycled", "visual_counts"):
            np.testing.assert_array_equal(single[2][key][0], batched[2][key][j])


def test_static_capacity_at_or_above_budgets_matches_exact():
    _, params, cfg = model_and_params(1)
    _, exact_tokens, exact = run_jax(params, cfg, v1("128"), [0, 1, 2])
    caps = tuple(int(c) for c in exact["num_kept"].max(axis=0))
    static = v1("128", capacity="static", capacities=caps)
    logits, tokens, stats = run_jax(params, cfg, static, [0, 1, 2])
    for key in ("raters", "rank", "budget", "recycled", "visual_counts", "num_kept"):
        np.testing.assert_array_equal(stats[key], exact[key])
    np.testing.assert_array_equal(
        stats["kept"][:, :, : stats["kept"].shape[2]], exact["kept"][:, :, : stats["kept"].shape[2]]
    )
    assert (stats["overflow"] == 0).all()
    np.testing.assert_array_equal(tokens, exact_tokens)


def test_static_capacity_below_budget_keeps_top_c_and_reports_overflow():
    _, params, cfg = model_and_params(1)
    _, _, exact = run_jax(params, cfg, v1("128"), [0])
    budget0 = int(exact["budget"][0, 0])
    cap = budget0 - 5
    static = v1("128", capacity="static", capacities=(cap, 40, 40, 40))
    _, _, stats = run_jax(params, cfg, static, [0])
    assert int(stats["overflow"][0, 0]) == budget0 - cap
    assert int(stats["num_kept"][0, 0]) == cap
    # top-C by score: the reference's layer-2 scores are those of the same (unpruned) layer.
    _, r = reference(1, "128", 0)
    scores = r.prunes[0].scores.numpy()
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = [int(x) for x in stats["kept"][0, 0] if x >= 0]
    assert kept == sorted(order[:cap])


def test_one_compile_per_bucket_and_config():
    _, params, cfg = model_and_params(0)
    sparse = v1("64")
    run_jax(params, cfg, sparse, [0, 1, 2])
    before = compile_counts()["prefill"]
    _, params1, _ = model_and_params(1)
    for rows in ([1, 2, 0], [2, 0, 1]):  # other prompts and images, other weights
        run_jax(params1, cfg, sparse, rows)
    assert compile_counts()["prefill"] == before


def test_xla_counts_fewer_flops_for_static_prefill():
    _, params, cfg = model_and_params(0)
    cfg = cfg.replace(unroll_layers=True)
    batch, _ = make_batch([EXAMPLES[0][0]], [EXAMPLES[0][1]], pixels()[:1])

    def xla_flops(sparse):
        lowered = prefill_jit.lower(params, batch, cfg, sparse, 1)
        return lowered.compile().cost_analysis()["flops"]

    dense = xla_flops(SparseConfig())
    static = xla_flops(v1("64", capacity="static", capacities=(8, 8, 8, 8)))
    assert static < 0.7 * dense, (static, dense)


def test_calibrated_static_capacities_reproduce_exact():
    from sparsevlm_jax.calibrated import calibrate

    _, params, cfg = model_and_params(0)
    rows = [0, 1, 2, 3]
    batch, n = make_batch(
        [EXAMPLES[i][0] for i in rows], [EXAMPLES[i][1] for i in rows], pixels()[rows]
    )
    static = calibrate(params, cfg, v1("scale2"), [(batch, n)])
    assert static.capacity == "static" and len(static.capacities) == len(LAYERS)
    _, exact_tokens, exact = run_jax(params, cfg, v1("scale2"), rows)
    _, tokens, stats = run_jax(params, cfg, static, rows)
    for key in ("rank", "budget", "num_kept", "recycled", "visual_counts"):
        np.testing.assert_array_equal(stats[key], exact[key])
    assert (stats["overflow"] == 0).all() and (stats["recycled_overflow"] == 0).all()
    np.testing.assert_array_equal(tokens, exact_tokens)
    # The calibrated buffers are exactly as large as the largest observed counts.
    assert static.capacities == tuple(int(c) for c in exact["num_kept"].max(axis=0))


# Decode positions (SPEC §5) and SparseVLM+'s fixed 14 heads (SPEC §6).


def run_jax_positions(params, cfg, sparse: SparseConfig, rows: list[int]):
    """(greedy tokens, next-token position per stage after the prefill [S, n] and after
    decoding [S, n], decode steps taken)."""
    batch, n = make_batch(
        [EXAMPLES[i][0] for i in rows], [EXAMPLES[i][1] for i in rows], pixels()[rows]
    )
    logits, cache, _ = prefill_jit(params, batch, cfg, sparse, NEW_TOKENS, True)
    valid = np.asarray(cache.valid[-1][:, : cache.prefill_len[-1]])
    after_prefill = np.stack([np.asarray(p)[:n] for p in cache.position])  # before donation
    last = jnp.stack([logits[j, np.flatnonzero(valid[j])[-1]] for j in range(logits.shape[0])])
    tokens, _, final = decode_jit(
        params, cache, last, jax.random.PRNGKey(0), 0.0, 1.0, cfg, NEW_TOKENS, ()
    )
    after_decode = np.stack([np.asarray(p)[:n] for p in final.position])
    return np.asarray(tokens)[:n], after_prefill, after_decode, int(final.step)


@pytest.mark.parametrize("method", ["v1", "v1_5", "v2_0"])
def test_decode_positions_match_reference(method):
    """The position each decoded token gets at every stage is the reference's: each layer's
    cache length for v1 / v1.5, N + t at every layer for v2.0 (N = the unpruned prompt
    length, different per example here)."""
    _, params, cfg = model_and_params(0)
    if method == "v1":
        sparse, preset = v1("128"), "128"
    else:
        sparse, preset = METHODS[method][0].with_static_shape(SCHEDULE, 64), method
    rows = [0, 1]
    tokens, after_prefill, after_decode, steps = run_jax_positions(params, cfg, sparse, rows)
    starts = [0, *(layer + 1 for layer in sparse.layers)]
    for j, i in enumerate(rows):
        toks, r = reference(0, preset, i)
        assert tokens[j].tolist() == toks
        assert len(r.decode_positions) == NEW_TOKENS - 1 == steps
        first = [r.decode_positions[0][start] for start in starts]
        assert after_prefill[:, j].tolist() == first
        assert after_decode[:, j].tolist() == [p + steps for p in first]
        for t, per_layer in enumerate(r.decode_positions):
            assert per_layer == tuple(r.decode_positions[0][layer] + t for layer in range(24))
        if method == "v2_0":
            assert set(r.decode_positions[0]) == {r.prompt_len}
            assert r.prompt_len == len(EXAMPLES[i][0]) + 64 + len(EXAMPLES[i][1])


@functools.cache
def wide_model_and_params():
    """The parity model with 16 heads (4 KV heads, head_dim 8): SparseVLM+ keeps 14."""
    import tempfile

    from convert import load_transformers

    model = tiny_llava(
        num_layers=24,
        image_size=IMAGE,
        hidden=128,
        heads=16,
        kv_heads=4,
        seed=0,
        qk_std=0.3,
        embed_std=1.0,
        projector_std=0.5,
    )
    d = save_tiny_llava(model, tempfile.mkdtemp(prefix="parity-wide-") + "/hf")
    params, cfg = load_transformers(d, dtype="float32")
    return model, params, cfg


@functools.cache
def wide_reference(i: int, v2_heads: int | None = None):
    model, _, cfg = wide_model_and_params()
    prefix, text = EXAMPLES[i]
    ids = torch.tensor([prefix + [IMAGE_TOKEN] * cfg.num_image_tokens + text])
    pix = torch.tensor(pixels()[i : i + 1]).permute(0, 3, 1, 2)
    params = ref.RefSparseParams(
        method="v2_0", layers=FIXED_LAYERS, schedule=SCHEDULE, v2_heads=v2_heads
    )
    return ref.reference_generate(model, ids, pix, params, max_new_tokens=NEW_TOKENS)


def test_v2_0_on_16_heads_matches_reference():
    """SparseVLM+ averages exactly 14 of 16 heads (SPEC §6): kept indices, logits, greedy
    tokens and decode positions (N + t) equal the reference's, batched."""
    _, params, cfg = wide_model_and_params()
    assert cfg.text.num_attention_heads == 16
    sparse = SparseConfig(method="v2_0", layers=FIXED_LAYERS, schedule=SCHEDULE)
    sparse = sparse.with_static_shape(SCHEDULE, cfg.num_image_tokens)
    rows = list(range(len(EXAMPLES)))
    logits, tokens, stats = run_jax(params, cfg, sparse, rows)
    _, _, after_decode, steps = run_jax_positions(params, cfg, sparse, rows)
    for j in rows:
        toks, r = wide_reference(j)
        assert_clear_decisions(r)
        assert [len(rec.heads) for rec in r.prunes] == [14, 14, 14]
        assert all(rec.pruned for rec in r.prunes)
        assert_same_decisions(stats, j, r)
        np.testing.assert_allclose(logits[j], r.logits.numpy(), atol=1e-4, rtol=0)
        assert tokens[j].tolist() == toks
        assert r.decode_positions == [(r.prompt_len + t,) * 24 for t in range(NEW_TOKENS - 1)]
        assert set(after_decode[:, j].tolist()) == {r.prompt_len + steps}
    # The head count matters here: the old rule's round(14/32 * 16) = 7 heads decide otherwise.
    _, seven = wide_reference(0, v2_heads=7)
    _, r = wide_reference(0)
    assert [rec.kept for rec in seven.prunes] != [rec.kept for rec in r.prunes]
