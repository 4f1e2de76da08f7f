"""`sparsevlm convert`: the converter (`convert.cli.run`) behind the command."""

from __future__ import annotations

import argparse

from sparsevlm_jax.cli.errors import EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    """Runs the converter and prints its summary."""
    from convert.cli import run

    print(run(args))
    return EXIT_OK
