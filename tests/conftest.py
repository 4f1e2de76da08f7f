"""Test-session setup: the persistent compilation cache is off for the tests (in-process calls
and the installed command in subprocesses), unless the environment names a cache, so every
test compiles what it runs, as before the cache existed, and nothing is written to the user's
cache. `tests/test_compile_cache.py` turns it on, in directories of its own."""

from __future__ import annotations

import os

os.environ.setdefault("SPARSEVLM_COMPILE_CACHE", "off")
