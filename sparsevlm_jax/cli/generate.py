"""`sparsevlm generate` (one question about one image) and `sparsevlm eval` (a question file).

Both check everything they can before loading weights: options, model directory and config,
sparsity, prompts (and for eval the questions, images and answers file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from sparsevlm_jax.cli.errors import EXIT_OK
from sparsevlm_jax.cli.mesh import check_mesh
from sparsevlm_jax.cli.models import (
    check_prompt,
    load_pipeline,
    make_processor,
    model_config,
    resolve_model,
)
from sparsevlm_jax.cli.options import check_generation_args
from sparsevlm_jax.cli.report import describe_sparse, format_stats, result_json
from sparsevlm_jax.cli.sparsity import sparse_from_args
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.sparse.config import SparseConfig


def prepare(args: argparse.Namespace) -> tuple[Path, LlavaConfig, SparseConfig, Any]:
    """Model path, config, sparsity and processor for generate / visualize (no weights)."""
    check_generation_args(args)
    path = resolve_model(args.model)
    cfg = model_config(path, args.clip)
    sparse = sparse_from_args(args, cfg, path)
    processor = make_processor(args, path, cfg)
    check_prompt(processor, args.prompt, placeholders=visual_placeholders(args))
    return path, cfg, sparse, processor


def image_paths(args: argparse.Namespace) -> list[str]:
    return args.image if isinstance(args.image, list) else [args.image] if args.image else []


def visual_placeholders(args: argparse.Namespace) -> list[str]:
    """The prompt's markers for the command's visual items: the images', then the videos'."""
    from sparsevlm_jax.processing import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

    videos = getattr(args, "video", None) or []
    if getattr(args, "frames", 1) < 1:
        raise InputError(f"--frames must be >= 1, got {args.frames}")
    marks = [IMAGE_PLACEHOLDER] * len(image_paths(args)) + [VIDEO_PLACEHOLDER] * len(videos)
    if not marks:
        raise InputError("give an --image or a --video")
    return marks


def run_one(
    args: argparse.Namespace, picture: str | None = None
) -> tuple[Any, Any, Any, SparseConfig, dict[str, Any]]:
    """Shared by generate and visualize: validates everything, then answers the prompt.

    picture: visualize's output path (checked before any work; needs a sparse method).
    Returns (pipeline, PIL image, result, sparse config, stats as from `stats_to_json`).
    """
    from sparsevlm_jax.eval import stats_to_json
    from sparsevlm_jax.eval.stats import frames_kept
    from sparsevlm_jax.processing import load_image

    path, cfg, sparse, _ = prepare(args)
    if picture is not None:
        from sparsevlm_jax.eval import check_writable
        from sparsevlm_jax.visualize import image_format

        if not sparse.enabled:
            raise InputError("visualize needs a sparse method (e.g. --sparse v1 --budget 192)")
        check_writable(picture, "picture")
        image_format(picture)
    paths = image_paths(args)
    if picture is not None and len(paths) + len(getattr(args, "video", None) or []) != 1:
        raise InputError("visualize draws one image or video: give one --image or --video")
    images: list[Any] = [load_image(p) for p in paths]
    if getattr(args, "video", None):
        from sparsevlm_jax.video import load_video

        images += [load_video(v, args.frames) for v in args.video]
    image = (
        images[0] if len(images) == 1 and (picture or not getattr(args, "video", None)) else images
    )
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
    stats = stats_to_json(result.stats, sparse, cfg.num_image_tokens)
    videos = [x for x in images if not isinstance(x, Image.Image)]
    if sparse.enabled and videos:
        frames = sum(len(v.frames) for v in videos)
        stats["frames_kept"] = frames_kept(stats["layers"], frame_map(pipe, images), frames)
    return pipe, image, result, sparse, stats


def frame_map(pipe: Any, items: list[Any]) -> list[Any]:
    """The frame of each visual token of a prompt's items (None for images' tokens; frames
    of several videos numbered on; Qwen-VL: the tuple of frames of its temporal patch)."""
    from sparsevlm_jax.anyres import num_visual_tokens

    if pipe.cfg.qwen:  # a token per pair of frames
        return pipe.processor.token_frames(items)
    out: list[int | None] = []
    frame = 0
    per_frame = pipe.cfg.video_tokens_per_frame
    for it in items:
        if isinstance(it, Image.Image):
            spec = pipe.processor.anyres  # None: one tile, `num_image_tokens`
            n = num_visual_tokens(it.size[::-1], spec) if spec else pipe.cfg.num_image_tokens
            out += [None] * n
        else:
            for _ in it.frames:
                out += [frame] * per_frame
                frame += 1
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    """Prints the answer, then `--stats` or instead one `--json` object."""
    pipe, _, result, sparse, stats = run_one(args)
    if args.json:
        print(json.dumps({**result_json(result, sparse, pipe.cfg), "stats": stats}))
        return EXIT_OK
    print(result.text)
    if args.stats:
        print()
        print(format_stats(stats, sparse, pipe.cfg, args.max_new_tokens))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    """Answers a LLaVA question file into an answers file (resumable); prints a summary.

    With several processes (`--num-processes`, `sparsevlm_jax.distributed`) each one answers
    its share into its part file, and process 0 merges them into the answers file. The files
    it writes are locked for the whole run (a second run refuses, or waits with `--wait`); a
    full disk and the environment's other failures are one-line errors (exit 2).
    """
    from contextlib import ExitStack

    from sparsevlm_jax.eval import environment_errors

    with environment_errors(args.answers), ExitStack() as held:
        return _eval(args, held)


def _eval(args: argparse.Namespace, held: Any) -> int:
    """`cmd_eval` inside its error mapping; `held` (an ExitStack) releases the locks."""
    from sparsevlm_jax import distributed
    from sparsevlm_jax import eval as ev

    check_generation_args(args)
    cluster = distributed.cluster_from(args.coordinator, args.num_processes, args.process_id)
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    share = ev.Share(cluster.process_id, cluster.num_processes)
    ev.check_writable(args.answers)
    ev.check_writable(share.path(args.answers), "part file")
    if args.frames < 1:
        raise InputError(f"--frames must be >= 1, got {args.frames}")
    questions = [
        q if q.video is None or q.frames else dataclasses.replace(q, frames=args.frames)
        for q in ev.read_questions(args.questions)
    ]
    ev.check_images(questions, args.image_folder)
    # One writer per file, from here to the end (before the model loads): refuse or --wait.
    claim = held.enter_context(
        ev.Claim(args.answers, share.index, share.count, args.wait, _say_waiting)
    )
    # Unreadable answer or part files fail before the processes connect or load weights.
    ev.done_ids(args.answers, share.path(args.answers))
    distributed.initialize(cluster)  # before anything touches a JAX device
    path = resolve_model(args.model)
    cfg = model_config(path, args.clip)
    sparse = sparse_from_args(args, cfg, path)
    processor = make_processor(args, path, cfg)
    if not 1 <= args.batch_size <= max(processor.buckets.batch):
        raise InputError(
            f"--batch-size must be in 1..{max(processor.buckets.batch)}, got {args.batch_size}"
        )
    ev.check_prompts(questions, processor)
    mesh = check_mesh(args, cfg)  # --mesh (cli/mesh.py): this process's local devices
    pipe = load_pipeline(args, path, cfg, mesh)  # straight into the mesh's shards
    if args.warmup:
        warm_up_eval(args, pipe, questions, share, sparse)
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
        share=share,
        barrier=distributed.barrier,
        claim=claim,
    )
    for line in summary.duplicate_lines():
        print(f"sparsevlm: {line}", file=sys.stderr)
    print(summary.line())
    if summary.merged is not None:
        print(
            f"{args.answers}: {summary.merged.answers} answers in question order, merged from "
            f"{summary.merged.parts} part files"
        )
    if summary.accuracy is not None:
        print("\n".join(summary.accuracy.summary()))
    print(compiled_line(describe_sparse(sparse)))
    return EXIT_OK


def warm_up_eval(
    args: argparse.Namespace, pipe: Any, questions: list[Any], share: Any, sparse: SparseConfig
) -> None:
    """`--warmup`: compiles what the questions still to answer need, with a progress bar."""
    from sparsevlm_jax import eval as ev
    from sparsevlm_jax.compile_cache import warm_up

    selected = questions if args.limit is None else questions[: args.limit]
    done = ev.done_ids(args.answers, share.path(args.answers))
    pending = [q for q in share.of(selected) if q.question_id not in done]
    got = warm_up(
        pipe,
        [ev.image_path(q, args.image_folder) for q in pending],
        [q.text for q in pending],
        sparse,
        args.max_new_tokens,
        args.batch_size,
        progress=not args.quiet,
    )
    print(f"warm-up: {got.line()}")


def _say_waiting(message: str) -> None:
    print(f"sparsevlm: {message}", file=sys.stderr, flush=True)


def compiled_line(config: str) -> str:
    """How many programs this process holds (bounded by the buckets, not the questions), how
    many XLA compiled and how many came from the persistent cache, and what that cost."""
    from sparsevlm_jax.compile_cache import stats
    from sparsevlm_jax.generate import compile_counts

    c = compile_counts()
    return (
        f"compiled programs ({config}): prefill {c['prefill']} fused + {c['prefill_stages']} "
        f"stage programs (bucketed policy), decode {c['decode']}\n{stats().line()}"
    )
