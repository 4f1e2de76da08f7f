"""How the `sparsevlm` command fails: exit statuses and which exceptions mean bad input.

Exit status: 0 success; 2 a usage or input error (bad arguments, files, images, prompts,
checkpoints, configs), reported as ONE line `sparsevlm: error: <message>` on stderr, with no
partial output file left behind; 1 an unexpected error (a bug), reported with a traceback.
"""

from __future__ import annotations

from sparsevlm_jax.config import ConfigError
from sparsevlm_jax.errors import InputError

PROG = "sparsevlm"
EXIT_OK, EXIT_BUG, EXIT_INPUT = 0, 1, 2


def input_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit 2, one line) rather than a bug."""
    from sparsevlm_jax.checkpoint import CheckpointError

    types: list[type[BaseException]] = [
        InputError,  # includes batch.BucketError
        ConfigError,
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    ]
    try:
        from convert.errors import ConversionError
    except ImportError:  # the converter is optional at run time
        pass
    else:
        types.append(ConversionError)
    return tuple(types)


def error_message(e: BaseException) -> str:
    """One line describing an input error."""
    if isinstance(e, OSError) and e.strerror:
        where = e.filename if e.filename is not None else ""
        msg = f"{where}: {e.strerror}" if where else e.strerror
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())
