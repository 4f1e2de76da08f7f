"""JAX side of a full run: compiled prefill and decode step, latency, memory, the machine.

Latency: every timed callable blocks until its results are ready; warm-up first, then
`--repeat` rounds in which all implementations run once each, in rotating order, so the load
of a shared machine affects them alike; min / median / max are reported. Compile time is
measured separately (lower + compile of the same programs that are timed).
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax.batch import Batch
from sparsevlm_jax.bench.flops import kv_report
from sparsevlm_jax.bench.workloads import Workload
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.model.llava import KVCache, decode_step
from sparsevlm_jax.prefill import CapacityInfo, compiled_programs, prefill_jit
from sparsevlm_jax.prefill import prefill as dispatch_prefill
from sparsevlm_jax.sparse.config import SparseConfig

Timings = dict[str, list[float]]


def summarize(runs: Sequence[float]) -> dict[str, Any]:
    """min / median / max in milliseconds."""
    if not runs:
        return {"runs": 0}
    ms = [1e3 * r for r in runs]
    return {
        "min_ms": min(ms),
        "median_ms": statistics.median(ms),
        "max_ms": max(ms),
        "runs": len(ms),
    }


def round_robin(
    fns: dict[str, Callable[[], Any]], warmup: int, repeat: int, desc: str, quiet: bool
) -> Timings:
    """Times every callable `repeat` times after `warmup` calls, one call of each per round
    in rotating order (a shared machine's load then hits every implementation alike)."""
    from tqdm.auto import tqdm

    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: Timings = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in tqdm(range(repeat), desc=desc, disable=quiet, leave=False):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def memory_analysis(compiled: Any) -> dict[str, int] | None:
    """`compiled.memory_analysis()` as a dict, with peak = arguments + outputs + temps - aliases."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    names = ("argument", "output", "alias", "temp", "generated_code")
    out = {n: int(getattr(m, f"{n}_size_in_bytes", 0) or 0) for n in names}
    out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def device_memory() -> dict[str, int] | None:
    """`device.memory_stats()` of the default device (GPU/TPU; None on CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats:
        return None
    keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keys if k in stats}


def _greedy_step(params: dict, cfg: LlavaConfig, cache: KVCache, tokens: jax.Array):
    logits, cache = decode_step(params, cfg, cache, tokens)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache


greedy_step_jit = jax.jit(_greedy_step, static_argnums=1, donate_argnums=2)
first_token_jit = jax.jit(lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32))


class JaxMethod:
    """The compiled prefill and greedy decode step of one method, with stateful decoding.

    A one-program prefill (dense, `static`, `exact`) is compiled ahead of time and its
    compiled object is timed. The `bucketed` policy runs stage programs with a host round
    trip in between: it is timed through `sparsevlm_jax.prefill.prefill`, the dispatch users
    call; its compile time is the first call minus a steady-state call, and its FLOPs are
    counted on the one-program `static` prefill with the capacities the bucketed run chose
    (`counted_sparse`: the same stage shapes).
    """

    def __init__(self, params: dict, wl: Workload, sparse: SparseConfig, batch_host: Batch):
        self.params, self.wl, self.sparse, self.batch_host = params, wl, sparse, batch_host
        self.batch = jax.device_put(batch_host)
        self.compile_s: dict[str, float] = {}
        self.bucketed = sparse.enabled and sparse.capacity == "bucketed"
        self.capacity: CapacityInfo | None = None
        self.counted_sparse = sparse
        self.prefill_c: Any = None
        if self.bucketed:
            before = compiled_programs()["prefill_stages"]
            t0 = time.perf_counter()
            logits, cache, stats, self.capacity = self._dispatch(self.batch)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            self._dispatch(self.batch)
            steady = time.perf_counter() - t0
            self.compile_s.update(
                prefill_lower=0.0,
                prefill_compile=max(first - steady, 0.0),
                prefill_first_call=first,
                prefill_stage_programs=compiled_programs()["prefill_stages"] - before,
            )
            self.counted_sparse = sparse.replace(
                capacity="static",
                capacities=self.capacity.capacities,
                recycled_capacities=self.capacity.recycled_capacities,
            )
        else:
            t0 = time.perf_counter()
            lowered = prefill_jit.lower(params, self.batch, wl.cfg, sparse, wl.max_new_tokens)
            t1 = time.perf_counter()
            self.prefill_c = lowered.compile()
            self.compile_s.update(prefill_lower=t1 - t0, prefill_compile=time.perf_counter() - t1)
            logits, cache, stats = self.prefill_c(params, self.batch)
            jax.block_until_ready(logits)
        self.all_stats = {k: np.asarray(v) for k, v in stats.items()}
        self.stats = {k: v[0] for k, v in self.all_stats.items()}
        self.kv = kv_report(cache, sparse, wl.cfg, wl.max_new_tokens)
        self.kv["nbytes"] = cache.nbytes()
        self.first_token = np.asarray(first_token_jit(logits))
        self.last_logits = np.asarray(logits[0], np.float32)  # example 0's last prompt token
        tok = first_token_jit(logits)
        t0 = time.perf_counter()
        lowered = greedy_step_jit.lower(params, wl.cfg, cache, tok)
        t1 = time.perf_counter()
        self.step_c = lowered.compile()
        self.compile_s.update(decode_lower=t1 - t0, decode_compile=time.perf_counter() - t1)
        self.memory = {
            "prefill": None if self.bucketed else memory_analysis(self.prefill_c),
            "decode_step": memory_analysis(self.step_c),
        }
        self.cache, self.tok, self.steps = cache, tok, 0

    def _dispatch(self, batch: Batch) -> tuple[Any, ...]:
        out = dispatch_prefill(self.params, batch, self.wl.cfg, self.sparse, self.wl.max_new_tokens)
        jax.block_until_ready(out[0])
        return out

    def _run(self, batch: Batch) -> Any:
        """The prefill's logits, ready."""
        if self.bucketed:
            return self._dispatch(batch)[0]
        out = self.prefill_c(self.params, batch)
        jax.block_until_ready(out)
        return out[0]

    def prefill(self) -> None:
        self._run(self.batch)

    def ttft(self) -> int:
        """Host inputs to the first generated token id on the host."""
        logits = self._run(jax.device_put(self.batch_host))
        return int(np.asarray(first_token_jit(logits))[0])

    def decode(self) -> None:
        if self.steps >= self.wl.max_new_tokens - 1:
            raise RuntimeError("decode timing ran out of cache slots; raise --max-new-tokens")
        self.tok, self.cache = self.step_c(self.params, self.cache, self.tok)
        self.tok.block_until_ready()
        self.steps += 1

    def visual_valid(self) -> list[int] | list[list[int]] | None:
        """Valid visual tokens each layer processed (from the prefill statistics); per
        example ([B][L]) on families with per-example visual counts."""
        if "tokens_per_layer" not in self.stats:
            return None
        other = self.wl.prompt_tokens
        if self.wl.variable:
            rows = np.asarray(self.all_stats["tokens_per_layer"])[: self.wl.batch]
            return [[int(t) - other for t in row] for row in rows]
        return [int(t) - other for t in self.stats["tokens_per_layer"]]

    def pruning_stats(self) -> dict[str, Any]:
        keys = ("rank", "budget", "num_kept", "recycled", "overflow", "recycled_overflow")
        return {k: self.stats[k].tolist() for k in keys if k in self.stats}


def attach_timings(entries: list[dict[str, Any]], timings: dict[str, Timings]) -> None:
    """Moves the timing summaries into each entry's jax / torch sections."""
    for e in entries:
        for what, runs in timings.items():
            for name, times in runs.items():
                impl, label = name.split("/", 1)
                if label != e["label"]:
                    continue
                section = e["jax"] if impl == "jax" else e["torch"].setdefault(impl, {})
                section[what] = summarize(times)


def _median(section: dict[str, Any], what: str) -> float | None:
    return section.get(what, {}).get("median_ms")


def add_latency_ratios(entries: list[dict[str, Any]]) -> None:
    """Sparse/dense latency ratios, their gap to the FLOPs ratio, JAX vs PyTorch speedups."""
    dense = _median(entries[0]["jax"], "prefill")
    for e in entries:
        jax_ms = _median(e["jax"], "prefill")
        ratios: dict[str, Any] = {}
        if dense and jax_ms:
            ratios["prefill_latency_ratio"] = jax_ms / dense
            for kind in ("xla_total", "ideal_valid"):
                f = e["flops_ratio"][kind]
                if f is not None:
                    ratios[f"latency_vs_{kind}_flops"] = jax_ms / dense / f - 1.0
        for impl in ("torch", "torch_matched"):
            t = e["torch"].get(impl, {})
            for what in ("prefill", "decode_step", "ttft"):
                a, b = _median(t, what), _median(e["jax"], what)
                if a and b:
                    ratios[f"{impl}_over_jax_{what}"] = a / b
        e["ratios"] = ratios


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


OPENBLAS_SETTERS = (
    "openblas_set_num_threads",
    "scipy_openblas_set_num_threads",
    "scipy_openblas_set_num_threads64_",
)


ENVIRONMENT = {
    # JAX and torch share one GPU: no preallocation of 75% of its memory by JAX.
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    # torch's OpenMP workers spin-wait by default; next to XLA's thread pool on a loaded
    # machine a decode step then stalls for seconds. Read when torch loads.
    "OMP_WAIT_POLICY": "PASSIVE",
    # JAX's CPU LAPACK calls (v1's SVD) run in scipy's OpenBLAS, whose worker threads spin next
    # to XLA's: on a loaded 2-core machine a 64x309 SVD takes 260 ms instead of 0.5 ms. One
    # thread suits these small matrices (`limit_blas_threads` also fixes already-loaded ones).
    "OPENBLAS_NUM_THREADS": "1",
}


def prepare_environment() -> dict[str, Any]:
    """Sets `ENVIRONMENT`'s variables not set by the user (before JAX's backend and torch
    start, where possible); returns what the report records about it."""
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    return {
        **{key: os.environ[key] for key in ENVIRONMENT},
        "torch_imported_before": "torch" in sys.modules,
    }


def limit_blas_threads(n: int) -> list[str]:
    """Sets the thread count of every OpenBLAS already loaded in this process (scipy's, which
    JAX's CPU LAPACK kernels use); the environment variable covers later loads. Returns the
    libraries changed. Best effort: Linux only."""
    import ctypes

    os.environ["OPENBLAS_NUM_THREADS"] = str(n)
    changed = []
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return changed
    libs = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in OPENBLAS_SETTERS:
            fn = getattr(handle, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                changed.append(f"{Path(lib).name}:{sym}")
                break
    return changed


def hardware_info(torch_device: str | None) -> dict[str, Any]:
    """CPU, cores, library versions and the accelerator, for the JSON header."""
    import jaxlib

    dev = jax.devices()[0]
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "load_average_start": list(os.getloadavg()),
        "environment": {k: os.environ.get(k) for k in ENVIRONMENT},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(),
        "jax_device_kind": dev.device_kind,
        "jax_device_count": jax.device_count(),
    }
    try:
        import torch
        import transformers
    except ImportError:
        return info
    info.update(torch=torch.__version__, transformers=transformers.__version__)
    info["torch_device"] = torch_device
    info["torch_threads"] = torch.get_num_threads()
    if torch_device and torch_device.startswith("cuda"):
        info["torch_device_name"] = torch.cuda.get_device_name()
    return info


def device_slug() -> str:
    return {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "cpu")
