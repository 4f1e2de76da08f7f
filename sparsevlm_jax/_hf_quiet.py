"""Keeps transformers' "PyTorch was not found" advice off the console.

transformers prints it (twice: its package init can run twice) whenever its tokenizers or
configs are imported without torch. This library needs torch only for pickle conversion, the
reference and benchmarks, and says so itself where it does. The filter sits on transformers'
own logger, created here before transformers is first imported; nothing else is dropped.
"""

import logging


class NoTorchAdvice(logging.Filter):
    """Drops the one "PyTorch was not found" record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "PyTorch was not found" not in record.getMessage()


logging.getLogger("transformers").addFilter(NoTorchAdvice())
