"""`sparsevlm bench` (= `python -m sparsevlm_jax.bench`): arguments and the run they ask for."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from sparsevlm_jax.bench.report import markdown_flops, markdown_full, save_outputs, to_json
from sparsevlm_jax.bench.runs import DEADLINE_COMPILE_SHARE, run_flops, run_full
from sparsevlm_jax.bench.targets import flops_targets, latency_targets
from sparsevlm_jax.bench.timing import device_slug, prepare_environment
from sparsevlm_jax.bench.workloads import (
    IMAGE_SETS,
    PREFIX_TOKENS,
    QWEN_FRAME,
    QWEN_PREFIX_TOKENS,
    QWEN_SETS,
    QWEN_TIMED_IMAGES,
    TEXT_TOKENS,
    TIMED_IMAGES,
    VIDEO,
    VIDEO_SETS,
    Options,
    Workload,
    item_name,
    method_list,
    parse_image_sets,
)
from sparsevlm_jax.presets import SHAPES
from sparsevlm_jax.qwen_images import QwenPreprocess

PROG = "sparsevlm bench"


def default_out_dir() -> Path:
    """`benchmarks/results` of this checkout when there is one, else under the cwd."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "benchmarks").is_dir():
        return repo / "benchmarks" / "results"
    return Path("benchmarks") / "results"


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The `sparsevlm bench` arguments (also `python -m sparsevlm_jax.bench`); with
    `add_help=False` it can be a parent of the `sparsevlm` CLI's `bench` subparser, whose
    handler then calls `run(args)`."""
    p = argparse.ArgumentParser(
        add_help=add_help,
        prog=PROG,
        description="Prefill FLOPs, latency, decode step, memory and compile time: dense vs "
        "every named sparse preset, XLA vs PyTorch. Writes JSON, markdown and a PNG plot.",
        epilog="examples:\n  sparsevlm bench --shape llava-1.5-7b --flops-only --json\n"
        "  sparsevlm bench --shape llava-next-7b --flops-only\n"
        "  sparsevlm bench --shape qwen2.5-vl-7b --flops-only --images '1080x1920;32f'\n"
        "  sparsevlm bench --shape mini\n"
        "  sparsevlm bench --shape mini-next --images 480x640\n"
        "  sparsevlm bench --shape mini-qwen --images 720x1280\n"
        "  sparsevlm bench --shape llava-1.5-7b --dtype bfloat16   # on a GPU",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="mini", help="(%(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="model dtype "
                   "(default: bfloat16 on GPU/TPU for the LLaVA shapes, else float32)")  # fmt: skip
    p.add_argument("--flops-only", action="store_true", help="abstract lowering: FLOPs, no weights")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--out", type=Path, default=None, help="results directory "
                   "(default: benchmarks/results of the checkout)")  # fmt: skip
    p.add_argument("--no-save", action="store_true", help="write no files")
    p.add_argument("--tag", default="", help="appended to the output files' names, e.g. "
                   "llava-1.5-7b-gpu-part1.json with --tag part1")  # fmt: skip
    p.add_argument("--count", choices=("auto", "compiled", "lowered", "none"), default="auto",
                   help="XLA FLOPs of the compiled or the lowered (pre-optimisation) program; "
                   "auto: compiled on CPU, lowered on accelerators (the unrolled counting "
                   "programs take minutes to compile there); none: no XLA count in a full run "
                   "(`benchmarks/gpu_run.py --merge` counts later, on any machine)")  # fmt: skip
    p.add_argument("--count-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the counted program (%(default)s; see module docs)")  # fmt: skip
    p.add_argument("--methods", default="", help="comma-separated methods or labels, e.g. "
                   "v1,fastv-64 (default: every named preset; dense always runs)")  # fmt: skip
    p.add_argument("--prefix-tokens", type=int, default=None, help=f"(default {PREFIX_TOKENS}; "
                   f"Qwen-VL shapes {QWEN_PREFIX_TOKENS}: their chat template)")  # fmt: skip
    p.add_argument("--text-tokens", type=int, default=TEXT_TOKENS, help="(%(default)s)")
    sets = "; ".join(f"{k}={','.join(f'{h}x{w}' for h, w in v)}" for k, v in IMAGE_SETS.items())
    timed = ",".join(f"{h}x{w}" for h, w in TIMED_IMAGES)
    qwen = "; ".join(f"{k}={','.join(map(item_name, v))}" for k, v in QWEN_SETS.items())
    qwen_timed = ",".join(map(item_name, QWEN_TIMED_IMAGES))
    p.add_argument("--images", default="", metavar="SETS", help="LLaVA-NeXT and Qwen-VL "
                   "shapes: image sizes HEIGHTxWIDTH (or Nf: a video of N frames, video shapes), "
                   "one batch per set: sets split by ';', images by ',', optionally NAME=... "
                   f"(FLOPs-only default: \"{sets}\"; video shapes: 8f, 16f, 32f; Qwen-VL: "
                   f"\"{qwen}\"; a full run uses the first set, default {timed}, Qwen-VL "
                   f"{qwen_timed})")  # fmt: skip
    p.add_argument("--video-frame", default="x".join(map(str, QWEN_FRAME)), metavar="HxW",
                   help="Qwen-VL shapes: the pixels of a video's frames (%(default)s)")  # fmt: skip
    p.add_argument("--max-pixels", type=int, default=QwenPreprocess().max_pixels,
                   help="Qwen-VL shapes: an image's pixel budget (%(default)s = 1280 tokens, "
                   "qwen_images.QwenPreprocess; the hub processor's is 12845056)")  # fmt: skip
    t = p.add_argument_group("full run")
    t.add_argument("--warmup", type=int, default=1, help="(%(default)s)")
    t.add_argument("--repeat", type=int, default=5, help="timed prefill rounds (%(default)s)")
    t.add_argument("--decode-steps", type=int, default=10, help="timed steps (%(default)s)")
    t.add_argument("--ttft-repeat", type=int, default=3, help="(%(default)s)")
    t.add_argument("--max-new-tokens", type=int, default=32, help="decode slots (%(default)s)")
    t.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    t.add_argument("--torch-device", help="default: cuda when JAX runs on a GPU, else cpu")
    t.add_argument("--threads", type=int, default=0, help="torch threads (default: cores)")
    t.add_argument("--blas-threads", type=int, default=1, help="OpenBLAS threads of JAX's "
                   "CPU LAPACK calls (%(default)s; 0 = one per core)")  # fmt: skip
    t.add_argument("--init", choices=("auto", "convert", "device", "host"), default="auto",
                   help="weights: convert = one random transformers model converted to JAX "
                   "(identical weights); device = jax.random / torch init on the device; "
                   "host = init_params (auto: convert below 1B parameters)")  # fmt: skip
    t.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    t.add_argument("--deadline", type=float, default=0.0, metavar="SECONDS",
                   help="time budget of the whole run: methods not yet compiled when "
                   f"{round(100 * DEADLINE_COMPILE_SHARE)}%% of it has passed are skipped "
                   "(and listed) so the timing rounds still fit (0 = none)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--render", type=Path, metavar="JSON", help="recompute the targets and "
                   "rewrite a saved report's JSON, markdown and PNG; measures nothing")  # fmt: skip
    return p


def split_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def image_sets_from_args(args: argparse.Namespace) -> dict[str, tuple[tuple[int, int], ...]]:
    """`--images` parsed (ValueError when malformed); defaults: IMAGE_SETS for FLOPs-only
    runs, TIMED_IMAGES for full runs."""
    if args.images:
        return parse_image_sets(args.images)
    cfg = SHAPES[args.shape]()
    if cfg.qwen and args.flops_only:  # a 1080p image and a 32-frame clip
        return dict(QWEN_SETS)
    if cfg.takes_video and not cfg.qwen:  # videos of 8 / 16 / 32 frames
        return dict(VIDEO_SETS)
    if args.flops_only:
        return dict(IMAGE_SETS)
    timed = QWEN_TIMED_IMAGES if cfg.qwen else TIMED_IMAGES
    return {"+".join(map(item_name, timed)): timed}


def workload_from_args(args: argparse.Namespace) -> Workload:
    """The workload; on LLaVA-NeXT shapes with the first image set of `--images`."""
    accel = jax.default_backend() in ("gpu", "tpu")
    mini = args.shape.startswith("mini")
    dtype = args.dtype or ("bfloat16" if accel and not mini else "float32")
    if args.flops_only and args.dtype is None and not mini:
        dtype = "bfloat16"  # the KV-cache bytes of the real model
    cfg = SHAPES[args.shape](dtype)
    images, name = (), ""
    if cfg.variable_visual:
        name, images = next(iter(image_sets_from_args(args).items()))
    extra: dict = {}
    if cfg.qwen:
        extra = dict(
            video_frame=video_frame(args), qwen_settings=QwenPreprocess(max_pixels=args.max_pixels)
        )
    return Workload(
        shape=args.shape,
        cfg=cfg,
        prefix_tokens=prefix_tokens(args),
        text_tokens=args.text_tokens,
        max_new_tokens=args.max_new_tokens,
        count_dtype=args.count_dtype,
        images=images,
        image_set=name,
        **extra,
    )


def video_frame(args: argparse.Namespace) -> tuple[int, int]:
    """`--video-frame` (ValueError unless one HEIGHTxWIDTH)."""
    sets = list(parse_image_sets(args.video_frame).values())
    if len(sets) != 1 or len(sets[0]) != 1 or sets[0][0][0] == VIDEO:
        raise ValueError(f"--video-frame {args.video_frame!r} is not one HEIGHTxWIDTH")
    return sets[0][0]


def prefix_tokens(args: argparse.Namespace) -> int:
    """`--prefix-tokens`, default the shape's template's (vicuna_v1 or Qwen's chat)."""
    if args.prefix_tokens is not None:
        return args.prefix_tokens
    return QWEN_PREFIX_TOKENS if SHAPES[args.shape]().qwen else PREFIX_TOKENS


def options_from_args(args: argparse.Namespace, count: str) -> Options:
    torch_on = not args.no_torch
    if torch_on:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            print(f"{PROG}: torch/transformers not installed: JAX only", file=sys.stderr)
            torch_on = False
    device = args.torch_device
    if torch_on and device is None:
        import torch

        gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
        device = "cuda" if gpu else "cpu"
    return Options(
        warmup=args.warmup,
        repeat=args.repeat,
        decode_repeat=args.decode_steps,
        ttft_repeat=args.ttft_repeat,
        compile_count=count == "compiled",
        count_flops=count != "none",
        deadline_s=args.deadline,
        torch=torch_on,
        torch_device=device,
        threads=args.threads,
        blas_threads=args.blas_threads,
        init=args.init,
        seed=args.seed,
        quiet=args.quiet,
        methods=split_list(args.methods),
    )


def render_saved(path: Path) -> int:
    """Recomputes the targets of a saved JSON report and rewrites it with its markdown (and
    PNG, for a full run) beside it."""
    report = json.loads(path.read_text())
    results = report["results"]
    report["targets"] = flops_targets(results)
    if report["kind"] == "full":
        report["targets"] += latency_targets(results)
    for out in save_outputs(report, path.parent, path.stem):
        print(f"wrote {out}", file=sys.stderr)
    return 0


def fast_compile_for_counting() -> bool:
    """Compiles without LLVM optimisation (`--xla_backend_optimization_level=0`) when no JAX
    backend is up yet: a FLOPs-only run never executes its programs, the optimised HLO and
    its cost analysis are unchanged, and compiling takes about half the time."""
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    return True


def main(argv: Sequence[str] | None = None, extra: dict | None = None) -> int:
    """Parses `argv` (default: the command line) and runs the benchmark; the exit status.
    `extra` entries are added to the report (e.g. a driver script's probes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(build_parser().parse_args(argv), argv, extra)


def run(
    args: argparse.Namespace, argv: Sequence[str] | None = None, extra: dict | None = None
) -> int:
    """Runs the benchmark for parsed arguments; returns the exit status (2: bad arguments).

    `argv` is only recorded in the report (default: the process's command line); `extra`
    entries are added to the report.
    """
    if argv is None:
        argv = [a for i, a in enumerate(sys.argv[1:]) if not (i == 0 and a == "bench")]
    if args.render is not None:
        return render_saved(args.render)
    env = prepare_environment()
    if prefix_tokens(args) < 1 or args.text_tokens < 1:
        print(f"{PROG}: error: prompt token counts must be >= 1", file=sys.stderr)
        return 2
    variable = SHAPES[args.shape]().variable_visual
    try:
        method_list(split_list(args.methods), variable, SHAPES[args.shape]().takes_video)
        sets = image_sets_from_args(args) if variable else None
        if SHAPES[args.shape]().qwen:  # smart_resize's aspect-ratio limit, the ladder
            wl = workload_from_args(args)
            for images in sets.values():
                _ = dataclasses.replace(wl, images=tuple(images)).visual_slots
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    fast = args.flops_only and args.count != "lowered" and fast_compile_for_counting()
    count = args.count
    if count == "auto":
        count = "compiled" if jax.default_backend() == "cpu" else "lowered"
    if args.flops_only and count == "none":
        print(f"{PROG}: error: --flops-only needs an XLA count (not --count none)", file=sys.stderr)
        return 2
    wl = workload_from_args(args)
    if args.flops_only:
        report = run_flops(wl, count == "compiled", args.quiet, split_list(args.methods), sets)
        report["xla_count"]["backend_optimization_level_0"] = fast
        stem = f"{wl.shape}-flops"
    else:
        report = run_full(wl, options_from_args(args, count))
        stem = f"{wl.shape}-{device_slug()}"
    if args.tag:
        stem = f"{stem}-{args.tag}"
    report["command"] = " ".join([PROG, *argv])
    report["hardware"]["environment"] = env
    report.update(extra or {})
    if not args.no_save:
        for path in save_outputs(report, args.out or default_out_dir(), stem):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        sys.stdout.write(to_json(report))
    else:
        print(markdown_full(report) if report["kind"] == "full" else markdown_flops(report))
    return 0
