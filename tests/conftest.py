"""Test-session setup: one persistent compilation cache for the whole run, in a temporary
directory, unless the environment names one. The tests' processes (in-process calls and the
installed command in subprocesses) share compiled programs, and nothing is written to the
user's own cache (`sparsevlm_jax.compile_cache`)."""

from __future__ import annotations

import os
import shutil
import tempfile

_OWN = None
if "SPARSEVLM_COMPILE_CACHE" not in os.environ:
    _OWN = tempfile.mkdtemp(prefix="sparsevlm-test-cache-")
    os.environ["SPARSEVLM_COMPILE_CACHE"] = _OWN


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ARG001 - pytest's hook signature
    if _OWN is not None:
        shutil.rmtree(_OWN, ignore_errors=True)
