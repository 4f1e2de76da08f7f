"""`sparsevlm_jax.mrope` against transformers' own `get_rope_index` (Qwen2-VL, Qwen2.5-VL).

Tiny random models are built in-process (nothing is downloaded). transformers 5.25 keeps
`get_rope_index` on `model.model` and reads spans from `mm_token_type_ids`; every case here
passes it and checks that the 3-D positions really differ from 1-D ones, so a silent 1-D
fallback cannot pass.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparsevlm_jax import mrope

torch = pytest.importorskip("torch")

IMG, VID, VSTART, VEND = 590, 591, 592, 593
MERGE = 2
TPS = 2  # Qwen2.5 vision_config.tokens_per_second of the tiny model
PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal patch * patch * patch

TEXT_CFG = dict(
    vocab_size=600,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
)
TOKEN_IDS = dict(
    image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND
)


@pytest.fixture(scope="module")
def qwen2():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=TEXT_CFG,
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=MERGE,
            temporal_patch_size=2,
        ),
        **TOKEN_IDS,
    )
    return Qwen2VLForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def qwen25():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config=TEXT_CFG,
        vision_config=dict(
            depth=1,
            hidden_size=32,
            out_hidden_size=64,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=MERGE,
            temporal_patch_size=2,
            tokens_per_second=TPS,
            fullatt_block_indexes=[0],
            window_size=56,
        ),
        **TOKEN_IDS,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    assert model.config.vision_config.tokens_per_second == TPS
    return model


def build(segments, seed=0):
    """Token ids of a prompt. segments: ("text", n) | ("image", (t,h,w)) | ("video", (t,h,w));
    a visual span is <vision_start> pad*n <vision_end>. Returns ids [L], image grids, video
    grids."""
    rng = np.random.default_rng(seed)
    ids, images, videos = [], [], []
    for kind, arg in segments:
        if kind == "text":
            ids += rng.integers(3, 500, arg).tolist()
            continue
        t, h, w = arg
        ids += [VSTART] + [IMG if kind == "image" else VID] * (t * h * w // MERGE**2) + [VEND]
        (images if kind == "image" else videos).append(arg)
    return np.array(ids, np.int64), images, videos


def pad_batch(rows, side="left"):
    """Pad 1-D id arrays to one length with token 0. Returns ids [B, L], mask [B, L]."""
    n = max(len(r) for r in rows)
    ids = np.zeros((len(rows), n), np.int64)
    mask = np.zeros((len(rows), n), np.int64)
    for b, r in enumerate(rows):
        sl = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[b, sl] = r
        mask[b, sl] = 1
    return ids, mask


def hf_rope_index(model, ids, mask, images, videos, second_per_grid_ts=None):
    """transformers' positions [B, L, 3] and rope_deltas [B] for ids [B, L]."""
    kw = {}
    if second_per_grid_ts is not None:
        kw["second_per_grid_ts"] = torch.tensor(second_per_grid_ts, dtype=torch.float32)
    ids_t = torch.from_numpy(ids)
    pos, deltas = model.model.get_rope_index(
        ids_t,
        mm_token_type_ids=torch.from_numpy(mrope.token_types(ids, IMG, VID)),
        image_grid_thw=torch.tensor(images, dtype=torch.long) if images else None,
        video_grid_thw=torch.tensor(videos, dtype=torch.long) if videos else None,
        attention_mask=None if mask is None else torch.from_numpy(mask),
        **kw,
    )
    return pos.permute(1, 2, 0).numpy(), deltas.reshape(-1).numpy()


def check_against_hf(model, ids, mask, images, videos, secs=None, tps=None):
    """Compare batch and per-row results with transformers; return our positions."""
    want_pos, want_deltas = hf_rope_index(model, ids, mask, images, videos, secs)
    got_pos, got_next = mrope.rope_index_batch(
        ids, mask, images, videos, IMG, VID, VSTART, MERGE, secs, tps
    )
    np.testing.assert_array_equal(got_pos, want_pos)
    n_valid = np.full(ids.shape[0], ids.shape[1]) if mask is None else mask.sum(1)
    np.testing.assert_array_equal(got_next, want_deltas + n_valid)
    valid = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    differs = []
    for b in range(ids.shape[0]):
        p = got_pos[b][valid[b]]
        differs.append(not np.array_equal(p, mrope.text_positions(len(p))))
        assert got_next[b] == p.max() + 1
        assert mrope.next_position_from_rope_deltas(want_deltas[b], n_valid[b]) == got_next[b]
    # 3-D really differs from the 1-D positions transformers can fall back to (only a row
    # whose every group is one merged token, grid (1, 2, 2), has equal ones)
    assert any(differs)
    return got_pos


def single(ids, images, videos, **kw):
    return mrope.rope_index(ids, None, images, videos, IMG, VID, VSTART, MERGE, **kw)


# --------------------------------------------------------------------------- Qwen2-VL


@pytest.mark.parametrize("grid", [(1, 4, 6), (1, 8, 4), (1, 2, 4)])
def test_one_image(qwen2, grid):
    ids, images, videos = build([("text", 5), ("image", grid), ("text", 7)])
    pos = check_against_hf(qwen2, ids[None], None, images, videos)[0]
    # hand check: text resumes at start + max(h', w') after the group
    start = 6  # 5 text + vision_start
    n = grid[1] * grid[2] // 4
    assert tuple(pos[start]) == (start, start, start)
    assert tuple(pos[start + n - 1]) == (start, start + grid[1] // 2 - 1, start + grid[2] // 2 - 1)
    assert tuple(pos[start + n]) == (start + max(grid[1:]) // 2,) * 3  # vision_end
    single_pos, nxt = single(ids, images, videos)
    np.testing.assert_array_equal(single_pos, pos)
    assert nxt == pos.max() + 1 == pos[-1, 0] + 1


def test_two_images_with_text_between(qwen2):
    ids, images, videos = build(
        [("text", 4), ("image", (1, 4, 6)), ("text", 9), ("image", (1, 8, 4)), ("text", 3)]
    )
    check_against_hf(qwen2, ids[None], None, images, videos)


def test_video_t_gt_1(qwen2):
    # t = 3 > max(h', w') = 2: the time stream passes the spatial extent
    ids, images, videos = build([("text", 3), ("video", (3, 4, 4)), ("text", 4)])
    pos = check_against_hf(qwen2, ids[None], None, images, videos)[0]
    vis = pos[ids == VID]
    np.testing.assert_array_equal(np.unique(vis[:, 0]) - 4, [0, 1, 2])
    # transformers 5.25 resumes at start + max(h', w') = 4 + 2, the video's last time
    assert tuple(pos[ids == VEND][0]) == (6, 6, 6)
    assert pos.max() == pos[-1, 0] == 10


def test_after_vision_max_rule(qwen2):
    """``after_vision="max"`` (transformers <= 5.2, vLLM): text resumes at the group's max + 1."""
    ids, images, videos = build([("text", 3), ("video", (5, 4, 4)), ("text", 4)])
    spatial, nxt_s = single(ids, images, videos)
    maxrule, nxt_m = single(ids, images, videos, after_vision="max")
    vend = np.flatnonzero(ids == VEND)[0]
    # video starts at 4; time 4..8, rows / cols 4..5
    assert tuple(spatial[vend]) == (6, 6, 6)
    assert tuple(maxrule[vend]) == (9, 9, 9)
    np.testing.assert_array_equal(spatial[:vend], maxrule[:vend])
    assert nxt_s == 6 + 5  # vision_end + 4 text
    assert nxt_m == 9 + 5
    # on images both rules agree
    ids, images, videos = build([("image", (1, 4, 6)), ("text", 2), ("image", (1, 8, 4))])
    np.testing.assert_array_equal(
        single(ids, images, videos)[0], single(ids, images, videos, after_vision="max")[0]
    )


def test_image_and_video_interleaved(qwen2):
    ids, images, videos = build(
        [
            ("text", 2),
            ("video", (2, 4, 6)),
            ("text", 5),
            ("image", (1, 4, 6)),
            ("text", 1),
            ("image", (1, 2, 4)),
            ("text", 3),
            ("video", (4, 2, 2)),
            ("text", 2),
        ]
    )
    check_against_hf(qwen2, ids[None], None, images, videos)


def test_batch_left_padding(qwen2):
    r0, i0, v0 = build([("text", 3), ("image", (1, 4, 6)), ("text", 4)], seed=1)
    r1, i1, v1 = build(
        [("text", 2), ("image", (1, 8, 4)), ("text", 2), ("video", (2, 4, 4)), ("text", 6)],
        seed=2,
    )
    r2, i2, v2 = build([("text", 1), ("image", (1, 2, 2)), ("text", 1)], seed=3)
    ids, mask = pad_batch([r0, r1, r2], "left")
    pos = check_against_hf(qwen2, ids, mask, i0 + i1 + i2, v0 + v1 + v2)
    assert (pos[mask == 0] == 0).all()  # padding gets (0, 0, 0), as transformers
    # each row equals the unpadded row's positions, shifted into place
    for b, (r, i, v) in enumerate([(r0, i0, v0), (r1, i1, v1), (r2, i2, v2)]):
        alone, nxt = single(r, i, v)
        np.testing.assert_array_equal(pos[b][mask[b] == 1], alone)
        row_pos, row_next = mrope.rope_index(ids[b], mask[b], i, v, IMG, VID, VSTART, MERGE)
        np.testing.assert_array_equal(row_pos, pos[b])
        assert row_next == nxt


def test_batch_right_padding(qwen2):
    r0, i0, v0 = build([("text", 3), ("image", (1, 4, 6)), ("text", 4)], seed=4)
    r1, i1, v1 = build([("video", (2, 2, 4)), ("text", 1)], seed=5)
    ids, mask = pad_batch([r0, r1], "right")
    check_against_hf(qwen2, ids, mask, i0 + i1, v0 + v1)


def test_positions_drive_the_model(qwen2):
    """Logits with our position_ids equal transformers' own 3-D path (and differ from 1-D);
    generate's cached decoding continues at next_position."""
    r0, i0, v0 = build([("text", 3), ("image", (1, 4, 6)), ("text", 4)], seed=6)
    r1, i1, v1 = build(
        [("text", 2), ("image", (1, 2, 4)), ("text", 1), ("video", (2, 2, 2))], seed=7
    )
    ids, mask = pad_batch([r0, r1], "left")
    images, videos = i0 + i1, v0 + v1
    g = torch.Generator().manual_seed(0)
    n_img_patches = sum(t * h * w for t, h, w in images)
    n_vid_patches = sum(t * h * w for t, h, w in videos)
    common = dict(
        attention_mask=torch.from_numpy(mask),
        pixel_values=torch.randn(n_img_patches, PATCH_DIM, generator=g),
        image_grid_thw=torch.tensor(images),
        pixel_values_videos=torch.randn(n_vid_patches, PATCH_DIM, generator=g),
        video_grid_thw=torch.tensor(videos),
        use_cache=False,
    )
    ids_t = torch.from_numpy(ids)
    pos, nxt = mrope.rope_index_batch(ids, mask, images, videos, IMG, VID, VSTART, MERGE)
    pos_t = torch.from_numpy(pos.astype(np.int64)).permute(2, 0, 1)
    with torch.no_grad():
        hf = qwen2(
            input_ids=ids_t,
            mm_token_type_ids=torch.from_numpy(mrope.token_types(ids, IMG, VID)),
            **common,
        ).logits
        ours = qwen2(input_ids=ids_t, position_ids=pos_t, **common).logits
        flat = torch.from_numpy(np.maximum(np.cumsum(mask, 1) - 1, 0))
        one_d = qwen2(input_ids=ids_t, position_ids=flat, **common).logits
    valid = torch.from_numpy(mask).bool()
    torch.testing.assert_close(ours[valid], hf[valid], rtol=0, atol=0)
    assert (one_d[valid] - hf[valid]).abs().max() > 1e-5

    # decoding: transformers' generate (cached steps at rope_deltas + n_valid + j) against full
    # forwards in which decoded token j sits at (next_position + j,) * 3
    gen_kw = {k: v for k, v in common.items() if k != "use_cache"}
    with torch.no_grad():
        gen = qwen2.generate(
            input_ids=ids_t,
            mm_token_type_ids=torch.from_numpy(mrope.token_types(ids, IMG, VID)),
            max_new_tokens=3,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **gen_kw,
        )
    length = ids.shape[1]
    for j, step_logits in enumerate(gen.logits):
        dec = np.repeat((nxt[:, None] + np.arange(j))[:, :, None], 3, 2).astype(np.int32)
        ext = torch.from_numpy(np.concatenate([pos, dec], 1).astype(np.int64)).permute(2, 0, 1)
        ext_mask = torch.cat([common["attention_mask"], torch.ones(2, j, dtype=torch.long)], 1)
        with torch.no_grad():
            full = qwen2(
                input_ids=gen.sequences[:, : length + j],
                position_ids=ext,
                **dict(common, attention_mask=ext_mask),
            ).logits[:, -1]
        torch.testing.assert_close(full, step_logits, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- Qwen2.5-VL


@pytest.mark.parametrize("secs", [None, [1.0], [0.5], [0.7]])
def test_qwen25_video_time_scaling(qwen25, secs):
    ids, images, videos = build([("text", 3), ("video", (4, 4, 6)), ("text", 4)])
    pos = check_against_hf(qwen25, ids[None], None, images, videos, secs, TPS)[0]
    dt = TPS * (1.0 if secs is None else secs[0])
    times = np.unique(pos[ids == VID][:, 0]) - 4
    np.testing.assert_array_equal(times, np.unique((np.arange(4) * np.float32(dt)).astype(int)))


def test_qwen25_image_not_time_scaled(qwen25):
    ids, images, videos = build(
        [("text", 2), ("image", (1, 4, 6)), ("text", 3), ("image", (1, 8, 4)), ("text", 1)]
    )
    check_against_hf(qwen25, ids[None], None, images, videos, None, TPS)


def test_qwen25_image_and_videos_batch(qwen25):
    r0, i0, v0 = build(
        [("text", 2), ("image", (1, 4, 6)), ("text", 3), ("video", (4, 2, 4)), ("text", 2)],
        seed=8,
    )
    r1, i1, v1 = build([("video", (2, 4, 4)), ("text", 5), ("video", (3, 2, 2))], seed=9)
    ids, mask = pad_batch([r0, r1], "left")
    secs = [0.5, 1.0, 1.5]
    check_against_hf(qwen25, ids, mask, i0 + i1, v0 + v1, secs, TPS)
    # Qwen2-VL behaviour (tokens_per_second None) ignores time scaling
    q2, _ = mrope.rope_index_batch(ids, mask, i0 + i1, v0 + v1, IMG, VID, VSTART, MERGE)
    q25, _ = mrope.rope_index_batch(ids, mask, i0 + i1, v0 + v1, IMG, VID, VSTART, MERGE, secs, TPS)
    assert not np.array_equal(q2, q25)


# --------------------------------------------------------------------------- helpers, errors


def test_text_only_and_all_padding():
    pos, nxt = mrope.rope_index(np.arange(3, 9), None, [], [], IMG, VID, VSTART)
    np.testing.assert_array_equal(pos, mrope.text_positions(6))
    assert nxt == 6
    pos, nxt = mrope.rope_index(np.zeros(4, np.int64), np.zeros(4), None, None, IMG, VID, VSTART)
    assert nxt == 0 and (pos == 0).all()


def test_mismatches_raise():
    ids, images, videos = build([("text", 2), ("image", (1, 4, 6)), ("text", 2)])
    with pytest.raises(ValueError, match="grids"):
        single(ids, [], videos)
    with pytest.raises(ValueError, match="grids"):
        single(ids, images + [(1, 2, 2)], videos)
    with pytest.raises(ValueError, match="tokens"):
        single(ids, [(1, 4, 4)], videos)
    with pytest.raises(ValueError, match="vision-start"):
        single(ids[ids != VSTART], images, videos)
    # without the check, a span need not follow <vision_start>
    pos, _ = mrope.rope_index(ids[ids != VSTART], None, images, [], IMG, VID, None)
    assert pos.shape == (len(ids) - 1, 3)
    with pytest.raises(ValueError, match="tokens_per_second"):
        single(ids, images, videos, second_per_grid_ts=[1.0])
    with pytest.raises(ValueError, match="after_vision"):
        single(ids, images, videos, after_vision="end")


def test_mrope_section_check():
    mrope.mrope_section_check((16, 24, 24), 128)
    mrope.mrope_section_check([2, 3, 3], 16)
    with pytest.raises(ValueError, match="half the head dimension") as e:
        mrope.mrope_section_check((16, 24, 24), 96)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="half the head dimension"):
        mrope.mrope_section_check((16, 24, 32), 128)
    with pytest.raises(ValueError):
        mrope.mrope_section_check((16, 24, 24), 129)
    with pytest.raises(ValueError):
        mrope.mrope_section_check((-8, 36, 36), 128)


def test_section_matches_transformers_split(qwen2):
    """The tiny model's own section passes; transformers' recomposition takes chunk i from
    stream i % 3 (the layout the module docstring states)."""
    rot = qwen2.model.language_model.rotary_emb
    section = qwen2.config.text_config.rope_parameters["mrope_section"]
    head_dim = 64 // 4
    mrope.mrope_section_check(section, head_dim)
    pos = torch.tensor([[[5]], [[11]], [[17]]])  # (t, h, w) of one token
    cos, _ = rot(torch.zeros(1, dtype=torch.float32), pos)
    inv = rot.inv_freq.numpy()
    stream = np.concatenate([np.full(s, i % 3) for i, s in enumerate(section)])
    want = np.cos(np.array([5, 11, 17])[stream] * inv)
    np.testing.assert_allclose(cos[0, 0].numpy(), np.concatenate([want, want]), rtol=1e-5)
