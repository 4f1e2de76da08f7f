"""The converter's one error type."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message is one line naming every problem."""
