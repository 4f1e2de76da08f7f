"""Where does a sparse prefill's time go? Piece-by-piece timing of the compiled prefill.

    python benchmarks/profile_prefill.py --shape mini --methods v1-64,v1_5-64,fastv-64

Mirrors `sparsevlm_jax.model.llava.prefill` with each piece jitted on its own — the input
embedding (vision tower), every decoder stage (one `lax.scan` each) and every pruning step —
and times each piece (min / median over `--repeat` runs after a warm-up, `block_until_ready`
in between). Next to the time it shows the piece's XLA FLOPs (cost analysis of the lowered
piece, layer scans unrolled) and the achieved GFLOP/s, so that work which costs time but few
FLOPs (sorting, SVD, clustering, gathers) and stages that run at lower efficiency because
their sequences are short stand out. The whole compiled prefill is timed alongside: the sum of
the pieces is close to it (the pieces lose cross-piece fusion and add dispatches).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from sparsevlm_jax import bench
from sparsevlm_jax.batch import make_batch
from sparsevlm_jax.generate import prefill_jit
from sparsevlm_jax.model import llama
from sparsevlm_jax.model.llava import embed_inputs, stage_bounds
from sparsevlm_jax.model.sequence import SeqState
from sparsevlm_jax.params import init_params
from sparsevlm_jax.presets import SHAPES


def time_fn(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """(min, median) seconds of `fn()` after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def flops_of(fn: Callable, *args: Any) -> float:
    return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


def profile(params: dict, cfg: Any, sparse: Any, batch: Any, repeat: int) -> list[dict]:
    """Rows (piece, tokens, seconds, FLOPs) for one method's prefill."""
    from sparsevlm_jax.sparse.prune import Pruner

    rows = []
    unrolled = cfg.replace(unroll_layers=True)
    layers = params["text"]["layers"]
    embed = jax.jit(embed_inputs, static_argnums=1)
    state0 = embed(params, cfg, batch)
    t = time_fn(lambda: embed(params, cfg, batch), repeat)
    fl = flops_of(lambda p, b: embed_inputs(p, cfg, b).x, params, batch)
    rows.append(("embed + vision tower", state0.x.shape[1], t, fl))

    bounds = stage_bounds(cfg.text.num_hidden_layers, sparse.layers if sparse.enabled else ())
    state = state0
    for s, (start, stop) in enumerate(bounds):
        tail = state.num_text if sparse.enabled and s < len(bounds) - 1 else 0

        def stage(x, pos, valid, c=cfg, a=start, b=stop, q=tail):
            return llama.prefill_stage(layers, c.text, a, b, x, pos, valid, q, c.unroll_layers)

        def stage_u(x, pos, valid, a=start, b=stop, q=tail):
            return llama.prefill_stage(layers, unrolled.text, a, b, x, pos, valid, q, True)

        run = jax.jit(stage)
        args = (state.x, state.positions, state.valid)
        x, kv, q_text = run(*args)
        t = time_fn(lambda run=run, args=args: run(*args), repeat)
        name = f"stage {s}: layers {start}-{stop - 1}"
        rows.append((name, state.x.shape[1], t, flops_of(stage_u, *args)))
        state = state.replace(x=x)
        if tail:
            state = time_prune(rows, Pruner, cfg, sparse, state0, state, s, q_text, kv, repeat)
    compiled = prefill_jit.lower(params, batch, cfg, sparse, 1).compile()
    t = time_fn(lambda: compiled(params, batch), repeat)
    rows.append(("whole prefill (one program)", 0, t, float("nan")))
    return rows


def time_prune(rows, pruner_cls, cfg, sparse, state0, state, s, q_text, kv, repeat) -> SeqState:
    """Times pruning step s (raters included: a fresh Pruner computes them) and returns the
    pruned state."""

    def prune(x0, v0, p0, x, v, p, q, k):
        first = SeqState(x0, v0, p0, state0.num_prefix, state0.vis_cap)
        pruner = pruner_cls(cfg, sparse, first)
        # earlier layers' visual counts (only read by the statistics)
        pruner.carry = pruner.carry.replace(n_vis=pruner.carry.n_vis * (s + 1))
        cur = SeqState(x, v, p, state.num_prefix, state.vis_cap)
        out = pruner.prune(s, cur, q, k)
        return out.x, out.valid, out.positions

    args = (
        state0.x,
        state0.valid,
        state0.positions,
        state.x,
        state.valid,
        state.positions,
        q_text,
        kv.k[-1],
    )
    run = jax.jit(prune)
    x, valid, pos = run(*args)
    t = time_fn(lambda: run(*args), repeat)
    rows.append((f"prune {s} (+ raters)", state.x.shape[1], t, flops_of(prune, *args)))
    vis_out = x.shape[1] - state.num_prefix - state.num_text
    return SeqState(x, valid, pos, state.num_prefix, vis_out)


def print_rows(label: str, rows: list) -> None:
    print(f"\n## {label}\n")
    print("| piece | slots | min ms | median ms | XLA GFLOPs | GFLOP/s (min) |")
    print("|---|---|---|---|---|---|")
    total = 0.0
    for name, slots, (tmin, tmed), fl in rows:
        if not name.startswith("whole"):
            total += tmin
        rate = "–" if np.isnan(fl) else f"{fl / 1e9 / tmin:.1f}"
        gf = "–" if np.isnan(fl) else f"{fl / 1e9:.3f}"
        print(f"| {name} | {slots or '–'} | {1e3 * tmin:.1f} | {1e3 * tmed:.1f} | {gf} | {rate} |")
    print(f"| sum of pieces (min) | | {1e3 * total:.1f} | | | |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="mini", choices=sorted(SHAPES))
    p.add_argument("--methods", default="v1-64", help="comma-separated labels (dense runs too)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--blas-threads", type=int, default=1, help="as in sparsevlm bench")
    args = p.parse_args(argv)
    bench.prepare_environment()
    bench.limit_blas_threads(args.blas_threads or bench.usable_cores())
    cfg = SHAPES[args.shape]("float32")
    wl = bench.Workload(args.shape, cfg)
    params = init_params(cfg)
    prefix, text = bench.prompt_ids(wl)
    batch, _ = make_batch([prefix], [text], bench.random_pixels(cfg), wl.buckets)
    batch = jax.device_put(batch)
    print(f"load average at start: {os.getloadavg()}")
    for method, budget in bench.method_list(bench.split_list(args.methods)):
        sparse = bench.bench_sparse_config(method, budget, cfg)
        rows = profile(params, cfg, sparse, batch, args.repeat)
        print_rows(bench.method_label(method, budget), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
