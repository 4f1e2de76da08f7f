"""Benchmarks: XLA vs PyTorch, dense vs sparse: FLOPs, latency, memory, compile time.

    sparsevlm bench --shape llava-1.5-7b --flops-only --json     # FLOPs by abstract lowering
    sparsevlm bench --shape mini                                 # full run (CPU-sized shape)
    python -m sparsevlm_jax.bench --shape llava-1.5-7b --dtype bfloat16    # full run on a GPU

Modules:
  * `workloads`: the benchmark setting (shape, prompt sizes), the methods measured, inputs and
    random weights.
  * `flops`: XLA cost analysis of the prefill vs SPEC §8's ideal counts; KV-cache bytes.
  * `timing`: the compiled JAX prefill / decode step, round-robin latency, memory, the machine
    and its thread settings.
  * `torch_side`: transformers (dense) and the PyTorch reference (sparse).
  * `targets`: FLOPs and latency targets (reported, never asserted).
  * `report`, `plot`: JSON, markdown and the PNG plot.
  * `runs`: the FLOPs-only and full runs; `cli`: the `sparsevlm bench` arguments.
"""

from sparsevlm_jax.bench.cli import PROG, build_parser, default_out_dir, main, run, split_list
from sparsevlm_jax.bench.flops import kv_report, token_report
from sparsevlm_jax.bench.plot import plot_figure, render_png
from sparsevlm_jax.bench.report import markdown_flops, markdown_full, save_outputs, to_json
from sparsevlm_jax.bench.runs import SCHEMA, run_flops, run_full
from sparsevlm_jax.bench.timing import (
    JaxMethod,
    limit_blas_threads,
    prepare_environment,
    usable_cores,
)
from sparsevlm_jax.bench.workloads import (
    Options,
    Workload,
    bench_sparse_config,
    method_label,
    method_list,
    prompt_ids,
    random_pixels,
)

__all__ = [
    "PROG",
    "SCHEMA",
    "JaxMethod",
    "Options",
    "Workload",
    "bench_sparse_config",
    "build_parser",
    "default_out_dir",
    "kv_report",
    "limit_blas_threads",
    "main",
    "markdown_flops",
    "markdown_full",
    "method_label",
    "method_list",
    "plot_figure",
    "prepare_environment",
    "prompt_ids",
    "random_pixels",
    "render_png",
    "run",
    "run_flops",
    "run_full",
    "save_outputs",
    "split_list",
    "to_json",
    "token_report",
    "usable_cores",
]
