"""Validation: answer accuracy per question type and the per-patch heads' accuracy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax import shapes_task as st
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.model.clip import image_features
from sparsevlm_jax.params import Params
from sparsevlm_jax.train.batches import Packed
from sparsevlm_jax.train.forward import packed_forward

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("cfg",))
def patch_accuracy(aux: Params, params: Params, cfg: LlavaConfig, batch: dict[str, Array]) -> Array:
    """[2]: accuracy of the patch colour and patch shape heads on object patches."""
    feats = image_features(params, cfg, batch["pixel_values"]).astype(jnp.float32)
    labels = batch["patch_labels"]
    obj = labels[..., 0] > 0
    out = []
    for i in (0, 1):
        pred = jnp.argmax(feats @ aux[f"head{i}"]["kernel"] + aux[f"head{i}"]["bias"], -1)
        out.append(jnp.sum((pred == labels[..., i]) & obj) / jnp.maximum(jnp.sum(obj), 1))
    return jnp.stack(out)


@functools.partial(jax.jit, static_argnames=("cfg",))
def predict(params: Params, cfg: LlavaConfig, batch: dict[str, Array]) -> Array:
    """[B, Q] greedy first answer token of every question block."""
    logits, _ = packed_forward(params, cfg, batch)
    first = jnp.argmax(batch["targets"] >= 0, axis=-1)  # the slot predicting the answer
    at = jnp.take_along_axis(logits, first[..., None, None], axis=2)[:, :, 0]
    return jnp.argmax(at, axis=-1)


def validate(params: Params, cfg: LlavaConfig, val: list[Packed]) -> dict[str, float]:
    """Answer accuracy per question type and overall on the validation batches."""
    correct = np.zeros(len(st.CATEGORIES))
    total = np.zeros(len(st.CATEGORIES))
    for pb in val:
        pred = np.asarray(predict(params, cfg, pb.device()))
        ok = pred == pb.answer_ids
        for c in range(len(st.CATEGORIES)):
            correct[c] += ok[pb.category == c].sum()
            total[c] += (pb.category == c).sum()
    out = {f"val_{c}": float(correct[i] / max(total[i], 1)) for i, c in enumerate(st.CATEGORIES)}
    out["val_overall"] = float(correct.sum() / max(total.sum(), 1))
    return out
