"""The method presets' rules (SPEC §6): pruning layers by depth, SparseVLM+ head counts."""

from __future__ import annotations

import pytest

from sparsevlm_jax.config import ConfigError
from sparsevlm_jax.sparse.config import (
    V1_LAYERS_32,
    V15_LAYERS_32,
    SparseConfig,
    named_sparse_config,
    preset_layers,
    v2_num_heads,
)


@pytest.mark.parametrize("num_layers", [21, 24, 32, 40, 80])
def test_deep_enough_models_get_the_authors_layers(num_layers):
    assert preset_layers(V1_LAYERS_32, num_layers) == (2, 6, 15, 19)
    assert preset_layers(V15_LAYERS_32, num_layers) == (2, 6, 15)
    assert SparseConfig.v1(192, num_layers=num_layers).layers == (2, 6, 15, 19)
    for method in ("v1_5", "v2_0", "random"):
        assert named_sparse_config(method, 192, num_layers).layers == (2, 6, 15)
    assert named_sparse_config("v1", 128, num_layers).layers == (2, 6, 15, 19)
    # FastV's K = 2: the layer that decides is K - 1.
    assert named_sparse_config("fastv", 64, num_layers).layers == (1,)


def test_shallow_models_get_scaled_layers():
    # round(l * 8 / 32) with halves to even: 0.5 -> 0, 1.5 -> 2, 3.75 -> 4, 4.75 -> 5.
    assert preset_layers(V1_LAYERS_32, 8) == (0, 2, 4, 5)
    assert preset_layers(V15_LAYERS_32, 8) == (0, 2, 4)
    assert SparseConfig.v1(64, num_layers=8).layers == (0, 2, 4, 5)
    # 20 layers: too shallow for layer 19 (nothing would follow it), deep enough for 15.
    assert preset_layers(V1_LAYERS_32, 20) == (1, 4, 9, 12)
    assert preset_layers(V15_LAYERS_32, 20) == (2, 6, 15)
    # Scaled layers are pushed up to stay strictly increasing.
    assert preset_layers((0, 1, 2), 4) == (0, 1, 2)
    assert preset_layers((2, 6, 15, 19), 16) == (1, 3, 8, 10)


def test_too_shallow_models_raise():
    with pytest.raises(ConfigError, match="too shallow"):
        preset_layers(V1_LAYERS_32, 4)
    SparseConfig.v1(192, num_layers=21).validate_for(21)


@pytest.mark.parametrize(
    ("heads", "expected"),
    [(1, 1), (2, 1), (4, 2), (8, 4), (13, 6), (14, 14), (16, 14), (32, 14), (40, 14)],
)
def test_v2_num_heads(heads, expected):
    assert v2_num_heads(heads) == expected


def test_v2_num_heads_override():
    assert v2_num_heads(40, 18) == 18
    assert v2_num_heads(4, 4) == 4
    for bad in (0, 5):
        with pytest.raises(ConfigError):
            v2_num_heads(4, bad)
    with pytest.raises(ConfigError):
        SparseConfig(method="v2_0", layers=(1,), schedule=(3,), v2_heads=0)
