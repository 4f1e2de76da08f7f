"""The LLaVA-1.5-7B benchmark on one H100/H200, in parts that each fit one 10-minute call.

    python3 benchmarks/gpu_run.py --part 1 --out DIR   # dense, v1 and FastV at 192/128/64
    python3 benchmarks/gpu_run.py --part 2 --out DIR   # dense, v1.5 and v2.0 at 192/128/64
    python benchmarks/gpu_run.py --merge DIR/*-part1.json DIR/*-part2.json \\
        --out benchmarks/results                        # any machine: FLOPs, one report
    python benchmarks/gpu_run.py --dry-run --part 1 --out /tmp/x   # CPU, `mini` shape

Each part is one `sparsevlm bench` full run (`sparsevlm_jax.bench`) in bfloat16 with random
weights generated on the device (`--init device`: `jax.random` for JAX, transformers'
initialiser on cuda for PyTorch): prefill, decode step, TTFT, compile time and memory of JAX
(v1 under its default `bucketed` policy) vs transformers (sdpa) for dense and vs the PyTorch
reference (`sparsevlm_jax.reference`) for the sparse presets. Dense runs in every part, so each
part's ratios compare measurements of one process. The XLA FLOPs are not counted on the
device (`--count none`: lowering the unrolled 7B programs costs host minutes of a short
lease); `--merge` counts them afterwards, on any machine, from the capacities each run
chose, and writes one report (`llava-1.5-7b-gpu.json|md|png`).

Before measuring, the prefill attention is probed on the device (`sparsevlm_jax.bench.
attention`): cuDNN's fused kernel is used when it runs and agrees with the XLA attention,
else `SPARSEVLM_ATTENTION=xla`; the probe's timings go into the report.

A time budget (`--deadline`, default 480 s per part) keeps a part inside its call: methods
not compiled in time are skipped and printed with the command that measures them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

STARTED = time.monotonic()
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python3 benchmarks/gpu_run.py` from a plain checkout
    sys.path.insert(0, str(REPO))

SHAPE = "llava-1.5-7b"
PARTS = {
    1: ("v1-192", "v1-128", "v1-64", "fastv-192", "fastv-128", "fastv-64"),
    2: ("v1_5-192", "v1_5-128", "v1_5-64", "v2_0-192", "v2_0-128", "v2_0-64"),
}
DRY_RUN_METHODS = {1: ("v1-64", "fastv-64"), 2: ("v1_5-64", "v2_0-64")}
DEADLINE_S = 480.0


def part_argv(args: argparse.Namespace) -> list[str]:
    """The `sparsevlm bench` arguments of one part (or its CPU dry run)."""
    methods = args.methods or ",".join((DRY_RUN_METHODS if args.dry_run else PARTS)[args.part])
    common = ["--init", "device", "--methods", methods, "--count", "none", "--quiet"]
    common += ["--tag", f"part{args.part}"]
    if args.out is not None:
        common += ["--out", str(args.out)]
    if args.dry_run:  # float32: PyTorch's bfloat16 matmuls on a CPU take seconds per prefill
        timing = ["--warmup", "0", "--repeat", "1", "--decode-steps", "1", "--ttft-repeat", "1"]
        return ["--shape", "mini", "--dtype", "float32", *common, *timing, "--max-new-tokens", "4"]
    deadline = max(args.deadline - (time.monotonic() - STARTED), 60.0)
    timing = ["--warmup", "2", "--repeat", "10", "--decode-steps", "10", "--ttft-repeat", "3"]
    return [
        *("--shape", SHAPE, "--dtype", "bfloat16", *common, *timing),
        *("--max-new-tokens", "16", "--deadline", f"{deadline:.0f}"),
    ]


def run_part(args: argparse.Namespace) -> int:
    import jax

    from sparsevlm_jax import bench
    from sparsevlm_jax.bench.attention import attention_probe, choose_attention
    from sparsevlm_jax.bench.workloads import PREFIX_TOKENS
    from sparsevlm_jax.presets import SHAPES

    bench.prepare_environment()
    backend = jax.default_backend()
    if not args.dry_run and backend != "gpu":
        print(
            f"gpu_run: JAX runs on {backend}, not a GPU (use --dry-run on a CPU)", file=sys.stderr
        )
        return 2
    shape, dtype = ("mini", "float32") if args.dry_run else (SHAPE, "bfloat16")
    cfg = SHAPES[shape](dtype)
    length = PREFIX_TOKENS + cfg.num_image_tokens + 64
    probe = attention_probe(cfg.text, length, dtype, repeat=3 if args.dry_run else 20)
    probe["chosen"] = choose_attention(probe)
    print(f"gpu_run: attention probe {json.dumps(probe)}", file=sys.stderr, flush=True)
    argv = part_argv(args)
    print(f"gpu_run: sparsevlm bench {' '.join(argv)}", file=sys.stderr, flush=True)
    status = bench.main(argv, extra={"attention_probe": probe, "part": args.part})
    print(f"gpu_run: part {args.part} done in {time.monotonic() - STARTED:.0f} s", file=sys.stderr)
    return status


def merge(paths: list[Path], out: Path, count: str) -> int:
    """Writes `llava-1.5-7b-gpu.*`; parts of a dry run (`mini`) give `mini-cpu-dry-run.*`."""
    from sparsevlm_jax.bench.merge import merge_reports

    shape = json.loads(paths[0].read_text())["workload"]["shape"]
    stem = f"{SHAPE}-gpu" if shape == SHAPE else f"{shape}-cpu-dry-run"
    for path in merge_reports(paths, out, count, stem):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--part", type=int, choices=sorted(PARTS), default=1)
    p.add_argument("--dry-run", action="store_true", help="CPU, `mini` shape, one round each")
    p.add_argument("--methods", default="", help="override the part's methods (labels)")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds (%(default)s)")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON", help="part reports to merge")
    p.add_argument("--count", choices=("compiled", "lowered"), default="compiled",
                   help="XLA FLOPs of a merge: compiled (as `--flops-only` on a CPU) or "
                   "lowered (faster)")  # fmt: skip
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out or REPO / "benchmarks" / "results", args.count)
    return run_part(args)


if __name__ == "__main__":
    sys.exit(main())
