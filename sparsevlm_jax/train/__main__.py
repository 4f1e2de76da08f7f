"""`python -m sparsevlm_jax.train --out DIR [--steps N] [--resume] [--preset demo|tiny]`."""

from sparsevlm_jax.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
