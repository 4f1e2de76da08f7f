"""The persistent compilation cache (sparsevlm_jax/compile_cache.py) and program counts.

- the cache directory is used, can be chosen and turned off; its counters follow JAX's events;
- a second `sparsevlm eval` process compiles nothing: every program comes from the cache
  (through the installed command, via the benchmark's dry run);
- how many programs each capacity policy compiles over a fixed list of inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from sparsevlm_jax import compile_cache as cc
from sparsevlm_jax.batch import make_batch
from sparsevlm_jax.generate import compile_counts, prefill

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_cache():
    """Puts JAX's cache settings and `compile_cache`'s state back after the test."""
    names = (
        "jax_compilation_cache_dir",
        "jax_enable_compilation_cache",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {n: getattr(jax.config, n) for n in names}
    active = cc._active
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
    cc._active = active


def test_event_names_exist_in_the_installed_jax() -> None:
    """The counters listen for these names: a jax upgrade that renames one fails here."""
    src = Path(jax.__file__).parent / "_src"
    text = "".join(
        (src / f).read_text() for f in ("compiler.py", "compilation_cache.py", "dispatch.py")
    )
    for event in (
        cc.BACKEND_COMPILE_EVENT,
        cc.TRACE_EVENT,
        cc.LOWER_EVENT,
        cc.CACHE_HIT_EVENT,
        cc.CACHE_WRITE_EVENT,
        cc.CACHE_RETRIEVAL_EVENT,
    ):
        assert event in text, event


def test_where_the_cache_lives(monkeypatch, tmp_path, restore_cache) -> None:
    for var in (cc.ENV_VAR, cc.JAX_ENV_VAR, "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cc.resolve() == cc.CacheSetting(tmp_path / "home/.cache/sparsevlm/jax", "default")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cc.resolve().path == tmp_path / "xdg/sparsevlm/jax"
    monkeypatch.setenv(cc.JAX_ENV_VAR, str(tmp_path / "jaxdir"))
    assert cc.resolve() == cc.CacheSetting(tmp_path / "jaxdir", "$JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv(cc.ENV_VAR, "off")
    assert not cc.resolve().enabled and cc.resolve().source == "$SPARSEVLM_COMPILE_CACHE"
    assert cc.resolve(tmp_path / "opt") == cc.CacheSetting(tmp_path / "opt", "option")
    for word in ("off", "OFF", "none", "0", "false"):
        assert cc.resolve(word).path is None


def _fresh_program(tag: float) -> jax.Array:
    """A program no other test compiled (the constant is part of the HLO)."""
    return jax.jit(lambda x: jnp.tanh(x) * tag + x @ x.T)(jnp.ones((16, 16)))


def test_the_directory_is_used_and_can_be_turned_off(tmp_path, restore_cache) -> None:
    setting = cc.enable(tmp_path / "cache")
    assert setting.path == tmp_path / "cache" and cc.active() == setting
    before = cc.stats()
    _fresh_program(1.25).block_until_ready()
    got = cc.stats().since(before)
    files = set((tmp_path / "cache").iterdir())
    assert got.programs >= 1 and got.compiled == got.programs and got.written >= 1
    assert len(files) >= got.written  # one entry per program written (+ JAX's own files)

    assert not cc.enable("off").enabled
    before = cc.stats()
    _fresh_program(2.5).block_until_ready()
    got = cc.stats().since(before)
    assert got.compiled >= 1 and got.from_cache == 0 and got.written == 0
    assert set((tmp_path / "cache").iterdir()) == files  # nothing new written
    assert "0 from the cache" in got.line()


def test_a_second_process_loads_every_program_from_the_cache(tmp_path) -> None:
    """The benchmark's dry run: `sparsevlm eval` twice on one cache, in fresh processes."""
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/compile_once.py"), "--dry-run",
         "--work", str(tmp_path), "--questions", "2", "--runs", "first,second"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads((tmp_path / "compile-once.json").read_text())
    first, second = state["runs"]["first"]["compilation"], state["runs"]["second"]["compilation"]
    assert first["compiled"] == first["programs"] > 0 and first["from_cache"] == 0
    assert second["compiled"] == 0 and second["from_cache"] == second["programs"] > 0
    held = state["runs"]["second"]["held_programs"]
    assert held == state["runs"]["first"]["held_programs"] and held["stage"] > 0
    assert any(list((tmp_path / "cache").iterdir()))
    rows = state["ladder"]["rows"]
    four = next(r for r in rows if r["steps_per_octave"] == 4 and r["candidates"] != "own ladder")
    assert four["programs_history_free"] == held["stage"]  # the study counts what ran
    assert (tmp_path / "compile-once.md").read_text().count("| first |") == 1


def _stage_keys(shape: tuple[int, ...], plan) -> set:
    """The stage programs a bucketed call needs: the first stage per batch shape, then one
    per (batch shape, stage, incoming width, this layer's capacities): history-free, nothing
    of earlier stages but the width they hand on."""
    keys = {("first", shape)}
    width = "first"
    for s, (kept, recycled) in enumerate(plan, start=1):
        keys.add((shape, s, width, kept, recycled))
        width = kept + recycled
    return keys


# Stage programs the bucketed policy compiles over `INPUTS` below (4-step ladder, candidate
# buffers derived from the kept bucket, pruning after layers 2 and 6): one first stage, then
# one per stage, incoming width and capacities.
BUCKETED_PROGRAMS = 5
INPUTS = ([0], [2], [0])  # rows of test_sparse_parity.EXAMPLES; [0] again: nothing new


def test_program_counts_per_policy_over_fixed_inputs() -> None:
    from test_sparse_parity import EXAMPLES, PRESETS, model_and_params, pixels

    from sparsevlm_jax.sparse.config import SparseConfig

    _, params, cfg = model_and_params(0)
    pix = pixels()
    new_tokens = 11  # a static argument no other test uses: every program here is new
    for policy in ("static", "bucketed"):
        kw = {"capacities": (40, 20)} if policy == "static" else {}
        scale, bias = PRESETS["64"]
        sparse = SparseConfig(
            method="v1", layers=(2, 6), scale=scale, bias=bias, capacity=policy, **kw
        )
        before, kinds_before = compile_counts(), cc.stats()
        keys, shapes = set(), set()
        for rows in INPUTS:
            batch, _ = make_batch(
                [EXAMPLES[i][0] for i in rows], [EXAMPLES[i][1] for i in rows], pix[rows]
            )
            _, _, _, info = prefill(params, batch, cfg, sparse, new_tokens)
            shapes.add(batch.shape_key)
            plan = list(zip(info.capacities, info.recycled_capacities, strict=True))
            keys |= _stage_keys(batch.shape_key, plan)
        after = compile_counts()
        fused = after["prefill"] - before["prefill"]
        stages = after["prefill_stages"] - before["prefill_stages"]
        # the summary's per-kind counts name the same programs
        kinds = {k: n for k, n, _ in cc.stats().since(kinds_before).by_kind}
        assert kinds.get("prefill stages", 0) == stages and kinds.get("prefill", 0) == fused
        assert len(shapes) == 1
        if policy == "bucketed":
            # keys count (kept, recycled) histories; candidate buckets could add a few
            assert fused == 0 and len(keys) <= stages <= len(keys) + 2, (stages, keys)
            assert stages == BUCKETED_PROGRAMS, stages
        else:  # one fused program per batch bucket, whatever the inputs
            assert (fused, stages) == (1, 0), policy
