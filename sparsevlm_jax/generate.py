"""Jitted prefill + decode loop, sampling and stop conditions.

Per (bucket, SparseConfig, max_new_tokens): the prefill (one program, or one per stage and
capacity bucket under the `bucketed` policy: `sparsevlm_jax.prefill`), and the decode
loop (a `lax.while_loop` over steps that stops when every row has produced an EOS token or
`max_new_tokens` are out). Temperature and top-p are traced values, so changing them does not
recompile; the cache is donated to the decode loop.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax.batch import Batch
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.model.llava import KVCache, decode_step
from sparsevlm_jax.prefill import CapacityInfo, compiled_programs, prefill, prefill_jit
from sparsevlm_jax.sharding import follow_params_mesh
from sparsevlm_jax.sparse.config import SparseConfig

__all__ = ["Generation", "compile_counts", "decode_jit", "generate_ids", "prefill", "prefill_jit"]

Array = jax.Array
PAD = -1  # token id written after a row has finished


def sample(logits: Array, key: Array, temperature: Array, top_p: Array) -> Array:
    """Next tokens [B] int32 from logits [B, vocab]: greedy when temperature <= 0, else
    temperature sampling restricted to the smallest set of tokens whose probability mass
    reaches top_p (the most likely token is always allowed)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = mass_before < top_p
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    sampled = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


@functools.partial(
    jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_ids"), donate_argnames=("cache",)
)
def decode_jit(
    params: dict,
    cache: KVCache,
    logits: Array,
    key: Array,
    temperature: Array,
    top_p: Array,
    cfg: LlavaConfig,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
) -> tuple[Array, Array, KVCache]:
    """Samples up to max_new_tokens tokens, starting from the prefill's last logits.

    Returns (tokens [B, max_new_tokens] int32, PAD after a row's EOS; num_tokens [B], EOS
    included; the final cache, which reuses the donated one's memory).
    """
    b = logits.shape[0]
    eos = jnp.asarray(eos_ids if eos_ids else (-2,), jnp.int32)

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos[None], axis=-1)

    key, sub = jax.random.split(key)
    tok = sample(logits, sub, temperature, top_p)
    out = jnp.full((b, max_new_tokens), PAD, jnp.int32).at[:, 0].set(tok)
    state = (jnp.int32(1), tok, is_eos(tok), out, cache, key)

    def cond(state):
        i, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, done, out, cache, key = state
        logits, cache = decode_step(params, cfg, cache, tok)
        key, sub = jax.random.split(key)
        nxt = jnp.where(done, PAD, sample(logits, sub, temperature, top_p))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, done | is_eos(nxt), out, cache, key

    _, _, _, out, cache, _ = jax.lax.while_loop(cond, body, state)
    return out, jnp.sum(out != PAD, axis=1), cache


@dataclass
class Generation:
    """What `generate_ids` returns for the real (unpadded) rows of a batch."""

    token_ids: list[list[int]]
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    kv_cache_bytes: int = 0
    capacity: CapacityInfo | None = None


@follow_params_mesh  # params on a mesh (sharding.shard_params): the batch is split over data
def generate_ids(
    params: dict,
    cfg: LlavaConfig,
    batch: Batch,
    num_real: int | None = None,
    sparse: SparseConfig = SparseConfig(),
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: tuple[int, ...] | None = None,
) -> Generation:
    """Prefill + decode for one bucketed batch; token lists stop at (and include) EOS.

    Timings (seconds, wall clock, after `block_until_ready`): `prefill` and `decode`; they
    include compilation on the first call of a bucket.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sparse.validate_for(cfg.text.num_hidden_layers)
    if cfg.text.sliding_window is not None:  # never a silent difference from windowed attention
        longest = int(np.max(batch.prompt_lengths(cfg.num_image_tokens)))
        cfg.text.check_window(longest + max_new_tokens, "the prompt with its answer")
    eos = tuple(cfg.text.eos_token_ids if eos_ids is None else eos_ids)
    n = batch.prefix_ids.shape[0] if num_real is None else num_real
    t0 = time.perf_counter()
    logits, cache, stats, capacity = prefill(params, batch, cfg, sparse, max_new_tokens)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    kv_bytes = cache.nbytes()
    tokens, counts, _ = decode_jit(
        params,
        cache,
        logits,
        jax.random.PRNGKey(seed),
        jnp.float32(temperature),
        jnp.float32(top_p),
        cfg,
        max_new_tokens,
        eos,
    )
    tokens, counts = np.asarray(tokens), np.asarray(counts)
    t2 = time.perf_counter()
    ids = [tokens[i, : counts[i]].tolist() for i in range(n)]
    host_stats = {k: np.asarray(v)[:n] for k, v in stats.items()}
    timings = {"prefill": t1 - t0, "decode": t2 - t1}
    return Generation(ids, host_stats, timings, kv_bytes, capacity)


def compile_counts() -> dict[str, int]:
    """How many programs the jitted prefill (fused and bucketed stages) and decode hold."""
    return {**compiled_programs(), "decode": decode_jit._cache_size()}


def strip_eos(ids: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos_ids else ids
