"""Does XLA:CPU keep every core busy? Times the `mini` prefill under XLA flag variants.

    python benchmarks/cpu_threads.py                      # every variant in VARIANTS
    python benchmarks/cpu_threads.py --variants default,no-eigen-threads --repeat 20

Each variant runs in a fresh process (XLA reads `XLA_FLAGS` once, when its CPU backend
starts) and measures, after a warm-up: one [675, 256] x [256, 688] float32 matmul (the MLP's
shape), one causal attention of the `mini` shape (block-skipping and full-mask), the whole
dense `mini` prefill and one decode step; for each the median wall time and the cores it kept
busy (process CPU time / wall time over the timed calls, `os.times`). Prints a markdown
table; `--json` writes the rows too. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "default": "",  # jax 0.10.2: dots, reductions and elementwise ops in YNNPACK fusions
    "no-ynn": "--xla_cpu_experimental_ynn_fusion_type=",  # XLA's own emitters, Eigen dots
    "no-ynn-one-thread": "--xla_cpu_experimental_ynn_fusion_type= "
    "--xla_cpu_multi_thread_eigen=false",
    "ynn-dot-only": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "no-eigen-threads": "--xla_cpu_multi_thread_eigen=false",
    "legacy-runtime": "--xla_cpu_use_thunk_runtime=false",
    "concurrency-scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
}


def measure(fn, repeat: int) -> dict[str, float]:
    """Median ms and busy cores (CPU time / wall time) of `fn()` over `repeat` calls."""
    import jax

    jax.block_until_ready(fn())
    times = []
    t_cpu0, t_wall0 = os.times(), time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    t_cpu1, wall = os.times(), time.perf_counter() - t_wall0
    cpu = (t_cpu1.user - t_cpu0.user) + (t_cpu1.system - t_cpu0.system)
    return {"ms": 1e3 * statistics.median(times), "cores": cpu / wall}


def child(repeat: int) -> dict:
    """One variant, in this process (XLA_FLAGS already set by the parent)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sparsevlm_jax import bench
    from sparsevlm_jax.batch import make_batch
    from sparsevlm_jax.model import llama
    from sparsevlm_jax.params import init_params
    from sparsevlm_jax.prefill import prefill_jit
    from sparsevlm_jax.presets import mini
    from sparsevlm_jax.sparse.config import SparseConfig

    bench.prepare_environment()
    bench.limit_blas_threads(1)
    rng = np.random.default_rng(0)
    cfg = mini()
    wl = bench.Workload("mini", cfg)
    t = wl.prefix_bucket + cfg.num_image_tokens + wl.text_bucket
    a = jnp.asarray(rng.normal(size=(t, 256)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(256, 688)), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    rows = {"matmul": measure(lambda: mm(a, b), 5 * repeat)}
    n, h = cfg.text.num_attention_heads, cfg.text.head_dim
    q = jnp.asarray(rng.normal(size=(1, t, n, h)), jnp.float32)
    valid = jnp.ones((1, t), bool).at[:, :3].set(False)
    ends = llama.query_block_ends(t)
    blocks = jax.jit(lambda q, m: llama.attend(q, q, q, llama.CausalMask(m, ends)))
    full = jax.jit(lambda q, m: llama.attend(q, q, q, llama.causal_mask(m)))
    rows["attention_blocks"] = measure(lambda: blocks(q, valid), 5 * repeat)
    rows["attention_full_mask"] = measure(lambda: full(q, valid), 5 * repeat)
    params = init_params(cfg, 0)
    prefix, text = bench.prompt_ids(wl)
    batch, _ = make_batch([prefix], [text], bench.random_pixels(cfg), wl.buckets)
    batch = jax.device_put(batch)
    compiled = prefill_jit.lower(params, batch, cfg, SparseConfig(), 32).compile()
    rows["prefill"] = measure(lambda: compiled(params, batch)[0], repeat)
    logits, cache, _ = compiled(params, batch)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    step = jax.jit(bench.timing._greedy_step, static_argnums=1)
    state = {"cache": cache, "tok": tok}

    def decode():
        state["tok"], state["cache"] = step(params, cfg, state["cache"], state["tok"])
        return state["tok"]

    rows["decode_step"] = measure(decode, min(repeat, 25))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.repeat)))
        return 0
    results = {}
    for name in args.variants.split(","):
        env = {**os.environ, "XLA_FLAGS": VARIANTS[name]}
        cmd = [sys.executable, __file__, "--child", "--repeat", str(args.repeat)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            results[name] = {"error": err}
        else:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    cols = ("matmul", "attention_blocks", "attention_full_mask", "prefill", "decode_step")
    print(f"load average after: {os.getloadavg()}")
    print("| variant | XLA_FLAGS | " + " | ".join(f"{c} ms (cores)" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | `{VARIANTS[name]}` | error: {r['error']} |")
            continue
        cells = " | ".join(f"{r[c]['ms']:.2f} ({r[c]['cores']:.2f})" for c in cols)
        print(f"| {name} | `{VARIANTS[name]}` | {cells} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
