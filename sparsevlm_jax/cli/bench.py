"""`sparsevlm bench ARGS`: the benchmark (`sparsevlm_jax.bench`) with its own parser.

Everything after `bench` is handed to that parser as it is (`app.main` does not parse it), so
`sparsevlm bench --help` shows the benchmark's options.
"""

from __future__ import annotations

from collections.abc import Sequence


def run_bench(argv: Sequence[str]) -> int:
    """Runs `sparsevlm_jax.bench` (imported only here: it tunes BLAS/OpenMP threads)."""
    from sparsevlm_jax import bench

    return bench.main(list(argv))
