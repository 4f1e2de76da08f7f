"""The `sparsevlm` argument parser and `main`: parse, run the command, map errors to statuses.

Commands live in sibling modules (generate + eval, visualize, convert + info, calibrate, demo,
bench); failures are reported as `errors` says (one line and exit 2 for bad input, a
traceback and exit 1 for a bug).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from sparsevlm_jax.cli import calibrate, convert, demo, generate, info, visualize
from sparsevlm_jax.cli.bench import run_bench
from sparsevlm_jax.cli.errors import EXIT_BUG, EXIT_INPUT, PROG, error_message, input_error_types
from sparsevlm_jax.cli.mesh import add_eval_mesh_arg
from sparsevlm_jax.cli.options import (
    HelpFormatter,
    add_generation_args,
    add_loading_args,
    add_model_args,
    add_sparse_args,
)

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
skipping the question ids it already holds. --limit N answers the first N questions.
One run writes a file at a time: a second run on the same answers file (or two processes
with one --process-id) stops with exit 2 before loading the model; --wait waits for the
first to finish, then answers only what is still missing. A full disk (or a read-only or
removed file) stops the run with one line and exit 2; the answers written are safe and a
rerun resumes.

several processes (e.g. two hosts; the same command on each, its own --process-id):
  sparsevlm eval --model llava-7b-jax --questions pope.jsonl --image-folder coco/val2014 \\
      --answers shared/pope.jsonl --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0
Question i goes to process i % N; process p appends to ANSWERS.part-<p>-of-<N>. When all are
done, process 0 merges the parts into ANSWERS in question order (atomically) and removes them,
so the answers directory must be shared. After any interruption rerun every process: a question
already in ANSWERS or in any part file is not answered again. --mesh describes each process's
local devices; JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID may replace the flags.""",
    "calibrate": """examples:
  sparsevlm calibrate llava-7b-jax --questions llava_gqa_testdev_balanced.jsonl \\
      --image-folder gqa/images --examples 200 --percentile 99

Writes MODEL/sparse_defaults.json (replacing it), from which generate, eval, visualize and
demo take v1's static capacities by default (when its budget and pruning layers match).""",
    "visualize": """examples:
  sparsevlm visualize --model llava-7b-jax --image cat.jpg --prompt "What is this?" \\
      --sparse v1 --budget 192 --out kept.png""",
    "info": """examples:
  sparsevlm info llava-7b-jax
  sparsevlm info llava-hf/llava-1.5-7b-hf
  sparsevlm info llava-13b-jax --mesh data=1,model=8""",
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


def add_process_args(g: Any) -> None:
    """eval's `jax.distributed` settings; each defaults to JAX's environment variable."""
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="process 0's address, where it runs the coordinator (default: "
        "$JAX_COORDINATOR_ADDRESS)",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="processes sharing the questions, e.g. one per host (default: $JAX_NUM_PROCESSES, "
        "else 1)",
    )
    g.add_argument(
        "--process-id",
        type=int,
        metavar="I",
        help="this process, 0..N-1 (default: $JAX_PROCESS_ID)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `sparsevlm` argument parser (one subparser per command)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="LLaVA-family and Qwen-VL models in JAX with SparseVLM visual-token pruning.",
        epilog="Run `sparsevlm COMMAND --help` for a command's options and examples.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--compile-cache",
        metavar="DIR|off",
        help="persistent compilation cache: compiled programs are kept here and reused by "
        "later runs (default: $SPARSEVLM_COMPILE_CACHE, else $JAX_COMPILATION_CACHE_DIR, else "
        "~/.cache/sparsevlm/jax; `off` compiles everything afresh). Give it before COMMAND.",
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
        convert.cmd_convert,
        parents=[convert_parser()],
        conflict_handler="resolve",
    )

    g = command(
        "generate", "answer one question about an image (or several)", generate.cmd_generate
    )
    add_model_args(g)
    g.add_argument(
        "--image",
        metavar="PATH",
        action="append",
        help="image file; repeat it for several images in one prompt (LLaVA-NeXT): the "
        "prompt's <image> markers place them, one each, else they all go first",
    )
    g.add_argument(
        "--video",
        metavar="PATH",
        action="append",
        help="video file (mp4, webm, avi, mkv; decoded with PyAV) or folder of frame images "
        "(sorted by name), for video models (LLaVA-NeXT-Video, Video-LLaVA); its <video> "
        "marker places it, else it goes first. Visual items are the --image's, then the "
        "--video's",
    )
    g.add_argument(
        "--frames",
        type=int,
        default=8,
        metavar="N",
        help="frames sampled uniformly over the whole clip: frame k*total//N, k < N, "
        "transformers' rule (%(default)s)",
    )
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the question")
    add_sparse_args(g)
    add_generation_args(g, max_new_tokens=64)
    out = g.add_argument_group("output")
    out.add_argument("--stats", action="store_true", help="print the pruning statistics")
    out.add_argument("--json", action="store_true", help="print one JSON object instead")

    e = command("eval", "answer a LLaVA question JSONL (resumable)", generate.cmd_eval)
    add_model_args(e)
    e.add_argument("--questions", required=True, metavar="Q.jsonl", help="LLaVA question file")
    e.add_argument("--image-folder", required=True, metavar="DIR", help="images are under DIR")
    e.add_argument("--answers", required=True, metavar="OUT.jsonl", help="answers file")
    e.add_argument(
        "--frames",
        type=int,
        default=8,
        metavar="N",
        help='frames sampled from a line\'s "video" (a file or a folder of frames under '
        '--image-folder), unless the line gives its own "frames" (%(default)s)',
    )
    e.add_argument("--batch-size", type=int, default=1, metavar="B", help="(%(default)s)")
    e.add_argument("--limit", type=int, metavar="N", help="answer only the first N questions")
    e.add_argument("--model-id", metavar="NAME", help="model_id field (default: model dir name)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument(
        "--wait",
        action="store_true",
        help="when another run is writing the answers file (or this process's part file), wait "
        "for it to finish, then answer what is still missing (default: stop, exit 2)",
    )
    e.add_argument(
        "--warmup",
        action="store_true",
        help="first compile every program the questions will need (their prefills run once "
        "more), with a progress bar; then answer",
    )
    add_eval_mesh_arg(e)
    add_process_args(e.add_argument_group("several processes (jax.distributed)"))
    add_sparse_args(e)
    add_generation_args(e, max_new_tokens=128)

    c = command(
        "calibrate",
        "measure v1's static capacities on your questions; store them beside the model",
        calibrate.cmd_calibrate,
    )
    c.add_argument("model", metavar="MODEL", help="checkpoint (or transformers) directory")
    c.add_argument("--questions", required=True, metavar="Q.jsonl", help="LLaVA question file")
    c.add_argument("--image-folder", required=True, metavar="DIR", help="images are under DIR")
    c.add_argument(
        "--budgets", default="192,128,64", metavar="LIST", help="v1 budgets (%(default)s)"
    )
    c.add_argument(
        "--examples", type=int, default=64, metavar="N", help="first N questions (%(default)s)"
    )
    c.add_argument(
        "--percentile",
        type=float,
        default=100.0,
        metavar="P",
        help="capacity = this percentile of the counts seen per layer (%(default)g: no "
        "overflow on these questions)",
    )
    c.add_argument(
        "--layers",
        metavar="L1,L2,...",
        help="pruning layers, 0-based (default: the authors' 2,6,15,19; scaled only on "
        "models too shallow for them, SPEC §6)",
    )
    c.add_argument("--batch-size", type=int, default=8, metavar="B", help="(%(default)s)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    add_loading_args(c.add_argument_group("model"))

    v = command("visualize", "draw the patches kept at each pruning layer", visualize.cmd_visualize)
    add_model_args(v)
    v.add_argument("--image", metavar="PATH", help="image file")
    v.add_argument(
        "--video",
        metavar="PATH",
        action="append",
        help="or a video file / frame folder (video models): one row of frames per layer",
    )
    v.add_argument("--frames", type=int, default=8, metavar="N", help="frames (%(default)s)")
    v.add_argument("--prompt", required=True, metavar="TEXT", help="the question")
    v.add_argument("--out", required=True, metavar="PNG", help="picture to write")
    add_sparse_args(v)
    add_generation_args(v, max_new_tokens=16)

    i = command("info", "summarise a checkpoint without loading its weights", info.cmd_info)
    i.add_argument("checkpoint", metavar="CKPT", help="checkpoint or transformers directory")
    i.add_argument("--clip", metavar="DIR", help="CLIP directory, for original LLaVA checkpoints")
    info.add_mesh_arg(i)

    # Listed here for `sparsevlm --help`; `main` hands `sparsevlm bench ARGS` to the
    # benchmark's own parser before this parser sees it.
    command(
        "bench",
        "FLOPs, latency, memory and compile time: JAX vs PyTorch, dense vs every method",
        lambda args: run_bench([]),
        add_help=False,
    )

    d = command("demo", "dense vs pruned answers of the bundled model, side by side", demo.cmd_demo)
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


def run_command(func: Callable[..., int], *args: Any) -> int:
    """`func(*args)` with errors turned into exit statuses (see `errors`)."""
    try:
        return func(*args)
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


def split_global_options(argv: list[str]) -> tuple[str | None, list[str]]:
    """(`--compile-cache` value or None, the rest): the global options before COMMAND."""
    setting, rest = None, list(argv)
    while rest and rest[0].startswith("--compile-cache"):
        head = rest.pop(0)
        if head.startswith("--compile-cache="):
            setting = head.split("=", 1)[1]
        elif head == "--compile-cache" and rest:
            setting = rest.pop(0)
        else:  # a missing value or an unknown option: argparse says so
            return setting, [head, *rest]
    return setting, rest


def start_compile_cache(setting: str | None, command: str) -> None:
    """The persistent compilation cache for this run (`sparsevlm_jax.compile_cache`): on by
    default; `bench` measures compile times, so it uses a cache only when told to."""
    from sparsevlm_jax import compile_cache

    if command == "bench" and setting is None:
        return
    compile_cache.enable(setting)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `sparsevlm` command; returns the exit status (argparse usage errors exit 2)."""
    setting, argv = split_global_options(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] == ["bench"]:
        # The benchmark parses its own arguments, untouched (an argparse REMAINDER here
        # would see `--shape ...` as this parser's unknown options).
        start_compile_cache(setting, "bench")
        return run_command(run_bench, argv[1:])
    args = build_parser().parse_args(argv)
    start_compile_cache(setting, args.command)
    return run_command(args.func, args)
