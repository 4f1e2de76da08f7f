"""Block-skipping causal attention equals the dense masked softmax (padding, invalid slots)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsevlm_jax.model import llama


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
