"""`python benchmarks/bench.py ...` = `sparsevlm bench ...` (see `sparsevlm_jax.bench`)."""

import sys

from sparsevlm_jax.bench import main

if __name__ == "__main__":
    sys.exit(main())
