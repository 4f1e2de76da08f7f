"""`python -m sparsevlm_jax.bench ...` = `sparsevlm bench ...`."""

import sys

from sparsevlm_jax.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
