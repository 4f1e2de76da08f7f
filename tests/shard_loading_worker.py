"""Loading straight into shards on 8 forced CPU host devices, for `test_shard_loading.py`.

Run as a script (`python tests/shard_loading_worker.py DIR`): the device count must be in
XLA_FLAGS before jax is imported. Writes a tiny random transformers LLaVA (8 text, KV and
vision heads so that model=8 splits them; a vocabulary of 132 that model=8 cannot split)
under DIR as a `save_pretrained` safetensors directory, as a torch `pytorch_model.bin`
directory and as our converted checkpoint, then loads each onto meshes 2x4, 1x8 and 4x2.
Prints one JSON object on the last line of stdout:

    cases:     {"<source> <mesh>": {"sharding": [params whose sharding is not the rule
               table's], "values": [params not equal to the unsharded load], "shards":
               [params whose device blocks have the wrong shape], "worst": LoadStats.worst or
               None, "largest": bytes, "blocks": n, "max_shard": bytes of the largest
               parameter shard on that mesh}}
    bf16:      [params of a bfloat16 load on 2x4 that differ from the cast reference]
    streamed:  [params where the unsharded streaming load differs from convert_to_numpy]
    reads:     distinct blocks read by array_from_shards for a [8, 16] array split over model
               on 2x4 (4: each block once, although 8 devices hold them)
    model_bytes: bytes of the whole model (float32)
"""

from __future__ import annotations

import os
import sys

DEVICES = 8
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
).strip()
os.environ.setdefault("PJRT_NPROC", str(2 * DEVICES))

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convert import convert_checkpoint, convert_to_numpy  # noqa: E402
from convert.llava import load_transformers  # noqa: E402
from convert.streaming import LoadStats  # noqa: E402
from sparsevlm_jax import sharding as sh  # noqa: E402
from sparsevlm_jax.loading import load_model  # noqa: E402
from sparsevlm_jax.params import flatten  # noqa: E402

MESHES = ((2, 4), (1, 8), (4, 2))


def write_sources(root: Path) -> dict[str, Path]:
    """The same tiny random model as safetensors, torch .bin and our checkpoint."""
    import torch
    import transformers

    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        image_size=28,
        patch_size=14,
        projection_dim=16,
    )
    text = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=132,
    )
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=7)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    out = {"safetensors": root / "st", "bin": root / "bin", "checkpoint": root / "ckpt"}
    model.save_pretrained(out["safetensors"])
    out["bin"].mkdir()
    torch.save(model.state_dict(), out["bin"] / "pytorch_model.bin")
    (out["bin"] / "config.json").write_text((out["safetensors"] / "config.json").read_text())
    convert_checkpoint(out["safetensors"], out["checkpoint"], dtype="float32", progress=False)
    return out


def check(params: dict, cfg, mesh, reference: dict[str, np.ndarray]) -> dict[str, list[str]]:
    """Mismatches against the rule table's shardings, the reference values, the shard shapes."""
    want = flatten(sh.param_shardings(cfg, mesh))
    layouts = sh.param_layouts(cfg, sh.mesh_shape(mesh))
    out: dict[str, list[str]] = {"sharding": [], "values": [], "shards": []}
    for key, leaf in flatten(params).items():
        if leaf.sharding != want[key]:
            out["sharding"].append(f"{key}: {leaf.sharding.spec} != {want[key].spec}")
        if not np.array_equal(np.asarray(leaf), reference[key]):
            out["values"].append(key)
        shapes = {tuple(s.data.shape) for s in leaf.addressable_shards}
        if shapes != {layouts[key].shard_shape} or len(leaf.addressable_shards) != DEVICES:
            out["shards"].append(f"{key}: {sorted(shapes)} != {layouts[key].shard_shape}")
    return out


def count_reads(mesh) -> int:
    """array_from_shards reads each distinct block once, however many devices hold it."""
    full = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    reads = []

    def read(index):
        reads.append(index)
        return full[index]

    a = sh.array_from_shards(full.shape, NamedSharding(mesh, P(None, "model")), read)
    assert np.array_equal(np.asarray(a), full)
    return len(reads)


def main() -> None:
    assert jax.device_count() == DEVICES, jax.devices()
    t0 = time.perf_counter()
    paths = write_sources(Path(sys.argv[1]))
    print(f"sources written: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    old, _ = convert_to_numpy(paths["safetensors"], dtype="float32", progress=False)
    streamed, _ = load_transformers(paths["safetensors"], dtype="float32")
    streamed = {k: np.asarray(v) for k, v in flatten(streamed).items()}
    result: dict = {"cases": {}, "model_bytes": sum(v.nbytes for v in old.values())}
    result["streamed"] = [k for k in old if not np.array_equal(old[k], streamed[k])]
    for source, path in paths.items():
        params, _ = load_model(path)  # unsharded: the reference of every mesh
        reference = {k: np.asarray(v) for k, v in flatten(params).items()}
        for shape in MESHES:
            mesh = sh.make_mesh(sh.MeshShape(*shape))
            stats = LoadStats()
            if source == "checkpoint":
                params, cfg = load_model(path, mesh=mesh)
            else:
                params, cfg = load_transformers(path, dtype="float32", mesh=mesh, stats=stats)
            case = check(params, cfg, mesh, reference)
            done = source != "checkpoint"
            layouts = sh.param_layouts(cfg, sh.MeshShape(*shape)).values()
            case.update(
                worst=stats.worst if done else None,
                largest=stats.largest,
                blocks=stats.blocks,
                max_shard=max(int(np.prod(x.shard_shape)) * 4 for x in layouts),
            )
            result["cases"][f"{source} {shape[0]}x{shape[1]}"] = case
        print(f"{source}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    mesh = sh.make_mesh(sh.MeshShape(2, 4))
    bf16, _ = load_model(paths["safetensors"], dtype="bfloat16", mesh=mesh)
    result["bf16"] = [
        k
        for k, v in flatten(bf16).items()
        if not np.array_equal(
            np.asarray(v).view(np.uint16), old[k].astype(ml_dtypes.bfloat16).view(np.uint16)
        )
    ]
    result["reads"] = count_reads(mesh)
    print(f"done: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
