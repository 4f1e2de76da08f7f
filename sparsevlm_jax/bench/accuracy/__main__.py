"""`python -m sparsevlm_jax.bench.accuracy [--model DIR] [--images 544] [--out DIR] ...`."""

from sparsevlm_jax.bench.accuracy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
