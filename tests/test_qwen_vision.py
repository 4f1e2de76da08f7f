"""Qwen2-VL / Qwen2.5-VL vision towers and their host-side inputs against transformers.

Tiny random towers (built in-process, weights redrawn so that every layer moves the output by
O(1)) run through transformers' `model.model.visual` and through `qwen_vision.visual_features`
on `qwen_images.pack`'s padded batches: one image, two images of different sizes in one
example, a padded batch of examples with different patch counts, tiled attention, bf16 params
and an 8-frame video. The preprocessing is compared with `Qwen2VLImageProcessorPil`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from convert import names
from sparsevlm_jax import qwen_images as qi
from sparsevlm_jax.model import qwen_vision as qv

torch = pytest.importorskip("torch")

from transformers import (  # noqa: E402  (after the torch skip)
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (  # noqa: E402
    smart_resize as hf_smart_resize,
)

TEXT = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
)  # fmt: skip
VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2),
    "qwen2_5_vl": dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2,
                       out_hidden_size=64, window_size=112, fullatt_block_indexes=[1]),
}  # fmt: skip
features = jax.jit(qv.visual_features, static_argnums=(1,))


def _randomize(visual: torch.nn.Module) -> None:
    """Weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
    with torch.no_grad():
        for name, p in visual.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)


@dataclasses.dataclass
class Tower:
    visual: torch.nn.Module  # transformers' model.model.visual
    vcfg: qv.QwenVisionConfig
    params: dict
    hf_vision_config: dict


@pytest.fixture(scope="module", params=qv.KINDS)
def tower(request) -> Tower:
    torch.manual_seed(0)
    if request.param == "qwen2_vl":
        cfg = Qwen2VLConfig(text_config=TEXT, vision_config=VISION["qwen2_vl"])
        model = Qwen2VLForConditionalGeneration(cfg)
    else:
        cfg = Qwen2_5_VLConfig(text_config=TEXT, vision_config=VISION["qwen2_5_vl"])
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    visual = model.model.visual.eval()
    _randomize(visual)
    d = cfg.vision_config.to_dict()
    vcfg = qv.QwenVisionConfig.from_hf(d)
    assert vcfg.kind == request.param
    state = {k: v.numpy() for k, v in visual.state_dict().items()}
    return Tower(visual, vcfg, qv.params_from_state_dict(state, vcfg), d)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    # grids (1, 16, 22): several Qwen2.5 windows, some partial; (1, 8, 10); (1, 4, 14)
    return [_rgb(224, 308, 0), _rgb(100, 150, 1), _rgb(60, 200, 2)]


def _reference(t: Tower, items: list[qi.Item]) -> np.ndarray:
    """transformers' merged features [tokens, out] of items in one call."""
    rows = torch.from_numpy(np.concatenate([r for r, _ in items]))
    grid = torch.tensor([g for _, g in items])
    with torch.no_grad():
        return t.visual(rows, grid_thw=grid).pooler_output.numpy()


def _check_batch(t: Tower, examples: list[list[qi.Item]], inputs: qv.VisionInputs,
                 atol: float = 1e-4) -> np.ndarray:  # fmt: skip
    out = np.asarray(features(t.params, t.vcfg, inputs))
    assert out.shape == (len(examples), inputs.capacity // 4, t.vcfg.out_hidden_size)
    for b, items in enumerate(examples):
        ref = _reference(t, items)
        n = int(inputs.num_tokens[b])
        assert n == len(ref)
        np.testing.assert_allclose(out[b, :n], ref, atol=atol, rtol=1e-4)
        assert not out[b, n:].any()  # padding tokens are zero
    return out


# ---------------------------------------------------------------------------------------------
# Preprocessing


def _pil(h: int, w: int, mode: str, seed: int) -> Image.Image:
    rgba = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(rgba, "RGBA")
    return img if mode == "RGBA" else img.convert(mode)


@pytest.mark.parametrize(
    "budget",
    [{}, dict(min_pixels=100 * 28 * 28, max_pixels=200 * 28 * 28)],
    ids=["default", "minmax"],
)
def test_preprocessing_matches_transformers(budget):
    """pixel_values and image_grid_thw equal `Qwen2VLImageProcessorPil`'s, for wide, tall,
    downscaled, upscaled, grayscale and transparent images, and with min/max pixels set."""
    vcfg = qv.QwenVisionConfig()
    cases = [
        _pil(37, 500, "RGB", 0), _pil(333, 250, "RGB", 1), _pil(1000, 800, "RGB", 2),
        _pil(30, 30, "L", 3), _pil(90, 61, "RGBA", 4), _pil(5, 900, "RGB", 5),
    ]  # fmt: skip
    ref = Qwen2VLImageProcessorPil(**budget)(cases, return_tensors="np")
    items = [qi.preprocess_image(c, vcfg, qi.QwenPreprocess(**budget)) for c in cases]
    np.testing.assert_array_equal(np.array([g for _, g in items]), ref["image_grid_thw"])
    np.testing.assert_allclose(
        np.concatenate([r for r, _ in items]), ref["pixel_values"], atol=1e-6, rtol=0
    )
    # a uint8 array is the same image as its PIL form
    arr = np.asarray(cases[1])
    np.testing.assert_array_equal(qi.preprocess_image(arr, vcfg)[0], items[1][0])


def test_smart_resize_and_aspect_limit():
    for h in (1, 13, 27, 28, 29, 100, 517, 1080, 4000):
        for w in (28, 41, 300, 1920, 5000):
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in ((56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28)):
                assert qi.smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi)
    with pytest.raises(ValueError) as e:
        qi.preprocess_image(_pil(2, 401, "RGB", 0), qv.QwenVisionConfig())
    msg = str(e.value)
    assert "\n" not in msg and "401x2" in msg and "200" in msg


def test_preprocess_settings_from_hf():
    proc = Qwen2VLImageProcessorPil(min_pixels=1234, max_pixels=56789)
    s = qi.QwenPreprocess.from_hf(proc.to_dict())
    assert (s.min_pixels, s.max_pixels) == (1234, 56789)
    hub = {"min_pixels": 3136, "max_pixels": 12845056, "image_mean": [0.5] * 3,
           "image_std": [0.25] * 3}  # fmt: skip
    s = qi.QwenPreprocess.from_hf(hub, {"max_pixels": 1000})
    assert (s.max_pixels, s.image_mean, s.video_max_pixels) == (12845056, (0.5,) * 3, 1000)


# ---------------------------------------------------------------------------------------------
# Configuration, parameters, names


def test_config_round_trip_and_hub_dicts(tower):
    v = tower.vcfg
    d = v.to_dict()
    assert qv.QwenVisionConfig.from_dict(d) == v
    assert qv.QwenVisionConfig.from_dict({k: list(x) if isinstance(x, tuple) else x
                                          for k, x in d.items()}) == v  # fmt: skip
    if v.kind == "qwen2_vl":
        assert (v.embed_dim, v.intermediate_size, v.out_hidden_size) == (32, 64, 64)
        assert v.hidden_act == "quick_gelu" and v.full_attention_layers().all()
        hub = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
               "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
               "temporal_patch_size": 2}  # fmt: skip
        h = qv.QwenVisionConfig.from_hf(hub)
        assert (h.kind, h.embed_dim, h.intermediate_size, h.out_hidden_size) == (
            "qwen2_vl",
            1280,
            5120,
            1536,
        )
    else:
        assert (v.embed_dim, v.intermediate_size, v.out_hidden_size) == (32, 48, 64)
        assert v.fullatt_block_indexes == (1,) and v.window_groups == 4
        assert v.full_attention_layers().tolist() == [False, True, False]
        hub = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
               "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
               "spatial_merge_size": 2, "window_size": 112, "tokens_per_second": 2,
               "fullatt_block_indexes": [7, 15, 23, 31], "temporal_patch_size": 2,
               "model_type": "qwen2_5_vl"}  # fmt: skip
        h = qv.QwenVisionConfig.from_hf(hub)
        assert (h.kind, h.fullatt_block_indexes, h.tokens_per_second) == (
            "qwen2_5_vl",
            (7, 15, 23, 31),
            2.0,
        )
    assert isinstance(qv.QwenVisionConfig.from_dict(h.to_dict()).fullatt_block_indexes, tuple)


def test_name_rules_cover_the_checkpoint(tower):
    """Every tensor of the tower (with either prefix) resolves; the tree has the documented
    shapes; the Conv3d flattening equals transformers' patch embedding."""
    assert (qv.COPY, qv.LINEAR) == (names.COPY, names.LINEAR)
    shapes = qv.vision_param_shapes(tower.vcfg)
    got = jax.tree.map(lambda a: tuple(a.shape), tower.params)
    assert got == jax.tree.map(tuple, shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = set()
    for name in tower.visual.state_dict():
        target = qv._resolve(name)
        assert target not in (None, "ignored"), name
        keys.add(target[0])
    flat = {"vision/" + "/".join(p.key for p in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tower.params)[0]}  # fmt: skip
    assert keys == flat
    assert qv._resolve("rotary_pos_emb.inv_freq") == "ignored"
    assert qv._resolve("blocks.0.attn.nonsense.weight") is None
    rows = np.random.default_rng(0).normal(size=(8, tower.vcfg.patch_dim)).astype(np.float32)
    with torch.no_grad():
        ref = tower.visual.patch_embed(torch.from_numpy(rows)).numpy()
    ours = rows @ np.asarray(tower.params["patch_embed"]["kernel"])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The tower


def test_tower_matches_transformers(tower, images):
    """One image, and two images of different sizes in one example, in a padded batch of two
    examples with different patch counts: each equals transformers on its own images."""
    items = [qi.preprocess_image(x, tower.vcfg) for x in images]
    examples = [[items[0]], [items[1], items[2]]]
    inputs = qi.pack(examples, tower.vcfg)
    assert inputs.capacity == 352 and inputs.block == 352  # 88 tokens: a ladder size
    assert inputs.num_tokens.tolist() == [88, 34]
    batched = _check_batch(tower, examples, inputs)
    # the second example alone, padded much further: the same numbers
    alone = qi.pack(examples[1:], tower.vcfg, capacity=256)
    out = np.asarray(features(tower.params, tower.vcfg, alone))
    np.testing.assert_allclose(out[0, :34], batched[1, :34], atol=1e-5)


def test_tiled_attention(tower, images):
    """Attention in 64-row tiles (each visiting only its segments' key tiles) = transformers."""
    items = [qi.preprocess_image(x, tower.vcfg) for x in images]
    examples = [[items[1], items[2]], [items[0]]]
    inputs = qi.pack(examples, tower.vcfg, capacity=384, block=64)
    assert inputs.block_ranges.shape == (6, 2, 2)
    if tower.vcfg.windowed:  # windowed layers visit fewer key tiles than full ones
        spans = inputs.block_ranges[:, :, 1] - inputs.block_ranges[:, :, 0]
        assert (spans[:, 1] <= spans[:, 0]).all() and (spans[:, 1] < spans[:, 0]).any()
    _check_batch(tower, examples, inputs)


def test_attention_segments_are_exercised(tower, images):
    """The segments change the result, so the parity above is not vacuous: two images of an
    example attend each other once their segments are merged, and Qwen2.5's windows differ
    from whole-frame attention."""
    items = [qi.preprocess_image(x, tower.vcfg) for x in images[:2]]
    inputs = qi.pack([items], tower.vcfg)
    n = 352 + 80
    assert len(np.unique(inputs.segments[0, :n])) == 2
    ref = np.asarray(features(tower.params, tower.vcfg, inputs))
    one = np.where(np.arange(inputs.capacity) < n, 0, inputs.segments)
    merged = inputs.replace(segments=one, window_segments=one)
    assert np.abs(np.asarray(features(tower.params, tower.vcfg, merged)) - ref).max() > 1e-2
    if tower.vcfg.windowed:  # 2 x 3 windows of up to 4 x 4 groups, then 1 x 2 (4 x 5 groups)
        assert len(np.unique(inputs.window_segments[0, :n])) == 6 + 2
        full = inputs.replace(window_segments=inputs.segments)
        assert np.abs(np.asarray(features(tower.params, tower.vcfg, full)) - ref).max() > 1e-2
    else:
        np.testing.assert_array_equal(inputs.window_segments, inputs.segments)


def test_bf16_params(tower, images):
    items = [qi.preprocess_image(images[1], tower.vcfg)]
    inputs = qi.pack([items], tower.vcfg)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), tower.params)
    out = features(bf16, tower.vcfg, inputs)
    assert out.dtype == jnp.bfloat16
    ref = _reference(tower, items)
    err = np.abs(np.asarray(out[0, :20], np.float32) - ref).max()
    assert err < 0.05 * np.abs(ref).max()


def _hand_built_video(frames: np.ndarray, s: qi.QwenPreprocess) -> tuple[np.ndarray, list]:
    """transformers' video processor after its resize (frames already at a multiple of 28,
    inside the budget): rescale, normalise, then its patchify permutation."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)[None].float() * s.rescale_factor
    mean, std = torch.tensor(s.image_mean), torch.tensor(s.image_std)
    x = (x - mean[:, None, None]) / std[:, None, None]
    b, t, c, h, w = x.shape
    gt, gh, gw = t // 2, h // 14, w // 14
    x = x.view(b, gt, 2, c, gh // 2, 2, 14, gw // 2, 2, 14).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(gt * gh * gw, c * 2 * 14 * 14).numpy(), [gt, gh, gw]


def test_video_matches_transformers(tower, images):
    """8 frames -> grid (4, 8, 12), in a padded batch next to an image example."""
    frames = np.random.default_rng(7).integers(0, 256, (8, 112, 168, 3), dtype=np.uint8)
    s = qi.QwenPreprocess(video_min_pixels=56 * 56)
    rows, grid = _hand_built_video(frames, s)
    ours = qi.preprocess_video(frames, tower.vcfg, s)
    assert ours[1] == tuple(grid) == (4, 8, 12)
    np.testing.assert_allclose(ours[0], rows, atol=1e-5, rtol=0)
    inputs, grids = qi.prepare([[images[2]], [frames]], tower.vcfg, s)
    assert [g.tolist() for g in grids] == [[[1, 4, 14]], [[4, 8, 12]]]
    with torch.no_grad():
        ref = tower.visual(torch.from_numpy(rows), grid_thw=torch.tensor([grid]))
    out = np.asarray(features(tower.params, tower.vcfg, inputs))
    assert inputs.num_tokens.tolist() == [14, 96]
    np.testing.assert_allclose(out[1, :96], ref.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Host-side packing


def test_odd_frame_count_repeats_the_last_frame():
    vcfg = qv.QwenVisionConfig()
    frames = np.random.default_rng(3).integers(0, 256, (3, 56, 84, 3), dtype=np.uint8)
    s = qi.QwenPreprocess(video_min_pixels=56 * 56)
    odd = qi.preprocess_video(list(frames), vcfg, s)
    even = qi.preprocess_video(np.concatenate([frames, frames[-1:]]), vcfg, s)
    assert odd[1] == even[1] == (2, 4, 6)
    np.testing.assert_array_equal(odd[0], even[0])


def test_buckets_and_errors():
    for n in (16, 352, 1000, 5120, 20000):
        p = qi.patch_capacity(n)
        assert p % 4 == 0 and p >= max(n, 256) and (n < 256 * 4 or p <= n * 1.0625 + 4)
        assert qi.patch_capacity(p) == p  # a bucket holds itself
    assert qi.patch_capacity(16) == 256 and qi.patch_capacity(5120) == 5120
    assert qi.attention_block(352) == 352 and qi.attention_block(5120) == 512
    assert qi.attention_block(2176) == 128
    vcfg = qv.QwenVisionConfig(kind="qwen2_5_vl", window_size=112)
    item = qi.preprocess_image(_rgb(224, 308, 0), vcfg)
    with pytest.raises(ValueError, match="do not fit"):
        qi.pack([[item]], vcfg, capacity=256)
    with pytest.raises(ValueError, match="does not divide"):
        qi.pack([[item]], vcfg, capacity=384, block=100)
    inputs = qi.pack([[item], []], vcfg)  # an example without images: all padding
    assert inputs.num_tokens.tolist() == [88, 0]
    assert (inputs.segments[1] >= qv.PAD_SEGMENT).all()
    # the window permutation: a permutation of the groups, undone by reverse_index
    index = inputs.reverse_index[0]
    assert sorted(index.tolist()) == list(range(88))


def test_position_ids_and_window_index_match_transformers():
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    vcfg = qv.QwenVisionConfig(kind="qwen2_5_vl", window_size=112)
    grids = [(1, 16, 22), (2, 8, 8), (1, 4, 14), (3, 10, 6)]
    pos = np.concatenate([qi.position_ids(g, 2) for g in grids])
    ref = get_vision_position_ids(torch.tensor(grids), 2).numpy()
    np.testing.assert_array_equal(pos, ref)
    index, cu = get_vision_window_index(torch.tensor(grids), 2, 112, 14)
    ours, offset, bounds = [], 0, [0]
    for g in grids:
        idx, win = qi.window_order(g, vcfg)
        ours.append(idx + offset)
        offset += len(idx)
        bounds += (bounds[-1] + 4 * np.cumsum(np.bincount(win))).tolist()
    np.testing.assert_array_equal(np.concatenate(ours), index.numpy())
    np.testing.assert_array_equal(np.unique(bounds), np.unique(cu.numpy()))
