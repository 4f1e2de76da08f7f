"""Tests of the PyTorch reference implementation of SPEC.md (sparsevlm_jax/reference/).

Tiny random LLaVA models are built in-process with transformers' own classes (no hub).
Everything runs on CPU in float32.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sparsevlm_jax import reference as ref  # noqa: E402
from sparsevlm_jax.reference import RefSparseParams  # noqa: E402

IMAGE_TOKEN = 63
VOCAB = 64
PREFIX = [1, 5, 6, 7, 8]  # p = 5, like llava-hf's "USER: "
TEXT = list(range(10, 30))  # T = 20 text tokens after the image


def build_llava(image_size: int, seed: int = 0, heads: int = 4, kv_heads: int = 2):
    """A tiny LlavaForConditionalGeneration: CLIP 32-d x 2 layers, Llama 64-d x 20 layers,
    `heads` heads / `kv_heads` KV heads (default 4 / 2), vocab 64. Language-side weights are
    redrawn with large standard deviations so attention is peaked and logits are well
    separated."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=20,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=VOCAB,
        max_position_embeddings=512,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim != 2 or "vision_tower" in name:
                continue
            if "q_proj" in name or "k_proj" in name:
                std = 0.3
            elif "embed_tokens" in name:
                std = 1.0
            else:
                std = 0.15
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_inputs(num_image_tokens: int, image_size: int, seed: int = 1):
    ids = torch.tensor([PREFIX + [IMAGE_TOKEN] * num_image_tokens + TEXT])
    pixels = torch.randn(
        1, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed)
    )
    return ids, pixels


@pytest.fixture(scope="module")
def model64():
    """112 px / 14 px patches: 64 visual tokens."""
    return build_llava(112)


@pytest.fixture(scope="module")
def inputs64():
    return make_inputs(64, 112)


def hf_layer(model, i: int, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' own LlamaDecoderLayer i, causal, at the given positions: [1, n, D]."""
    lm = model.model.language_model
    n = h.shape[1]
    mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
    cos_sin = lm.rotary_emb(h, positions[None])
    return lm.layers[i](h, attention_mask=mask, position_embeddings=cos_sin)


# ---------------------------------------------------------------------------------------------
# (1) dense = transformers
# ---------------------------------------------------------------------------------------------


def test_dense_logits_match_transformers(model64, inputs64):
    ids, pixels = inputs64
    result = ref.reference_prefill(model64, ids, pixels, RefSparseParams.dense())
    with torch.no_grad():
        expected = model64(input_ids=ids, pixel_values=pixels).logits[0]
    assert result.logits.shape == expected.shape
    torch.testing.assert_close(result.logits, expected, atol=1e-4, rtol=1e-4)
    assert result.visual_counts == (64,) * 20
    assert result.equivalent_tokens == 64.0
    assert result.prunes == [] and result.min_margin == math.inf
    assert all(k.shape[2] == ids.shape[1] for k, _ in result.kv_caches)


def test_dense_greedy_matches_transformers_generate(model64, inputs64):
    ids, pixels = inputs64
    tokens, result = ref.reference_generate(
        model64, ids, pixels, RefSparseParams.dense(), max_new_tokens=6
    )
    with torch.no_grad():
        out = model64.generate(
            input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False
        )
    assert tokens == out[0, ids.shape[1] :].tolist()
    assert len(result.greedy_gaps) == 6 and min(result.greedy_gaps) > 1e-3


def test_generate_stops_at_eos(model64, inputs64):
    ids, pixels = inputs64
    tokens, _ = ref.reference_generate(model64, ids, pixels, RefSparseParams.dense(), 6)
    stopped, _ = ref.reference_generate(
        model64, ids, pixels, RefSparseParams.dense(), 6, eos_token_ids=(tokens[1],)
    )
    assert stopped == tokens[: tokens.index(tokens[1]) + 1]


# ---------------------------------------------------------------------------------------------
# (2) the no-prune branch (V - rank == 0) leaves the model dense
# ---------------------------------------------------------------------------------------------


def test_full_rank_layers_prune_nothing():
    # 28 px: 4 visual tokens, 20 text tokens -> more raters than visual tokens, so the
    # |raters| x 4 attention matrix has full column rank 4 = V at every pruning layer.
    model = build_llava(28)
    ids, pixels = make_inputs(4, 28)
    result = ref.reference_prefill(model, ids, pixels, RefSparseParams(scale=0.5))
    assert len(result.raters) >= 4
    assert [r.rank for r in result.prunes] == [4, 4, 4, 4]
    assert not any(r.pruned for r in result.prunes)
    assert all(
        r.budget == 4 and r.kept == (0, 1, 2, 3) and r.n_recycled == 0 for r in result.prunes
    )
    assert result.visual_counts == (4,) * 20
    dense = ref.reference_prefill(model, ids, pixels, RefSparseParams.dense())
    torch.testing.assert_close(result.logits, dense.logits, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# (3) v1 with pruning and recycling at every pruning layer
# ---------------------------------------------------------------------------------------------

V1_PRUNING = RefSparseParams(method="v1", layers=(2, 6, 15, 19), scale=2.0, bias=0.0)


@pytest.fixture(scope="module")
def v1_result(model64, inputs64):
    ids, pixels = inputs64
    return ref.reference_prefill(model64, ids, pixels, V1_PRUNING, keep_layer_inputs=True)


def test_v1_prunes_and_recycles_at_every_layer(v1_result, inputs64):
    ids, _ = inputs64
    res = v1_result
    assert [r.layer for r in res.prunes] == [2, 6, 15, 19]
    v = 64
    for rec in res.prunes:
        assert rec.v_in == v and rec.text_start == 5 + v
        assert rec.pruned and rec.n_recycled >= 1
        assert rec.rank is not None and 0 < rec.rank < v
        assert rec.budget == min(int(rec.rank * 2.0), v - 1) == len(rec.kept)
        assert list(rec.kept) == sorted(set(rec.kept)) and rec.kept[-1] < v
        # The kept tokens are the top-k scores; candidates the best-scored pruned ones.
        pruned = sorted(set(range(v)) - set(rec.kept), key=lambda j: -float(rec.scores[j]))
        assert min(float(rec.scores[j]) for j in rec.kept) >= float(rec.scores[pruned[0]])
        n_cand = int(0.3 * (v - rec.budget)) + 1
        assert list(rec.candidates) == pruned[:n_cand]
        assert rec.n_recycled == int(n_cand / 10) + 1 == len(rec.centres)
        assert len(rec.assignment) == n_cand
        assert all(rec.assignment[c] == i for i, c in enumerate(rec.centres))
        assert rec.v_out == rec.budget + rec.n_recycled
        v = rec.v_out
    # Visual counts after every layer: 64 before layer 2, then each record's v_out.
    counts = []
    v = 64
    outs = {r.layer: r.v_out for r in res.prunes}
    for layer in range(20):
        v = outs.get(layer, v)
        counts.append(v)
    assert res.visual_counts == tuple(counts)
    assert res.equivalent_tokens == pytest.approx(sum(counts) / 20)
    # The final sequence: prefix, V visual tokens, all text; positions renumbered.
    n_final = 5 + v + len(TEXT)
    assert res.logits.shape == (n_final, VOCAB)
    assert res.positions.tolist() == list(range(n_final))
    # Layer l's cache holds what layer l ran on: the pruning layer the unpruned sequence.
    lengths = [k.shape[2] for k, _ in res.kv_caches]
    n = ids.shape[1]
    for layer in range(20):
        assert lengths[layer] == n
        if layer in outs:
            n = 5 + outs[layer] + len(TEXT)
    assert res.min_margin > 0


def test_v1_first_pruning_layer_against_transformers(model64, inputs64, v1_result):
    """Layers 0-2 are unpruned: check raters, scores, rank and the compacted sequence with
    transformers' own forward (eager attention probabilities and hidden states)."""
    ids, pixels = inputs64
    with torch.no_grad():
        out = model64(
            input_ids=ids, pixel_values=pixels, output_attentions=True, output_hidden_states=True
        )
    p, v0 = 5, 64
    embeds = out.hidden_states[0][0]  # input embeddings [N, D]
    m = (embeds[p : p + v0] @ embeds[p + v0 :].T).softmax(1).mean(0)
    raters = [j for j in range(len(TEXT)) if m[j] > m.mean()]
    assert list(v1_result.raters) == raters
    rec = v1_result.prunes[0]
    attn = out.attentions[2][0].mean(0)  # [N, N]
    relation = attn[[p + v0 + j for j in raters]][:, p : p + v0]
    torch.testing.assert_close(rec.scores, relation.mean(0), atol=1e-6, rtol=1e-5)
    assert rec.rank == int(torch.linalg.matrix_rank(relation))
    # Layer 3 ran on [prefix | kept | recycled | text] of layer 2's output.
    h2 = out.hidden_states[3][0]  # output of layer 2
    h3, pos3 = v1_result.layer_inputs[3]
    kept = list(rec.kept)
    merged, centres, _, _ = ref.dpc_knn_cluster(h2[[p + j for j in rec.candidates]], rec.n_recycled)
    assert tuple(centres) == rec.centres
    expected = torch.cat([h2[:p], h2[[p + j for j in kept]], merged, h2[p + v0 :]])
    torch.testing.assert_close(h3[0], expected, atol=1e-5, rtol=1e-5)
    assert pos3.tolist() == list(range(h3.shape[1]))


def test_v1_decode_step_matches_layerwise_recompute(model64, v1_result):
    """One cached decoding step equals, at every layer, transformers' decoder layer run on
    [that layer's prefill input | the new token] with the new token at position len_l."""
    res = v1_result
    token = int(res.logits[-1].argmax())
    logits, caches, new_inputs = ref.reference_decode_step(
        model64, res.kv_caches, token, return_layer_inputs=True
    )
    lm = model64.model.language_model
    with torch.no_grad():
        for i in range(20):
            h_i, pos_i = res.layer_inputs[i]
            seq = torch.cat([h_i, new_inputs[i]], dim=1)
            pos = torch.cat([pos_i, torch.tensor([h_i.shape[1]])])
            out = hf_layer(model64, i, seq, pos)[:, -1:]
            if i + 1 < 20:  # the new token's input to the next layer is this layer's output
                torch.testing.assert_close(out, new_inputs[i + 1], atol=1e-5, rtol=1e-5)
            assert caches[i][0].shape[2] == h_i.shape[1] + 1
        expected = model64.lm_head(lm.norm(out))[0, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_v1_generate_runs_with_pruned_caches(model64, inputs64):
    ids, pixels = inputs64
    tokens, result = ref.reference_generate(model64, ids, pixels, V1_PRUNING, max_new_tokens=4)
    assert len(tokens) == 4 and len(result.greedy_gaps) == 4
    # The same steps by hand.
    logits, caches = result.logits[-1], result.kv_caches
    manual = []
    for _ in range(4):
        manual.append(int(logits.argmax()))
        logits, caches, _ = ref.reference_decode_step(model64, caches, manual[-1])
    assert manual == tokens
    # v1 decodes each layer at its own cache length (SPEC §5).
    lengths = tuple(k.shape[2] for k, _ in result.kv_caches)
    assert result.decode_positions == [tuple(n + t for n in lengths) for t in range(3)]


# ---------------------------------------------------------------------------------------------
# Other methods
# ---------------------------------------------------------------------------------------------


def test_fixed_schedule_v1_5(model64, inputs64):
    ids, pixels = inputs64
    params = RefSparseParams(method="v1_5", layers=(2, 6, 15), schedule=(30, 20, 10))
    res = ref.reference_prefill(model64, ids, pixels, params)
    assert [r.budget for r in res.prunes] == [30, 20, 10]
    assert all(r.n_recycled >= 1 and r.rank is None for r in res.prunes)
    assert res.prunes[1].v_in == 30 + res.prunes[0].n_recycled
    # Margin bookkeeping off (for timing) changes no decision.
    fast = ref.reference_prefill(model64, ids, pixels, params, track_margins=False)
    assert [r.kept for r in fast.prunes] == [r.kept for r in res.prunes]
    assert [r.centres for r in fast.prunes] == [r.centres for r in res.prunes]
    torch.testing.assert_close(fast.logits, res.logits, atol=0, rtol=0)


def test_v2_0_keeps_positions_and_does_not_recycle(model64, inputs64):
    ids, pixels = inputs64
    params = RefSparseParams(method="v2_0", layers=(2, 6, 15), schedule=(30, 20, 10))
    res = ref.reference_prefill(model64, ids, pixels, params, keep_layer_inputs=True)
    assert [r.v_out for r in res.prunes] == [30, 20, 10]
    assert all(r.n_recycled == 0 and len(r.heads) == 2 for r in res.prunes)  # round(14/32*4)
    # Final positions: prefix, the surviving visual tokens' original ids, text ids.
    kept0 = [res.prunes[0].kept[j] for j in res.prunes[1].kept]
    kept = [kept0[j] for j in res.prunes[2].kept]
    expected = list(range(5)) + [5 + j for j in kept] + list(range(69, 69 + len(TEXT)))
    assert res.positions.tolist() == expected
    # Decoding continues the original positions (SPEC §5): the t-th generated token has
    # position N + t at every layer, N = 89 the unpruned prompt length.
    n = ids.shape[1]
    assert res.prompt_len == n == 89
    tokens, gen = ref.reference_generate(model64, ids, pixels, params, max_new_tokens=4)
    assert gen.decode_positions == [(n + t,) * 20 for t in range(3)]
    manual, logits, caches = [], gen.logits[-1], gen.kv_caches
    for t in range(4):
        manual.append(int(logits.argmax()))
        logits, caches, _ = ref.reference_decode_step(model64, caches, manual[-1], position=n + t)
    assert manual == tokens
    # One step equals transformers' layers run on [prefill input | new token at position N].
    token = int(res.logits[-1].argmax())
    _, caches, new_inputs = ref.reference_decode_step(
        model64, res.kv_caches, token, return_layer_inputs=True, position=n
    )
    with torch.no_grad():
        for i in range(19):
            h_i, pos_i = res.layer_inputs[i]
            seq = torch.cat([h_i, new_inputs[i]], dim=1)
            out = hf_layer(model64, i, seq, torch.cat([pos_i, torch.tensor([n])]))[:, -1:]
            torch.testing.assert_close(out, new_inputs[i + 1], atol=1e-5, rtol=1e-5)
    assert caches[19][0].shape[2] == len(expected) + 1


def test_v2_0_averages_exactly_14_heads_on_wide_models(inputs64):
    """SPEC §6: 14 heads whenever the model has at least 14 (here 16 of 16)."""
    ids, pixels = inputs64
    model = build_llava(112, heads=16, kv_heads=4)
    params = RefSparseParams(method="v2_0", layers=(2, 6, 15), schedule=(30, 20, 10))
    res = ref.reference_prefill(model, ids, pixels, params)
    assert [len(r.heads) for r in res.prunes] == [14, 14, 14]
    assert [r.v_out for r in res.prunes] == [30, 20, 10]
    two = ref.reference_prefill(model, ids, pixels, dataclasses.replace(params, v2_heads=2))
    assert [len(r.heads) for r in two.prunes] == [2, 2, 2]
    assert [ref.v2_head_count(h) for h in (4, 13, 14, 16, 40)] == [2, 6, 14, 14, 14]


def test_fastv_and_random(model64, inputs64):
    ids, pixels = inputs64
    fastv = ref.reference_prefill(model64, ids, pixels, RefSparseParams.fastv(k=2, ratio=0.5))
    assert [r.layer for r in fastv.prunes] == [1]
    assert fastv.visual_counts == (64,) + (32,) * 19
    with torch.no_grad():
        out = model64(input_ids=ids, pixel_values=pixels, output_attentions=True)
    last = out.attentions[1][0].mean(0)[-1, 5:69]
    torch.testing.assert_close(fastv.prunes[0].scores, last, atol=1e-6, rtol=1e-5)
    assert set(fastv.prunes[0].kept) == set(torch.sort(-last, stable=True).indices[:32].tolist())

    params = RefSparseParams(method="random", layers=(2, 6), schedule=(30, 10), seed=3)
    a = ref.reference_prefill(model64, ids, pixels, params)
    b = ref.reference_prefill(model64, ids, pixels, params)
    assert a.prunes[0].kept == b.prunes[0].kept and len(a.prunes[0].kept) == 30
    assert a.visual_counts[-1] == 10


def test_presets():
    assert RefSparseParams.v1(128).scale == 9.0 and RefSparseParams.v1(128).bias == 6.0
    assert RefSparseParams.v1_5(64).schedule == (66, 30, 17)
    assert RefSparseParams.v2_0(192).layers == (2, 6, 15)
    assert RefSparseParams.fastv(3).layers == (2,)
    with pytest.raises(ValueError):
        RefSparseParams(method="v1_5", layers=(2, 6, 15), schedule=(1, 2))
    with pytest.raises(ValueError):
        RefSparseParams(method="nope")


# ---------------------------------------------------------------------------------------------
# (4) unit checks of the decision steps
# ---------------------------------------------------------------------------------------------


def test_select_top_k_ties_go_to_lower_index():
    scores = torch.tensor([1.0, 2.0, 2.0, 0.0, 2.0])
    kept, pruned, margin = ref.select_top_k(scores, 2)
    assert kept.tolist() == [1, 2] and pruned.tolist() == [4, 0, 3] and margin == 0.0
    kept, pruned, margin = ref.select_top_k(scores, 3)
    assert kept.tolist() == [1, 2, 4] and margin == pytest.approx(0.5)


def test_select_raters_strictly_above_mean():
    vis = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    raters, m, margin = ref.select_raters(vis, txt)
    expected = (vis @ txt.T).softmax(1).mean(0)
    torch.testing.assert_close(m, expected)
    assert raters == tuple(j for j in range(3) if expected[j] > expected.mean())
    assert margin > 0


def test_float32_rank_tolerance():
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 5, generator=gen, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(6, 5, generator=gen, dtype=torch.float64))
    # tol = sigma_max * max(8, 6) * eps32 ~= 9.5e-7: 1e-5 counts, 1e-9 and 0 do not.
    sigma = torch.tensor([1.0, 1e-2, 1e-5, 1e-9, 0.0], dtype=torch.float64)
    a = (u * sigma) @ w.T
    rank, margin = ref.float32_rank(a)
    assert rank == 3 == int(torch.linalg.matrix_rank(a.float()))
    assert 5e-7 < margin < 1e-6  # the zero singular values sit ~tol below tol
    low = torch.randn(7, 3, generator=gen) @ torch.randn(3, 9, generator=gen)
    assert ref.float32_rank(low)[0] == int(torch.linalg.matrix_rank(low)) == 3
    assert ref.float32_rank(torch.zeros(3, 4))[0] == 0


def test_dpc_knn_finds_obvious_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    sizes = [5, 7, 9]
    labels = torch.tensor(sum(([i] * s for i, s in enumerate(sizes)), []))
    x = centres[labels] + 0.1 * torch.randn(len(labels), 4, generator=gen)
    perm = torch.randperm(len(labels), generator=gen)
    x, labels = x[perm], labels[perm]
    merged, picked, assignment, margins = ref.dpc_knn_cluster(x, 3)
    assert len(set(labels[picked].tolist())) == 3  # one centre per blob
    # Every token joins its blob's centre.
    for t in range(len(labels)):
        assert labels[picked[int(assignment[t])]] == labels[t]
    for j, c in enumerate(picked):
        members = x[labels == labels[c]]
        expected = members.sum(0) / (members.shape[0] + 1e-6)
        torch.testing.assert_close(merged[j], expected)
    assert margins["assignment"] > 0.5


def test_dpc_knn_structural_ties():
    # One cluster: every density is exp(0) = 1; the centre is the first candidate and the
    # merged token the mean of all, whatever the tie rule.
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    for ties in ("lower_index", "strict"):
        merged, picked, assignment, margins = ref.dpc_knn_cluster(x, 1, ties)
        assert picked == [0] and assignment.tolist() == [0, 0, 0] and margins == {}
        torch.testing.assert_close(merged[0], x.sum(0) / (3 + 1e-6))
    # Two clusters: a mutual nearest pair has bitwise-equal densities (self + each other).
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [10.0, 2.0]])
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    assert torch.equal(dist, dist.T) and torch.all(dist.diagonal() == 0)
    # Default: equal densities are ordered by index (lower = denser), like the authors'
    # tie-breaking noise would order them one way or the other.
    _, picked, assignment, _ = ref.dpc_knn_cluster(x, 2)
    assert picked == [0, 2] and assignment.tolist() == [0, 0, 1, 1]
    # "strict": neither of the closest pair is denser, both get delta = max distance.
    _, picked, assignment, _ = ref.dpc_knn_cluster(x, 2, "strict")
    assert picked == [0, 1] and assignment.tolist() == [0, 1, 1, 1]


def test_density_order_tie_rule():
    rho = torch.tensor([0.5, 0.7, 0.5, 0.7])
    denser = ref.density_order(rho)
    assert denser.tolist() == [
        [False, True, False, True],
        [False, False, False, False],
        [True, True, False, True],
        [False, True, False, False],
    ]
    assert not (denser & denser.T).any()
    strict = ref.density_order(rho, "strict")
    assert strict.tolist() == (rho[None, :] > rho[:, None]).tolist()
