"""Test-session setup.

- The persistent compilation cache is off for the tests (in-process calls and the installed
  command in subprocesses) unless the environment names a cache, so every test compiles what
  it runs and nothing is written to the user's cache; `tests/test_compile_cache.py` turns it
  on, in directories of its own.
- After each test module, JAX's compiled programs are dropped (`jax.clear_caches`). Every
  XLA:CPU executable keeps memory mappings of its own, and one process running the whole suite
  would otherwise pass the kernel's limit on mappings (`vm.max_map_count`, 65,530 by default):
  past it, XLA's compiler crashes with a segmentation fault.
"""

from __future__ import annotations

import gc
import os

import pytest

os.environ.setdefault("SPARSEVLM_COMPILE_CACHE", "off")


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    yield
    import jax

    jax.clear_caches()
    gc.collect()
