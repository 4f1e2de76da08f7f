"""Errors shared across the package."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input; the CLI prints it on one line and exits 2."""
