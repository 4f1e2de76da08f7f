"""Meshes and the one sharding rule set: how every tensor is laid out over devices.

A mesh has two axes: `data` (examples of a batch) and `model` (tensor parallelism,
Megatron-style). Everything the compiled programs see is laid out by the tables below;
`jax.jit` propagates these input shardings through the prefill and decode programs and XLA
inserts the collectives (no hand-written communication anywhere).

Parameters (`PARAM_RULES`, first matching rule wins; paths as in `sparsevlm_jax.params`):

    text/layers/{q,k,v}_proj     column split: output features (= heads) over model
    text/layers/o_proj           row split: input features (= heads) over model (all-reduce)
    text/layers/{gate,up}_proj   column split: MLP hidden over model
    text/layers/down_proj        row split: MLP hidden over model (all-reduce)
    text/embed_tokens [V, D]     hidden split: a lookup stays local, then gathers D
    text/lm_head [D, V]          vocab split: logits come out split over vocab
    vision/layers/...            the same column / row pairs over CLIP's heads and MLP
    projector linear_1, linear_2 a column / row pair over the text hidden size
    everything else              replicated (norms, row-split biases, CLIP's embeddings)

Stacked layers keep their leading layer axis unsplit. Head splits require the head counts
(text query heads, text KV heads, vision heads) to divide the model axis (`ConfigError`
otherwise); a vocabulary, MLP or hidden size that does not divide it is replicated instead
(the layout table says so). Parameters are replicated over `data`.

Activations and caches (`constrain` applies these inside the programs when a mesh is set):

    batch arrays [B, ...]          B over data
    hidden states x [B, L, D]      B over data, replicated over model
    q, k, v [B, L, heads, H]       B over data, heads over model
    KV cache k, v [L, B, S, K, H]  B over data, K over model
    pruning arrays [B, T, V], [B, V], [B, N]   B over data, replicated over model

The pruning (`sparsevlm_jax.sparse.prune`) reads per-head attention rows [B, N, T, V] that
live with their heads; the sum over heads is a reduction over model (an all-reduce of a
[B, T, V] array), after which ranks (SVD), selection and recycling work on small
[B, T, V] / [B, V] arrays replicated over model. SparseVLM+ (v2.0) ranks heads by their mass
[B, N]: that small array is replicated over model, so every device sees every head's mass and
makes the same choice; each device then sums its own selected heads and one all-reduce gives
the mean (`sparsevlm_jax.sparse.prune.top_heads_mean`).

Usage:

    mesh = make_mesh("data=2,model=4")
    params = shard_params(params, cfg, mesh)  # or load straight into it:
    params, cfg = sparsevlm_jax.loading.load_model(path, mesh=mesh)
    gen = generate_ids(params, cfg, batch, ...)  # follows the params' mesh
    with use_mesh(mesh):  # the jitted functions themselves
        logits, cache, stats, _ = prefill(params, shard_batch(batch, mesh), cfg, sparse, n)

On CPU host devices (`--xla_force_host_platform_device_count`, the tests) give XLA's thread
pool more threads than devices (`PJRT_NPROC`): jaxlib's CPU SVD blocks a pool thread while
its batch runs on the same pool, and eight devices calling it at once can otherwise deadlock.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparsevlm_jax.config import ConfigError, LlavaConfig
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.params import flatten, param_shapes, unflatten

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)

# Layouts of activations and caches (see the module docstring).
BATCH = P(DATA)
HIDDEN = P(DATA, None, None)
HEADS = P(DATA, None, MODEL, None)
PER_HEAD_ROWS = P(DATA, MODEL, None, None)  # [B, N, T, V] attention rows of the text
KV_CACHE = P(None, DATA, None, MODEL, None)
SMALL = P(DATA)  # [B, ...] replicated over model


# ------------------------------------------------------------------------------------------
# Mesh


@dataclass(frozen=True)
class MeshShape:
    """Sizes of the two mesh axes."""

    data: int = 1
    model: int = 1

    @property
    def size(self) -> int:
        return self.data * self.model

    def __str__(self) -> str:
        return f"data={self.data},model={self.model}"


def parse_mesh(text: str | None, num_devices: int | None = None) -> MeshShape:
    """`--mesh data=N,model=M` (either may be left out) as a `MeshShape`.

    A missing `data` takes the devices left: `num_devices // model` (1 when `num_devices` is
    None); no text at all puts every device on data. InputError for anything malformed.
    """
    sizes: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise InputError(f"--mesh: expected data=N,model=M, got {text!r}")
        if name in sizes:
            raise InputError(f"--mesh: axis {name!r} given twice in {text!r}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise InputError(f"--mesh: {name} must be an integer, got {value.strip()!r}") from None
        if sizes[name] < 1:
            raise InputError(f"--mesh: {name} must be >= 1, got {sizes[name]}")
    model = sizes.get(MODEL, 1)
    if DATA in sizes:
        data = sizes[DATA]
    elif num_devices is None:
        data = 1
    else:
        data = num_devices // model
        if data < 1:
            raise InputError(f"--mesh: model={model} needs {model} devices, {num_devices} found")
    return MeshShape(data, model)


def make_mesh(
    shape: MeshShape | str | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ("data", "model") mesh over the first `shape.size` of `devices` (default: the
    local devices; no shape: all of them on data). Axes are `Auto`: jit propagates shardings.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    if not isinstance(shape, MeshShape):
        shape = parse_mesh(shape, len(devices))
    if shape.size > len(devices):
        raise InputError(
            f"mesh {shape} needs {shape.size} devices, {len(devices)} "
            f"{'is' if len(devices) == 1 else 'are'} available"
        )
    grid = np.asarray(devices[: shape.size], dtype=object).reshape(shape.data, shape.model)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def mesh_shape(mesh: Mesh) -> MeshShape:
    return MeshShape(int(mesh.shape[DATA]), int(mesh.shape[MODEL]))


def use_mesh(mesh: Mesh):
    """Context in which the programs' `constrain` annotations apply (`jax.set_mesh`)."""
    return jax.set_mesh(mesh)


# ------------------------------------------------------------------------------------------
# The parameter rules


@dataclass(frozen=True)
class Rule:
    """Parameters whose path fully matches `pattern` get `spec`.

    split: what the model axis splits, which must divide it: "heads" / "kv_heads" /
    "vision_heads" (else ConfigError) or a size ("vocab", "mlp", "hidden"; else that
    dimension is replicated). kind: "column", "row", "lookup" or "replicated".
    """

    pattern: str
    spec: tuple[str | None, ...]
    split: str = ""
    kind: str = "replicated"


COLUMN_STACKED = (None, None, MODEL)  # [L, in, out]: out over model
ROW_STACKED = (None, MODEL, None)  # [L, in, out]: in over model
BIAS_STACKED = (None, MODEL)  # [L, out]

PARAM_RULES: tuple[Rule, ...] = (
    Rule(r"text/layers/q_proj/kernel", COLUMN_STACKED, "heads", "column"),
    Rule(r"text/layers/q_proj/bias", BIAS_STACKED, "heads", "column"),
    Rule(r"text/layers/[kv]_proj/kernel", COLUMN_STACKED, "kv_heads", "column"),
    Rule(r"text/layers/[kv]_proj/bias", BIAS_STACKED, "kv_heads", "column"),
    Rule(r"text/layers/o_proj/kernel", ROW_STACKED, "heads", "row"),
    Rule(r"text/layers/(gate|up)_proj/kernel", COLUMN_STACKED, "mlp", "column"),
    Rule(r"text/layers/(gate|up)_proj/bias", BIAS_STACKED, "mlp", "column"),
    Rule(r"text/layers/down_proj/kernel", ROW_STACKED, "mlp", "row"),
    Rule(r"text/embed_tokens", (None, MODEL), "hidden", "lookup"),
    Rule(r"text/lm_head", (None, MODEL), "vocab", "column"),
    Rule(r"(?:video_)?vision/layers/[qkv]_proj/kernel", COLUMN_STACKED, "vision_heads", "column"),
    Rule(r"(?:video_)?vision/layers/[qkv]_proj/bias", BIAS_STACKED, "vision_heads", "column"),
    Rule(r"(?:video_)?vision/layers/out_proj/kernel", ROW_STACKED, "vision_heads", "row"),
    Rule(r"(?:video_)?vision/layers/fc1/kernel", COLUMN_STACKED, "vision_mlp", "column"),
    Rule(r"(?:video_)?vision/layers/fc1/bias", BIAS_STACKED, "vision_mlp", "column"),
    Rule(r"(?:video_)?vision/layers/fc2/kernel", ROW_STACKED, "vision_mlp", "row"),
    Rule(r"projector/linear_1/kernel", (None, MODEL), "hidden", "column"),
    Rule(r"projector/linear_1/bias", (MODEL,), "hidden", "column"),
    Rule(r"projector/linear_2/kernel", (MODEL, None), "hidden", "row"),
    Rule(r".*", (), "", "replicated"),
)

HEAD_SPLITS = {
    "heads": ("text query heads", lambda c: c.text.num_attention_heads),
    "kv_heads": ("text KV heads", lambda c: c.text.num_key_value_heads),
    "vision_heads": ("vision heads", lambda c: c.vision.num_attention_heads),
}


def rule_for(path: str) -> Rule:
    return next(r for r in PARAM_RULES if re.fullmatch(r.pattern, path))


def check_heads(cfg: LlavaConfig, model: int) -> None:
    """ConfigError (one line) unless every head count divides the model axis."""
    for what, count in HEAD_SPLITS.values():
        n = count(cfg)
        if n % model:
            raise ConfigError(f"--mesh model={model} does not divide the model's {n} {what}")


@dataclass(frozen=True)
class ParamLayout:
    """One parameter's layout: spec over the mesh, shard shape, and why."""

    path: str
    shape: tuple[int, ...]
    spec: P
    shard_shape: tuple[int, ...]
    rule: Rule
    note: str = ""  # e.g. why a dimension is replicated against the rule


def param_layouts(cfg: LlavaConfig, shape: MeshShape) -> dict[str, ParamLayout]:
    """The layout of every parameter (flat path -> `ParamLayout`) under `PARAM_RULES`."""
    check_heads(cfg, shape.model)
    out = {}
    for path, dims in flatten(param_shapes(cfg)).items():
        rule = rule_for(path)
        spec, note = list(rule.spec) + [None] * (len(dims) - len(rule.spec)), ""
        for i, axis in enumerate(spec):
            if axis == MODEL and dims[i] % shape.model:
                spec[i] = None
                note = f"replicated: {dims[i]} does not divide by model={shape.model}"
        shard = tuple(
            d // (shape.model if a == MODEL else 1) for d, a in zip(dims, spec, strict=True)
        )
        out[path] = ParamLayout(path, tuple(dims), P(*spec), shard, rule, note)
    return out


def param_specs(cfg: LlavaConfig, shape: MeshShape) -> dict:
    """The parameter tree's `PartitionSpec`s (nested like the params)."""
    return unflatten({k: v.spec for k, v in param_layouts(cfg, shape).items()})


def param_shardings(cfg: LlavaConfig, mesh: Mesh) -> dict:
    """The parameter tree's `NamedSharding`s on `mesh` (e.g. for an orbax restore)."""
    specs = param_specs(cfg, mesh_shape(mesh))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


def shard_params(params: dict, cfg: LlavaConfig, mesh: Mesh) -> dict:
    """`params` placed on `mesh` as the rules say (`jax.device_put`)."""
    return jax.device_put(params, param_shardings(cfg, mesh))


def as_mesh(mesh: Mesh | MeshShape | str) -> Mesh:
    """A `Mesh` as it is; a `MeshShape` or `--mesh` text made over the local devices."""
    return mesh if isinstance(mesh, Mesh) else make_mesh(mesh)


def array_from_shards(
    shape: tuple[int, ...], sharding: jax.sharding.Sharding, read: Callable[[tuple], np.ndarray]
) -> jax.Array:
    """A `jax.Array` of `shape` laid out by `sharding`, each device's block `read(index)`.

    Like `jax.make_array_from_callback`, but each block is placed on its device as soon as it
    is read (make_array_from_callback reads every device's block before placing any, i.e.
    holds the whole array on the host), and a block that several devices hold (replication
    over data) is read once and copied device to device. Host memory: one block at a time.

    read: index (a tuple of slices of `shape`) -> that block as a numpy array.
    """
    placed: dict[tuple, jax.Array] = {}
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=False))
        if key in placed:
            arrays.append(jax.device_put(placed[key], device))
            continue
        block = jax.device_put(read(index), device)
        block.block_until_ready()  # the host block can go before the next one is read
        placed[key] = block
        arrays.append(block)
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """A `Batch` (any pytree of [B, ...] arrays) with B split over data.

    B is the prompt's batch size (`prefix_ids`, else the first leaf's); a leaf without that
    leading axis (a tower input shared by the batch, e.g. Qwen-VL's attention tile ranges) is
    replicated. A sharding is only a layout: the program computes the same either way.
    """
    ids = getattr(batch, "prefix_ids", None)
    b = (ids if ids is not None else jax.tree.leaves(batch)[0]).shape[0]
    data = int(mesh.shape[DATA])
    if b % data:
        raise InputError(f"a batch of {b} does not split over data={data}: use a multiple")
    split, whole = NamedSharding(mesh, BATCH), NamedSharding(mesh, P())

    def place(x: Any) -> Any:
        batched = getattr(x, "ndim", 0) >= 1 and x.shape[0] == b
        return jax.device_put(x, split if batched else whole)

    return jax.tree.map(place, batch)


def params_mesh(params: dict) -> Mesh | None:
    """The ("data", "model") mesh the parameters were placed on (`shard_params`), or None."""
    leaves = jax.tree.leaves(params)
    s = getattr(leaves[0], "sharding", None) if leaves else None
    if isinstance(s, NamedSharding) and isinstance(s.mesh, Mesh) and s.mesh.axis_names == AXES:
        return s.mesh
    return None


def follow_params_mesh(fn: Callable) -> Callable:
    """For `fn(params, cfg, batch, ...)`: when the params are on a mesh, the batch is split
    over data and `fn` runs with the mesh set (`use_mesh`); otherwise `fn` runs as it is."""

    @functools.wraps(fn)
    def wrapper(params: dict, cfg: LlavaConfig, batch: Any, *args: Any, **kw: Any) -> Any:
        mesh = params_mesh(params)
        if mesh is None:
            return fn(params, cfg, batch, *args, **kw)
        with use_mesh(mesh):
            return fn(params, cfg, shard_batch(batch, mesh), *args, **kw)

    return wrapper


# ------------------------------------------------------------------------------------------
# Inside the programs


def constrain(x: jax.Array, spec: P) -> jax.Array:
    """`with_sharding_constraint(x, spec)` under a ("data", "model") mesh set with
    `use_mesh`; a no-op without one (single-device runs compile what they always did).

    Axes of `spec` whose dimension does not divide by the axis size are left unconstrained.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != AXES:
        return x
    entries = list(spec) + [None] * (x.ndim - len(spec))
    fitted = [
        None if a is not None and x.shape[i] % mesh.shape[a] else a for i, a in enumerate(entries)
    ]
    return jax.lax.with_sharding_constraint(x, P(*fitted))


# ------------------------------------------------------------------------------------------
# The human table (`sparsevlm info --mesh`)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _spec_text(spec: P) -> str:
    parts = ["·" if a is None else str(a) for a in spec]
    return "(" + ", ".join(parts) + ")" if parts else "replicated"


def format_layout(cfg: LlavaConfig, shape: MeshShape, dtypes: dict[str, str] | None = None) -> str:
    """Every tensor's layout on a mesh of `shape`, with bytes per device.

    dtypes: flat path -> dtype name (default: `cfg.param_dtype` for every parameter).
    """
    layouts = param_layouts(cfg, shape)
    itemsize = {"bfloat16": 2, "float16": 2}
    rows, total, per_device = [], 0, 0
    for path, lay in layouts.items():
        dt = (dtypes or {}).get(path, cfg.param_dtype)
        size = itemsize.get(dt) or np.dtype(dt).itemsize
        full = int(np.prod(lay.shape)) * size
        mine = int(np.prod(lay.shard_shape)) * size
        total, per_device = total + full, per_device + mine
        how = lay.rule.kind if lay.spec != P() or lay.rule.kind == "replicated" else "replicated"
        if lay.note:
            how = lay.note
        dims = "x".join(map(str, lay.shape))
        rows.append((path, dims, _spec_text(lay.spec), how, _human(mine)))
    t = cfg.text
    kv_item = itemsize.get(cfg.dtype) or np.dtype(cfg.dtype).itemsize
    kv_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * kv_item
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    head = ("tensor", "shape", "mesh axes", "how")
    w = [max(a, len(b)) for a, b in zip(w, head, strict=True)]
    lines = [f"mesh:        {shape} ({shape.size} devices)"]
    fmt = "  " + "  ".join(f"{{:<{n}}}" for n in w) + "  {:>10}"
    lines.append(fmt.format(*head, "per device"))
    lines += [fmt.format(*r) for r in rows]
    lines += [
        f"parameters:  {_human(per_device)} per device of {_human(total)} "
        f"(replicated over data={shape.data})",
        f"batch:       every [B, ...] input split over data (B a multiple of {shape.data})",
        "activations: x [B, L, D] (data, ·, ·); q, k, v [B, L, heads, H] (data, ·, model, ·)",
        f"KV cache:    k, v [L, B, S, K, H] (·, data, ·, model, ·): "
        f"{_human(kv_token / shape.model)} per token per device "
        f"({_human(kv_token)} per token in all, {cfg.dtype})",
        "pruning:     [B, T, V] rows after the head sum (data, ·, ·): small, replicated over model",
    ]
    return "\n".join(lines)
