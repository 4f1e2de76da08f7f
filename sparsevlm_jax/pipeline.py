"""The user-facing API: load a model, answer questions about images, report statistics.

import sparsevlm_jax as sv
pipe = sv.load("llava-1.5-7b-jax")                  # converted or transformers dir
out = pipe.generate(["cat.jpg"], ["What is this?"], sparse=sv.SparseConfig.v1(192))
print(out[0].text, out[0].stats["equivalent_tokens"])
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np

from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.generate import Generation, generate_ids, strip_eos
from sparsevlm_jax.processing import Processor
from sparsevlm_jax.sparse.config import SparseConfig
from sparsevlm_jax.sparse.prune import analytic_flops

ImageLike = Any  # a path or a PIL image


@dataclass
class Result:
    """One answer: text, generated token ids (EOS stripped) and per-example statistics."""

    text: str
    token_ids: list[int]
    stats: dict[str, Any] = field(default_factory=dict)


def kv_cache_bytes(cfg: LlavaConfig, tokens_per_layer: np.ndarray, extra: int) -> int:
    """Bytes of K and V for one example whose layer j caches tokens_per_layer[j] + extra."""
    t = cfg.text
    per_token = 2 * t.num_key_value_heads * t.head_dim * jnp.dtype(cfg.dtype).itemsize
    return int(per_token * np.sum(np.asarray(tokens_per_layer) + extra))


def example_stats(
    cfg: LlavaConfig, sparse: SparseConfig, gen: Generation, i: int, max_new_tokens: int
) -> dict[str, Any]:
    """JSON-friendly statistics of example i (SPEC §6/§8 numbers for sparse runs)."""
    out: dict[str, Any] = {
        "prefill_seconds": gen.timings.get("prefill"),
        "decode_seconds": gen.timings.get("decode"),
    }
    if not sparse.enabled:
        return out
    s = {k: v[i] for k, v in gen.stats.items()}
    flops = analytic_flops({k: v[i : i + 1] for k, v in gen.stats.items()}, cfg)
    dense_layers = np.full(cfg.text.num_hidden_layers, int(s["dense_tokens"]))
    out.update(
        method=sparse.name,
        pruning_layers=list(sparse.layers),
        capacity=gen.capacity.to_dict() if gen.capacity is not None else None,
        raters=np.flatnonzero(s["raters"]).tolist(),
        visual_tokens=int(s["visual_tokens"]),
        layers=[
            {
                "layer": layer,
                "rank": int(s["rank"][j]) if sparse.method == "v1" else None,
                "budget": int(s["budget"][j]),
                "kept": [int(x) for x in s["kept"][j] if x >= 0],
                "recycled": int(s["recycled"][j]),
                "overflow": int(s["overflow"][j]),
                "recycled_overflow": int(s["recycled_overflow"][j]),
            }
            for j, layer in enumerate(sparse.layers)
        ],
        visual_counts=s["visual_counts"].tolist(),
        equivalent_tokens=float(s["equivalent_tokens"]),
        flops=float(flops["flops"][0]),
        dense_flops=float(flops["dense_flops"][0]),
        kv_cache_bytes=kv_cache_bytes(cfg, s["tokens_per_layer"], max_new_tokens),
        dense_kv_cache_bytes=kv_cache_bytes(cfg, dense_layers, max_new_tokens),
    )
    return out


class LlavaPipeline:
    """Params + config + processor, and `generate` over lists of images and questions."""

    def __init__(self, params: dict, cfg: LlavaConfig, processor: Processor):
        self.params, self.cfg, self.processor = params, cfg, processor

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: str | None = None,
        compute_dtype: str | None = None,
        clip: str | os.PathLike | None = None,
        mesh: Any = None,
        **processor_overrides: Any,
    ) -> LlavaPipeline:
        """Loads a converted checkpoint or a transformers/original LLaVA directory.

        dtype: weight dtype (None keeps the stored one); compute_dtype defaults to it.
        mesh: a `jax.sharding.Mesh`, a `sharding.MeshShape` or "data=N,model=M": the weights
            are loaded straight into their shards on it (`sharding.param_shardings`), and
            `generate` runs on it; None: one device.
        processor_overrides: e.g. `template="llava_hf"`, `image_mode="crop"`.

        Turns on the persistent compilation cache (`sparsevlm_jax.compile_cache`: later
        processes load the programs this one compiles) unless `compile_cache.enable` was
        called before: call `compile_cache.enable("off")` first to go without.
        """
        from sparsevlm_jax import compile_cache
        from sparsevlm_jax.loading import load_model

        if compile_cache.active() is None:  # the persistent cache, unless set up already
            compile_cache.enable()
        if mesh is not None:
            from sparsevlm_jax.sharding import as_mesh

            mesh = as_mesh(mesh)
        params, cfg = load_model(path, dtype=dtype, clip=clip, mesh=mesh)
        cfg = cfg.replace(param_dtype=dtype or cfg.param_dtype)
        cfg = cfg.replace(dtype=compute_dtype or cfg.param_dtype)
        processor = Processor.from_pretrained(path, cfg, **processor_overrides)
        if mesh is not None:  # every batch must split over data
            data, buckets = int(mesh.shape["data"]), processor.buckets
            batch = tuple(sorted({-(-b // data) * data for b in buckets.batch}))
            processor.buckets = dataclasses.replace(buckets, batch=batch)
        return cls(params, cfg, processor)

    def generate(
        self,
        images: list[ImageLike],
        questions: list[str],
        sparse: SparseConfig = SparseConfig(),
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 8,
    ) -> list[Result]:
        """Answers each question about its image, `batch_size` examples per compiled call."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        eos = tuple(self.cfg.text.eos_token_ids)
        results: list[Result] = []
        for lo in range(0, len(images), batch_size):
            batch, n = self.processor(images[lo : lo + batch_size], questions[lo : lo + batch_size])
            gen = generate_ids(
                self.params,
                self.cfg,
                batch,
                n,
                sparse,
                max_new_tokens,
                temperature,
                top_p,
                seed + lo,
            )
            for i, ids in enumerate(gen.token_ids):
                ids = strip_eos(ids, eos)
                stats = example_stats(self.cfg, sparse, gen, i, max_new_tokens)
                results.append(Result(self.processor.decode(ids), ids, stats))
        return results


def load(path: str | os.PathLike, **kw: Any) -> LlavaPipeline:
    """`LlavaPipeline.from_pretrained`: a converted checkpoint or a transformers directory."""
    return LlavaPipeline.from_pretrained(path, **kw)
