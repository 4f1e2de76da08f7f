"""The optimizer (AdamW, warmup + cosine, clipping) and the jitted update steps of both
phases, on the train state {"params", "aux", "opt_state"} that checkpoints hold."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.train.config import TrainConfig
from sparsevlm_jax.train.losses import loss_fn, vision_loss_fn

Array = jax.Array


def make_optimizer(tc: TrainConfig, phase: str = "joint") -> optax.GradientTransformation:
    """AdamW (decay on matrices only), warmup + cosine schedule, global-norm clipping.

    phase "vision": steps 0..vision_steps at vision_lr; "joint": the remaining steps at lr.
    Both have the same state structure, so one checkpoint layout serves both phases.
    """
    if phase == "vision":
        lr, warmup, steps = tc.vision_lr, tc.vision_warmup, tc.vision_steps
    else:
        lr, warmup, steps = tc.lr, tc.warmup, tc.steps - tc.vision_steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, max(warmup, 1), max(steps, warmup + 1), end_value=lr * 0.02
    )

    def decay_mask(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x.ndim >= 2 and "norm" not in jax.tree_util.keystr(path), tree
        )

    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=tc.weight_decay, mask=decay_mask),
    )


@functools.partial(
    jax.jit, static_argnames=("cfg", "opt", "aux_weight", "attn_weight"), donate_argnums=(0,)
)
def train_step(
    state: dict[str, Any],
    batch: dict[str, Array],
    cfg: LlavaConfig,
    opt: optax.GradientTransformation,
    aux_weight: float,
    attn_weight: float = 0.0,
) -> tuple[dict[str, Any], dict[str, Array]]:
    """One AdamW step on state {"params", "aux", "opt_state"}; returns (state, metrics)."""
    trainable = {"params": state["params"], "aux": state["aux"]}
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, cfg, batch, aux_weight, attn_weight
    )
    updates, opt_state = opt.update(grads, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return {**trainable, "opt_state": opt_state}, metrics


@functools.partial(jax.jit, static_argnames=("cfg", "opt"), donate_argnums=(0,))
def vision_step(
    state: dict[str, Any],
    batch: dict[str, Array],
    cfg: LlavaConfig,
    opt: optax.GradientTransformation,
) -> tuple[dict[str, Any], dict[str, Array]]:
    """One AdamW step of phase 1 (decoder untouched: its gradients are zero)."""
    trainable = {"params": state["params"], "aux": state["aux"]}
    (_, metrics), grads = jax.value_and_grad(vision_loss_fn, has_aux=True)(trainable, cfg, batch)
    updates, opt_state = opt.update(grads, state["opt_state"], trainable)
    # The decoder is not trained here: no weight decay either.
    updates["params"]["text"] = jax.tree.map(jnp.zeros_like, updates["params"]["text"])
    trainable = optax.apply_updates(trainable, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return {**trainable, "opt_state": opt_state}, metrics
