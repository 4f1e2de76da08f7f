"""Loading straight into shards (`loading.load_model(..., mesh=...)`, issue 13 item 3).

The multi-device checks run in ONE subprocess on 8 forced CPU host devices
(`shard_loading_worker.py`): a tiny random transformers LLaVA as a safetensors directory, a
torch .bin directory and our converted checkpoint, each loaded onto meshes 2x4, 1x8 and 4x2.
Every parameter must carry the rule table's sharding, hold exactly the unsharded load's values
in blocks of the table's shard shape, and (source checkpoints) no read may create a host
array larger than the block it was reading. The rest runs here on one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("shard_loading_worker.py")
SOURCES = ("safetensors", "bin", "checkpoint")
MESHES = ("2x4", "1x8", "4x2")

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    root = tmp_path_factory.mktemp("shard_loading")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("source", SOURCES)
def test_every_parameter_lands_on_its_shards_with_the_unsharded_values(worker, source):
    for mesh in MESHES:
        case = worker["cases"][f"{source} {mesh}"]
        assert case["sharding"] == [], (source, mesh)
        assert case["values"] == [], (source, mesh)
        assert case["shards"] == [], (source, mesh)


@pytest.mark.parametrize("source", ["safetensors", "bin"])
def test_no_read_holds_more_than_one_shard(worker, source):
    for mesh in MESHES:
        case = worker["cases"][f"{source} {mesh}"]
        assert case["blocks"] > 0
        assert 0 < case["worst"] <= 1.0, (source, mesh, case["worst"])
        # The largest host array any read created: at most the largest shard on the mesh.
        assert case["largest"] <= case["max_shard"], (source, mesh, case)
        assert case["max_shard"] < worker["model_bytes"] / 8


def test_streaming_load_equals_the_converter_and_casts(worker):
    assert worker["streamed"] == []  # one device: the same values as convert_to_numpy
    assert worker["bf16"] == []  # bfloat16 on 2x4: the converter's cast, bit for bit


def test_a_block_several_devices_hold_is_read_once(worker):
    assert worker["reads"] == 4  # 2x4 mesh, split over model: 4 blocks for 8 devices


# ------------------------------------------------------------------------------------------
# In this process (one device)


def test_block_reads_of_a_safetensors_file(tmp_path):
    """`BlockReader.read(info, index)` = tensor[index] for row, column and mixed blocks,
    and a column block is read in row chunks no larger than the block."""
    from safetensors.numpy import save_file

    from convert.readers import open_weights

    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((12, 10)).astype(np.float32),
        "b": rng.standard_normal((7,)).astype(np.float16),
        "c": rng.standard_normal((3, 4, 5)).astype(np.float32),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    files = open_weights(tmp_path)
    infos = {e.name: e for e in files.entries()}
    sizes: list[int] = []
    with files.blocks(lambda a: sizes.append(a.nbytes)) as reader:
        for name, index in (
            ("a", (slice(None), slice(None))),
            ("a", (slice(3, 9), slice(None))),
            ("a", (slice(None), slice(5, 10))),
            ("a", (slice(2, 11), slice(0, 3))),
            ("b", (slice(1, 4),)),
            ("c", (slice(1, 3), slice(None), slice(2, 4))),
            ("c", ()),
        ):
            sizes.clear()
            got = reader.read(infos[name], index)
            want = tensors[name][index]
            np.testing.assert_array_equal(got, want, err_msg=f"{name}{index}")
            assert max(sizes) <= max(want.nbytes, tensors[name][0].nbytes), (name, index, sizes)


def test_a_broken_checkpoint_is_refused_before_any_read(tmp_path, monkeypatch):
    """Without a mesh as with one: the converter's one-line refusal naming every problem,
    before a single tensor is read."""
    from safetensors.numpy import save_file

    from convert import ConversionError, readers
    from sparsevlm_jax.loading import load_model
    from sparsevlm_jax.sharding import make_mesh

    d = tmp_path / "bad"
    d.mkdir()
    save_file(
        {"language_model.model.embed_tokens.weight": np.zeros((4, 4), np.float32)},
        str(d / "model.safetensors"),
    )
    cfg = {
        "model_type": "llava",
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": 28, "patch_size": 14},
        "text_config": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64},
    }  # fmt: skip
    (d / "config.json").write_text(json.dumps(cfg))

    def no_reads(*_):
        raise AssertionError("tensor data read before the checkpoint was checked")

    monkeypatch.setattr(readers._SafetensorsBlocks, "read", no_reads)
    for mesh in (None, make_mesh("data=1,model=1")):
        with pytest.raises(ConversionError) as info:
            load_model(d, mesh=mesh)
        msg = str(info.value)
        assert "\n" not in msg and "missing" in msg and "wrong shape" in msg
