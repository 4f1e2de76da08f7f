"""Compile once, answer many: JAX's persistent compilation cache, on by default, and counters.

Every program the prefill and decode need (one per bucket and config, and under v1's
`bucketed` policy one per stage and capacity bucket, `sparsevlm_jax.prefill`) is compiled by
XLA the first time a process meets it. With the persistent cache the compiled executable is
also written to disk, and any later process that lowers the same program (same HLO, same
compile options, same jax/jaxlib and backend) loads it instead of compiling it again.

Where the cache lives, first match wins:

1. the explicit setting (`sparsevlm --compile-cache DIR|off`, `enable(DIR | "off")`);
2. the environment variable `SPARSEVLM_COMPILE_CACHE` (a directory, or `off`);
3. JAX's own `JAX_COMPILATION_CACHE_DIR`, or a `jax_compilation_cache_dir` already set in
   `jax.config` by the caller (honoured as they are);
4. `$XDG_CACHE_HOME/sparsevlm/jax`, else `~/.cache/sparsevlm/jax`.

`off` (also `none`, `0`, `false`, `disabled`) turns the persistent cache off for this
process. Small CPU programs compile in well under JAX's default 1 s threshold, so every
program is written (`jax_persistent_cache_min_compile_time_secs = 0`, no size minimum).

`CompileCounter` counts, through `jax.monitoring`, what XLA was asked for: programs
(`/jax/core/compile/backend_compile_duration`, one event per executable, compiled or
loaded), persistent-cache hits, the seconds XLA spent compiling (backend time minus cache
retrieval) and the seconds spent tracing and lowering (paid by every process, cache or not).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import monitoring

ENV_VAR = "SPARSEVLM_COMPILE_CACHE"
JAX_ENV_VAR = "JAX_COMPILATION_CACHE_DIR"
OFF_WORDS = frozenset({"off", "none", "0", "false", "no", "disabled"})

# Event names of jax 0.4.30+ (jax/_src/dispatch.py, compiler.py); checked in
# tests/test_compile_cache.py against the installed jax.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_REQUEST_EVENT = "/jax/compilation_cache/compile_requests_use_cache"
CACHE_WRITE_EVENT = "/jax/compilation_cache/cache_misses"
CACHE_RETRIEVAL_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"


@dataclass(frozen=True)
class CacheSetting:
    """Where the persistent cache is (None: off) and which setting chose it."""

    path: Path | None
    source: str  # "option", "$SPARSEVLM_COMPILE_CACHE", "$JAX_COMPILATION_CACHE_DIR", "default"

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def describe(self) -> str:
        if self.path is None:
            return f"persistent compilation cache off ({self.source})"
        return f"persistent compilation cache {self.path} ({self.source})"


def default_dir() -> Path:
    """`$XDG_CACHE_HOME/sparsevlm/jax`, else `~/.cache/sparsevlm/jax`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsevlm" / "jax"


def is_off(value: str) -> bool:
    return value.strip().lower() in OFF_WORDS


def resolve(setting: str | os.PathLike | None = None) -> CacheSetting:
    """The cache directory for `setting` (None: the environment, then the default)."""
    candidates = (
        (setting, "option"),
        (os.environ.get(ENV_VAR), f"${ENV_VAR}"),
        (os.environ.get(JAX_ENV_VAR), f"${JAX_ENV_VAR}"),
        (jax.config.jax_compilation_cache_dir, "jax.config"),
    )
    for value, source in candidates:
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if is_off(os.fspath(value)):
            return CacheSetting(None, source)
        return CacheSetting(Path(os.path.expanduser(os.fspath(value))).absolute(), source)
    return CacheSetting(default_dir(), "default")


_lock = threading.Lock()
_active: CacheSetting | None = None


def enable(setting: str | os.PathLike | None = None) -> CacheSetting:
    """Turns the persistent compilation cache on at the resolved directory, or off.

    Idempotent; a later call with another directory switches to it (JAX's cache object is
    reset so that the new directory is used). A directory that cannot be created turns the
    cache off with the reason in `source` instead of failing the run.
    """
    global _active
    chosen = resolve(setting)
    with _lock:
        if chosen == _active:
            return chosen
        if chosen.path is not None:
            try:
                chosen.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                chosen = CacheSetting(None, f"cannot create {chosen.path}: {e.strerror}")
        _apply(chosen)
        _active = chosen
        counter()  # start counting from here on
    return chosen


def _apply(chosen: CacheSetting) -> None:
    from jax.experimental.compilation_cache import compilation_cache as cc

    if chosen.path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        jax.config.update("jax_compilation_cache_dir", None)
    else:
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", os.fspath(chosen.path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    cc.reset_cache()  # the next compile opens the (new) directory


def active() -> CacheSetting | None:
    """The setting `enable` applied in this process (None: never called)."""
    return _active


@dataclass(frozen=True)
class CompileStats:
    """What XLA was asked for, cumulative or between two snapshots (`since`).

    programs: executables produced (compiled or loaded from the persistent cache);
    from_cache: loaded from the persistent cache; written: new entries written to it;
    compile_s: XLA compilation seconds (loading excluded); load_s: seconds loading from the
    cache; trace_s: tracing and lowering to HLO (paid whether the cache hits or not);
    by_kind: (kind, programs, XLA seconds including cache loads) per `program_kind`.
    """

    programs: int = 0
    from_cache: int = 0
    written: int = 0
    compile_s: float = 0.0
    load_s: float = 0.0
    trace_s: float = 0.0
    by_kind: tuple[tuple[str, int, float], ...] = ()

    @property
    def compiled(self) -> int:
        """Programs XLA compiled in this process (not loaded)."""
        return self.programs - self.from_cache

    def since(self, before: CompileStats) -> CompileStats:
        return CompileStats(
            self.programs - before.programs,
            self.from_cache - before.from_cache,
            self.written - before.written,
            self.compile_s - before.compile_s,
            self.load_s - before.load_s,
            self.trace_s - before.trace_s,
            _kinds_since(self.by_kind, before.by_kind),
        )

    @property
    def total_s(self) -> float:
        """Everything compilation cost: tracing, lowering, XLA, loading."""
        return self.compile_s + self.load_s + self.trace_s

    def to_dict(self) -> dict[str, float | int]:
        return {
            "programs": self.programs,
            "compiled": self.compiled,
            "from_cache": self.from_cache,
            "written": self.written,
            "compile_s": round(self.compile_s, 3),
            "load_s": round(self.load_s, 3),
            "trace_s": round(self.trace_s, 3),
            "total_s": round(self.total_s, 3),
            "by_kind": {k: {"programs": n, "xla_s": round(t, 3)} for k, n, t in self.by_kind},
        }

    def line(self) -> str:
        """One line for a command's summary."""
        setting = active()
        where = "" if setting is None else f"; {setting.describe()}"
        return (
            f"compilation: {self.programs} programs, {self.compiled} compiled, "
            f"{self.from_cache} from the cache; {self.total_s:.1f} s (XLA {self.compile_s:.1f} s, "
            f"cache loads {self.load_s:.1f} s, tracing + lowering {self.trace_s:.1f} s){where}"
            + self.kinds_line()
        )

    def kinds_line(self) -> str:
        """'; by program (XLA or cache load): prefill stages 9 (11.4 s), decode 2 (5.1 s)'."""
        parts = [f"{k} {n} ({t:.1f} s)" for k, n, t in self.by_kind if n]
        return f"; by program (XLA or cache load): {', '.join(parts)}" if parts else ""


# What the jitted functions of this package compile, by the name JAX reports.
PROGRAM_KINDS = {
    "prefill_jit": "prefill",
    "_first_stage": "prefill stages",
    "_next_stage": "prefill stages",
    "decode_jit": "decode",
}


def program_kind(fun_name: object) -> str:
    """The kind of a compiled program from JAX's `fun_name` ('jit(_next_stage)' or
    '_next_stage'): one of `PROGRAM_KINDS`' values, else 'other' (eager ops, tests)."""
    name = str(fun_name or "")
    name = name[4:-1] if name.startswith("jit(") and name.endswith(")") else name
    return PROGRAM_KINDS.get(name, "other")


def _kinds_since(now: tuple, before: tuple) -> tuple[tuple[str, int, float], ...]:
    old = {k: (n, t) for k, n, t in before}
    out = [(k, n - old.get(k, (0, 0.0))[0], t - old.get(k, (0, 0.0))[1]) for k, n, t in now]
    return tuple(x for x in out if x[1] > 0)


class CompileCounter:
    """Accumulates `CompileStats` from `jax.monitoring` events (register once per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._programs = self._hits = self._writes = 0
        self._backend_s = self._load_s = self._trace_s = 0.0
        self._kinds: dict[str, tuple[int, float]] = {}
        monitoring.register_event_listener(self._on_event)
        monitoring.register_event_duration_secs_listener(self._on_duration)

    def _on_event(self, event: str, **_: object) -> None:
        if event == CACHE_HIT_EVENT:
            with self._lock:
                self._hits += 1
        elif event == CACHE_WRITE_EVENT:
            with self._lock:
                self._writes += 1

    def _on_duration(self, event: str, seconds: float, **kw: object) -> None:
        with self._lock:
            if event == BACKEND_COMPILE_EVENT:
                self._programs += 1
                self._backend_s += seconds
                kind = program_kind(kw.get("fun_name"))
                n, t = self._kinds.get(kind, (0, 0.0))
                self._kinds[kind] = (n + 1, t + seconds)
            elif event == CACHE_RETRIEVAL_EVENT:
                self._load_s += seconds
            elif event in (TRACE_EVENT, LOWER_EVENT):
                self._trace_s += seconds

    def snapshot(self) -> CompileStats:
        with self._lock:
            # Backend time covers the cache lookup (a miss's lookup is small but counted).
            compile_s = max(self._backend_s - self._load_s, 0.0)
            kinds = tuple((k, n, t) for k, (n, t) in sorted(self._kinds.items(), key=_order))
            return CompileStats(
                self._programs,
                self._hits,
                self._writes,
                compile_s,
                self._load_s,
                self._trace_s,
                kinds,
            )


def _order(item: tuple[str, tuple[int, float]]) -> float:
    return -item[1][1]  # most seconds first


_counter: CompileCounter | None = None


def counter() -> CompileCounter:
    """The process's counter, registered with `jax.monitoring` on first use."""
    global _counter
    if _counter is None:
        _counter = CompileCounter()
    return _counter


def stats() -> CompileStats:
    """Cumulative `CompileStats` since the counter started (`enable` starts it)."""
    return counter().snapshot()


def warm_up(
    pipe: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    sparse: Any,
    max_new_tokens: int,
    batch_size: int = 1,
    progress: bool = True,
) -> CompileStats:
    """Compiles the programs answering these questions will need, before answering them.

    Runs each distinct (image, question) batch's prefill, which compiles the prompt bucket's
    program and, under the `bucketed` policy, the stage programs its budgets lead to (the
    decisions are data-dependent: only the prefill knows them), and compiles the decode loop
    once per KV-cache shape. With the persistent cache on, the decode loop is compiled ahead
    of time (`lower().compile()` writes the cache; the answering run loads it); with it off,
    the loop runs once so that this process keeps it. Batches are formed as `eval` forms
    them (`batch_size`, a short last batch padded with its last question). Returns what was
    compiled meanwhile.

    pipe: a `LlavaPipeline`; images: paths or PIL images, one per question.
    """
    from tqdm.auto import tqdm

    from sparsevlm_jax.generate import decode_jit, prefill
    from sparsevlm_jax.sharding import follow_params_mesh

    before = stats()
    aot = active() is not None and active().enabled
    eos = tuple(pipe.cfg.text.eos_token_ids)
    shapes_done: set[Any] = set()

    @follow_params_mesh
    def one(params: dict, cfg: Any, batch: Any) -> None:
        logits, cache, _, _ = prefill(params, batch, cfg, sparse, max_new_tokens)
        key = tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves((cache, logits)))
        if key in shapes_done:
            return
        shapes_done.add(key)
        args = (params, cache, logits, jax.random.PRNGKey(0), jnp.float32(0), jnp.float32(1))
        if aot:
            decode_jit.lower(*args, cfg, max_new_tokens, eos).compile()
        else:
            jax.block_until_ready(decode_jit(*args, cfg, max_new_tokens, eos))

    pairs = list(zip(images, questions, strict=True))
    chunks, seen = [], set()
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo : lo + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
        key = tuple((str(i), q) for i, q in chunk)
        if key not in seen:
            seen.add(key)
            chunks.append(chunk)
    for chunk in tqdm(chunks, desc="warm-up", unit="batch", disable=not progress):
        batch, _ = pipe.processor([i for i, _ in chunk], [q for _, q in chunk])
        one(pipe.params, pipe.cfg, batch)
    return stats().since(before)
