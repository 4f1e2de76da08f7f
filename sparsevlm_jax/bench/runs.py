"""The two kinds of run: FLOPs only (abstract lowering) and full (weights, timing, PyTorch)."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sparsevlm_jax.batch import make_batch
from sparsevlm_jax.bench.flops import (
    add_reductions,
    flops_report,
    token_report,
    xla_full_attention_cost,
    xla_prefill_cost,
    xla_vision_cost,
)
from sparsevlm_jax.bench.targets import flops_targets, latency_targets
from sparsevlm_jax.bench.timing import (
    JaxMethod,
    add_latency_ratios,
    attach_timings,
    device_memory,
    hardware_info,
    limit_blas_threads,
    round_robin,
    usable_cores,
)
from sparsevlm_jax.bench.torch_side import (
    add_torch_runners,
    device_weights,
    shared_weights,
    torch_inputs,
    torch_qwen_inputs,
)
from sparsevlm_jax.bench.workloads import (
    EACH,
    IMAGE_SETS,
    QWEN_SETS,
    VIDEO,
    VIDEO_SETS,
    Options,
    Workload,
    bench_sparse_config,
    method_label,
    method_list,
    next_inputs,
    prompt_ids,
    qwen_inputs,
    qwen_prompt_ids,
    random_pixels,
    v1_shape,
)
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.eval import sparse_to_json
from sparsevlm_jax.flops import CONVENTION
from sparsevlm_jax.params import flatten, init_params, param_shapes
from sparsevlm_jax.sparse.config import AUTHORS_VIDEO

SCHEMA = "sparsevlm-bench/1"
# With a deadline, no new method is compiled once this share of it has passed: the rest of
# the time is for the timing rounds (all methods' compiled programs are timed together).
DEADLINE_COMPILE_SHARE = 0.6


def report_header(
    kind: str, wl: Workload, torch_device: str | None, compile_: bool
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "sparsevlm bench",  # completed by main()
        "hardware": hardware_info(torch_device),
        "workload": wl.describe(),
        "flops_convention": CONVENTION,
        "xla_count": {
            "source": "compiled" if compile_ else "lowered",
            "dtype": wl.count_dtype,
            "how": "prefill_jit lowered with unroll_layers=True and abstract weights; "
            "decoder = prefill - vision tower (image_features lowered alone; LLaVA-NeXT: "
            "llava_next.visual_tokens, every tile + the packing gather"
            + (
                "; Qwen-VL: qwen_vl.visual_tokens, qwen_vision.visual_features on the "
                "bucket's patch capacity + the gather into the visual slots, its scanned "
                "blocks counted once in both programs"
                if wl.cfg.qwen
                else ""
            )
            + "); a bucketed run is counted on the static program with the capacities it chose",
        },
    }


def run_flops(
    wl: Workload,
    compile_: bool,
    quiet: bool,
    methods: Sequence[str] = (),
    image_sets: dict[str, tuple[tuple[int, int], ...]] | None = None,
) -> dict[str, Any]:
    """XLA-counted and ideal prefill FLOPs of every method, by abstract lowering.

    LLaVA-NeXT shapes are counted on each of `image_sets` (default `IMAGE_SETS`): every entry
    then names its `image_set`, and reductions are against that set's dense entry."""
    if not wl.variable:
        vision = xla_vision_cost(wl, compile_)
        results = flops_entries(wl, compile_, quiet, methods, vision)
        return {
            **report_header("flops", wl, None, compile_),
            "vision_count": vision,
            "results": results,
            "targets": flops_targets(results),
        }
    results, visions = [], {}
    sets = image_sets or default_sets(wl.cfg)
    for name, images in sets.items():
        video = wl.cfg.takes_video and any(hw[0] == VIDEO for hw in images)
        if name.startswith(EACH):  # one batch per image, counts summed
            name = name[len(EACH) :]
            singles = [dataclasses.replace(wl, images=(hw,), image_set=name) for hw in images]
            per_image = []
            for one in singles:
                vision = xla_vision_cost(one, compile_)
                per_image.append(flops_entries(one, compile_, quiet, methods, vision, video))
            entries = [sum_entries(list(es)) for es in zip(*per_image, strict=True)]
            add_reductions(entries)
            visions[name] = {"flops": sum(es[0]["flops"]["xla_vision"] for es in per_image)}
            describe = {**singles[0].describe(), "separate_batches": True}
            describe.update(
                batch=1,
                images=[list(hw) for hw in images],
                visual_counts=[c for one in singles for c in one.visual_counts],
                visual_slots=[one.visual_slots for one in singles],
            )
            if wl.cfg.qwen:
                describe.update(
                    grids=[list(one.qwen_grid(hw)) for one in singles for hw in one.images],
                    patch_capacity=[one.patch_capacity for one in singles],
                )
            for e in entries:
                results.append({"image_set": name, "workload": describe, **e})
            continue
        set_wl = dataclasses.replace(wl, images=tuple(images), image_set=name)
        visions[name] = xla_vision_cost(set_wl, compile_)
        for e in flops_entries(set_wl, compile_, quiet, methods, visions[name], video):
            results.append({"image_set": name, "workload": set_wl.describe(), **e})
    header = report_header("flops", dataclasses.replace(wl, image_set=""), None, compile_)
    per_set = ("images", "visual_counts", "visual_slots", "image_set", "grids", "patch_capacity")
    for key in per_set:  # per set: in the results
        header["workload"].pop(key, None)
    return {
        **header,
        "image_sets": {k.removeprefix(EACH): [list(hw) for hw in v] for k, v in sets.items()},
        "vision_count": visions,
        "results": results,
        "targets": flops_targets(results),
    }


SUMMED_FLOPS = (
    "xla_total",
    "xla_vision",
    "xla_decoder",
    "xla_total_lowered",
    "xla_decoder_lowered",
    "xla_decoder_full_attention",
    "ideal_uniform",
    "ideal_valid",
    "ideal_capacity",
    "ideal_padded",
)


def sum_entries(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One method's entries on images run one per batch, as one entry: FLOPs and KV bytes
    summed, per-layer counts averaged over the images (each image's kept in `per_image`)."""
    first = entries[0]
    f = {k: sum(e["flops"][k] for e in entries) for k in SUMMED_FLOPS if k in first["flops"]}
    for kind in ("valid", "capacity", "padded"):
        f[f"waste_vs_{kind}"] = f["xla_decoder"] / f[f"ideal_{kind}"] - 1.0
    f["padding_overhead"] = f["ideal_padded"] / f["ideal_capacity"] - 1.0
    f["unused_capacity_overhead"] = f["ideal_capacity"] / f["ideal_valid"] - 1.0
    rows = [r for e in entries for r in e["visual_tokens_per_example"]]
    eq = [x for e in entries for x in e["equivalent_tokens_per_example"]]
    mean = [float(np.mean(col)) for col in zip(*rows, strict=True)]
    kv = {k: sum(e["kv_cache"][k] for e in entries) for k in ("bytes", "prompt_bytes")}
    return {
        "method": first["method"],
        "budget": first["budget"],
        "label": first["label"],
        "sparse_config": first["sparse_config"],
        "sparse_configs": [e["sparse_config"] for e in entries],
        "visual_counts_source": first["visual_counts_source"],
        "visual_tokens_per_layer": mean,
        "visual_tokens_per_example": rows,
        "visual_slots_per_layer": first["visual_slots_per_layer"],
        "equivalent_tokens": float(np.mean(eq)),
        "equivalent_tokens_per_example": eq,
        "mean_visual_processed": float(np.mean(mean)),
        **{k: f[k] for k in ("ideal_uniform", "ideal_valid", "ideal_capacity", "ideal_padded")},
        "flops": f,
        "kv_cache": {**kv, "decode_slots": first["kv_cache"]["decode_slots"], "stages": []},
        "per_image": entries,
    }


def default_sets(cfg: LlavaConfig) -> dict[str, tuple[tuple[int, int], ...]]:
    """FLOPs-only image sets of a shape without `--images`."""
    if cfg.qwen:
        return dict(QWEN_SETS)
    return dict(VIDEO_SETS if cfg.takes_video else IMAGE_SETS)


def flops_entries(
    wl: Workload,
    compile_: bool,
    quiet: bool,
    methods: Sequence[str],
    vision: dict[str, float],
    video: bool | None = None,
) -> list[dict[str, Any]]:
    """One FLOPs entry per method on one workload, with reductions vs its dense entry.
    `video`: whether the authors' video preset runs (default: the family takes videos and
    an example is one)."""
    from tqdm.auto import tqdm

    results = []
    desc = f"FLOPs {wl.shape}" + (f" {wl.image_set}" if wl.image_set else "")
    if video is None:
        video = wl.cfg.takes_video and wl.has_video
    if not video:  # asked for on a set without a video: nothing to run
        methods = [m for m in methods if m != AUTHORS_VIDEO] or (["dense"] if methods else [])
    for method, budget in tqdm(method_list(methods, wl.variable, video), desc=desc, disable=quiet):
        sparse = bench_sparse_config(method, budget, wl.cfg, visual_counts=wl.visual_counts)
        cost, kv = xla_prefill_cost(wl, sparse, compile_)
        if wl.variable:  # long sequences: the block-skipped attention is a visible share
            cost["flops_full_attention"] = xla_full_attention_cost(wl, sparse)
        tokens = token_report(wl, sparse, v1_kept=v1_shape(method, budget))
        results.append(
            {
                "method": method,
                "budget": budget,
                "label": method_label(method, budget),
                "sparse_config": sparse_to_json(sparse),
                **tokens,
                "flops": flops_report(wl, cost, vision, tokens),
                "xla_count_program": {k: cost[k] for k in ("lower_s", "compile_s") if k in cost},
                "kv_cache": kv,
            }
        )
    add_reductions(results)
    return results


def pick_init(cfg: LlavaConfig, init: str, torch_on: bool) -> str:
    """`convert` (same weights on both sides) for small models, `device` for large ones."""
    if init != "auto":
        return init
    n = sum(math.prod(s) for s in flatten(param_shapes(cfg)).values())
    return "convert" if torch_on and n < 1e9 else "device"


def build_models(wl: Workload, opts: Options) -> tuple[Any, dict, Workload, str]:
    """(torch model or None, JAX params, workload with the model's config, init used)."""
    init = pick_init(wl.cfg, opts.init, opts.torch)
    if init == "convert":
        model, params, cfg = shared_weights(wl.cfg, opts.torch_device, opts.seed)
        return model, params, dataclasses.replace(wl, cfg=cfg), init
    if init == "host":
        return None, init_params(wl.cfg, opts.seed), wl, init
    model, params = device_weights(wl.cfg, opts.torch_device if opts.torch else None, opts.seed)
    return model, params, wl, init


def run_full(wl: Workload, opts: Options) -> dict[str, Any]:
    """Latency, TTFT, decode step, compile time, memory and FLOPs of every method, JAX and
    PyTorch, on the default device."""
    from tqdm.auto import tqdm

    started = time.monotonic()
    load_start = list(os.getloadavg())
    blas = limit_blas_threads(opts.blas_threads or usable_cores())
    if opts.torch:
        import torch

        torch.set_num_threads(opts.threads or usable_cores())
    model, params, wl, init = build_models(wl, opts)
    prefix, text = (qwen_prompt_ids if wl.cfg.qwen else prompt_ids)(wl, opts.seed)
    qwen = None
    if wl.cfg.qwen:  # Qwen-VL: each item through the processor's preprocessing, M-RoPE
        qwen = qwen_inputs(wl, prefix, text, opts.seed)
        n = wl.batch
        batch_host, _ = make_batch([prefix] * n, [text] * n, qwen.pixels, wl.buckets,
                                   qwen.visual_index, positions=qwen.positions)  # fmt: skip
    elif wl.variable:  # LLaVA-NeXT: the tiles and visual indices of `wl.images`
        pixels, index, _ = next_inputs(wl, opts.seed)
        n = wl.batch
        batch_host, _ = make_batch([prefix] * n, [text] * n, pixels, wl.buckets, index)
    else:
        pixels = random_pixels(wl.cfg, opts.seed)
        batch_host, _ = make_batch([prefix], [text], pixels, wl.buckets)
    vision = xla_vision_cost(wl, opts.compile_count) if opts.count_flops else None

    entries: list[dict[str, Any]] = []
    skipped: list[str] = []
    prefill_fns: dict[str, Callable[[], Any]] = {}
    ttft_fns: dict[str, Callable[[], Any]] = {}
    decode_fns: dict[str, Callable[[], Any]] = {}
    ids = pix = None
    if model is not None and qwen is not None:
        ids, pix = torch_qwen_inputs(wl, qwen, opts.torch_device)
    elif model is not None:
        ids, pix = torch_inputs(wl, prefix, text, pixels, opts.torch_device)
    # the authors' video preset runs on a workload with a video (as in FLOPs-only runs)
    video = wl.cfg.takes_video and wl.has_video
    select = list(opts.methods)
    if not video:  # asked for on images: nothing to run
        select = [m for m in select if m != AUTHORS_VIDEO] or (["dense"] if select else [])
    methods = method_list(select, wl.variable, video)
    for method, budget in tqdm(methods, desc="compile", disable=opts.quiet):
        label = method_label(method, budget)
        elapsed = time.monotonic() - started
        if entries and opts.deadline_s and elapsed > DEADLINE_COMPILE_SHARE * opts.deadline_s:
            skipped.append(label)
            continue
        sparse = bench_sparse_config(method, budget, wl.cfg, static=False)
        jm = JaxMethod(params, wl, sparse, batch_host)
        cost = None
        if opts.count_flops:
            cost, _ = xla_prefill_cost(wl, jm.counted_sparse, opts.compile_count)
        tokens = token_report(wl, jm.counted_sparse, jm.visual_valid())
        entry: dict[str, Any] = {
            "method": method,
            "budget": budget,
            "label": label,
            "sparse_config": sparse_to_json(sparse),
            "counted_config": sparse_to_json(jm.counted_sparse),
            "capacity": None if jm.capacity is None else jm.capacity.to_dict(),
            **tokens,
            "flops": flops_report(wl, cost, vision, tokens),
            "pruning": jm.pruning_stats(),
            "jax": {"compile_s": jm.compile_s, "memory": jm.memory, "kv_cache": jm.kv},
            "torch": {},
        }
        entry["jax"]["memory"]["device_after_warmup"] = device_memory()
        prefill_fns[f"jax/{label}"] = jm.prefill
        ttft_fns[f"jax/{label}"] = jm.ttft
        decode_fns[f"jax/{label}"] = jm.decode
        if model is not None:
            add_torch_runners(entry, model, ids, pix, sparse, jm, opts, prefill_fns, decode_fns)
            ttft_fns.update(entry.pop("_ttft"))
        entries.append(entry)

    steps = opts.decode_repeat
    if wl.max_new_tokens < opts.warmup + steps + 2:
        raise ValueError(f"--max-new-tokens must be at least {opts.warmup + steps + 2}")
    timings = {
        "prefill": round_robin(prefill_fns, opts.warmup, opts.repeat, "prefill", opts.quiet),
        "ttft": round_robin(ttft_fns, 0, opts.ttft_repeat, "ttft", opts.quiet),
        "decode_step": round_robin(decode_fns, opts.warmup, steps, "decode", opts.quiet),
    }
    attach_timings(entries, timings)
    add_reductions(entries)
    add_latency_ratios(entries)
    report = {
        **report_header("full", wl, opts.torch_device if opts.torch else None, opts.compile_count),
        "init": init,
        "timing": {
            "warmup": opts.warmup,
            "repeat": opts.repeat,
            "decode_steps": steps,
            "ttft_repeat": opts.ttft_repeat,
            "order": "round-robin over implementations, rotating",
        },
        "vision_count": vision,
        "results": entries,
    }
    if not opts.count_flops:
        report["xla_count"]["source"] = "none (counted later: benchmarks/gpu_run.py --merge)"
    report["skipped_for_time"] = skipped
    report["wall_s"] = time.monotonic() - started
    report["hardware"]["load_average_start"] = load_start
    report["hardware"]["load_average_end"] = list(os.getloadavg())
    report["hardware"]["openblas_threads_set"] = blas
    report["targets"] = flops_targets(entries) + latency_targets(entries)
    return report
