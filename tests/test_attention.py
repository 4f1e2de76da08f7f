"""Block-skipping causal attention equals the dense masked softmax (padding, invalid slots);
the key-tiled online-softmax attention of long prompts (`attention.flash_causal_attend`) equals
the current full-row attention, with memory linear in the length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsevlm_jax.model import attention, llama


def random_qkv(b=2, t=300, n=4, k=2, h=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    kk = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
    valid = rng.random((b, t)) > 0.3
    valid[:, :5] = False  # left padding: fully masked query rows
    valid[0, 100:180] = False  # a run of unused capacity
    return q, kk, v, jnp.asarray(valid)


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 7])
def test_block_skipping_equals_dense_mask(blocks):
    q, k, v, valid = random_qkv()
    ends = llama.query_block_ends(q.shape[1], blocks, min_block=8)
    assert len(ends) == blocks and ends[-1] == q.shape[1]
    assert all(e % llama.BLOCK_ALIGN == 0 for e in ends[:-1])
    dense = llama.attend(q, k, v, llama.causal_mask(valid))
    blocked = jax.jit(lambda *a: llama.attend(*a[:3], llama.CausalMask(a[3], ends)))(q, k, v, valid)
    # Rows of invalid slots attend to nothing valid: garbage either way (finite), never read.
    rows = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(blocked)[rows], np.asarray(dense)[rows], atol=2e-6)
    assert np.isfinite(np.asarray(blocked)).all()


def test_block_ends_rule():
    assert llama.query_block_ends(100) == (100,)  # too short to split
    assert llama.query_block_ends(675) == (176, 352, 528, 675)
    assert llama.query_block_ends(300) == (152, 300)
    assert llama.query_block_ends(675, 1) == (675,)


def test_prefill_stage_blocks_match_unblocked():
    """A whole stage with and without block skipping: same outputs, keys and text queries."""
    import dataclasses

    from sparsevlm_jax.params import init_params
    from sparsevlm_jax.presets import mini

    cfg = mini().replace(text=dataclasses.replace(mini().text, num_hidden_layers=2))
    params = init_params(cfg, 0)
    layers = params["text"]["layers"]
    _, _, _, valid = random_qkv(b=2, t=280)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 280, cfg.text.hidden_size)), jnp.float32)
    pos = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    run = jax.jit(
        llama.prefill_stage,
        static_argnums=(1, 2, 3),
        static_argnames=("query_tail", "query_blocks"),
    )
    ref = run(layers, cfg.text, 0, 2, x, pos, valid, query_tail=16, query_blocks=1)
    out = run(layers, cfg.text, 0, 2, x, pos, valid, query_tail=16, query_blocks=4)
    rows = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out[0])[rows], np.asarray(ref[0])[rows], atol=1e-5)
    for a, b in zip(out[1], ref[1], strict=True):  # keys and values of the valid slots
        np.testing.assert_allclose(np.asarray(a)[:, rows], np.asarray(b)[:, rows], atol=1e-5)
    tail = rows[:, -16:]
    np.testing.assert_allclose(np.asarray(out[2])[tail], np.asarray(ref[2])[tail], atol=1e-5)


def test_attention_implementation_choice(monkeypatch):
    monkeypatch.delenv("SPARSEVLM_ATTENTION", raising=False)
    assert llama.attention_implementation(jnp.float32, 64) == "xla"
    if jax.default_backend() == "cpu":
        assert llama.attention_implementation(jnp.bfloat16, 128) == "xla"
    monkeypatch.setenv("SPARSEVLM_ATTENTION", "cudnn")
    assert llama.attention_implementation(jnp.float32, 64) == "cudnn"
    monkeypatch.setenv("SPARSEVLM_ATTENTION", "nope")
    with pytest.raises(ValueError):
        llama.attention_implementation(jnp.float32, 64)


def test_attend_matches_numpy_softmax():
    q, k, v, valid = random_qkv(b=1, t=40, n=4, k=2, h=8, seed=3)
    out = np.asarray(llama.attend(q, k, v, llama.causal_mask(valid)))
    qn, kn, vn, m = (np.asarray(x, np.float64) for x in (q, k, v, valid))
    kn, vn = np.repeat(kn, 2, axis=2), np.repeat(vn, 2, axis=2)  # grouped-query heads
    s = np.einsum("btnh,bsnh->bnts", qn, kn) / np.sqrt(8)
    allowed = np.tril(np.ones((40, 40), bool))[None, None] & m.astype(bool)[:, None, None]
    s = np.where(allowed, s, -np.inf)
    with np.errstate(invalid="ignore"):  # rows of invalid slots: no valid key at all
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), vn).reshape(1, 40, 32)
    rows = np.asarray(valid)
    np.testing.assert_allclose(out[rows], ref[rows], atol=2e-6)


def padded_qkv(b, t, n, k, h, seed=0, dtype=jnp.float32):
    """Random q, k, v and validity with a different pattern per example: left padding and a
    run of invalid (pruned / unused) visual slots; right padding; holes at random; the rest
    valid, except example 4 with no valid slot at all."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
    kk = jnp.asarray(rng.normal(size=(b, t, k, h)), dtype)
    v = jnp.asarray(rng.normal(size=(b, t, k, h)), dtype)
    valid = np.ones((b, t), bool)
    valid[0, :7] = False  # left padding of the prefix bucket
    valid[0, t // 3 : t // 2] = False  # invalid visual slots in the middle
    if b > 1:
        valid[1, -(t // 5) :] = False  # right padding of the text bucket
    if b > 2:
        valid[2] = rng.random(t) > 0.4
        valid[2, :3] = False
    if b > 3:
        valid[3] = False  # nothing valid: every row attends to nothing
    return q, kk, v, jnp.asarray(valid)


def has_valid_key(valid) -> np.ndarray:
    """[B, T]: query slot t has a valid key s <= t."""
    return np.cumsum(np.asarray(valid), axis=1) > 0


@pytest.mark.parametrize(
    "b,t,n,k,h,block",
    [
        (4, 300, 4, 2, 16, 64),  # length not a multiple of the block, GQA
        (2, 256, 8, 1, 8, 64),  # a multiple, one kv head
        (3, 130, 4, 4, 16, 128),  # one full block and a 2-row tail
        (2, 50, 2, 1, 8, 64),  # one block longer than the sequence
        (3, 515, 4, 2, 8, 32),
    ],
)
def test_flash_equals_full_rows(b, t, n, k, h, block):
    q, kk, v, valid = padded_qkv(b, t, n, k, h, seed=t)
    flash = jax.jit(attention.flash_causal_attend, static_argnums=4)(q, kk, v, valid, block)
    dense = llama.attend(q, kk, v, llama.causal_mask(valid))  # whole score rows
    old = jax.jit(  # the query-block path short prompts keep (whole rows per query block)
        lambda *a: llama.causal_attend(*a[:3], llama.CausalMask(a[3], (t // 2, t)))
    )(q, kk, v, valid)
    rows = has_valid_key(valid)
    flash, dense, old = (np.asarray(x) for x in (flash, dense, old))
    assert flash.shape == (b, t, n * h) and flash.dtype == np.float32
    assert np.abs(flash[rows] - dense[rows]).max() <= 1e-5
    assert np.abs(flash[rows] - old[rows]).max() <= 1e-5
    # Rows with no valid key: the full-row paths give a finite average of masked values
    # (never read), the tiled one zeros (as cuDNN's path does); neither a NaN.
    assert np.isfinite(flash).all() and np.isfinite(dense).all() and np.isfinite(old).all()
    assert (flash[~rows] == 0).all()


def test_long_causal_mask_runs_tiled(monkeypatch):
    """`attend` with a `CausalMask` of >= FLASH_MIN_LENGTH slots takes the tiled path (and
    equals the dense mask); one query block (`query_blocks=1`) keeps the whole matrix."""
    t = attention.FLASH_MIN_LENGTH + 77
    q, kk, v, valid = padded_qkv(2, t, 4, 2, 8, seed=5)
    calls = []
    real = attention.flash_causal_attend

    def spy(*args):
        calls.append(args[4])  # the tile size
        return real(*args)

    monkeypatch.setattr(attention, "flash_causal_attend", spy)
    ends = llama.query_block_ends(t)
    out = jax.jit(lambda *a: llama.attend(*a[:3], llama.CausalMask(a[3], ends)))(q, kk, v, valid)
    assert calls == [attention.flash_block(t)]
    single = llama.attend(q, kk, v, llama.CausalMask(valid, (t,)))
    assert len(calls) == 1
    dense = llama.attend(q, kk, v, llama.causal_mask(valid))
    rows = has_valid_key(valid)
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(dense)[rows], atol=1e-5)
    np.testing.assert_allclose(np.asarray(single)[rows], np.asarray(dense)[rows], atol=1e-5)


def test_flash_block_rule():
    assert attention.flash_block(attention.FLASH_MIN_LENGTH - 1) is None
    for t in (attention.FLASH_MIN_LENGTH, 2432, 8192, 32768):
        block = attention.flash_block(t)
        assert block is not None and block % llama.BLOCK_ALIGN == 0 and block <= t


def test_flash_bfloat16_accumulates_in_float32():
    q, kk, v, valid = padded_qkv(2, 200, 4, 2, 32, seed=2, dtype=jnp.bfloat16)
    out = jax.jit(attention.flash_causal_attend, static_argnums=4)(q, kk, v, valid, 64)
    assert out.dtype == jnp.bfloat16
    f32 = [x.astype(jnp.float32) for x in (q, kk, v)]
    ref = np.asarray(llama.attend(*f32, llama.causal_mask(valid)))
    bf = np.asarray(llama.attend(q, kk, v, llama.causal_mask(valid)).astype(jnp.float32))
    rows = has_valid_key(valid)
    got = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(got).all()
    # As close to the float32 result as the full-row bf16 attention is (bf16 output rounding).
    assert np.abs(got[rows] - ref[rows]).max() <= 2 * np.abs(bf[rows] - ref[rows]).max() + 1e-3


def test_flash_memory_is_linear():
    """XLA's temporaries of the tiled attention (mini-next heads) grow about linearly from 1k
    to 8k slots (a full score matrix: 64x)."""
    shape = jax.ShapeDtypeStruct

    def temp_bytes(t):
        x = shape((1, t, 4, 64), jnp.float32)
        fn = jax.jit(attention.flash_causal_attend, static_argnums=4)
        compiled = fn.lower(x, x, x, shape((1, t), jnp.bool_), attention.flash_block(t)).compile()
        stats = compiled.memory_analysis()
        if stats is None:
            pytest.skip("no memory analysis on this backend")
        return stats.temp_size_in_bytes

    assert temp_bytes(8192) <= 9 * temp_bytes(1024)


def test_prefill_stage_long_tiled_matches_full_matrix():
    """A whole stage over a long sequence: tiled attention vs the one-block full matrix."""
    import dataclasses

    from sparsevlm_jax.params import init_params
    from sparsevlm_jax.presets import mini

    cfg = mini().replace(text=dataclasses.replace(mini().text, num_hidden_layers=2))
    layers = init_params(cfg, 0)["text"]["layers"]
    t = attention.FLASH_MIN_LENGTH + 40
    _, _, _, valid = padded_qkv(2, t, 1, 1, 1, seed=7)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, t, cfg.text.hidden_size)), jnp.float32)
    pos = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
    run = jax.jit(
        llama.prefill_stage,
        static_argnums=(1, 2, 3),
        static_argnames=("query_tail", "query_blocks"),
    )
    ref = run(layers, cfg.text, 0, 2, x, pos, valid, query_tail=16, query_blocks=1)
    out = run(layers, cfg.text, 0, 2, x, pos, valid, query_tail=16)
    rows = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out[0])[rows], np.asarray(ref[0])[rows], atol=1e-5)
    for a, b in zip(out[1], ref[1], strict=True):
        np.testing.assert_allclose(np.asarray(a)[:, rows], np.asarray(b)[:, rows], atol=1e-5)
    tail = rows[:, -16:]
    np.testing.assert_allclose(np.asarray(out[2])[tail], np.asarray(ref[2])[tail], atol=1e-5)
    assert np.isfinite(np.asarray(out[0])).all()


def test_flash_unrolled_is_the_same_program_counted():
    """`unroll=True` (FLOP counting): the same numbers, and XLA's cost analysis sees every
    tile (a loop body is counted once): between the causal half and the whole matrix."""
    t = 600
    q, kk, v, valid = padded_qkv(2, t, 4, 2, 16, seed=11)
    looped = jax.jit(attention.flash_causal_attend, static_argnums=(4, 5))
    a, b = looped(q, kk, v, valid, 128, False), looped(q, kk, v, valid, 128, True)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

    def flops(fn):
        return jax.jit(fn).lower(q, kk, v, valid).cost_analysis()["flops"]

    whole = flops(lambda *x: llama.attend(*x[:3], llama.causal_mask(x[3])))
    tiled = flops(lambda *x: attention.flash_causal_attend(*x, 128, unroll=True))
    assert 0.5 * whole < tiled < whole
