"""The training losses: answer + EOS cross-entropy, the per-patch auxiliary heads (not shipped),
the supervised attention of head 0 and the answer at the question's key word; phase 1's
vision-only loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax import shapes_task as st
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.model.clip import image_features
from sparsevlm_jax.params import Params
from sparsevlm_jax.train.forward import packed_forward

Array = jax.Array
NUM_AUX_COLORS = len(st.COLOR_NAMES) + 1  # 0 = nothing
NUM_AUX_SHAPES = len(st.SHAPES) + 1
# Weights of the per-patch heads (patch colour, patch shape, cell colour, cell shape). In task
# v2 every object is one patch, so the cell heads are not needed (kept for the label layout).
AUX_HEAD_WEIGHTS = (1.0, 1.0, 0.0, 0.0)
# Per-patch loss weight of background patches (object patches: 1). Unweighted, the ~250
# background patches of an image dominate and shape stays near chance.
BACKGROUND_WEIGHT = 0.1


def init_aux(cfg: LlavaConfig, seed: int) -> Params:
    """The auxiliary per-patch heads (not shipped): [D, 7] colour and [D, 5] shape, twice."""
    rng = np.random.default_rng(seed + 1)
    d = cfg.text.hidden_size
    sizes = [NUM_AUX_COLORS, NUM_AUX_SHAPES, NUM_AUX_COLORS, NUM_AUX_SHAPES]
    return {
        f"head{i}": {
            "kernel": jnp.asarray(rng.normal(0, 0.02, (d, n)), jnp.float32),
            "bias": jnp.zeros((n,), jnp.float32),
        }
        for i, n in enumerate(sizes)
    }


def cross_entropy(logits: Array, labels: Array, weight: Array) -> Array:
    """Mean of softmax cross-entropy over entries with weight (labels clipped to >= 0)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def loss_fn(
    trainable: dict[str, Params],
    cfg: LlavaConfig,
    batch: dict[str, Array],
    aux_weight: float,
    attn_weight: float,
) -> tuple[Array, dict[str, Array]]:
    """Answer + EOS cross-entropy, plus `aux_weight` times the per-patch auxiliary loss, plus
    `attn_weight` times the cross-entropy of the supervised attention head."""
    logits, feats, answer_logp, word_logp = packed_forward(
        trainable["params"], cfg, batch, with_attn=True
    )
    t, tw = batch["attn_targets"], batch["word_targets"]
    attn = -jnp.sum(t * answer_logp) / jnp.maximum(jnp.sum(t), 1.0)
    attn = attn - jnp.sum(tw * word_logp) / jnp.maximum(jnp.sum(tw), 1.0)
    keys = batch["key_targets"]
    key = cross_entropy(logits, keys, (keys >= 0).astype(jnp.float32))
    targets = batch["targets"]
    main = cross_entropy(logits, targets, (targets >= 0).astype(jnp.float32))
    aux, weighted = patch_losses(trainable["aux"], feats, batch["patch_labels"])
    total = main + aux_weight * weighted + attn_weight * attn + aux_weight * key
    return total, {"loss": main, "aux_loss": aux, "attn_loss": attn, "key_loss": key}


def patch_losses(aux: Params, feats: Array, labels: Array) -> tuple[Array, Array]:
    """(mean per-head CE, AUX_HEAD_WEIGHTS-weighted sum) of the per-patch heads.

    feats [B,Np,D] projected image features; labels [B,Np,4]. Background patches weigh
    BACKGROUND_WEIGHT, object patches 1.
    """
    feats32 = feats.astype(jnp.float32)
    weight = jnp.where(labels[..., 0] > 0, 1.0, BACKGROUND_WEIGHT)
    plain, weighted = 0.0, 0.0
    for i, w in enumerate(AUX_HEAD_WEIGHTS):
        head = aux[f"head{i}"]
        ce = cross_entropy(feats32 @ head["kernel"] + head["bias"], labels[..., i], weight)
        plain, weighted = plain + ce / len(AUX_HEAD_WEIGHTS), weighted + w * ce
    return plain, weighted


def vision_loss_fn(
    trainable: dict[str, Params], cfg: LlavaConfig, batch: dict[str, Array]
) -> tuple[Array, dict[str, Array]]:
    """Phase 1: the vision tower and projector alone, on the per-patch heads."""
    feats = image_features(trainable["params"], cfg, batch["pixel_values"])
    aux, weighted = patch_losses(trainable["aux"], feats, batch["patch_labels"])
    return weighted, {"aux_loss": aux}
