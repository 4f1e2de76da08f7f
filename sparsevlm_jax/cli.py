"""The `sparsevlm` command: convert, generate, eval, visualize, info, demo.

Exit status: 0 success; 2 a usage or input error (bad arguments, files, images, prompts,
checkpoints, configs), reported as ONE line `sparsevlm: error: <message>` on stderr, with no
partial output file left behind; 1 an unexpected error (a bug), reported with a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sparsevlm_jax.config import ConfigError, LlavaConfig
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.sparse.config import (
    METHODS,
    NAMED_BUDGETS,
    V1_BUDGETS,
    V1_LAYERS_32,
    SparseConfig,
    named_sparse_config,
    scale_layers,
)

PROG = "sparsevlm"
EXIT_OK, EXIT_BUG, EXIT_INPUT = 0, 1, 2
DEFAULT_BUDGET = 192
RATER_METHODS = ("v1", "v1_5", "v2_0")  # the methods that score with text raters
REFERENCE_DEPTH = 32  # LLaVA-1.5-7B's decoder depth, for which the presets are stated


def default_model_path() -> str | None:
    """The model used when `--model` is not given: the bundled demo model, if installed."""
    from sparsevlm_jax.checkpoint import is_checkpoint
    from sparsevlm_jax.shapes_task import demo_model_path

    path = demo_model_path()
    return str(path) if is_checkpoint(path) else None


# ----------------------------------------------------------------------------------------------
# Errors


def input_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit 2, one line) rather than a bug."""
    from sparsevlm_jax.checkpoint import CheckpointError

    types: list[type[BaseException]] = [
        InputError,  # includes batch.BucketError
        ConfigError,
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    ]
    try:
        from convert.errors import ConversionError
    except ImportError:  # the converter is optional at run time
        pass
    else:
        types.append(ConversionError)
    return tuple(types)


def error_message(e: BaseException) -> str:
    """One line describing an input error."""
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename is not None else ""
        msg = f"{where}: {e.strerror}" if where else e.strerror
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


# ----------------------------------------------------------------------------------------------
# Shared options


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in the epilog as written."""


def comma_ints(text: str, what: str) -> tuple[int, ...]:
    """Parses "2,6,15" as (2, 6, 15); InputError naming the option otherwise."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"{what}: expected comma-separated integers, got {text!r}") from None
    return values


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        metavar="CKPT",
        help="converted checkpoint (sparsevlm convert) or a llava-hf / original LLaVA directory",
    )
    g.add_argument("--clip", metavar="DIR", help="CLIP directory, for original LLaVA checkpoints")
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="weight and compute dtype (default: the stored one)",
    )
    g.add_argument(
        "--template",
        metavar="NAME",
        help="conversation template: vicuna_v1 (default), llava_v1 or llava_hf",
    )
    g.add_argument(
        "--image-mode",
        choices=("pad", "crop"),
        help="pad to square with the mean colour (LLaVA-1.5, default) or centre crop",
    )


def add_sparse_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "sparsity",
        "Default: dense, or v1 when any other sparsity option is given. Pick a named budget "
        "(--budget) or, for v1, an explicit rule k = floor(rank*scale + bias) (--scale/--bias).",
    )
    g.add_argument("--sparse", metavar="METHOD", help=f"{', '.join(METHODS)}")
    budgets = "; ".join(f"{m}: {','.join(map(str, b))}" for m, b in NAMED_BUDGETS.items())
    g.add_argument(
        "--budget",
        type=int,
        metavar="N",
        help=f"named budget (visual tokens of 576-token LLaVA-1.5; default {DEFAULT_BUDGET}): "
        f"{budgets}. Schedules and FastV's ratio are rescaled to the model's token count; "
        "v1's rank rules are not, so a v1 budget must be below it",
    )
    g.add_argument("--scale", type=float, metavar="S", help="v1 budget rule: scale")
    g.add_argument("--bias", type=float, metavar="B", help="v1 budget rule: bias (default 0)")
    g.add_argument(
        "--layers",
        metavar="L1,L2,...",
        help="pruning layers, 0-based (default 2,6,15,19 scaled to the model's depth)",
    )
    g.add_argument(
        "--capacity",
        metavar="SPEC",
        help="exact (default), or static capacities: one number per pruning layer",
    )


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    g = p.add_argument_group("generation")
    g.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, metavar="N", help="(%(default)s)"
    )
    g.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (%(default)s)"
    )
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="(%(default)s)")
    g.add_argument("--seed", type=int, default=0, metavar="K", help="(%(default)s)")


def check_generation_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {args.top_p}")


def parse_capacity(spec: str | None, num_image_tokens: int) -> tuple[str, tuple[int, ...]]:
    """--capacity: "exact", "static" (not yet: needs calibration) or numbers (static)."""
    if spec is None or spec == "exact":
        return "exact", ()
    if spec == "static":
        raise InputError(
            "--capacity static needs one number per pruning layer, e.g. --capacity 300,200,110,60 "
            "(calibrated static capacities are not available yet)"
        )
    caps = comma_ints(spec, "--capacity")
    for c in caps:
        if c < 1:
            raise InputError(f"--capacity: capacities must be >= 1, got {c}")
        if c > num_image_tokens:
            raise InputError(
                f"--capacity: capacity {c} is larger than the model's {num_image_tokens} "
                "visual tokens"
            )
    return "static", caps


def sparse_from_args(args: argparse.Namespace, cfg: LlavaConfig) -> SparseConfig:
    """The `SparseConfig` the sparsity options ask for, checked against the model.

    `--budget N` names a preset of `config.NAMED_BUDGETS`, stated for LLaVA-1.5's 576 visual
    tokens. The fixed schedules (v1_5, v2_0, random) and FastV's ratio are rescaled to the
    model's visual token count (`config.named_sparse_config`); v1's budgets are rank rules
    `k = floor(rank*scale + bias)` that are not rescaled, so a v1 budget must be below the
    model's visual token count (use --scale/--bias on smaller models).

    Raises:
      InputError / ConfigError: unknown method or budget, conflicting options, a v1 budget
        not below the visual token count, bad layers or capacities.
    """
    rule = (args.budget, args.scale, args.bias, args.layers, args.capacity)
    explicit = any(x is not None for x in rule)
    method = args.sparse if args.sparse is not None else ("v1" if explicit else "dense")
    if method not in METHODS:
        raise ConfigError(f"unknown sparse method {method!r}; known: {', '.join(METHODS)}")
    if method == "dense":
        if explicit:
            raise InputError("--budget/--scale/--bias/--layers/--capacity need a sparse method")
        return SparseConfig()
    if method != "v1" and (args.scale is not None or args.bias is not None):
        raise InputError(f"--scale/--bias are v1's budget rule; {method} takes --budget")
    if args.budget is not None and (args.scale is not None or args.bias is not None):
        raise InputError("give either --budget or --scale/--bias, not both")
    if args.bias is not None and args.scale is None:
        raise InputError("--bias needs --scale")
    num_layers, num_visual = cfg.text.num_hidden_layers, cfg.num_image_tokens
    budget = None if args.scale is not None else args.budget
    if budget is None and args.scale is None:
        budget = DEFAULT_BUDGET
    if budget is not None:
        check_budget(method, budget, num_visual)
    capacity, capacities = parse_capacity(args.capacity, num_visual)
    layers = comma_ints(args.layers, "--layers") if args.layers is not None else None
    if budget is None:
        sparse = SparseConfig(
            method="v1",
            layers=layers if layers is not None else default_layers(num_layers),
            scale=args.scale,
            bias=args.bias or 0.0,
            capacity=capacity,
            capacities=capacities,
        )
    elif method == "v1":
        layers = layers if layers is not None else default_layers(num_layers)
        sparse = SparseConfig.v1(budget, num_layers, layers, capacity, capacities)
    else:
        kw: dict[str, Any] = {}
        if args.capacity is not None:
            kw = {"capacity": capacity, "capacities": capacities}
        # With explicit --layers the preset is built for the reference depth, then moved.
        depth = num_layers if layers is None else REFERENCE_DEPTH
        try:
            sparse = named_sparse_config(method, budget, depth, num_visual, **kw)
        except ConfigError as e:
            raise ConfigError(f"{e}; pass --layers" if "too shallow" in str(e) else e) from None
        if layers is not None:
            sparse = sparse.replace(layers=layers)
    sparse.validate_for(num_layers)
    return sparse


def check_budget(method: str, budget: int, num_visual: int) -> None:
    """A named budget of `method`; a v1 budget must be below the visual token count."""
    known = NAMED_BUDGETS[method]
    if budget not in known:
        named = ", ".join(map(str, known))
        raise InputError(f"--budget: no {method} budget named {budget}; named budgets: {named}")
    if method == "v1" and budget >= num_visual:
        raise InputError(
            f"--budget {budget} is not below the model's {num_visual} visual tokens (v1's "
            "named budgets are rank rules for 576-token LLaVA-1.5; use --scale/--bias)"
        )


def default_layers(num_layers: int) -> tuple[int, ...]:
    """SparseVLM's 2,6,15,19 moved to a model of `num_layers` decoder layers."""
    try:
        return scale_layers(V1_LAYERS_32, num_layers)
    except ConfigError as e:
        raise ConfigError(f"{e}; pass --layers") from None


# ----------------------------------------------------------------------------------------------
# Model loading


def resolve_model(model: str | None) -> Path:
    """--model, or the bundled default; InputError when there is neither or it is missing."""
    path = model if model is not None else default_model_path()
    if path is None:
        raise InputError(
            "a model is required: pass --model CKPT (a checkpoint written by `sparsevlm "
            "convert`, or a llava-hf / original LLaVA directory); no bundled model is installed"
        )
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such model directory")
    if not p.is_dir():
        raise InputError(f"{p}: is not a directory (a model is a checkpoint directory)")
    return p


def processor_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.template is not None:
        out["template"] = args.template
    if args.image_mode is not None:
        out["image_mode"] = args.image_mode
    return out


def make_processor(args: argparse.Namespace, path: Path, cfg: LlavaConfig) -> Any:
    """The model's `Processor` (tokenizer + image settings), without loading weights."""
    from sparsevlm_jax.processing import Processor

    return Processor.from_pretrained(path, cfg, **processor_overrides(args))


def _raised_in(e: BaseException, packages: tuple[str, ...]) -> bool:
    tb = e.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if any(f"{os.sep}{p}{os.sep}" in name for p in packages):
            return True
        tb = tb.tb_next
    return False


def load_pipeline(args: argparse.Namespace, path: Path, cfg: LlavaConfig) -> Any:
    """`LlavaPipeline.from_pretrained`, with a damaged checkpoint reported as an input error.

    Our checkpoints' array list is checked first; an error raised inside orbax / tensorstore
    while reading the weights (a deleted or corrupt data file) becomes a CheckpointError.
    """
    from sparsevlm_jax import checkpoint
    from sparsevlm_jax.checkpoint import CheckpointError
    from sparsevlm_jax.pipeline import LlavaPipeline

    if checkpoint.is_checkpoint(path):
        checkpoint.check_arrays(path, cfg)
    try:
        return LlavaPipeline.from_pretrained(
            path, dtype=args.dtype, clip=args.clip, **processor_overrides(args)
        )
    except Exception as e:
        if isinstance(e, input_error_types()) or not _raised_in(e, ("orbax", "tensorstore")):
            raise
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        text = str(root).strip()
        first = text.splitlines()[0] if text else type(root).__name__
        raise CheckpointError(f"{path}: cannot read the weights ({first})") from e


def check_prompt(processor: Any, prompt: str) -> None:
    """Tokenizes the prompt and checks it fits a bucket (InputError otherwise)."""
    from sparsevlm_jax.batch import Buckets

    prefix, text = processor.encode(prompt)
    Buckets.pick(processor.buckets.prefix, len(prefix), "prefix length")
    Buckets.pick(processor.buckets.text, len(text), "prompt length after the image")


def prepare(args: argparse.Namespace) -> tuple[Path, LlavaConfig, SparseConfig, Any]:
    """Model path, config, sparsity and processor for generate / visualize (no weights)."""
    from sparsevlm_jax import checkpoint

    check_generation_args(args)
    path = resolve_model(args.model)
    cfg = checkpoint.load_model_config(path, args.clip)
    sparse = sparse_from_args(args, cfg)
    processor = make_processor(args, path, cfg)
    check_prompt(processor, args.prompt)
    return path, cfg, sparse, processor


# ----------------------------------------------------------------------------------------------
# generate


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def human_flops(n: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if n < 1000 or unit == "P":
            return f"{n:.2f} {unit}FLOPs"
        n /= 1000
    raise AssertionError


def describe_sparse(sparse: SparseConfig) -> str:
    """One line: method, budget rule or schedule, layers, capacity policy."""
    if not sparse.enabled:
        return "dense (no pruning)"
    parts = [sparse.method]
    if sparse.budget_name is not None:
        parts.append(f"budget {sparse.budget_name}")
    if sparse.method == "v1":
        parts.append(f"k = floor(rank*{sparse.scale:g} + {sparse.bias:g})")
    elif sparse.method == "fastv":
        parts.append(f"ratio {sparse.fastv_ratio:.3f}")
    else:
        parts.append(f"schedule {','.join(map(str, sparse.schedule))}")
    parts.append(f"layers {','.join(map(str, sparse.layers))}")
    cap = sparse.capacity
    if sparse.capacities:
        cap += " " + ",".join(map(str, sparse.capacities))
    parts.append(f"capacity {cap}")
    return ", ".join(parts)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def format_stats(
    stats: dict[str, Any], sparse: SparseConfig, cfg: LlavaConfig, max_new_tokens: int
) -> str:
    """The readable `--stats` block (stats as from `stats_to_json`)."""
    lines = [f"sparsity:      {describe_sparse(sparse)}"]
    if sparse.enabled:
        raters = stats.get("raters") or []
        if sparse.method in RATER_METHODS:
            shown = ", ".join(map(str, raters[:16])) + (", ..." if len(raters) > 16 else "")
            lines.append(f"raters:        {len(raters)} text tokens ({shown})")
        extra = any("recycled_overflow" in x for x in stats["layers"])
        header = "layer   rank  budget  kept  recycled  overflow"
        lines.append(header + ("  recycled overflow" if extra else ""))
        for x in stats["layers"]:
            row = (
                f"{x['layer']:>5}  {_cell(x.get('rank')):>5}  {_cell(x.get('budget')):>6}  "
                f"{len(x['kept']):>4}  {_cell(x.get('recycled')):>8}  {_cell(x.get('overflow')):>8}"
            )
            if extra:
                row += f"  {_cell(x.get('recycled_overflow')):>17}"
            lines.append(row)
        counts = " ".join(map(str, stats["visual_counts"]))
        flops, dense_flops = stats["flops"], stats["dense_flops"]
        kv, dense_kv = stats["kv_cache_bytes"], stats["dense_kv_cache_bytes"]
        lines += [
            f"visual tokens after each decoder layer: {counts}",
            f"equivalent visual tokens: {stats['equivalent_tokens']:.1f} of {cfg.num_image_tokens}",
            f"prefill FLOPs: {human_flops(flops)} ({100 * flops / dense_flops:.1f}% of dense "
            f"{human_flops(dense_flops)})",
            f"KV cache:      {human_bytes(kv)} ({100 * kv / dense_kv:.1f}% of dense "
            f"{human_bytes(dense_kv)}; room for {max_new_tokens} new tokens included)",
        ]
    lines.append(
        f"time:          prefill {stats['prefill_seconds']:.3f} s, decode "
        f"{stats['decode_seconds']:.3f} s (first call: includes compilation)"
    )
    return "\n".join(lines)


def result_json(result: Any, sparse: SparseConfig, cfg: LlavaConfig) -> dict[str, Any]:
    """`generate --json`: {"text", "token_ids", "stats": {..., "layers": [...]}, "sparse"}."""
    from sparsevlm_jax.eval import sparse_to_json, stats_to_json

    return {
        "text": result.text,
        "token_ids": [int(t) for t in result.token_ids],
        "stats": stats_to_json(result.stats, sparse, cfg.num_image_tokens),
        "sparse": sparse_to_json(sparse),
    }


def run_one(
    args: argparse.Namespace, picture: str | None = None
) -> tuple[Any, Any, Any, SparseConfig, dict[str, Any]]:
    """Shared by generate and visualize: validates everything, then answers the prompt.

    picture: visualize's output path (checked before any work; needs a sparse method).
    Returns (pipeline, PIL image, result, sparse config, stats as from `stats_to_json`).
    """
    from sparsevlm_jax.eval import stats_to_json
    from sparsevlm_jax.processing import load_image

    path, cfg, sparse, _ = prepare(args)
    if picture is not None:
        from sparsevlm_jax.eval import check_writable
        from sparsevlm_jax.visualize import image_format

        if not sparse.enabled:
            raise InputError("visualize needs a sparse method (e.g. --sparse v1 --budget 192)")
        check_writable(picture, "picture")
        image_format(picture)
    image = load_image(args.image)
    pipe = load_pipeline(args, path, cfg)
    result = pipe.generate(
        [image],
        [args.prompt],
        sparse=sparse,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=1,
    )[0]
    return pipe, image, result, sparse, stats_to_json(result.stats, sparse, cfg.num_image_tokens)


def cmd_generate(args: argparse.Namespace) -> int:
    pipe, _, result, sparse, stats = run_one(args)
    if args.json:
        print(json.dumps(result_json(result, sparse, pipe.cfg)))
        return EXIT_OK
    print(result.text)
    if args.stats:
        print()
        print(format_stats(stats, sparse, pipe.cfg, args.max_new_tokens))
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# eval


def cmd_eval(args: argparse.Namespace) -> int:
    from sparsevlm_jax import checkpoint
    from sparsevlm_jax import eval as ev

    check_generation_args(args)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    ev.check_writable(args.answers)
    questions = ev.read_questions(args.questions)
    ev.check_images(questions, args.image_folder)
    path = resolve_model(args.model)
    cfg = checkpoint.load_model_config(path, args.clip)
    sparse = sparse_from_args(args, cfg)
    processor = make_processor(args, path, cfg)
    if not 1 <= args.batch_size <= max(processor.buckets.batch):
        raise InputError(
            f"--batch-size must be in 1..{max(processor.buckets.batch)}, got {args.batch_size}"
        )
    ev.check_prompts(questions, processor)
    ev.answered_ids(args.answers)  # an unreadable answers file fails before loading weights
    pipe = load_pipeline(args, path, cfg)
    summary = ev.run_eval(
        pipe,
        questions,
        args.image_folder,
        args.answers,
        sparse,
        model_id=args.model_id or path.resolve().name,
        batch_size=args.batch_size,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(
        f"{args.answers}: {summary.written} answers written, {summary.already} already there "
        f"({summary.selected} questions)"
    )
    if summary.accuracy is not None:
        print("\n".join(summary.accuracy.summary()))
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# visualize


def cmd_visualize(args: argparse.Namespace) -> int:
    from sparsevlm_jax.visualize import kept_picture, save_atomic

    pipe, image, result, _, stats = run_one(args, picture=args.out)
    picture = kept_picture(image, pipe.processor, pipe.cfg, stats["layers"])
    save_atomic(picture, args.out)
    print(result.text)
    for x in stats["layers"]:
        print(f"layer {x['layer']}: {len(x['kept'])} kept + {x['recycled']} recycled")
    print(f"wrote {args.out} ({picture.width}x{picture.height}, {len(stats['layers']) + 1} panels)")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# info


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
    import numpy as np

    v, t = cfg.vision, cfg.text
    count = sum(int(np.prod(shape)) for shape, _ in arrays.values())
    nbytes = sum(int(np.prod(shape)) * _itemsize(dt) for shape, dt in arrays.values())
    dtypes = sorted({dt for _, dt in arrays.values()})
    style = "placeholder" if cfg.image_token_index < 0 else "expanded"
    try:
        layers = ",".join(map(str, scale_layers(V1_LAYERS_32, t.num_hidden_layers)))
    except ConfigError:
        layers = "none (too shallow; pass --layers)"
    proj = "bias" if cfg.projector_bias else "no bias"
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
            f"dtype:       {', '.join(dtypes)}",
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


def cmd_info(args: argparse.Namespace) -> int:
    from sparsevlm_jax import checkpoint

    path = resolve_model(args.checkpoint)
    cfg = checkpoint.load_model_config(path, args.clip)
    arrays, kind = model_arrays(path, cfg)
    print(format_info(path, cfg, arrays, kind))
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# convert, demo


def cmd_convert(args: argparse.Namespace) -> int:
    from convert.cli import run

    print(run(args))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs `sparsevlm_jax.bench` (imported only here: it tunes BLAS/OpenMP threads)."""
    from sparsevlm_jax import bench

    return bench.main(args.bench_args)


def cmd_demo(args: argparse.Namespace) -> int:
    from sparsevlm_jax.demo import run_demo, run_model_demo

    model = args.model if args.model is not None else default_model_path()
    if not args.random and model is not None:
        if args.num_images < 1:
            raise InputError(f"--num-images must be >= 1, got {args.num_images}")
        run_model_demo(resolve_model(model), args.num_images, out=args.out)
        return EXIT_OK

    budgets = comma_ints(args.budgets, "--budgets")
    for b in budgets:
        if b not in V1_BUDGETS:
            raise InputError(
                f"--budgets: no v1 budget named {b}; named budgets: "
                f"{', '.join(map(str, sorted(V1_BUDGETS, reverse=True)))}"
            )
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"{args.out}: exists and is not a directory")
    run_demo(budgets, args.max_new_tokens, args.out, fast_compile=not args.optimized)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# Parser

EPILOGS = {
    "convert": """examples:
  sparsevlm convert llava-hf/llava-1.5-7b-hf llava-7b-jax
  sparsevlm convert liuhaotian/llava-v1.5-7b llava-7b-jax --clip clip-vit-large-patch14-336
  sparsevlm convert ./tiny-hf ./tiny-jax --dtype float32 --overwrite --quiet""",
    "generate": """examples:
  sparsevlm generate --model llava-7b-jax --image cat.jpg --prompt "What is this?"
  sparsevlm generate --model llava-7b-jax --image cat.jpg --prompt "Describe it." \\
      --sparse v1 --budget 64 --stats
  sparsevlm generate --model llava-7b-jax --image cat.jpg --prompt "What is this?" \\
      --scale 13.5 --bias 0 --layers 2,6,15,19 --capacity 300,200,110,60 --json""",
    "eval": """examples:
  sparsevlm eval --model llava-7b-jax --questions llava_gqa_testdev_balanced.jsonl \\
      --image-folder gqa/images --answers answers/gqa-v1-192.jsonl --sparse v1 --budget 192
  sparsevlm eval --model llava-7b-jax --questions pope.jsonl --image-folder coco/val2014 \\
      --answers pope.jsonl --batch-size 8 --limit 100

The answers file is appended one batch at a time; rerunning the same command resumes,
skipping the question ids it already holds. --limit N answers the first N questions.""",
    "visualize": """examples:
  sparsevlm visualize --model llava-7b-jax --image cat.jpg --prompt "What is this?" \\
      --sparse v1 --budget 192 --out kept.png""",
    "info": """examples:
  sparsevlm info llava-7b-jax
  sparsevlm info llava-hf/llava-1.5-7b-hf""",
    "bench": """examples:
  sparsevlm bench --shape llava-1.5-7b --flops-only --json
  sparsevlm bench --shape mini
  sparsevlm bench --shape llava-1.5-7b --dtype bfloat16 --methods v1   (on a GPU)""",
    "demo": """examples:
  sparsevlm demo
  sparsevlm demo --num-images 5 --out demo-pictures
  sparsevlm demo --random --budgets 64 --max-new-tokens 4
  sparsevlm demo --random --optimized""",
}


def build_parser() -> argparse.ArgumentParser:
    """The `sparsevlm` argument parser (one subparser per command)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="LLaVA-1.5 in JAX with SparseVLM visual-token pruning.",
        epilog="Run `sparsevlm COMMAND --help` for a command's options and examples.",
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_: str, func: Callable[[argparse.Namespace], int], **kw: Any):
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=EPILOGS[name],
            formatter_class=HelpFormatter,
            **kw,
        )
        sp.set_defaults(func=func)
        return sp

    from convert.cli import build_parser as convert_parser

    command(
        "convert",
        "convert a llava-hf / transformers / original LLaVA checkpoint to ours",
        cmd_convert,
        parents=[convert_parser()],
        conflict_handler="resolve",
    )

    g = command("generate", "answer one question about one image", cmd_generate)
    add_model_args(g)
    g.add_argument("--image", required=True, metavar="PATH", help="image file")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the question")
    add_sparse_args(g)
    add_generation_args(g, max_new_tokens=64)
    out = g.add_argument_group("output")
    out.add_argument("--stats", action="store_true", help="print the pruning statistics")
    out.add_argument("--json", action="store_true", help="print one JSON object instead")

    e = command("eval", "answer a LLaVA question JSONL (resumable)", cmd_eval)
    add_model_args(e)
    e.add_argument("--questions", required=True, metavar="Q.jsonl", help="LLaVA question file")
    e.add_argument("--image-folder", required=True, metavar="DIR", help="images are under DIR")
    e.add_argument("--answers", required=True, metavar="OUT.jsonl", help="answers file")
    e.add_argument("--batch-size", type=int, default=1, metavar="B", help="(%(default)s)")
    e.add_argument("--limit", type=int, metavar="N", help="answer only the first N questions")
    e.add_argument("--model-id", metavar="NAME", help="model_id field (default: model dir name)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    add_sparse_args(e)
    add_generation_args(e, max_new_tokens=128)

    v = command("visualize", "draw the patches kept at each pruning layer", cmd_visualize)
    add_model_args(v)
    v.add_argument("--image", required=True, metavar="PATH", help="image file")
    v.add_argument("--prompt", required=True, metavar="TEXT", help="the question")
    v.add_argument("--out", required=True, metavar="PNG", help="picture to write")
    add_sparse_args(v)
    add_generation_args(v, max_new_tokens=16)

    i = command("info", "summarise a checkpoint without loading its weights", cmd_info)
    i.add_argument("checkpoint", metavar="CKPT", help="checkpoint or transformers directory")
    i.add_argument("--clip", metavar="DIR", help="CLIP directory, for original LLaVA checkpoints")

    bench = command(
        "bench",
        "FLOPs, latency, memory and compile time: JAX vs PyTorch, dense vs every method",
        cmd_bench,
        add_help=False,  # `sparsevlm bench --help` shows the benchmark's own options
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    # main() hands `sparsevlm bench ...` to the benchmark's own parser before parsing.

    d = command("demo", "dense vs pruned answers of the bundled model, side by side", cmd_demo)
    d.add_argument("--out", metavar="DIR", help="also write the kept-patch pictures here")
    d.add_argument("--model", metavar="CKPT", help="another checkpoint (default: the bundled one)")
    d.add_argument(
        "--num-images", type=int, default=3, metavar="N", help="test images to ask about (3)"
    )
    d.add_argument(
        "--random",
        action="store_true",
        help="instead, show the mechanics on a tiny random model with LLaVA-1.5's 576 visual "
        "tokens and 32 layers (the options below apply to it)",
    )
    d.add_argument(
        "--budgets", default="192,128,64", metavar="LIST", help="v1 budgets (%(default)s)"
    )
    d.add_argument("--max-new-tokens", type=int, default=8, metavar="N", help="(%(default)s)")
    d.add_argument(
        "--optimized",
        action="store_true",
        help="compile fully optimised code (slower compiles; by default XLA's optimisation "
        "level 0 keeps the demo under a minute on two CPU cores)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `sparsevlm` command; returns the exit status (argparse usage errors exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        argv = ["bench", "--", *argv[1:]]  # everything after `bench` is the benchmark's
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except input_error_types() as e:
        print(f"{PROG}: error: {error_message(e)}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"{PROG}: internal error (a bug; please report it with the traceback above)",
              file=sys.stderr)  # fmt: skip
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
