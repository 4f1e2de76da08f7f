"""LLaVA-NeXT anyres tiling and packing against transformers (fast, offline, CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from transformers.image_processing_utils import (
    select_best_resolution as hf_select_best_resolution,
)
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModel,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from sparsevlm_jax.anyres import (
    NEWLINE_INDEX,
    AnyresSpec,
    anyres_grid,
    num_visual_tokens,
    packed_indices,
    preprocess_anyres,
    select_best_resolution,
)
from sparsevlm_jax.config import ConfigError
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]
# (height, width); grids (1,3) (3,1) (2,2) (2,2) (3,1) (1,2) (2,1) (1,2); the last is smaller
# than one tile
TINY_SIZES = [
    (100, 300),
    (300, 100),
    (224, 224),
    (150, 230),
    (500, 90),
    (50, 100),
    (100, 50),
    (30, 40),
]


def _spec(pinpoints, tile: int, patch: int = 14, shortest_edge: int | None = None) -> AnyresSpec:
    return AnyresSpec(
        pinpoints=tuple(tuple(p) for p in pinpoints),
        tile_size=tile,
        patch_size=patch,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        shortest_edge=tile if shortest_edge is None else shortest_edge,
    )


REAL = _spec(REAL_PINPOINTS, 336)
TINY = _spec(TINY_PINPOINTS, 56)


def _rand_image(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img.convert(mode) if mode != "RGB" else img


def _hf_image_processor(spec: AnyresSpec):
    """transformers' LLaVA-NeXT image processor for `spec`, the PIL backend when available."""
    import transformers

    kw = dict(
        size={"shortest_edge": spec.shortest_edge},
        crop_size={"height": spec.tile_size, "width": spec.tile_size},
        image_grid_pinpoints=[list(p) for p in spec.pinpoints],
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )
    errors = []
    for name in ("LlavaNextImageProcessorPil", "LlavaNextImageProcessor"):
        try:
            return getattr(transformers, name)(**kw)
        except (ImportError, AttributeError) as e:
            errors.append(f"{name}: {e}")
    pytest.fail("no LLaVA-NeXT image processor constructs: " + "; ".join(errors))


def _hf_pack(config: LlavaNextConfig, table: torch.Tensor, size, newline: torch.Tensor):
    """transformers' pack_image_features for one image: [num_tiles, pps*pps, D] -> [V, D]."""
    fake = SimpleNamespace(config=config)  # pack_image_features reads only self.config
    feats, lens = LlavaNextModel.pack_image_features(
        fake, [table], torch.tensor([list(size)]), "default", image_newline=newline
    )
    assert int(lens[0]) == feats[0].shape[0]
    return feats[0]


def _hf_processor_count(pinpoints, tile: int, patch: int, size) -> int:
    """LlavaNextProcessor's placeholder count for one image ("default": CLS not counted)."""
    fake = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints),
        patch_size=patch,
        num_additional_image_tokens=1,
    )
    fake._get_unpadded_features = lambda *a: LlavaNextProcessor._get_unpadded_features(fake, *a)
    return LlavaNextProcessor._get_number_of_features(fake, size[0], size[1], tile, tile) - 1


def _gather(table: np.ndarray, idx: np.ndarray, newline: np.ndarray) -> np.ndarray:
    """[N, D] table, [V] packed indices -> [V, D], NEWLINE_INDEX -> `newline`."""
    out = table[np.where(idx == NEWLINE_INDEX, 0, idx)]
    out[idx == NEWLINE_INDEX] = newline
    return out


@pytest.fixture(scope="module")
def real_config() -> LlavaNextConfig:
    return LlavaNextConfig(image_grid_pinpoints=REAL_PINPOINTS)  # CLIP-L/336 tower, patch 14


@pytest.fixture(scope="module")
def tiny_model() -> LlavaNextForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        image_size=56,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=100,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=TINY_PINPOINTS,
        image_token_index=99,
    )
    return LlavaNextForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def tiny_processor():
    return _hf_image_processor(TINY)


# ---------------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    "size, expected",
    [((672, 672), 2928), ((480, 640), 2340), ((720, 1280), 1948), ((336, 336), 1176)],
)
def test_num_visual_tokens_real_spec(real_config, size, expected):
    # transformers' three views of the same count: the model's packing, the processor's
    # placeholder count and the tile count
    n_tiles = image_size_to_num_patches(list(size), REAL_PINPOINTS, 336)
    table = torch.arange(n_tiles * 576, dtype=torch.float64).reshape(n_tiles, 576, 1)
    hf = _hf_pack(
        real_config, table, size, torch.tensor([float(NEWLINE_INDEX)], dtype=torch.float64)
    )
    assert hf.shape[0] == expected
    assert _hf_processor_count(REAL_PINPOINTS, 336, 14, size) == expected
    assert num_visual_tokens(size, REAL) == expected
    # the index table as features: the model's packing *is* packed_indices
    np.testing.assert_array_equal(packed_indices(size, REAL), hf[:, 0].numpy().astype(np.int32))
    rows, cols = anyres_grid(size, REAL)
    assert 1 + rows * cols == n_tiles
    assert (rows, cols) == get_anyres_image_grid_shape(list(size), REAL_PINPOINTS, 336)


def test_packed_indices_match_transformers_many_sizes(real_config):
    rng = np.random.default_rng(1)
    sizes = [tuple(int(v) for v in rng.integers(20, 2000, 2)) for _ in range(40)]
    sizes += [
        (1, 200),
        (200, 1),
        (337, 335),
        (1000, 10),
        (10, 1000),
        (673, 1344),
        (1, 5000),
        (5000, 1),
    ]
    for size in sizes:
        hf_best = hf_select_best_resolution(list(size), REAL_PINPOINTS)
        assert select_best_resolution(size, REAL_PINPOINTS) == tuple(hf_best)
        n_tiles = 1 + int(np.prod(anyres_grid(size, REAL)))
        assert n_tiles == image_size_to_num_patches(list(size), REAL_PINPOINTS, 336)
        table = torch.arange(n_tiles * 576, dtype=torch.float64).reshape(n_tiles, 576, 1)
        nl = torch.tensor([float(NEWLINE_INDEX)], dtype=torch.float64)
        hf = _hf_pack(real_config, table, size, nl)[:, 0].numpy().astype(np.int32)
        ours = packed_indices(size, REAL)
        np.testing.assert_array_equal(ours, hf, err_msg=str(size))
        assert num_visual_tokens(size, REAL) == len(ours)
        assert num_visual_tokens(size, REAL) == _hf_processor_count(REAL_PINPOINTS, 336, 14, size)


# ---------------------------------------------------------------------------------- pixels


def test_tiny_sizes_select_different_grids():
    grids = {anyres_grid(s, TINY) for s in TINY_SIZES}
    assert len(grids) >= 4, grids
    assert TINY.max_tiles == 5 and TINY.patches_per_side == 4
    assert REAL.max_tiles == 5 and REAL.patches_per_side == 24


@pytest.mark.parametrize("size", TINY_SIZES)
def test_preprocess_matches_transformers(tiny_processor, size):
    img = _rand_image(*size, seed=size[0] * 1000 + size[1])
    ours = preprocess_anyres(img, TINY)
    hf = tiny_processor(img, return_tensors="np")
    ref = np.transpose(hf["pixel_values"][0], (0, 2, 3, 1))
    rows, cols = anyres_grid(size, TINY)
    assert ours.dtype == np.float32
    assert ours.shape == (1 + rows * cols, 56, 56, 3) == ref.shape
    assert tuple(hf["image_sizes"][0]) == size
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_preprocess_matches_transformers_real_spec():
    img = _rand_image(480, 640, seed=5)
    hf = _hf_image_processor(REAL)(img, return_tensors="np")["pixel_values"][0]
    ours = preprocess_anyres(img, REAL)
    assert ours.shape == (5, 336, 336, 3)
    np.testing.assert_allclose(ours, np.transpose(hf, (0, 2, 3, 1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size, mode", [((150, 230), "L"), ((90, 500), "RGB")])
def test_preprocess_matches_transformers_other_shortest_edge(size, mode):
    # shortest_edge != tile: tiles are resized to 64 and centre-cropped back to 56
    spec = _spec(TINY_PINPOINTS, 56, shortest_edge=64)
    img = _rand_image(*size, seed=7, mode=mode)
    ref = np.transpose(
        _hf_image_processor(spec)(img, return_tensors="np")["pixel_values"][0], (0, 2, 3, 1)
    )
    np.testing.assert_allclose(preprocess_anyres(img, spec), ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("size", TINY_SIZES)
def test_packing_matches_transformers(tiny_model, size):
    model = tiny_model.model
    rows, cols = anyres_grid(size, TINY)
    rng = np.random.default_rng(size[0] + 7 * size[1])
    feats = rng.standard_normal((1 + rows * cols, 16, 32)).astype(np.float32)
    newline = model.image_newline.detach()
    with torch.no_grad():
        hf, lens = model.pack_image_features(
            [torch.from_numpy(feats)], torch.tensor([list(size)]), "default", image_newline=newline
        )
    idx = packed_indices(size, TINY)
    assert idx.dtype == np.int32 and int(lens[0]) == len(idx) == num_visual_tokens(size, TINY)
    ours = _gather(feats.reshape(-1, 32), idx, newline.numpy())
    assert np.array_equal(ours, hf[0].numpy())


def test_image_features_end_to_end(tiny_model, tiny_processor):
    # our tiles -> the tower + projector as a flat table -> gather == transformers' features
    model = tiny_model.model
    for size in [(100, 300), (130, 60)]:
        img = _rand_image(*size, seed=3)
        tiles = torch.from_numpy(np.transpose(preprocess_anyres(img, TINY), (0, 3, 1, 2)).copy())
        with torch.no_grad():
            hf = model.get_image_features(
                pixel_values=tiles[None], image_sizes=torch.tensor([list(size)])
            ).pooler_output[0]
            hidden = model.vision_tower(tiles, output_hidden_states=True).hidden_states[-2]
            table = model.multi_modal_projector(hidden[:, 1:]).reshape(-1, 32).numpy()
        ours = _gather(table, packed_indices(size, TINY), model.image_newline.detach().numpy())
        np.testing.assert_allclose(ours, hf.numpy(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- errors


def test_bad_pinpoint_raises_config_error():
    with pytest.raises(ConfigError, match=r"\[56, 100\]") as e:
        _spec([[56, 112], [56, 100]], 56)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="empty"):
        _spec([], 56)
    with pytest.raises(ConfigError, match=r"\[0, 56\]"):
        _spec([[0, 56]], 56)
    with pytest.raises(ConfigError, match="patch size"):
        _spec(TINY_PINPOINTS, 56, patch=15)


def test_spec_is_hashable_and_from_hf():
    spec = AnyresSpec.from_hf(
        {
            "image_grid_pinpoints": TINY_PINPOINTS,
            "vision_config": {"image_size": 56, "patch_size": 14},
        },
        {
            "size": {"shortest_edge": 56},
            "crop_size": {"height": 56, "width": 56},
            "image_mean": list(OPENAI_CLIP_MEAN),
            "image_std": list(OPENAI_CLIP_STD),
        },
    )
    assert spec == TINY and hash(spec) == hash(TINY)
    with pytest.raises(ConfigError, match="crop size"):
        AnyresSpec.from_hf(
            {"image_grid_pinpoints": TINY_PINPOINTS, "vision_config": {"image_size": 56}},
            {"crop_size": {"height": 64, "width": 64}},
        )


def test_full_strategy_and_bad_sizes():
    with pytest.raises(NotImplementedError, match="full"):
        packed_indices((100, 300), TINY, strategy="full")
    with pytest.raises(ConfigError):
        packed_indices((100, 300), TINY, strategy="cls")  # type: ignore[arg-type]
    with pytest.raises(InputError):
        num_visual_tokens((0, 10), TINY)
    with pytest.raises(ConfigError, match="empty"):
        select_best_resolution((10, 10), [])
    # every pinpoint shows 0 pixels: transformers keeps the least wasted area (never None)
    assert select_best_resolution((1, 5000), REAL_PINPOINTS) == (336, 672)
    assert num_visual_tokens((1, 5000), REAL) == 576  # no grid row survives the unpadding
