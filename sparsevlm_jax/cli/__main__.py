"""`python -m sparsevlm_jax.cli ...` = `sparsevlm ...`."""

import sys

from sparsevlm_jax.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
