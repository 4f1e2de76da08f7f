"""Converter and checkpoint tests on a tiny random transformers LLaVA, written in every layout.

Layouts (all from ONE state dict): llava-hf hub names sharded in two files + index; transformers 5
`save_pretrained`; the in-memory state-dict names; original LLaVA (llava_llama config + Llama /
mm_projector keys, as safetensors and as `.bin`) with a separate CLIP dir, or with the CLIP
weights embedded. Every conversion must give the same tree, equal to the torch weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from convert import ConversionError, convert_checkpoint, convert_to_numpy
from convert import llava as convert_llava
from convert.names import CLIP_PREFIXES, IGNORED, MODEL_PREFIXES, Target, resolve
from convert.streaming import copy_into
from sparsevlm_jax import checkpoint
from sparsevlm_jax.config import LlavaConfig, VisionConfig
from sparsevlm_jax.loading import load_model
from sparsevlm_jax.params import flatten, param_shapes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMAGE_TOKEN = 60


@pytest.fixture(scope="module")
def hf_model():
    """A tiny random `LlavaForConditionalGeneration` (CLIP 3 layers, Llama 2 layers, GQA)."""
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        projection_dim=16,
    )
    text = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN
    )
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def state(hf_model) -> dict[str, np.ndarray]:
    """The in-memory state dict (`model.language_model.*`, `model.vision_tower.*`, ...)."""
    return {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}


def _rename(sd: dict[str, np.ndarray], rules: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in sd.items():
        for old, new in rules:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        out[name] = value
    return out


def _hub_names(sd):
    return _rename(
        sd,
        [
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower.vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
        ],
    )


def _original_names(sd):
    """Original LLaVA: Llama + projector only (vision dropped), `model.mm_projector.{0,2}`."""
    llama = {k: v for k, v in sd.items() if not k.startswith("model.vision_tower.")}
    return _rename(
        llama,
        [
            ("model.language_model.", "model."),
            ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
            ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ],
    )


def _write_json(path: Path, d: dict) -> None:
    path.write_text(json.dumps(d))


def _original_config(hf_model, tower: str = "openai/clip-vit-large-patch14-336") -> dict:
    d = hf_model.config.text_config.to_dict()
    d.update(
        model_type="llava_llama",
        architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower=tower,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_projector_type="mlp2x_gelu",
        mm_hidden_size=hf_model.config.vision_config.hidden_size,
        image_aspect_ratio="pad",
    )
    return d


def _clip_state(sd) -> dict[str, np.ndarray]:
    """A CLIPModel state dict: our vision weights under `vision_model.*` plus the text half."""
    vis = {
        "vision_model." + k[len("model.vision_tower.") :]: v
        for k, v in sd.items()
        if k.startswith("model.vision_tower.")
    }
    vis["vision_model.embeddings.position_ids"] = np.arange(5, dtype=np.int64)[None]
    vis["text_model.embeddings.token_embedding.weight"] = np.zeros((10, 8), np.float32)
    vis["visual_projection.weight"] = np.zeros((16, 32), np.float32)
    vis["text_projection.weight"] = np.zeros((16, 8), np.float32)
    vis["logit_scale"] = np.array(2.6, np.float32)
    return vis


def _torch_save(sd: dict[str, np.ndarray], path: Path) -> None:
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, hf_model, state) -> dict[str, tuple[Path, Path | None]]:
    """Every layout on disk: name -> (src dir, clip dir or None)."""
    root = tmp_path_factory.mktemp("layouts")
    hf_cfg = hf_model.config.to_dict()
    out: dict[str, tuple[Path, Path | None]] = {}

    # (a) llava-hf hub names, sharded in two files + index, with ignorable buffers.
    hub = _hub_names(state)
    hub["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    hub["vision_tower.vision_model.embeddings.position_ids"] = np.arange(5, dtype=np.int64)[None]
    d = root / "hub"
    d.mkdir()
    names = sorted(hub)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for fname, keys in shards.items():
        save_file({k: hub[k] for k in keys}, str(d / fname))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    _write_json(d / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    _write_json(d / "config.json", hf_cfg)
    (d / "tokenizer_config.json").write_text("{}")
    (d / "chat_template.jinja").write_text("{{ messages }}")
    out["hub"] = (d, None)

    # (b1) transformers 5 save_pretrained output (no `vision_model` in the vision names).
    d = root / "save_pretrained"
    hf_model.save_pretrained(d)
    out["save_pretrained"] = (d, None)

    # (b2) in-memory state-dict names.
    d = root / "in_memory"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    _write_json(d / "config.json", hf_cfg)
    out["in_memory"] = (d, None)

    # (c) original LLaVA + separate CLIP dir (CLIPModel as pytorch_model.bin).
    clip = root / "clip"
    clip.mkdir()
    _torch_save(_clip_state(state), clip / "pytorch_model.bin")
    vision_cfg = hf_model.config.vision_config.to_dict()
    _write_json(clip / "config.json", {"model_type": "clip", "vision_config": vision_cfg})
    (clip / "preprocessor_config.json").write_text("{}")
    orig = _original_names(state)
    orig["model.layers.1.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    for name, write in (
        ("original", lambda sd, d: save_file(sd, str(d / "model.safetensors"))),
        ("original_bin", lambda sd, d: _torch_save(sd, d / "pytorch_model.bin")),
    ):
        d = root / name
        d.mkdir()
        write(orig, d)
        _write_json(d / "config.json", _original_config(hf_model))
        out[name] = (d, clip)

    # (c') original LLaVA with the CLIP weights embedded (as LLaVA saves an unfrozen tower).
    d = root / "original_embedded"
    d.mkdir()
    emb = dict(orig)
    for k, v in _clip_state(state).items():
        if k.startswith("vision_model."):
            emb["model.vision_tower.vision_tower." + k] = v
    save_file(emb, str(d / "model.safetensors"))
    _write_json(d / "config.json", _original_config(hf_model, tower="tests/tiny-clip"))
    out["original_embedded"] = (d, None)
    return out


@pytest.fixture
def tiny_tower(hf_model, monkeypatch):
    """Makes the tiny CLIP a known tower, for original checkpoints with embedded CLIP."""
    vision = VisionConfig.from_hf(hf_model.config.vision_config.to_dict())
    monkeypatch.setitem(convert_llava.KNOWN_CLIP_TOWERS, "tiny-clip", vision)


@pytest.fixture(scope="module")
def reference(layouts) -> tuple[dict[str, np.ndarray], LlavaConfig]:
    return convert_to_numpy(layouts["hub"][0], dtype="float32", progress=False)


def test_every_layout_gives_the_same_tree(layouts, reference, tiny_tower):
    ref, ref_cfg = reference
    assert set(ref) == set(flatten(param_shapes(ref_cfg)))
    for name, (src, clip) in layouts.items():
        flat, cfg = convert_to_numpy(src, dtype="float32", clip=clip, progress=False)
        assert set(flat) == set(ref), name
        for key in ref:
            np.testing.assert_array_equal(flat[key], ref[key], err_msg=f"{name}: {key}")
        original = name.startswith("original")
        assert cfg.image_token_index == (-200 if original else IMAGE_TOKEN), name
        assert cfg.replace(image_token_index=0) == ref_cfg.replace(image_token_index=0), name


def test_tree_equals_torch_weights(reference, state, hf_model):
    flat, cfg = reference
    assert cfg.text.num_key_value_heads == 2 and cfg.vision.num_hidden_layers == 3
    q1 = state["model.language_model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(flat["text/layers/q_proj/kernel"][1], q1.T)
    k0 = state["model.language_model.layers.0.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(flat["text/layers/k_proj/kernel"][0], k0.T)
    fc1 = state["model.vision_tower.encoder.layers.2.mlp.fc1.bias"]
    np.testing.assert_array_equal(flat["vision/layers/fc1/bias"][2], fc1)
    np.testing.assert_array_equal(flat["text/lm_head"], state["lm_head.weight"].T)
    np.testing.assert_array_equal(
        flat["vision/pre_layrnorm/scale"], state["model.vision_tower.pre_layrnorm.weight"]
    )
    np.testing.assert_array_equal(
        flat["projector/linear_2/kernel"], state["model.multi_modal_projector.linear_2.weight"].T
    )
    # Patch embedding: the conv equals patches (rows ordered row, col, channel) @ kernel.
    conv = hf_model.model.vision_tower.embeddings.patch_embedding
    x = torch.randn(1, 3, 28, 28)
    want = conv(x).detach().numpy()[0].transpose(1, 2, 0)  # [2, 2, Dv]
    p = cfg.vision.patch_size
    nhwc = x.numpy()[0].transpose(1, 2, 0)  # [28, 28, C]
    patches = nhwc.reshape(2, p, 2, p, 3).transpose(0, 2, 1, 3, 4).reshape(2, 2, p * p * 3)
    np.testing.assert_allclose(patches @ flat["vision/patch_embedding"], want, atol=1e-5)


def test_name_table():
    assert resolve("language_model.model.layers.7.mlp.up_proj.weight", MODEL_PREFIXES) == Target(
        "text/layers/up_proj/kernel", 7, "linear"
    )
    embedded = "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    assert resolve(embedded, MODEL_PREFIXES) == Target("vision/layers/fc1/kernel", 1, "linear")
    assert resolve("model.mm_projector.2.bias", MODEL_PREFIXES) == Target(
        "projector/linear_2/bias", None, "copy"
    )
    assert resolve("vision_tower.post_layernorm.weight", MODEL_PREFIXES) == IGNORED
    assert resolve("logit_scale", CLIP_PREFIXES) == IGNORED
    assert resolve("text_model.encoder.layers.0.mlp.fc1.weight", CLIP_PREFIXES) == IGNORED
    newline = Target("image_newline", None, "copy")  # LLaVA-NeXT (unexpected on LLaVA-1.5)
    assert resolve("model.image_newline", MODEL_PREFIXES) == newline
    assert resolve("image_newline", MODEL_PREFIXES) == newline
    assert resolve("model.image_newline.extra", MODEL_PREFIXES) is None
    assert resolve("vision_model.embeddings.class_embedding", MODEL_PREFIXES) is None


def _broken_copy(src: Path, dst: Path, edit) -> Path:
    """Copies a single-file layout with `edit(state dict)` applied to its tensors."""
    from convert.readers import open_weights

    dst.mkdir()
    sd = dict(open_weights(src).tensors())
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def _assert_refused(src: Path, dst: Path, *needles: str) -> str:
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(src, dst, dtype="float32", progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if ".tmp-" in p.name]
    return msg


def test_refusals_name_every_problem(layouts, tmp_path):
    src = layouts["in_memory"][0]

    def edit(sd):
        del sd["model.language_model.layers.1.self_attn.q_proj.weight"]
        sd["lm_head.weight"] = sd["lm_head.weight"][:10]
        sd["foo.bar"] = np.zeros(3, np.float32)

    msg = _assert_refused(
        _broken_copy(src, tmp_path / "all", edit),
        tmp_path / "out_all",
        "1 missing (text/layers/q_proj/kernel[layer 1])",
        "1 unexpected (foo.bar)",
        "1 wrong shape (lm_head.weight: (10, 32) != (64, 32) (config vocab_size 64))",
    )
    assert msg.startswith("checkpoint ")

    def drop_vision(sd):
        for k in [k for k in sd if k.startswith("model.vision_tower.encoder.")]:
            del sd[k]

    _assert_refused(
        _broken_copy(src, tmp_path / "novision", drop_vision),
        tmp_path / "out_novision",
        "vision/layers/q_proj/kernel[layers 0-2]",
        "... and",
    )


def test_original_without_clip_is_refused(layouts, tmp_path):
    src, _ = layouts["original"]
    with pytest.raises(ConversionError, match="--clip"):
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_orbax_round_trip(layouts, reference, tmp_path):
    src, clip = layouts["original"]
    dst = tmp_path / "ckpt"
    cfg = convert_checkpoint(src, dst, dtype="float32", clip=clip, progress=False)
    assert checkpoint.is_checkpoint(dst) and not checkpoint.is_checkpoint(src)
    assert (dst / "preprocessor_config.json").is_file()
    params, loaded_cfg = checkpoint.load(dst)
    assert loaded_cfg == cfg
    flat = flatten(params)
    ref, _ = reference
    assert set(flat) == set(ref)
    for key, value in flat.items():
        assert isinstance(value, jax.Array) and value.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(value), ref[key], err_msg=key)
    with pytest.raises(checkpoint.CheckpointError, match="not empty"):
        convert_checkpoint(src, dst, clip=clip, progress=False)


def test_bfloat16_conversion_and_load_model(layouts, reference, tmp_path):
    src, _ = layouts["hub"]
    dst = tmp_path / "bf16"
    cfg = convert_checkpoint(src, dst, progress=False)  # default dtype: bfloat16
    assert cfg.param_dtype == "bfloat16"
    assert (dst / "tokenizer_config.json").is_file() and (dst / "chat_template.jinja").is_file()
    ref, _ = reference
    params, loaded = load_model(dst)
    assert loaded.param_dtype == "bfloat16"
    q = flatten(params)["text/layers/q_proj/kernel"]
    assert q.dtype == jnp.bfloat16
    want = ref["text/layers/q_proj/kernel"].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(q), want)
    params32, cfg32 = checkpoint.load(dst, dtype="float32")
    assert cfg32.param_dtype == "float32"
    assert flatten(params32)["text/lm_head"].dtype == jnp.float32
    direct, direct_cfg = load_model(src, dtype="float16")  # transformers dir, no disk write
    assert direct_cfg.param_dtype == "float16"
    assert flatten(direct)["text/embed_tokens"].dtype == jnp.float16


def test_keep_dtype_and_bf16_sources(layouts, reference, hf_model, tmp_path):
    _, cfg = convert_to_numpy(layouts["in_memory"][0], dtype=None, progress=False)
    assert cfg.param_dtype == "float32"
    from safetensors.torch import save_file as torch_save_file

    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in hf_model.state_dict().items()}
    for name, write in (
        ("st", lambda d: torch_save_file(bf16, str(d / "model.safetensors"))),
        ("bin", lambda d: torch.save(bf16, d / "pytorch_model.bin")),
    ):
        d = tmp_path / name
        d.mkdir()
        write(d)
        (d / "config.json").write_text((layouts["in_memory"][0] / "config.json").read_text())
        flat, cfg = convert_to_numpy(d, dtype=None, progress=False)
        assert cfg.param_dtype == "bfloat16"
        ref, _ = reference
        for key, value in flat.items():
            assert value.dtype == ml_dtypes.bfloat16, key
            want = ref[key].astype(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(value.view(np.uint16), want.view(np.uint16), key)


def test_tiled_transpose_copy():
    w = np.random.default_rng(0).standard_normal((70, 90)).astype(np.float16)
    dst = np.empty((90, 70), ml_dtypes.bfloat16)
    copy_into(dst, w, Target("x", None, "linear"), tile=16)
    np.testing.assert_array_equal(
        dst.view(np.uint16), w.T.astype(ml_dtypes.bfloat16).view(np.uint16)
    )


def test_cli(layouts, tmp_path, capsys):
    from convert.cli import main

    src, clip = layouts["original"]
    assert main([str(src), str(tmp_path / "a"), "--clip", str(clip), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out
    # The default stores bfloat16 from this float32 source: the summary and the metadata say so.
    assert "bfloat16 weights (source float32; --dtype float32 or keep to match it)" in out
    conversion = {"dtype": "bfloat16", "source_dtype": "float32", "requested_dtype": "bfloat16"}
    assert checkpoint.load_metadata(tmp_path / "a") == {"conversion": conversion}
    keep = [str(src), str(tmp_path / "k"), "--clip", str(clip), "--quiet", "--dtype", "keep"]
    assert main(keep) == 0
    assert "float32 weights (as the source)" in capsys.readouterr().out
    assert checkpoint.load_metadata(tmp_path / "k")["conversion"]["requested_dtype"] == "keep"
    assert main([str(src), str(tmp_path / "b"), "--quiet"]) == 2
    assert "--clip" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_checkpoint_errors(reference, tmp_path):
    ref, cfg = reference
    with pytest.raises(checkpoint.CheckpointError, match="not a sparsevlm-jax checkpoint"):
        checkpoint.load(tmp_path)
    bad = dict(ref)
    del bad["text/norm/scale"]
    bad["text/embed_tokens"] = bad["text/embed_tokens"][:5]
    from sparsevlm_jax.params import unflatten

    checkpoint.save(tmp_path / "bad", unflatten(bad), cfg)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(tmp_path / "bad")
    msg = str(info.value)
    assert "\n" not in msg and "1 missing (text/norm/scale)" in msg
    assert "text/embed_tokens: (5, 32) != (64, 32)" in msg
    # A failing save leaves neither the checkpoint nor its temporary directory.
    with pytest.raises(FileNotFoundError):
        checkpoint.save(tmp_path / "x", unflatten(ref), cfg, {"a.json": tmp_path / "missing"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
