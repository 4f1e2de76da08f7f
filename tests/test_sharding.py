"""Meshes and the sharding rule table (`sparsevlm_jax.sharding`): parsing, the table,
`sparsevlm info --mesh`."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsevlm_jax import sharding as sh
from sparsevlm_jax.config import ConfigError, LlavaConfig, TextConfig, VisionConfig
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.params import flatten, param_shapes


def tiny(heads: int = 8, kv_heads: int = 8, vision_heads: int = 8, vocab: int = 512):
    return LlavaConfig(
        vision=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=vision_heads,
            image_size=112,
            patch_size=14,
        ),
        text=TextConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=64 // heads,
        ),
    )


def test_parse_mesh():
    assert sh.parse_mesh("data=2,model=4") == sh.MeshShape(2, 4)
    assert sh.parse_mesh("model=4, data=1") == sh.MeshShape(1, 4)
    assert sh.parse_mesh(None, 8) == sh.MeshShape(8, 1)  # default: every device on data
    assert sh.parse_mesh("model=2", 8) == sh.MeshShape(4, 2)  # data takes the rest
    assert sh.parse_mesh("model=2") == sh.MeshShape(1, 2)
    for bad in ("data=2,pipe=2", "data=x", "model=0", "data=2,data=2", "4x2"):
        with pytest.raises(InputError, match="--mesh"):
            sh.parse_mesh(bad, 8)


def test_make_mesh_needs_enough_devices():
    import jax

    mesh = sh.make_mesh("data=1,model=1")
    assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (1, 1)
    with pytest.raises(InputError, match="needs 8 devices, 1 is available"):
        sh.make_mesh("data=2,model=4", jax.local_devices()[:1])


def test_every_parameter_has_a_rule_and_the_splits_are_megatron():
    cfg = tiny()
    lay = sh.param_layouts(cfg, sh.MeshShape(1, 8))
    assert set(lay) == set(flatten(param_shapes(cfg)))
    spec = {k: tuple(v.spec) for k, v in lay.items()}
    assert spec["text/layers/q_proj/kernel"] == (None, None, "model")  # column
    assert spec["text/layers/k_proj/kernel"] == (None, None, "model")
    assert spec["text/layers/o_proj/kernel"] == (None, "model", None)  # row
    assert spec["text/layers/gate_proj/kernel"] == (None, None, "model")
    assert spec["text/layers/down_proj/kernel"] == (None, "model", None)
    assert spec["text/embed_tokens"] == (None, "model")
    assert spec["text/lm_head"] == (None, "model")
    assert spec["vision/layers/fc1/kernel"] == (None, None, "model")
    assert spec["vision/layers/out_proj/kernel"] == (None, "model", None)
    assert spec["projector/linear_2/kernel"] == ("model", None)
    for replicated in (
        "text/norm/scale",
        "text/layers/input_layernorm/scale",
        "vision/layers/fc2/bias",
    ):
        assert set(spec[replicated]) <= {None}, replicated
    assert lay["text/layers/q_proj/kernel"].shard_shape == (4, 64, 8)


def test_heads_must_divide_the_model_axis():
    for cfg, what in (
        (tiny(heads=4, kv_heads=4), "4 text query heads"),
        (tiny(kv_heads=4), "4 text KV heads"),
        (tiny(vision_heads=4), "4 vision heads"),
    ):
        with pytest.raises(ConfigError, match=f"model=8 does not divide the model's {what}"):
            sh.param_layouts(cfg, sh.MeshShape(1, 8))


def test_a_size_that_does_not_divide_is_replicated_and_said_so():
    lay = sh.param_layouts(tiny(vocab=510), sh.MeshShape(1, 4))
    assert tuple(lay["text/lm_head"].spec) == (None, None)
    assert "510 does not divide" in lay["text/lm_head"].note
    assert "510 does not divide" in sh.format_layout(tiny(vocab=510), sh.MeshShape(1, 4))


def test_layout_table_bytes_per_device():
    cfg = LlavaConfig()  # LLaVA-1.5-7B's shapes
    text = sh.format_layout(cfg, sh.MeshShape(2, 4))
    q = [line for line in text.splitlines() if "text/layers/q_proj/kernel" in line][0]
    assert "(·, ·, model)" in q and "512.0 MiB" in q  # 32 x 4096 x 4096 fp32 / 4
    assert "per device of" in text and "KV cache" in text and "data=2" in text


def test_info_mesh(capsys):
    from sparsevlm_jax.cli.app import main

    ckpt = Path(__file__).resolve().parents[1] / "sparsevlm_jax" / "demo_model"
    if not (ckpt / "config.json").exists():
        pytest.skip("no bundled model")
    assert main(["info", str(ckpt), "--mesh", "data=2,model=1"]) == 0
    out = capsys.readouterr().out
    assert "mesh:        data=2,model=1" in out and "text/layers/q_proj/kernel" in out
    assert main(["info", str(ckpt), "--mesh", "model=x"]) == 2
    assert "--mesh: model must be an integer" in capsys.readouterr().err
