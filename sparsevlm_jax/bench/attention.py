"""The prefill attention alone: its implementations on this device, timed and compared.

`attention_probe` runs one causal self-attention of a model's shape (one sequence of the
benchmark's length, some invalid slots) three ways — the masked softmax over every key
(`llama.causal_mask`), the block-skipping `llama.causal_attend` the prefill uses, and on a GPU
cuDNN's fused kernel (`llama.cudnn_causal_attend`) — and reports the time of each and their
largest difference on the valid rows. A driver about to measure on a GPU calls it first: if
cuDNN fails there or disagrees, `choose_attention` sets `SPARSEVLM_ATTENTION=xla` so the
benchmark runs on the XLA attention instead of failing.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax.config import TextConfig
from sparsevlm_jax.model import llama

# Largest |difference| to the XLA attention on valid rows accepted from cuDNN, per dtype
# (outputs are O(1): values are unit normal).
TOLERANCE = {"bfloat16": 0.05, "float16": 0.01, "float32": 1e-4}


def _time_ms(fn: Callable[[], Any], repeat: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def attention_probe(
    text: TextConfig, length: int, dtype: str, repeat: int = 20, seed: int = 0
) -> dict[str, Any]:
    """Times and compares the prefill attention implementations for one [1, length] sequence
    with the heads of `text`, in `dtype`. Never raises for an implementation that fails: its
    error is reported instead."""
    rng = np.random.default_rng(seed)
    n, k, h = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    dt = jnp.dtype(dtype)
    q = jnp.asarray(rng.normal(size=(1, length, n, h)), dt)
    kk = jnp.asarray(rng.normal(size=(1, length, k, h)), dt)
    v = jnp.asarray(rng.normal(size=(1, length, k, h)), dt)
    valid_np = np.ones((1, length), bool)
    valid_np[:, : min(13, length // 4)] = False  # left padding of a prefix bucket
    valid = jnp.asarray(valid_np)
    ends = llama.query_block_ends(length)
    impls: dict[str, Callable[..., Any]] = {
        "xla_full_mask": lambda q, k, v, m: llama.attend(q, k, v, llama.causal_mask(m)),
        "xla_blocks": lambda q, k, v, m: llama.attend(q, k, v, llama.CausalMask(m, ends)),
    }
    if jax.default_backend() == "gpu":
        impls["cudnn"] = llama.cudnn_causal_attend
    out: dict[str, Any] = {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "shape": [1, length, n, k, h],
        "dtype": dtype,
        "query_block_ends": list(ends),
        "ms": {},
        "max_abs_diff_vs_xla_full_mask": {},
        "errors": {},
    }
    ref = None
    for name, fn in impls.items():
        try:
            f = jax.jit(fn)
            res = np.asarray(f(q, kk, v, valid).astype(jnp.float32))[valid_np]
            out["ms"][name] = _time_ms(lambda f=f: f(q, kk, v, valid), repeat)
        except Exception as e:  # noqa: BLE001 - reported, the caller decides
            out["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            continue
        if ref is None:
            ref = res
        out["max_abs_diff_vs_xla_full_mask"][name] = float(np.max(np.abs(res - ref)))
    return out


def cudnn_usable(probe: dict[str, Any]) -> bool:
    """cuDNN ran and agreed with the XLA attention within `TOLERANCE`."""
    diff = probe["max_abs_diff_vs_xla_full_mask"].get("cudnn")
    return diff is not None and diff <= TOLERANCE.get(probe["dtype"], 0.05)


def choose_attention(probe: dict[str, Any]) -> str:
    """Sets `SPARSEVLM_ATTENTION` for the rest of the process from a probe (unless the user
    set it): "xla" where cuDNN was tried and failed or disagreed; returns the choice."""
    if "SPARSEVLM_ATTENTION" in os.environ:
        return os.environ["SPARSEVLM_ATTENTION"]
    if "cudnn" in probe["ms"] or "cudnn" in probe["errors"]:
        choice = "auto" if cudnn_usable(probe) else "xla"
    else:
        choice = "auto"
    os.environ["SPARSEVLM_ATTENTION"] = choice
    return choice
