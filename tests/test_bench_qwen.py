"""`sparsevlm bench` on Qwen-VL shapes: the presets against the hub's config.json, the
workload's visual counts and abstract inputs against the host-side preprocessing, a
lowered-count FLOPs-only run of `mini-qwen` through the installed command; the timed run's
inputs (our positions = transformers' get_rope_index, the transformers config's shape = ours)
and a one-round timed run of `mini-qwen` through the installed command (JAX vs transformers'
Qwen2_5_VLForConditionalGeneration and the PyTorch reference, same weights: same last-token
logits, same pruning decisions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sparsevlm_jax import bench, qwen_images
from sparsevlm_jax.bench.flops import abstract_inputs, count_config
from sparsevlm_jax.bench.workloads import VIDEO
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.presets import SHAPES

SCRIPT = str(Path(sys.executable).with_name("sparsevlm"))

_TEXT_7B = {
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "max_window_layers": 28, "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "use_sliding_window": False, "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}  # fmt: skip
# The hub's config.json of Qwen/Qwen2.5-VL-7B-Instruct and Qwen/Qwen2-VL-7B-Instruct.
HUB = {
    "qwen2.5-vl-7b": {
        **_TEXT_7B, "model_type": "qwen2_5_vl", "max_position_embeddings": 128000,
        "vision_config": {
            "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
            "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
            "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
    },
    "qwen2-vl-7b": {
        **_TEXT_7B, "model_type": "qwen2_vl", "max_position_embeddings": 32768,
        "vision_config": {
            "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
            "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    },
}  # fmt: skip


@pytest.mark.parametrize("shape", sorted(HUB))
def test_presets_are_the_hub_configs(shape):
    assert SHAPES[shape]("float32") == LlavaConfig.from_hf(HUB[shape])


def test_mini_qwen_shape():
    cfg, mini = SHAPES["mini-qwen"](), SHAPES["mini"]()
    t = cfg.text
    assert cfg.qwen and cfg.qwen_vision.windowed and t.mrope_section == (8, 12, 12)
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.head_dim) == (
        mini.text.num_hidden_layers, mini.text.hidden_size, 4, 64)  # fmt: skip
    assert t.attention_bias and not t.o_bias
    assert max(cfg.image_token_index, cfg.video_token_index) < t.vocab_size


def test_workload_counts_at_the_7b_shape():
    cfg = SHAPES["qwen2.5-vl-7b"]()
    image = bench.Workload("qwen2.5-vl-7b", cfg, images=((1080, 1920),))
    assert image.qwen_grid((1080, 1920)) == (1, 52, 94)  # 728 x 1316 pixels (FAMILIES.md)
    assert (image.visual_counts, image.visual_slots, image.patch_capacity) == ([1222], 1280, 5120)
    video = bench.Workload("qwen2.5-vl-7b", cfg, images=((VIDEO, 32),))
    assert video.visual_counts == [4096] and video.visual_slots == 4096 and video.has_video


def test_abstract_inputs_match_the_host_preprocessing():
    """The counted program's inputs are those `qwen_images.prepare` builds for such an item."""
    cfg = SHAPES["mini-qwen"]()
    rng = np.random.default_rng(0)
    items = {(100, 150): rng.integers(0, 255, (100, 150, 3), np.uint8),
             (VIDEO, 3): rng.integers(0, 255, (3, 448, 448, 3), np.uint8)}  # fmt: skip
    for hw, item in items.items():
        wl = bench.Workload("mini-qwen", cfg, images=(hw,))
        inputs, grids = qwen_images.prepare([[item]], cfg.qwen_vision)
        assert [tuple(g) for g in grids[0]] == [wl.qwen_grid(hw)]
        assert wl.visual_counts == [int(inputs.num_tokens[0])]
        assert wl.patch_capacity == inputs.capacity
        _, batch = abstract_inputs(wl, count_config(wl))
        want = jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), inputs)
        got = jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), batch.pixel_values)
        assert got == want and batch.pixel_values.block == inputs.block
        p, v, t = wl.prefix_bucket, wl.visual_slots, wl.text_bucket
        assert batch.positions.shape == (1, p + v + t, 3) and batch.visual_index.shape == (1, v)


def test_flops_only_through_the_installed_command(tmp_path):
    """A small image and a 4-frame clip on `mini-qwen`, dense + v1.5 at 160 + the authors'
    video preset (which runs on the clip only)."""
    argv = ["bench", "--shape", "mini-qwen", "--flops-only", "--count", "lowered", "--quiet",
            "--json", "--methods", "v1_5-160,video", "--images", "336x448;4f",
            "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([SCRIPT, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    wl = report["workload"]
    assert wl["family"] == "qwen2_5_vl" and wl["prefix_tokens"] == 15  # Qwen's chat template
    by_set: dict[str, list] = {}
    for e in report["results"]:
        by_set.setdefault(e["image_set"], []).append(e)
    assert [e["label"] for e in by_set["336x448"]] == ["dense", "v1_5-160"]
    assert [e["label"] for e in by_set["4f"]] == ["dense", "video", "v1_5-160"]
    assert by_set["336x448"][0]["workload"]["visual_counts"] == [192]  # 12 x 16 tokens
    assert by_set["4f"][0]["workload"]["visual_counts"] == [512]  # 2 frame pairs of 16 x 16
    for group in by_set.values():
        for e in group[1:]:
            red = e["flops_reduction"]
            assert 0.5 < red["xla_decoder"] < 1 and 0.5 < red["ideal_valid"] < 1
            assert abs(red["xla_decoder_full_attention"] - red["ideal_valid"]) < 0.02
    md = (tmp_path / "mini-qwen-flops.md").read_text()
    assert "Qwen2.5-VL tower" in md and "## Image set `4f`" in md and "| v1_5-160 |" in md
    assert (tmp_path / "mini-qwen-flops.png").exists()


# --- timed runs ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["qwen2-vl-7b", "qwen2.5-vl-7b", "mini-qwen"])
def test_transformers_config_has_our_shape(shape):
    """The timed run's transformers model (`hf_qwen_config`) converts back to the shape: both
    towers, M-RoPE, the token ids."""
    from sparsevlm_jax.bench.torch_side import hf_qwen_config, same_shape

    cfg = SHAPES[shape]()
    back = LlavaConfig.from_hf(hf_qwen_config(cfg).to_dict())
    assert same_shape(cfg, back) and back.text.rms_norm_eps == cfg.text.rms_norm_eps
    ids = ("image_token_index", "video_token_index", "vision_start_token_id")
    assert [getattr(back, k) for k in ids] == [getattr(cfg, k) for k in ids]


@pytest.mark.parametrize("item", [(336, 448), (VIDEO, 3)])
def test_timed_inputs_are_transformers(item):
    """The timed run's inputs: the torch side gets the item's rows in the processor's order
    (`VisionInputs.patches` holds them in the tower's window order), and our M-RoPE positions
    are those transformers' `get_rope_index` computes from the torch side's ids, grids and
    `mm_token_type_ids` (a 3-frame video: 2 frame pairs, 1 s each on Qwen2.5's time axis)."""
    torch = pytest.importorskip("torch")
    from sparsevlm_jax.bench.torch_side import hf_model_class, hf_qwen_config, torch_qwen_inputs
    from sparsevlm_jax.bench.workloads import qwen_inputs, qwen_prompt_ids

    cfg = SHAPES["mini-qwen"]()
    wl = bench.Workload("mini-qwen", cfg, prefix_tokens=15, images=(item,))
    prefix, text = qwen_prompt_ids(wl)
    assert prefix[-1] == cfg.vision_start_token_id and text[0] == cfg.vision_start_token_id + 1
    q = qwen_inputs(wl, prefix, text)
    count = wl.visual_counts[0]
    assert q.grids == [wl.qwen_grid(item)] and len(q.rows[0]) == 4 * count
    rows = np.asarray(q.pixels.patches[0, : 4 * count])
    assert not np.array_equal(rows, q.rows[0])  # windows of 4 x 4 groups: another order
    assert np.array_equal(np.sort(rows, axis=0), np.sort(q.rows[0], axis=0))
    ids, pix = torch_qwen_inputs(wl, q, "cpu")
    kw = pix.kwargs()
    video = item[0] == VIDEO
    assert set(kw) == ({"pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
                        "mm_token_type_ids"} if video else
                       {"pixel_values", "image_grid_thw", "mm_token_type_ids"})  # fmt: skip
    assert int((kw["mm_token_type_ids"] == (2 if video else 1)).sum()) == count
    with torch.device("meta"):
        model = hf_model_class(cfg)._from_config(hf_qwen_config(cfg))
    grids = {k: v for k, v in kw.items() if k.endswith("_thw") or k == "second_per_grid_ts"}
    want, _ = model.model.get_rope_index(ids, mm_token_type_ids=kw["mm_token_type_ids"], **grids)
    assert np.array_equal(want[:, 0].T.numpy(), q.positions[0])
    if video:  # the time axis steps by tokens_per_second x 1 s per frame pair
        t = q.positions[0][len(prefix) : len(prefix) + count, 0]
        assert sorted(set(t.tolist())) == [len(prefix), len(prefix) + 2]


def test_timed_run_through_the_installed_command(tmp_path):
    """One round of everything (no timing asserted): dense JAX vs transformers'
    Qwen2_5_VLForConditionalGeneration, v1.5 at 320 vs the reference, same converted weights;
    the last-token logits agree to float rounding on both (wrong pixel order or 1-D positions
    on the torch side give ~1e-2), the reference keeps and recycles what JAX does, and the
    per-layer counts are those the FLOPs-only path assumes."""
    pytest.importorskip("torch")
    from sparsevlm_jax.bench.counts import expected_counts
    from sparsevlm_jax.sparse.config import named_sparse_config

    argv = ["bench", "--shape", "mini-qwen", "--images", "224x336", "--methods", "v1_5-320",
            "--warmup", "0", "--repeat", "1", "--decode-steps", "1", "--ttft-repeat", "1",
            "--max-new-tokens", "4", "--count", "lowered", "--quiet", "--json",
            "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([SCRIPT, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"mini-qwen-cpu.{x}" for x in
                                                          ("json", "md", "png")]  # fmt: skip
    wl = report["workload"]
    assert report["kind"] == "full" and report["init"] == "convert"
    assert wl["family"] == "qwen2_5_vl" and wl["grids"] == [[1, 16, 24]]
    assert wl["visual_counts"] == [96] and wl["prefix_tokens"] == 15
    dense, v15 = report["results"]
    assert dense["torch"]["torch"]["impl"] == "TorchDense"  # Qwen2_5_VLForConditionalGeneration
    assert v15["torch"]["torch"]["impl"] == "TorchReference"
    for e in (dense, v15):
        t = e["torch"]["torch"]
        assert t["first_token"] == t["jax_first_token"]
        assert t["logits_max_rel_diff_vs_jax"] < 1e-4, e["label"]
        assert e["jax"]["prefill"]["runs"] == 1 and t["prefill"]["runs"] == 1
        assert t["decode_step"]["runs"] == 1 and t["ttft"]["runs"] == 1
    # equal decisions: the reference kept and recycled what JAX did
    assert v15["torch"]["torch"]["budget"] == v15["pruning"]["budget"]
    assert v15["torch"]["torch"]["recycled"] == v15["pruning"]["recycled"]
    sparse = named_sparse_config("v1_5", 320, 32, variable_visual=True)
    assert v15["visual_tokens_per_example"] == [expected_counts(sparse, 96, 32)[0]]
    assert v15["torch"]["torch"]["equivalent_tokens"] == pytest.approx(v15["equivalent_tokens"])
    ratios = v15["ratios"]
    assert {"torch_over_jax_prefill", "latency_vs_xla_total_flops"} <= set(ratios)
    assert 0 < v15["flops_ratio"]["xla_total"] < 1
    md = (tmp_path / "mini-qwen-cpu.md").read_text()
    for row in ("| dense | JAX |", "| dense | PyTorch |", "| v1_5-320 | JAX |",
                "| v1_5-320 | PyTorch |"):  # fmt: skip
        assert row in md
    assert "inputs 224×336 (patch grids t×h×w 1×16×24" in md
    assert "first tokens equal in 2 of 2 runs" in md
