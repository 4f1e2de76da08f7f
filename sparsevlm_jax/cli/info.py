"""`sparsevlm convert` (a source checkpoint to ours) and `sparsevlm info` (what a model is)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsevlm_jax.cli.errors import EXIT_OK
from sparsevlm_jax.cli.models import model_config, resolve_model
from sparsevlm_jax.cli.report import human_bytes
from sparsevlm_jax.config import ConfigError, LlavaConfig
from sparsevlm_jax.sparse.config import V1_LAYERS_32, preset_layers


def cmd_convert(args: argparse.Namespace) -> int:
    """Runs the converter (`convert.cli.run`) and prints its summary."""
    from convert.cli import run

    print(run(args))
    return EXIT_OK


def model_arrays(path: Path, cfg: LlavaConfig) -> tuple[dict[str, tuple], str]:
    """(flat key -> (shape, dtype), description) for a checkpoint or a source directory."""
    from sparsevlm_jax import checkpoint
    from sparsevlm_jax.params import flatten, param_shapes

    if checkpoint.is_checkpoint(path):
        return checkpoint.saved_arrays(path / checkpoint.PARAMS_DIR), "sparsevlm-jax checkpoint"
    src = json.loads((path / checkpoint.CONFIG_FILE).read_text())
    text = src.get("text_config") or {}
    dtype = str(src.get("torch_dtype") or src.get("dtype") or text.get("torch_dtype") or "?")
    shapes = {k: (tuple(v), dtype) for k, v in flatten(param_shapes(cfg)).items()}
    return shapes, "transformers / LLaVA directory, not converted: sizes from its config"


def format_info(path: Path, cfg: LlavaConfig, arrays: dict[str, tuple], kind: str) -> str:
    """The `sparsevlm info` summary: towers, projector, image tokens, parameters, dtype."""
    import numpy as np

    v, t = cfg.vision, cfg.text
    count = sum(int(np.prod(shape)) for shape, _ in arrays.values())
    nbytes = sum(int(np.prod(shape)) * _itemsize(dt) for shape, dt in arrays.values())
    dtypes = sorted({dt for _, dt in arrays.values()})
    style = "placeholder" if cfg.image_token_index < 0 else "expanded"
    try:
        layers = ",".join(map(str, preset_layers(V1_LAYERS_32, t.num_hidden_layers)))
    except ConfigError:
        layers = "none (too shallow; pass --layers)"
    proj = "bias" if cfg.projector_bias else "no bias"
    from sparsevlm_jax.checkpoint import load_metadata

    conv = load_metadata(path).get("conversion") or {}
    note = ""
    if conv.get("source_dtype"):
        note = (
            f" (converted from {conv['source_dtype']} with --dtype "
            f"{conv.get('requested_dtype', '?')})"
        )
    return "\n".join(
        [
            f"checkpoint:  {path} ({kind})",
            f"vision:      CLIP ViT, {v.num_hidden_layers} layers, hidden {v.hidden_size}, "
            f"MLP {v.intermediate_size}, {v.num_attention_heads} heads, image {v.image_size} px, "
            f"patch {v.patch_size}, feature layer {cfg.vision_feature_layer} "
            f"({cfg.vision_feature_select_strategy})",
            f"projector:   {v.hidden_size} -> {t.hidden_size} -> {t.hidden_size} "
            f"({cfg.projector_hidden_act}, {proj})",
            f"text:        Llama, {t.num_hidden_layers} layers, hidden {t.hidden_size}, "
            f"MLP {t.intermediate_size}, {t.num_attention_heads} heads ({t.num_key_value_heads} "
            f"KV, head dim {t.head_dim}), vocab {t.vocab_size}, rope theta {t.rope_theta:g}, "
            f"max positions {t.max_position_embeddings}",
            f"image:       {cfg.num_image_tokens} visual tokens per image, image token index "
            f"{cfg.image_token_index} ({style})",
            f"sparse v1:   default pruning layers {layers}",
            f"parameters:  {count:,} ({human_bytes(nbytes)})",
            f"dtype:       {', '.join(dtypes)}{note}",
        ]
    )


def _itemsize(name: str) -> int:
    """Bytes per element of a dtype name (bfloat16 included); 0 when unknown."""
    import numpy as np

    if name == "bfloat16":
        return 2
    try:
        return np.dtype(name).itemsize
    except TypeError:
        return 0


def add_mesh_arg(p: argparse.ArgumentParser) -> None:
    """`info --mesh data=N,model=M`: how the model would be laid out over devices."""
    p.add_argument(
        "--mesh",
        metavar="data=N,model=M",
        help="also print every tensor's layout on such a mesh with its bytes per device "
        "(no devices needed; a missing axis is 1)",
    )


def cmd_info(args: argparse.Namespace) -> int:
    """Prints `format_info` for a checkpoint or source directory (no weights read), and with
    `--mesh` the layout table of `sparsevlm_jax.sharding.format_layout`."""
    path = resolve_model(args.checkpoint)
    cfg = model_config(path, args.clip)
    mesh = None
    if getattr(args, "mesh", None) is not None:
        from sparsevlm_jax.sharding import param_layouts, parse_mesh

        mesh = parse_mesh(args.mesh)
        param_layouts(cfg, mesh)  # a mesh the heads do not fit fails before any output
    arrays, kind = model_arrays(path, cfg)
    print(format_info(path, cfg, arrays, kind))
    if mesh is not None:
        from sparsevlm_jax.sharding import format_layout

        print()
        print(format_layout(cfg, mesh, {k: dt for k, (_, dt) in arrays.items()}))
    return EXIT_OK
