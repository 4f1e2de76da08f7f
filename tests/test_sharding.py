"""Meshes and the sharding rule table (`sparsevlm_jax.sharding`).

The multi-device checks run in ONE subprocess on 8 forced CPU host devices
(`sharding_worker.py`; the device count must be set before jax initialises, and this process
already has one device): meshes data x model = 8x1, 4x2, 2x4, 1x8 against the unsharded run,
dense and every pruning method (v1 under the bucketed and exact policies; the random
baseline on 2x4 only), a batch of 8:
kept indices, recycled counts (every pruning statistic) and greedy tokens identical, logits
within 1e-5 (float32), no recompilation on a repeated call, parameters laid out as the rule
table says, KV caches over batch and heads, and no split weight gathered whole in the
compiled programs. The rest (parsing, the table, `sparsevlm info --mesh`) runs here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsevlm_jax import sharding as sh
from sparsevlm_jax.config import ConfigError, LlavaConfig, TextConfig, VisionConfig
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.params import flatten, param_shapes
from sparsevlm_jax.shapes_task import demo_model_path

WORKER = Path(__file__).with_name("sharding_worker.py")
MESHES = ("8x1", "4x2", "2x4", "1x8")


@pytest.fixture(scope="module")
def worker() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(WORKER)], capture_output=True, text=True, env=env, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_parameters_follow_the_rule_table(worker):
    assert set(worker["params"]) == set(MESHES)
    for mesh, mismatches in worker["params"].items():
        assert mismatches == [], mesh


@pytest.mark.parametrize(
    "config", ["dense", "v1_bucketed", "v1_exact", "v1_5", "v2_0", "fastv", "random"]
)
def test_every_mesh_decides_and_decodes_like_one_device(worker, config):
    runs = worker["runs"][config]
    single = runs["single"]
    if config != "dense":  # the case must prune (and v1 / v1.5 recycle) to mean anything
        kept = [row[0] for row in single["stats"]["num_kept"]]
        assert max(kept) < 64, kept
        if config.startswith("v1"):
            assert max(max(row) for row in single["stats"]["recycled"]) > 0
    for mesh in MESHES if config != "random" else ["2x4"]:  # sharding_worker.ONE_MESH
        run = runs[mesh]
        assert run["tokens"] == single["tokens"], mesh
        assert run["stats"] == single["stats"], mesh  # kept, recycled, ranks, budgets, ...
        assert run["logits_diff"] <= 1e-5, (mesh, run["logits_diff"])
        assert run["repeat_equal"], mesh
        assert not any(run["recompiles"].values()), (mesh, run["recompiles"])
        # KV caches [L, B, S, K, H]: batch over data, KV heads over model.
        data, model = map(int, mesh.split("x"))
        for full, shard in run["kv_shards"]:
            want = [full[0], full[1] // data, full[2], full[3] // model, full[4]]
            assert shard == want, (mesh, full, shard)


def test_no_split_weight_is_gathered_whole(worker):
    assert worker["hlo"], "no programs were checked"
    for program, gathered in worker["hlo"].items():
        assert gathered == [], program
    assert worker["control"], "the check does not see a weight gathered on purpose"


# ------------------------------------------------------------------------------------------
# In this process: parsing, the table, errors


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

    ckpt = demo_model_path()  # shipped in the package: its absence is a failure
    assert (ckpt / "config.json").is_file(), ckpt
    assert main(["info", str(ckpt), "--mesh", "data=2,model=1"]) == 0
    out = capsys.readouterr().out
    assert "mesh:        data=2,model=1" in out and "text/layers/q_proj/kernel" in out
    assert main(["info", str(ckpt), "--mesh", "model=x"]) == 2
    assert "--mesh: model must be an integer" in capsys.readouterr().err


def test_eval_mesh_answers_like_one_device(worker):
    """`sparsevlm eval --mesh data=2,model=2` (batches of 4 split over data, the bundled
    model's weights over model) writes the answers of the single-device run."""
    single, mesh = worker["eval"]["single"], worker["eval"]["2x2"]
    assert [a["question_id"] for a in single] == [0, 1, 2, 3]
    assert mesh == single


def test_eval_mesh_is_checked_before_the_weights(tmp_path, capsys):
    from PIL import Image

    from sparsevlm_jax.cli.app import main

    ckpt = demo_model_path()  # shipped in the package: its absence is a failure
    assert (ckpt / "config.json").is_file(), ckpt
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "image": "a.png", "text": "What?"}\n')
    base = ["eval", "--model", str(ckpt), "--questions", str(tmp_path / "q.jsonl")]
    base += ["--image-folder", str(tmp_path), "--answers", str(tmp_path / "a.jsonl")]
    for extra, message in (
        (
            ["--mesh", "data=2", "--batch-size", "2"],
            "--mesh data=2,model=1 needs 2 devices, 1 found",
        ),
        (["--mesh", "data=2", "--batch-size", "3"], "--batch-size 3 does not split over"),
        (["--mesh", "model=three"], "--mesh: model must be an integer"),
    ):
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()
