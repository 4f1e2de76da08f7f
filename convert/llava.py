"""Convert a LLaVA checkpoint (llava-hf, transformers 5, or original LLaVA + CLIP) to ours:
LLaVA-1.5, LLaVA-NeXT, LLaVA-NeXT-Video, Video-LLaVA (two towers).

The conversion runs in two passes over the source files:

1. *plan*: list every tensor's name/shape/dtype (headers only), map it through the name table
   (`names.py`) and check the whole mapping against `params.param_shapes(cfg)`: unknown names,
   duplicates, wrong shapes, non-float tensors and missing parameters (per layer slot of the
   stacked arrays) are all collected and raised as ONE `ConversionError` before any data is read.
2. *fill*: preallocate the stacked target arrays in the target dtype and copy the source into
   them tensor by tensor (transposed / reshaped on the way). Peak memory is the target tree plus
   one source tensor: a 7B model in bf16 needs ~14 GB.

`load_transformers` (loading without writing) plans the same way, then reads each target
parameter straight onto its devices, block by block (`convert.streaming`): with a mesh every
device's shard is read from the source tensors it covers and placed at once, so the host never
holds more than about one shard (one parameter without a mesh), never the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, Sharding
from tqdm.auto import tqdm

from convert.errors import ConversionError
from convert.names import (
    CLIP_PREFIXES,
    IGNORED,
    MODEL_PREFIXES,
    Target,
    is_stacked,
    resolve,
    source_shape,
)
from convert.readers import TensorInfo, WeightFiles, open_weights
from convert.streaming import LoadStats, Parts, block_reader, copy_into
from sparsevlm_jax import checkpoint
from sparsevlm_jax.config import DTYPES, ConfigError, LlavaConfig, TextConfig, VisionConfig
from sparsevlm_jax.params import Params, flatten, param_shapes, unflatten
from sparsevlm_jax.sharding import array_from_shards, param_shardings

# Copied from the source directory (and, for original LLaVA, the CLIP directory) when present.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",  # Qwen-VL: the video processor's pixel budget
    "generation_config.json",
    "chat_template.jinja",  # transformers 5 / Qwen-VL: the checkpoint's chat template
    "chat_template.json",
    "processor_config.json",
    "vocab.json",  # byte-level BPE tokenizers (Qwen2)
    "merges.txt",
)

SUPPORTED_MODEL_TYPES = (
    "llava", "llava_next", "llava_next_video", "video_llava", "qwen2_vl", "qwen2_5_vl",
)  # fmt: skip

# Original LLaVA names its vision tower by hub id only; these are the towers we can build a
# config for when the CLIP weights are embedded in the checkpoint and no --clip dir is given.
KNOWN_CLIP_TOWERS: dict[str, VisionConfig] = {
    "clip-vit-large-patch14-336": VisionConfig(image_size=336),
    "clip-vit-large-patch14": VisionConfig(image_size=224),
}

_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


# --- config ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from e
    except ValueError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return d


def is_original_llava(d: dict[str, Any]) -> bool:
    """True for an original LLaVA (`LlavaLlamaForCausalLM`) config.json: Llama fields + mm_*."""
    if "text_config" in d:
        return False
    return d.get("model_type") == "llava_llama" or any(
        k in d for k in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")
    )


def read_config(
    src: str | Path, clip: str | Path | None = None, embedded_vision: bool = False
) -> LlavaConfig:
    """The `LlavaConfig` of a source directory (its `config.json`, plus the CLIP dir's).

    Args:
        src: llava-hf / transformers directory (model_type "llava"), or original LLaVA.
        clip: CLIP checkpoint directory (original LLaVA only).
        embedded_vision: the original LLaVA checkpoint carries its CLIP weights.
    """
    src = Path(src)
    d = _read_json(src / "config.json")
    try:
        if is_original_llava(d):
            return _original_config(src, d, clip, embedded_vision)
        if d.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise ConversionError(
                f"{src / 'config.json'}: model_type {d.get('model_type')!r} is not supported "
                f"(expected one of {', '.join(map(repr, SUPPORTED_MODEL_TYPES))} from "
                "llava-hf / transformers / Qwen, or an original LLaVA-1.5 / 1.6 config)"
            )
        if clip is not None:
            raise ConversionError(
                f"{src}: is a transformers LLaVA checkpoint with its own vision tower; "
                "--clip is only for original LLaVA checkpoints"
            )
        return LlavaConfig.from_hf(d)
    except ConfigError as e:
        raise ConversionError(f"{src / 'config.json'}: {e}") from e


def _original_config(
    src: Path, d: dict[str, Any], clip: str | Path | None, embedded_vision: bool
) -> LlavaConfig:
    where = src / "config.json"
    ptype = d.get("mm_projector_type", "linear")  # LLaVA's builder default
    if ptype != "mlp2x_gelu":
        raise ConversionError(f"{where}: mm_projector_type {ptype!r} unsupported (mlp2x_gelu)")
    merge = d.get("mm_patch_merge_type", "flat")
    anyres = str(d.get("image_aspect_ratio", "pad")).startswith("anyres")
    if anyres != (merge == "spatial_unpad") or merge not in ("flat", "spatial_unpad"):
        raise ConversionError(
            f"{where}: image_aspect_ratio {d.get('image_aspect_ratio')!r} with "
            f"mm_patch_merge_type {merge!r} is unsupported (LLaVA-1.5: pad + flat; "
            "LLaVA-1.6: anyres + spatial_unpad)"
        )
    feature = d.get("mm_vision_select_feature", "patch")
    if feature not in _SELECT_FEATURE:
        raise ConversionError(f"{where}: mm_vision_select_feature {feature!r} unsupported")
    tower = str(d.get("mm_vision_tower", "?"))
    if clip is not None:
        vision = _clip_vision_config(Path(clip))
    elif embedded_vision and Path(tower).name in KNOWN_CLIP_TOWERS:
        vision = KNOWN_CLIP_TOWERS[Path(tower).name]
    else:
        why = f"unknown embedded vision tower {tower!r}" if embedded_vision else "no vision weights"
        raise ConversionError(
            f"{src}: original LLaVA checkpoint with {why}; pass --clip DIR (a local copy of "
            f"the CLIP checkpoint {tower})"
        )
    if d.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ConversionError(
            f"{where}: mm_hidden_size {d['mm_hidden_size']} != CLIP hidden_size "
            f"{vision.hidden_size}"
        )
    return LlavaConfig(
        vision=vision,
        text=TextConfig.from_hf(d),
        image_token_index=-200,
        vision_feature_layer=d.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=_SELECT_FEATURE[feature],
        projector_hidden_act="gelu",
        projector_bias=True,
        family="llava_next" if anyres else "llava",
        image_grid_pinpoints=_pinpoints(d) if anyres else (),
    )


def _pinpoints(d: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(x) for x in p) for p in d.get("image_grid_pinpoints") or ())


def _clip_vision_config(clip: Path) -> VisionConfig:
    d = _read_json(clip / "config.json")
    if isinstance(d.get("vision_config"), dict):
        return VisionConfig.from_hf(d["vision_config"])
    if d.get("model_type") == "clip_vision_model":
        return VisionConfig.from_hf(d)
    raise ConversionError(
        f"{clip / 'config.json'}: not a CLIPConfig (no vision_config) nor a CLIPVisionConfig"
    )


# --- plan ------------------------------------------------------------------------------------


@dataclass
class _Problems:
    """Everything wrong with a checkpoint, collected so that one error names it all."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)
    wrong_dtype: list[str] = field(default_factory=list)

    def raise_if_any(self, src: Path) -> None:
        parts = [
            _describe(what, items)
            for what, items in (
                ("missing", self.missing),
                ("unexpected", self.unexpected),
                ("wrong shape", self.wrong_shape),
                ("duplicate", self.duplicate),
                ("non-float", self.wrong_dtype),
            )
            if items
        ]
        if parts:
            raise ConversionError(f"checkpoint {src}: " + ", ".join(parts))


def _describe(what: str, items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... and {len(items) - limit} more"
    return f"{len(items)} {what} ({shown})"


def _slots(key: str, layers: Iterable[int]) -> str:
    """`key[layer 3]`, `key[layers 0-23]`, `key[layers 1, 4-5]`."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)
    single = len(runs) == 1 and runs[0][0] == runs[0][1]
    return f"{key}[layer{'' if single else 's'} {text}]"


@dataclass
class _Source:
    """One weight directory and the name table its tensors go through."""

    files: WeightFiles
    prefixes: tuple[tuple[str, str | None], ...]
    entries: list[TensorInfo]


def _plan(
    sources: list[_Source], cfg: LlavaConfig, src: Path
) -> tuple[dict[tuple[int, str], Target], dict[str, tuple[int, ...]]]:
    """Maps every source tensor to its target and checks the mapping is complete and exact.

    Returns:
        `{(source index, tensor name): Target}` and the flat target shapes.

    Raises:
        ConversionError: naming every unknown, duplicate, wrongly shaped, non-float or missing
            tensor at once.
    """
    shapes = flatten(param_shapes(cfg))
    filled = {k: np.zeros(s[0] if is_stacked(k) else 1, bool) for k, s in shapes.items()}
    problems = _Problems()
    plan: dict[tuple[int, str], Target] = {}
    for i, source in enumerate(sources):
        for info in source.entries:
            target = resolve(info.name, source.prefixes)
            if target is IGNORED:
                continue
            if target is None or target.key not in shapes:
                tied = target is not None and target.key == "text/lm_head"
                if not (tied and cfg.text.tie_word_embeddings):
                    problems.unexpected.append(info.name)
                continue
            if _check(info, target, shapes[target.key], cfg, problems, filled[target.key]):
                plan[(i, info.name)] = target
    for key, done in filled.items():
        if is_stacked(key) and not done.all():
            problems.missing.append(_slots(key, np.flatnonzero(~done).tolist()))
        elif not done.all():
            problems.missing.append(key)
    problems.raise_if_any(src)
    return plan, shapes


def _check(
    info: TensorInfo,
    target: Target,
    shape: tuple[int, ...],
    cfg: LlavaConfig,
    problems: _Problems,
    done: np.ndarray,
) -> bool:
    """Checks one mapped tensor against its target; records problems and marks the slot."""
    stacked = is_stacked(target.key)
    if stacked != (target.layer is not None):
        problems.unexpected.append(info.name)
        return False
    if stacked and target.layer >= shape[0]:
        problems.unexpected.append(f"{info.name} (layer {target.layer} >= {shape[0]})")
        return False
    slot = target.layer if stacked else 0
    qv = cfg.qwen_vision
    channels = cfg.vision.num_channels if qv is None else qv.in_channels
    temporal = 2 if qv is None else qv.temporal_patch_size
    expected = source_shape(target.kind, shape[1:] if stacked else shape, channels, temporal)
    ok = True
    if info.shape != expected:
        hint = ""
        if target.key in ("text/embed_tokens", "text/lm_head"):
            hint = f" (config vocab_size {cfg.text.vocab_size})"
        problems.wrong_shape.append(f"{info.name}: {info.shape} != {expected}{hint}")
        ok = False
    if not jnp.issubdtype(info.dtype, jnp.floating):
        problems.wrong_dtype.append(f"{info.name}: {info.dtype}")
        ok = False
    if done[slot]:
        problems.duplicate.append(f"{info.name} -> {target.key}")
        ok = False
    done[slot] = True
    return ok


def source_dtype(entries: list[TensorInfo]) -> str | None:
    """The float dtype holding most of the source's elements (None: no float tensors)."""
    counts: dict[str, int] = {}
    for info in entries:
        if jnp.issubdtype(info.dtype, jnp.floating):
            counts[info.dtype.name] = counts.get(info.dtype.name, 0) + int(np.prod(info.shape))
    return max(counts, key=counts.get) if counts else None


def _target_dtype(dtype: str | None, found: str | None) -> str:
    """The requested dtype, or (None) the source's float dtype `found` (float32 if unusable)."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConversionError(f"dtype must be one of {DTYPES} or None, got {dtype!r}")
        return dtype
    return found if found in DTYPES else "float32"


# --- fill ------------------------------------------------------------------------------------


def _fill(
    sources: list[_Source],
    plan: dict[tuple[int, str], Target],
    arrays: dict[str, np.ndarray],
    progress: bool,
) -> None:
    """Copies every planned source tensor into its (slot of its) target array."""
    total = sum(len(s.entries) for s in sources)
    with tqdm(total=total, desc="converting", unit="tensor", disable=not progress) as bar:
        for i, source in enumerate(sources):
            for name, w in source.files.tensors():
                target = plan.get((i, name))
                if target is not None:
                    dst = arrays[target.key]
                    copy_into(dst if target.layer is None else dst[target.layer], w, target)
                del w
                bar.update()


def _open_sources(src: Path, clip: Path | None) -> tuple[list[_Source], LlavaConfig]:
    files = open_weights(src)
    entries = files.entries()
    sources = [_Source(files, MODEL_PREFIXES, entries)]
    embedded = any(e.name.startswith("model.vision_tower.") for e in entries)
    cfg = read_config(src, clip, embedded_vision=embedded)
    if clip is not None:
        clip_files = open_weights(clip)
        sources.append(_Source(clip_files, CLIP_PREFIXES, clip_files.entries()))
    return sources, cfg


def convert_to_numpy(
    src: str | Path,
    dtype: str | None = "bfloat16",
    clip: str | Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], LlavaConfig]:
    """Converts a source directory in memory.

    Args:
        src: llava-hf / transformers / original LLaVA checkpoint directory.
        dtype: "bfloat16" | "float32" | "float16", or None to keep the source's float dtype.
        clip: CLIP checkpoint directory (original LLaVA only).
        progress: show a tqdm bar over the source tensors.

    Returns:
        `(flat params, cfg)`: `{flat key: np.ndarray}` (see `params.flatten`) and the config
        with `param_dtype` and `dtype` set to the target dtype.

    Raises:
        ConversionError: one line naming every problem with the checkpoint.
    """
    flat, cfg, _ = _convert(Path(src), dtype, clip, progress)
    return flat, cfg


def _convert(
    src: Path, dtype: str | None, clip: str | Path | None, progress: bool
) -> tuple[dict[str, np.ndarray], LlavaConfig, str | None]:
    """`convert_to_numpy`, also returning the source's float dtype (`source_dtype`)."""
    return _read(_prepare(src, dtype, clip), progress)


def _read(p: _Prepared, progress: bool) -> tuple[dict[str, np.ndarray], LlavaConfig, str | None]:
    """The prepared source's arrays, converted (`_convert` after `_prepare`)."""
    arrays = {k: np.empty(s, jnp.dtype(p.cfg.param_dtype)) for k, s in p.shapes.items()}
    _fill(p.sources, p.plan, arrays, progress)
    return arrays, p.cfg, p.found


@dataclass
class _Prepared:
    """A source checkpoint opened and checked, before any tensor data is read."""

    sources: list[_Source]
    cfg: LlavaConfig  # param_dtype / dtype = the target dtype
    plan: dict[tuple[int, str], Target]
    shapes: dict[str, tuple[int, ...]]
    found: str | None  # the source's float dtype (`source_dtype`)


def _prepare(src: Path, dtype: str | None, clip: str | Path | None) -> _Prepared:
    """Opens the source (and CLIP) weights, picks the target dtype and checks the whole
    mapping (`_plan`: one ConversionError naming every problem)."""
    sources, cfg = _open_sources(src, None if clip is None else Path(clip))
    found = source_dtype(sources[0].entries)
    target_dtype = _target_dtype(dtype, found)
    cfg = cfg.replace(param_dtype=target_dtype, dtype=target_dtype)
    plan, shapes = _plan(sources, cfg, src)
    return _Prepared(sources, cfg, plan, shapes, found)


def tokenizer_files(src: str | Path, clip: str | Path | None = None) -> dict[str, Path]:
    """Tokenizer / processor files to copy: from `src`, else (preprocessor) from `clip`."""
    found: dict[str, Path] = {}
    for root in [Path(src)] + ([Path(clip)] if clip is not None else []):
        names = list(TOKENIZER_FILES) + sorted(p.name for p in root.glob("chat_template*"))
        for name in names:
            if name not in found and (root / name).is_file():
                found[name] = root / name
    return found


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = "bfloat16",
    clip: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> LlavaConfig:
    """Converts `src` and writes our checkpoint (orbax params + config.json + tokenizer) to `dst`.

    The checkpoint's `metadata.json` records the dtypes under "conversion" (stored, source,
    requested; see `sparsevlm_jax.checkpoint.load_metadata`).

    Args:
        src: llava-hf hub / transformers `save_pretrained` / original LLaVA-1.5 directory.
        dst: the checkpoint directory to create (atomically; nothing is left on failure). The
            file system must have room for it (`checkpoint.check_free_space`), checked before
            any tensor is read.
        dtype: "bfloat16" | "float32" | "float16", or None to keep the source's float dtype.
        clip: CLIP checkpoint directory, for original LLaVA checkpoints.
        progress: show a progress bar.
        overwrite: replace an existing non-empty `dst`.

    Returns:
        the config written to `dst`.

    Raises:
        ConversionError: one line naming every problem with the source checkpoint.
        CheckpointError: `dst` exists, its file system lacks the room, or writing it failed
            (a full disk, a quota, no permission: one line).
    """
    checkpoint.check_destination(dst, overwrite)
    p = _prepare(Path(src), dtype, clip)
    # Room for the whole checkpoint, before reading any tensor (refused with both numbers).
    itemsize = jnp.dtype(p.cfg.param_dtype).itemsize
    sizes = [int(np.prod(shape)) * itemsize for shape in p.shapes.values()]
    tokenizer = tokenizer_files(src, clip)
    checkpoint.check_free_space(dst, checkpoint.projected_bytes(sizes, tokenizer.values()))
    flat, cfg, found = _read(p, progress)
    conversion = {
        "dtype": cfg.param_dtype,
        "source_dtype": found,
        "requested_dtype": dtype or "keep",
    }
    checkpoint.save(
        dst,
        unflatten(flat),
        cfg,
        tokenizer,
        overwrite=overwrite,
        metadata={"conversion": conversion},
    )
    return cfg


def load_transformers(
    src: str | Path,
    dtype: str | None = None,
    clip: str | Path | None = None,
    progress: bool = False,
    mesh: Mesh | None = None,
    stats: LoadStats | None = None,
) -> tuple[Params, LlavaConfig]:
    """Loads a llava-hf / transformers / original LLaVA directory straight into `jax.Array`s.

    The whole checkpoint is checked first (`_plan`: one ConversionError naming every problem,
    and the head counts against the mesh) before any tensor data is read. Then every target
    parameter is read block by block onto its devices (`convert.streaming`): host memory
    holds about one shard at a time (one parameter without a mesh), never the model.

    Args:
        src: checkpoint directory; `clip` the CLIP directory for original LLaVA.
        dtype: as in `convert_checkpoint`; None keeps the source's float dtype.
        progress: show a tqdm bar over the target parameters.
        mesh: a ("data", "model") `jax.sharding.Mesh`: parameters are laid out by
            `sparsevlm_jax.sharding.param_shardings`; None: the first local device.
        stats: filled in with what reading cost on the host (`LoadStats`, for measurements).

    Returns:
        `(params, cfg)`: nested dict of `jax.Array`s and the config.
    """
    p = _prepare(Path(src), dtype, clip)
    cfg, shapes = p.cfg, p.shapes
    shardings = _shardings(cfg, mesh)
    np_dtype = jnp.dtype(cfg.param_dtype)  # ml_dtypes.bfloat16 for bfloat16
    note = None if stats is None else stats.note
    readers = [s.files.blocks(note) for s in p.sources]
    parts = _parts(p.plan, p.sources, readers)
    out: dict[str, jax.Array] = {}
    try:
        for key in tqdm(shapes, desc="loading", unit="tensor", disable=not progress):
            shape = tuple(shapes[key])
            read = block_reader(parts[key], shape, is_stacked(key), np_dtype, stats)
            out[key] = array_from_shards(shape, shardings(key), read)
    finally:
        for r in readers:
            r.close()
    return unflatten(out), cfg


def _shardings(cfg: LlavaConfig, mesh: Mesh | None) -> Callable[[str], Sharding]:
    """flat key -> the parameter's `Sharding` (every one on the first local device without a
    mesh). ConfigError (a head count that does not divide the model axis) before any read."""
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return lambda key: one
    return flatten(param_shardings(cfg, mesh)).__getitem__


def _parts(
    plan: dict[tuple[int, str], Target], sources: list[_Source], readers: list[Any]
) -> dict[str, Parts]:
    """Every target parameter's source tensors: flat key -> {layer slot (0 unstacked):
    (reader, tensor, target)}."""
    infos = [{e.name: e for e in s.entries} for s in sources]
    parts: dict[str, Parts] = {}
    for (i, name), target in plan.items():
        slot = 0 if target.layer is None else target.layer
        parts.setdefault(target.key, {})[slot] = (readers[i], infos[i][name], target)
    return parts
