"""The LLaVA-NeXT CPU latency benchmark (`mini-next`): one command, run on idle cores.

    python benchmarks/next_cpu_run.py                   # waits for idle cores, then measures
    python benchmarks/next_cpu_run.py --wait 0          # measures now, whatever the load
    python benchmarks/next_cpu_run.py --dry-run --out /tmp/x   # seconds: the same code path

One `sparsevlm bench` full run (`sparsevlm_jax.bench`) on the `mini-next` shape (mini's
widths, 32 layers, LLaVA-NeXT anyres tiling) with one 480x640 image (2,340 visual tokens,
padded to 2,432 slots): JAX dense vs transformers' `LlavaNextForConditionalGeneration` (sdpa,
`image_sizes` given), JAX pruned vs the PyTorch reference (`sparsevlm_jax.reference`, given
`image_sizes`) at equal decisions (same converted weights; fixed schedules scaled per example,
SPEC §9.3; v1 also against the reference fixed to JAX's kept counts). Writes
`mini-next-cpu.json|md|png` to `--out` (default benchmarks/results).

Timings on a shared machine are noise: before starting, the script polls the 1-minute load
average once a minute for up to `--wait` minutes and starts when it is below `--max-load`
(exit 3 without measuring when it never is). The load at start and end is in the report.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/next_cpu_run.py` from a plain checkout
    sys.path.insert(0, str(REPO))

SHAPE = "mini-next"
IMAGES = "480x640"
METHODS = ("v1-640", "v1_5-640", "v1_5-320", "v1_5-160", "v2_0-320", "fastv-320")
DRY_RUN_IMAGES = "336x336"
DRY_RUN_METHODS = ("v1_5-160",)
MAX_LOAD = 0.6
WAIT_MINUTES = 20


def bench_argv(args: argparse.Namespace) -> list[str]:
    """The `sparsevlm bench` arguments of the run (or its dry run)."""
    argv = ["--shape", SHAPE, "--dtype", "float32", "--quiet"]
    if args.out is not None:
        argv += ["--out", str(args.out)]
    if args.dry_run:
        methods = args.methods or ",".join(DRY_RUN_METHODS)
        timing = ["--warmup", "0", "--repeat", "1", "--decode-steps", "1", "--ttft-repeat", "1"]
        return [*argv, "--images", DRY_RUN_IMAGES, "--methods", methods, *timing,
                "--max-new-tokens", "4", "--count", "none", "--tag", "dry-run"]  # fmt: skip
    methods = args.methods or ",".join(METHODS)
    timing = ["--warmup", "1", "--repeat", "3", "--decode-steps", "5", "--ttft-repeat", "2"]
    return [*argv, "--images", IMAGES, "--methods", methods, *timing, "--max-new-tokens", "16"]


def wait_for_idle(minutes: float, max_load: float) -> bool:
    """Polls the 1-minute load average every minute for up to `minutes`; True once it is
    below `max_load`."""
    deadline = time.monotonic() + 60 * minutes
    while True:
        load = os.getloadavg()[0]
        print(f"load average {load:.2f} (need < {max_load})", file=sys.stderr, flush=True)
        if load < max_load:
            return True
        if time.monotonic() + 60 > deadline:
            return False
        time.sleep(60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="seconds-long CPU check, no waiting")
    p.add_argument("--out", type=Path, default=None, help="results directory")
    p.add_argument("--methods", default="", help=f"(default: {','.join(METHODS)})")
    p.add_argument("--wait", type=float, default=WAIT_MINUTES, help="minutes (%(default)s)")
    p.add_argument("--max-load", type=float, default=MAX_LOAD, help="(%(default)s)")
    args = p.parse_args(argv)
    if not args.dry_run and not wait_for_idle(args.wait, args.max_load):
        print("the machine stayed busy: nothing measured", file=sys.stderr)
        return 3
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from sparsevlm_jax import bench

    return bench.main(bench_argv(args), {"driver": "benchmarks/next_cpu_run.py"})


if __name__ == "__main__":
    sys.exit(main())
