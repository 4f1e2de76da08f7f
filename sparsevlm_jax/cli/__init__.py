"""The `sparsevlm` command (console script `sparsevlm_jax.cli:main`).

Modules: `app` (the parser and `main`), `errors` (exit statuses, which exceptions are bad
input), `options` (option groups several commands share), `sparsity` (the options' SparseConfig
and capacity policy), `models` (which model, opened how), `report` (the `--stats` block and
`--json`), and one module per command group: `generate` (generate, eval), `visualize`, `info`
(convert, info), `calibrate`, `demo`, `bench`.
"""

from sparsevlm_jax.cli.app import build_parser, main
from sparsevlm_jax.cli.models import default_model_path
from sparsevlm_jax.cli.sparsity import sparse_from_args

__all__ = ["build_parser", "default_model_path", "main", "sparse_from_args"]
