"""Memory of a sharded LLaVA: per-device bytes (abstract) and host RSS while loading (measured).

    python benchmarks/sharding_memory.py                  # both parts -> benchmarks/results/
    python benchmarks/sharding_memory.py --part abstract  # (a) only: seconds, no weights
    python benchmarks/sharding_memory.py --part measured --shapes mini --work /tmp/shm

(a) Abstract, for the LLaVA-1.5-7B and 13B shapes in bfloat16 at model = 1, 2, 4, 8 (data = 1;
    parameters are replicated over data, so data only multiplies devices): parameter bytes
    per device from the rule table (`sharding.param_layouts`: every parameter's shard shape),
    the largest single shard, and the KV cache per device: per token, and for one request of
    576 visual + 95 prompt tokens + 32 new tokens (batch 1), from `jax.eval_shape` of the
    prefill (no weights, no devices: the cache [L, B, S, K, H] is split over K on model),
    dense and for two pruning presets with static capacities (their caches are per stage).

(b) Measured host memory while loading, each case in a fresh subprocess on 8 forced CPU
    devices (`--xla_force_host_platform_device_count=8`): VmRSS before loading, after it
    (every leaf ready, garbage collected), and the peak (VmHWM, reset just before loading through
    /proc/self/clear_refs where the kernel allows it). On CPU the devices' memory IS host
    memory, so the loaded (sharded) model is resident after loading either way; what the
    loading path costs is the overhead `peak - before - held` (held: the bytes of every
    device's shards), reported with the transient `peak - after`. Cases, per model shape:

      source, sharded     safetensors directory -> `load_model(src, mesh=mesh)`: every shard
                          read straight onto its device (this issue)
      source, whole+shard the path before: `convert_to_numpy` (the whole model on the host),
                          `device_put` to one device, then `shard_params` onto the mesh
      source, one device  `load_model(src)` without a mesh (the same streaming reader)
      source, whole, one device   the path before without a mesh: `convert_to_numpy`, then
                          `device_put` leaf by leaf
      checkpoint, sharded our converted (orbax) checkpoint restored into the shardings
      checkpoint, whole+shard   restored on one device, then `shard_params`
      checkpoint, one device    restored on one device

    Shapes: `mini` (fp32, 32 layers of width 256; 4 heads, so mesh data=2,model=4) and
    `7b-2l` (LLaVA-1.5-7B's widths with 2 decoder and 2 CLIP layers, bfloat16, 1.4 GB; mesh
    data=1,model=8), written as llava-hf safetensors (hub names) with random weights and
    converted with `convert_checkpoint`. `MALLOC_MMAP_THRESHOLD_` is fixed in the children
    so that freed host buffers go back to the OS and "after" is what stays resident.

Writes sharding-memory.json, .md and .png (matplotlib) to --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEVICES = 8
MODELS = (1, 2, 4, 8)
PROMPT_TEXT, NEW_TOKENS = 95, 32  # 35-token vicuna prefix + 60-token question; 32 answered
PREFIX = 35
KV_PRESETS = (("dense", None), ("v1_5", 192), ("v1_5", 64))
MEASURED_SHAPES = {"mini": (2, 4), "7b-2l": (1, 8)}
CASES = (
    ("safetensors", "sharded"),
    ("safetensors", "whole+shard"),
    ("safetensors", "one device"),
    ("safetensors", "whole, one device"),
    ("checkpoint", "sharded"),
    ("checkpoint", "whole+shard"),
    ("checkpoint", "one device"),
)
MALLOC_MMAP_THRESHOLD = 65536


# ------------------------------------------------------------------------------------------
# (a) abstract


def abstract_rows(name: str) -> list[dict[str, Any]]:
    """Per-device parameter and KV-cache bytes of preset shape `name` (bf16) at each model."""
    from sparsevlm_jax.presets import SHAPES
    from sparsevlm_jax.sharding import MeshShape, param_layouts

    cfg = SHAPES[name]("bfloat16")
    kv = kv_cache_shapes(cfg)
    rows = []
    for model in MODELS:
        layouts = param_layouts(cfg, MeshShape(1, model)).values()
        shard = [int(np.prod(x.shard_shape)) * 2 for x in layouts]
        full = [int(np.prod(x.shape)) * 2 for x in layouts]
        replicated = sum(s for s, x in zip(shard, layouts, strict=True) if set(x.spec) <= {None})
        t = cfg.text
        per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2 // model
        rows.append(
            {
                "shape": name,
                "model": model,
                "param_bytes_total": sum(full),
                "param_bytes_per_device": sum(shard),
                "replicated_bytes_per_device": replicated,
                "largest_shard_bytes": max(shard),
                "kv_bytes_per_token_per_device": per_token,
                "kv_bytes_per_request_per_device": {k: v // model for k, v in kv["bytes"].items()},
                "kv_tokens": kv["tokens"],
            }
        )
    return rows


def kv_cache_shapes(cfg: Any) -> dict[str, Any]:
    """Bytes of the whole KV cache (all devices) of one request, per preset, from
    `jax.eval_shape` of the prefill (batch 1, the 95-token prompt, 32 new tokens)."""
    import jax

    from sparsevlm_jax.generate import prefill_jit
    from sparsevlm_jax.params import abstract_params
    from sparsevlm_jax.presets import abstract_batch
    from sparsevlm_jax.sparse.config import named_sparse_config

    params = abstract_params(cfg)
    batch = abstract_batch(cfg, 1, prefix=PREFIX, text=PROMPT_TEXT - PREFIX)
    out: dict[str, Any] = {"bytes": {}, "tokens": {}}
    for method, budget in KV_PRESETS:
        sparse = named_sparse_config(method, budget, cfg.text.num_hidden_layers)
        fn = functools.partial(prefill_jit, cfg=cfg, sparse=sparse, max_new_tokens=NEW_TOKENS)
        _, cache, _ = jax.eval_shape(fn, params, batch)
        key = method if budget is None else f"{method}@{budget}"
        out["bytes"][key] = sum(x.k.size * x.k.dtype.itemsize * 2 for x in cache.kv)
        out["tokens"][key] = [int(x.k.shape[2]) for x in cache.kv]  # slots per stage
    return out


# ------------------------------------------------------------------------------------------
# (b) measured: the model files


def seven_b_two_layers(dtype: str = "bfloat16") -> Any:
    """LLaVA-1.5-7B's widths (vocab 32064, hidden 4096, MLP 11008, 32 heads; CLIP-L/336)
    with 2 decoder and 2 CLIP layers: every 7B tensor shape, 1.4 GB instead of 14 GB."""
    import dataclasses

    from sparsevlm_jax.presets import llava_1_5_7b

    cfg = llava_1_5_7b(dtype)
    return cfg.replace(
        text=dataclasses.replace(cfg.text, num_hidden_layers=2),
        vision=dataclasses.replace(cfg.vision, num_hidden_layers=2),
    )


def measured_config(name: str) -> Any:
    from sparsevlm_jax.presets import mini

    return mini("float32") if name == "mini" else seven_b_two_layers()


def hub_name(key: str, layer: int | None) -> str:
    """The llava-hf hub name of flat parameter `key` (layer slot `layer` of a stack)."""
    part, _, rest = key.partition("/")
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}
    if part == "projector":
        mod, p = rest.split("/")
        return f"multi_modal_projector.{mod}.{leaf[p]}"
    if part == "text":
        if rest == "lm_head":
            return "language_model.lm_head.weight"
        if rest == "embed_tokens":
            return "language_model.model.embed_tokens.weight"
        if rest == "norm/scale":
            return "language_model.model.norm.weight"
        _, mod, p = rest.split("/")
        group = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        if mod.endswith("layernorm"):
            return f"language_model.model.layers.{layer}.{mod}.weight"
        return f"language_model.model.layers.{layer}.{group}.{mod}.{leaf[p]}"
    v = "vision_tower.vision_model."
    if rest in ("class_embedding",):
        return v + "embeddings.class_embedding"
    if rest in ("patch_embedding", "position_embedding"):
        return v + f"embeddings.{rest}.weight"
    if rest.startswith("pre_layrnorm/"):
        return v + f"pre_layrnorm.{leaf[rest.split('/')[1]]}"
    _, mod, p = rest.split("/")
    if mod.startswith("layer_norm"):
        return v + f"encoder.layers.{layer}.{mod}.{leaf[p]}"
    group = "mlp" if mod.startswith("fc") else "self_attn"
    return v + f"encoder.layers.{layer}.{group}.{mod}.{leaf[p]}"


def hf_config(cfg: Any) -> dict[str, Any]:
    """A llava-hf config.json for `cfg` (what `LlavaConfig.from_hf` reads)."""
    v, t = cfg.vision, cfg.text
    return {
        "model_type": "llava",
        "image_token_index": cfg.image_token_index,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_config": {
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
        },
        "text_config": {
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
        },
    }


def write_safetensors(cfg: Any, out: Path, dtype: str) -> int:
    """A llava-hf directory of random weights for `cfg` (hub names, one safetensors file,
    tensors written one at a time); returns the file's bytes."""
    import jax.numpy as jnp

    from convert.names import MODEL_PREFIXES, resolve, source_shape
    from sparsevlm_jax.params import flatten, param_shapes

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(cfg)))
    entries = []
    for key, shape in flatten(param_shapes(cfg)).items():
        layers = range(shape[0]) if "/layers/" in key else [None]
        for layer in layers:
            name = hub_name(key, layer)
            target = resolve(name, MODEL_PREFIXES)
            assert target.key == key and target.layer == layer, (name, target)
            per = tuple(shape[1:]) if layer is not None else tuple(shape)
            entries.append((name, source_shape(target.kind, per, cfg.vision.num_channels)))
    return stream_safetensors(out / "model.safetensors", entries, np.dtype(jnp.dtype(dtype)))


def stream_safetensors(path: Path, entries: list[tuple[str, tuple]], dtype: np.dtype) -> int:
    """Writes a safetensors file of random tensors `entries` (name, shape) one by one."""
    tag = {"float32": "F32", "bfloat16": "BF16"}[dtype.name]
    header, offset = {}, 0
    for name, shape in entries:
        n = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, shape in entries:
            f.write((rng.standard_normal(shape, np.float32) * 0.02).astype(dtype).tobytes())
    return path.stat().st_size


def prepare_models(work: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Writes (or reuses) each measured shape's safetensors directory and our checkpoint."""
    from convert import convert_checkpoint

    out = {}
    for name in names:
        cfg = measured_config(name)
        src, ckpt = work / name / "safetensors", work / name / "checkpoint"
        if not (src / "model.safetensors").is_file():
            shutil.rmtree(src, ignore_errors=True)
            write_safetensors(cfg, src, cfg.param_dtype)
        if not (ckpt / "config.json").is_file():
            convert_checkpoint(src, ckpt, dtype=cfg.param_dtype, progress=False)
        out[name] = {
            "safetensors": str(src),
            "checkpoint": str(ckpt),
            "safetensors_bytes": dir_bytes(src),
            "checkpoint_bytes": dir_bytes(ckpt / "params"),
            "param_bytes": param_bytes(cfg),
            "dtype": cfg.param_dtype,
            "mesh": "data={},model={}".format(*MEASURED_SHAPES[name]),
        }
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def param_bytes(cfg: Any) -> int:
    from sparsevlm_jax.params import flatten, param_shapes

    item = np.dtype("float32").itemsize if cfg.param_dtype == "float32" else 2
    return sum(int(np.prod(s)) * item for s in flatten(param_shapes(cfg)).values())


# ------------------------------------------------------------------------------------------
# (b) measured: one case in a fresh process


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return status_kib("VmHWM") <= status_kib("VmRSS") + 1024


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Loads one model one way (in this fresh process); returns the memory it took."""
    import jax
    import orbax.checkpoint  # noqa: F401  (imported before "before", whatever the case)

    from convert.llava import convert_to_numpy
    from sparsevlm_jax.loading import load_model
    from sparsevlm_jax.params import flatten, unflatten
    from sparsevlm_jax.sharding import make_mesh, shard_params

    jax.device_put(np.zeros(4)).block_until_ready()  # backend and devices up
    mesh = make_mesh(spec["mesh"])
    path, how = spec["path"], spec["how"]
    before = status_kib("VmRSS")
    peak_reset = reset_peak()
    t0 = time.perf_counter()
    if how == "sharded":
        params, _ = load_model(path, mesh=mesh)
    elif how == "one device":
        params, _ = load_model(path)
    elif spec["source"] == "checkpoint":  # whole+shard: restore on one device, then shard
        params, cfg = load_model(path)
        params = shard_params(params, cfg, mesh)
    else:  # the path before from a source: the converter's host tree, one device, (shard)
        flat, cfg = convert_to_numpy(path, dtype=None, progress=False)
        for key in list(flat):
            flat[key] = jax.device_put(flat.pop(key))
        params = unflatten(flat)
        if how == "whole+shard":
            params = shard_params(params, cfg, mesh)
        del flat
    leaves = jax.tree.leaves(params)
    jax.block_until_ready(leaves)
    seconds = time.perf_counter() - t0
    gc.collect()  # host arrays of the path before sit in reference cycles until collected
    after, peak = status_kib("VmRSS"), status_kib("VmHWM")
    held = sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards)
    return {
        **{k: spec[k] for k in ("shape", "source", "how", "mesh")},
        "seconds": seconds,
        "rss_before": before * 1024,
        "rss_after": after * 1024,
        "rss_peak": peak * 1024,
        "transient": (peak - after) * 1024,
        "overhead": peak * 1024 - before * 1024 - held,
        "retained": after * 1024 - before * 1024 - held,
        "peak_reset": peak_reset,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_file_after": status_kib("RssFile") * 1024,
        "device_bytes": held,
        "leaves": len(flatten(params)),
    }


def measure(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every case of every measured shape, each in a fresh subprocess."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
        PJRT_NPROC=str(2 * DEVICES),
        MALLOC_MMAP_THRESHOLD_=str(MALLOC_MMAP_THRESHOLD),
    )
    rows = []
    for name, m in models.items():
        for source, how in CASES:
            spec = {"shape": name, "source": source, "how": how, "path": m[source]}
            spec["mesh"] = "data=1,model=1" if "one device" in how else m["mesh"]
            proc = subprocess.run(
                [sys.executable, __file__, "--case", json.dumps(spec)],
                capture_output=True,
                text=True,
                env=env,
                timeout=1800,
            )
            if proc.returncode != 0:
                raise SystemExit(f"case {spec} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"{name:6} {source:11} {how:12} peak {mib(row['rss_peak'])}, after "
                f"{mib(row['rss_after'])}, transient {mib(row['transient'])}, "
                f"{row['seconds']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------
# Report


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def hardware() -> dict[str, Any]:
    import jax

    from sparsevlm_jax.bench.timing import cpu_model, usable_cores

    mem = next(
        (int(x.split()[1]) * 1024 for x in Path("/proc/meminfo").read_text().splitlines()
         if x.startswith("MemTotal:")),
        0,
    )  # fmt: skip
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_bytes": mem,
        "load_average_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def markdown(report: dict[str, Any]) -> str:
    hw = report["hardware"]
    lines = [
        "# Sharded LLaVA: memory per device, and host memory while loading (issue 13)",
        "",
        f"- Hardware: {hw['cpu_model']}, {hw['usable_cores']} usable cores, "
        f"{mib(hw['memory_bytes'])} RAM; {hw['platform']}, JAX {hw['jax']}.",
        f"- Load average at start: {', '.join(f'{x:.2f}' for x in hw['load_average_start'])}"
        f" ({report['other_load']}).",
        f"- Command: `{report['command']}`",
        "",
    ]
    if report.get("abstract"):
        lines += abstract_table(report["abstract"])
    if report.get("measured"):
        lines += measured_table(report)
    return "\n".join(lines) + "\n"


def abstract_table(rows: list[dict[str, Any]]) -> list[str]:
    presets = list(rows[0]["kv_bytes_per_request_per_device"])
    out = [
        "## (a) Per-device bytes, bfloat16, data=1 (abstract: rule table + `jax.eval_shape`)",
        "",
        "Parameters are replicated over `data`; the KV cache is split over batch (`data`) and "
        f"KV heads (`model`). A request = {rows[0]['kv_tokens']['dense'][0] - NEW_TOKENS} "
        f"prompt tokens (576 visual + {PROMPT_TEXT} text) + {NEW_TOKENS} new, batch 1; the "
        "pruning presets' caches are per stage (slots per stage in the JSON).",
        "",
        "| shape | model | params / device | of which replicated | largest shard | KV / token "
        "/ device | " + " | ".join(f"KV request, {p}" for p in presets) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(presets),
    ]
    for r in rows:
        kv = r["kv_bytes_per_request_per_device"]
        out.append(
            f"| {r['shape']} | {r['model']} | {mib(r['param_bytes_per_device'])} | "
            f"{mib(r['replicated_bytes_per_device'])} | {mib(r['largest_shard_bytes'])} | "
            f"{r['kv_bytes_per_token_per_device'] / 1024:.0f} KiB | "
            + " | ".join(mib(kv[p]) for p in presets)
            + " |"
        )
    return out + [""]


def measured_table(report: dict[str, Any]) -> list[str]:
    out = [
        f"## (b) Host memory while loading, {DEVICES} forced CPU devices (measured)",
        "",
        "Each case in a fresh process; before / after = VmRSS, peak = VmHWM reset just before "
        "loading (`/proc/self/clear_refs`). On CPU the devices' memory is host memory: after "
        'loading, the model itself ("held", the bytes of every device\'s shards, replicas '
        "over data included) is resident whatever the path. What the loading path costs is "
        "**overhead = peak − before − held**; transient = peak − after, and retained = after "
        "− before − held is what stays behind (after a garbage collection) beyond the model.",
        "",
    ]
    for name, m in report["models"].items():
        out.append(
            f"- `{name}`: {m['dtype']}, parameters {mib(m['param_bytes'])}; safetensors "
            f"{mib(m['safetensors_bytes'])}, our checkpoint {mib(m['checkpoint_bytes'])}; "
            f"mesh {m['mesh']}."
        )
    out += [
        "",
        "| shape | from | how | before | after | peak | held | **overhead** | "
        "overhead / file size | peak / file size | transient | retained | seconds |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["measured"]:
        m = report["models"][r["shape"]]
        size = m["safetensors_bytes"] if r["source"] == "safetensors" else m["checkpoint_bytes"]
        out.append(
            f"| {r['shape']} | {r['source']} | {r['how']} | {mib(r['rss_before'])} | "
            f"{mib(r['rss_after'])} | {mib(r['rss_peak'])} | {mib(r['device_bytes'])} | "
            f"**{mib(r['overhead'])}** | {r['overhead'] / size:.2f} | "
            f"{r['rss_peak'] / size:.2f} | {mib(r['transient'])} | {mib(r['retained'])} | "
            f"{r['seconds']:.1f} |"
        )
    return out + [""]


def figure(report: dict[str, Any]) -> Any:
    """Parameters and KV cache per device vs model axis (abstract); loading overhead vs
    the file's size (measured)."""
    from sparsevlm_jax.bench.plot import Figure, Panel, Series

    panels = []
    if report.get("abstract"):
        shapes = list(dict.fromkeys(r["shape"] for r in report["abstract"]))
        params, kv = [], []
        for i, name in enumerate(shapes):
            rows = [r for r in report["abstract"] if r["shape"] == name]
            pts = [(r["model"], r["param_bytes_per_device"] / 2**30) for r in rows]
            params.append(Series(name, pts, color=i))
            for j, preset in enumerate(rows[0]["kv_bytes_per_request_per_device"]):
                pts = [
                    (r["model"], r["kv_bytes_per_request_per_device"][preset] / 2**20) for r in rows
                ]
                kv.append(Series(f"{name} {preset}", pts, color=i, dashed=j > 0))
        panels.append(
            Panel("Parameters per device (bf16)", "model axis", "GiB", params, legend=True)
        )
        panels.append(
            Panel(
                f"KV cache per device, one request ({NEW_TOKENS} new tokens)",
                "model axis",
                "MiB",
                kv,
                legend=True,
            )
        )
    if report.get("measured"):
        series = []
        for i, (source, how) in enumerate(CASES):
            pts = []
            for r in report["measured"]:
                if (r["source"], r["how"]) == (source, how):
                    m = report["models"][r["shape"]]
                    pts.append((m[f"{source}_bytes"] / 2**20, r["overhead"] / 2**20))
            series.append(Series(f"{source}, {how}", pts, color=i, dashed=how != "sharded"))
        panels.append(
            Panel(
                "Loading overhead: peak RSS − before − model held",
                "file size (MiB)",
                "MiB",
                series,
                legend=True,
            )
        )
    return Figure("Sharded LLaVA memory (issue 13)", panels)


def write_outputs(report: dict[str, Any], out: Path) -> None:
    from sparsevlm_jax.bench.plot import write_png_or_say
    from sparsevlm_jax.bench.report import write_atomic

    stem = out / "sharding-memory"
    write_atomic(stem.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    write_atomic(stem.with_suffix(".md"), markdown(report))
    write_png_or_say(stem.with_suffix(".png"), figure(report), write_atomic)
    print(f"wrote {stem}.json, .md, .png", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("abstract", "measured", "all"), default="all")
    ap.add_argument("--shapes", default=",".join(MEASURED_SHAPES), help="measured shapes")
    ap.add_argument("--work", type=Path, help="where the model files go (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--other-load", default="nothing else running", help="for the report")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    report: dict[str, Any] = {
        "hardware": hardware(),
        "other_load": args.other_load,
        "command": shlex.join(["python", "benchmarks/sharding_memory.py", *(argv or sys.argv[1:])]),
        "malloc_mmap_threshold": MALLOC_MMAP_THRESHOLD,
    }
    if args.part in ("abstract", "all"):
        t0 = time.perf_counter()
        report["abstract"] = [
            r for n in ("llava-1.5-7b", "llava-1.5-13b") for r in abstract_rows(n)
        ]
        print(f"abstract: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.part in ("measured", "all"):
        work = args.work or Path(tempfile.mkdtemp(prefix="sharding-memory-"))
        names = [s for s in args.shapes.split(",") if s]
        unknown = [s for s in names if s not in MEASURED_SHAPES]
        if unknown:
            raise SystemExit(f"--shapes: unknown {unknown}; choose from {list(MEASURED_SHAPES)}")
        report["models"] = prepare_models(work, names)
        report["measured"] = measure(report["models"])
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report["hardware"]["load_average_end"] = list(os.getloadavg())
    write_outputs(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
