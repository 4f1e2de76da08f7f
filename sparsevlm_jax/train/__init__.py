"""Trains the demo LLaVA (the project's own architecture) from scratch on the shapes task.

    python -m sparsevlm_jax.train --out DIR [--steps N] [--resume] [--preset demo|tiny]

Recipe (see benchmarks/train_logs/README.md for what was tried):
  * Prefix sharing: each image is asked `questions_per_image` questions in ONE packed sequence
    `[system prompt + USER: | image | q1 a1 </s> | q2 a2 </s> | ...]`; every question block
    attends to the shared prefix + image and causally to itself only, with positions restarting
    after the image, so each block computes exactly what the lone prompt would (checked by
    tests/test_train.py against `prefill`). The image and the long template run once per image.
  * Loss: cross-entropy on the answer word and the EOS after it, plus auxiliary losses whose
    heads are not shipped: per-patch linear heads on the projected image features (colour /
    shape of the object under the patch and in the patch's grid cell), supervision of decoder
    head 0's attention (layer 0: from the question's colour / shape words to the objects with
    that colour / shape; layer `attn_layer`: from the answer slot to the objects asked about),
    and the answer predicted at the question's last colour / shape word.
  * AdamW with linear warmup and cosine decay, global-norm clipping; seeded data, orbax
    checkpoints every `--save-every` steps that `--resume` continues from.

Outputs in DIR: `ckpt/` (train state), `model/` (the latest model in our checkpoint format,
with tokenizer) and `best/` (best validation accuracy so far), `train_config.json`; the
learning curve goes to `--log-dir` as `<name>.jsonl` and `<name>.png`.
"""

# Modules, from the bottom up:
#   config      TrainConfig (what determines a run) and the model presets
#   batches     packed batches: one image, its questions as blocks, targets and labels
#   forward     the packed forward pass (and head 0's attention for its supervision)
#   losses      answer, per-patch and attention losses; the auxiliary heads
#   steps       the optimizer and the jitted update steps of both phases
#   validation  answer and per-patch accuracy on the validation batches
#   curves      the learning-curve PNG
#   loop        the training loop: init / resume, checkpoints, exported models, logs
#   cli         `python -m sparsevlm_jax.train` (see __main__)

from sparsevlm_jax.train.batches import (
    BLOCK_LEN,
    Packed,
    attention_target,
    encode_cached,
    make_packed,
    normalise,
    patch_labels,
    patch_objects,
    relevant_objects,
    train_batch,
    train_categories,
    word_targets,
)
from sparsevlm_jax.train.cli import main
from sparsevlm_jax.train.config import TrainConfig, model_config
from sparsevlm_jax.train.curves import draw_curve
from sparsevlm_jax.train.forward import attn_layer, packed_forward, packed_mask, slot_logp
from sparsevlm_jax.train.loop import export_model, restore_or_init, save_tokenizer, train
from sparsevlm_jax.train.losses import (
    AUX_HEAD_WEIGHTS,
    BACKGROUND_WEIGHT,
    NUM_AUX_COLORS,
    NUM_AUX_SHAPES,
    cross_entropy,
    init_aux,
    loss_fn,
    patch_losses,
    vision_loss_fn,
)
from sparsevlm_jax.train.steps import make_optimizer, train_step, vision_step
from sparsevlm_jax.train.validation import patch_accuracy, predict, validate

__all__ = [
    "AUX_HEAD_WEIGHTS",
    "BACKGROUND_WEIGHT",
    "BLOCK_LEN",
    "NUM_AUX_COLORS",
    "NUM_AUX_SHAPES",
    "Packed",
    "TrainConfig",
    "attention_target",
    "attn_layer",
    "cross_entropy",
    "draw_curve",
    "encode_cached",
    "export_model",
    "init_aux",
    "loss_fn",
    "main",
    "make_optimizer",
    "make_packed",
    "model_config",
    "normalise",
    "packed_forward",
    "packed_mask",
    "patch_accuracy",
    "patch_labels",
    "patch_losses",
    "patch_objects",
    "predict",
    "relevant_objects",
    "restore_or_init",
    "save_tokenizer",
    "slot_logp",
    "train",
    "train_batch",
    "train_categories",
    "train_step",
    "validate",
    "vision_loss_fn",
    "vision_step",
    "word_targets",
]
