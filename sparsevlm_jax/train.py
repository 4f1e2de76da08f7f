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

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsevlm_jax import shapes_task as st
from sparsevlm_jax.config import LlavaConfig, TextConfig, VisionConfig
from sparsevlm_jax.model import llama
from sparsevlm_jax.model.clip import image_features
from sparsevlm_jax.params import Params, init_params
from sparsevlm_jax.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Processor

Array = jax.Array
BLOCK_LEN = 12  # slots per question block: longest question text + answer + EOS is 11
NUM_AUX_COLORS = len(st.COLOR_NAMES) + 1  # 0 = nothing
NUM_AUX_SHAPES = len(st.SHAPES) + 1
# Weights of the per-patch heads (patch colour, patch shape, cell colour, cell shape). In task
# v2 every object is one patch, so the cell heads are not needed (kept for the label layout).
AUX_HEAD_WEIGHTS = (1.0, 1.0, 0.0, 0.0)
# Per-patch loss weight of background patches (object patches: 1). Unweighted, the ~250
# background patches of an image dominate and shape stays near chance.
BACKGROUND_WEIGHT = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (saved beside its checkpoints)."""

    preset: str = "demo"
    steps: int = 1000
    images_per_batch: int = 8
    questions_per_image: int = 16
    lr: float = 1.5e-3
    warmup: int = 60
    vision_steps: int = 0
    vision_lr: float = 2e-3
    vision_warmup: int = 100
    weight_decay: float = 0.05
    aux_weight: float = 1.0
    attn_weight: float = 0.5
    seed: int = 0
    save_every: int = 50
    eval_every: int = 50
    val_images: int = 128

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


# ----------------------------------------------------------------------------------------------
# Model config and tokenizer


def model_config(preset: str, tokenizer: Any) -> LlavaConfig:
    """The LlavaConfig of a preset ("demo": the shipped model, "tiny": for tests)."""
    vocab = int(math.ceil(len(tokenizer) / 8) * 8)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_id = tokenizer.convert_tokens_to_ids(st.IMAGE_TOKEN)
    if preset == "demo":
        vision = VisionConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=14,
        )
        text = TextConfig(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=32,
            max_position_embeddings=512,
            **ids,
        )
    elif preset == "tiny":
        vision = VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        )
        text = TextConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            **ids,
        )
    else:
        raise ValueError(f"unknown preset {preset!r} (demo, tiny)")
    return LlavaConfig(
        vision=vision, text=text, image_token_index=image_id, vision_feature_layer=-1
    )


# ----------------------------------------------------------------------------------------------
# Packed batches


@dataclass
class Packed:
    """Numpy arrays of one packed batch (B images, Q question blocks of BLOCK_LEN slots).

    pixel_values [B,H,W,3] f32; prefix_ids [P] (shared by all rows); block_ids, block_valid,
    targets [B,Q,BLOCK_LEN] (targets -1 where no loss); answer_ids, category [B,Q];
    patch_labels [B,Np,4] int32 (patch colour, patch shape, cell colour, cell shape);
    attn_targets [B,Q,1+Np] float32: where the answer slot should look (a distribution over
    the BOS sink and the patches of the objects matching the question);
    word_slots [B,Q,2] int32: block offsets of the question's colour / shape words and
    word_targets [B,Q,2,Np]: the patches of the objects with that colour / shape;
    key_targets [B,Q,BLOCK_LEN]: the answer at the question's last colour / shape word (an
    auxiliary target: the model answers where the information first meets), -1 elsewhere.
    """

    pixel_values: np.ndarray
    prefix_ids: np.ndarray
    block_ids: np.ndarray
    block_valid: np.ndarray
    targets: np.ndarray
    answer_ids: np.ndarray
    category: np.ndarray
    patch_labels: np.ndarray
    attn_targets: np.ndarray
    word_slots: np.ndarray
    word_targets: np.ndarray
    key_targets: np.ndarray

    def device(self) -> dict[str, Array]:
        return {k: jnp.asarray(v) for k, v in dataclasses.asdict(self).items()}


def normalise(image: np.ndarray) -> np.ndarray:
    """uint8 [S,S,3] -> CLIP-normalised float32 (what `Processor` gives for a square image)."""
    mean, std = np.asarray(OPENAI_CLIP_MEAN), np.asarray(OPENAI_CLIP_STD)
    return ((image / 255.0 - mean) / std).astype(np.float32)


def patch_objects(index_map: np.ndarray, patch: int) -> np.ndarray:
    """[Np]: 1 + index of the object drawn in each patch, 0 for background.

    In task v2 every object lies inside one patch, so a patch holds at most one object.
    """
    g = index_map.shape[0] // patch
    blocks = index_map[: g * patch, : g * patch].reshape(g, patch, g, patch).transpose(0, 2, 1, 3)
    return blocks.reshape(g * g, patch * patch).max(axis=1)


def relevant_objects(objs: tuple[st.Obj, ...], q: st.Question) -> list[int]:
    """Indices of the objects matching the whole description in a question (may be empty).

    color: the object of the named shape; shape: the object of the named colour; exists: the
    objects with both the colour and the shape; count: the objects of the shape.
    """
    w = q.text.split()
    if q.category == "color":
        return [i for i, o in enumerate(objs) if o.shape == w[4]]
    if q.category == "shape":
        return [i for i, o in enumerate(objs) if o.color == w[4]]
    if q.category == "exists":
        return [i for i, o in enumerate(objs) if o.color == w[3] and o.shape == w[4]]
    if q.category == "count":
        shape = {v: k for k, v in st.PLURALS.items()}[w[2]]
        return [i for i, o in enumerate(objs) if o.shape == shape]
    return []


def attention_target(objs: tuple[st.Obj, ...], q: st.Question, obj_map: np.ndarray) -> np.ndarray:
    """[1 + Np] uniform distribution over the BOS "sink" (entry 0) and the relevant patches.

    The sink takes the share of one object, so what the head reads is n/(n+1) of the matching
    objects' value: it separates "no match" from "some" (exists) and grows with n (count).
    """
    rel = (np.isin(obj_map - 1, relevant_objects(objs, q)) & (obj_map > 0)).astype(np.float32)
    t = np.concatenate([[1.0], rel])
    return (t / t.sum()).astype(np.float32)


def word_targets(
    objs: tuple[st.Obj, ...], q: st.Question, obj_map: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(slots [2], targets [2, Np]) for the (up to two) colour / shape words of a question.

    Each such word should look at the patches of every object with that colour / shape; a
    word naming nothing in the image (or a missing word) gets an all-zero target.
    """
    plural = {v: k for k, v in st.PLURALS.items()}
    slots = np.zeros(2, np.int32)
    targets = np.zeros((2, obj_map.shape[0]), np.float32)
    k = 0
    for i, w in enumerate(q.text.split()):
        w = plural.get(w, w)
        if k < 2 and (w in st.COLORS or w in st.SHAPES):
            rel = [j for j, o in enumerate(objs) if w in (o.color, o.shape)]
            mask = np.isin(obj_map - 1, rel) & (obj_map > 0)
            slots[k], targets[k] = i, mask / max(mask.sum(), 1)
            k += 1
    return slots, targets


def patch_labels(ex: st.Example, index_map: np.ndarray, patch: int) -> np.ndarray:
    """[Np, 4]: colour / shape of the object covering >= 30% of each patch, and of its cell."""
    g = index_map.shape[0] // patch
    col = np.array([0] + [st.COLOR_NAMES.index(o.color) + 1 for o in ex.objects])
    shp = np.array([0] + [st.SHAPES.index(o.shape) + 1 for o in ex.objects])
    obj = patch_objects(index_map, patch)
    cell_obj = np.zeros(st.GRID * st.GRID, np.int64)
    for i, o in enumerate(ex.objects):
        cell_obj[o.cell] = i + 1
    rows, cols = np.divmod(np.arange(g * g), g)
    cells = (rows * st.GRID // g) * st.GRID + cols * st.GRID // g
    cobj = cell_obj[cells]
    return np.stack([col[obj], shp[obj], col[cobj], shp[cobj]], axis=1).astype(np.int32)


def encode_cached(processor: Processor, question: str) -> tuple[list[int], list[int]]:
    """`processor.encode`, memoised per processor: the task has a few hundred distinct
    questions, and tokenising them again was a third of the time spent building a batch."""
    cache = processor.__dict__.setdefault("_encode_cache", {})
    if question not in cache:
        cache[question] = processor.encode(question)
    return cache[question]


def make_packed(
    processor: Processor,
    split: str,
    indices: list[int],
    categories: tuple[str, ...],
    cfg: LlavaConfig,
) -> Packed:
    """Packs examples `indices` of `split`, asking `categories` (one block each) per image.

    A category the scene does not allow is replaced by a counting question, so every row has
    exactly len(categories) blocks.
    """
    tok = processor.tokenizer
    size, q = cfg.vision.image_size, len(categories)
    pix, blocks, valid, targets, answers, cats, labels, attn = [], [], [], [], [], [], [], []
    wslots, wtargets, keys = [], [], []
    prefix: list[int] | None = None
    for idx in indices:
        rng = st.rng_for(split, idx)
        objs = st.make_scene(rng, size)
        image, index_map = st.render(objs, rng, size)
        qs = [st.ask(objs, c, rng) or st.ask(objs, "count", rng) for c in categories]
        ex = st.Example(image, objs, tuple(qs))
        pix.append(normalise(image))
        labels.append(patch_labels(ex, index_map, cfg.vision.patch_size))
        obj_map = patch_objects(index_map, cfg.vision.patch_size)
        attn.append(np.stack([attention_target(objs, x, obj_map) for x in ex.questions]))
        words = [word_targets(objs, x, obj_map) for x in ex.questions]
        wslots.append(np.stack([w[0] for w in words]))
        wtargets.append(np.stack([w[1] for w in words]))
        b = np.zeros((q, BLOCK_LEN), np.int32)
        v = np.zeros((q, BLOCK_LEN), bool)
        t = np.full((q, BLOCK_LEN), -1, np.int32)
        a = np.zeros(q, np.int32)
        for j, question in enumerate(ex.questions):
            pre, text = encode_cached(processor, question.text)
            prefix = pre if prefix is None else prefix
            if pre != prefix:
                raise ValueError("the prompt prefix must be the same for every question")
            ans = tok.convert_tokens_to_ids(question.answer)
            ids = [*text, ans, tok.eos_token_id]
            b[j, : len(ids)], v[j, : len(ids)] = ids, True
            t[j, len(text) - 1], t[j, len(text)] = ans, tok.eos_token_id
            a[j] = ans
        kt = np.full((q, BLOCK_LEN), -1, np.int32)
        for j, (slots, _) in enumerate(words):
            kt[j, slots.max()] = a[j]
        keys.append(kt)
        blocks.append(b)
        valid.append(v)
        targets.append(t)
        answers.append(a)
        cats.append([st.CATEGORIES.index(x.category) for x in ex.questions])
    return Packed(
        np.stack(pix),
        np.asarray(prefix, np.int32),
        np.stack(blocks),
        np.stack(valid),
        np.stack(targets),
        np.stack(answers),
        np.asarray(cats, np.int32),
        np.stack(labels),
        np.stack(attn),
        np.stack(wslots),
        np.stack(wtargets),
        np.stack(keys),
    )


def train_categories(n: int, rng: np.random.Generator) -> tuple[str, ...]:
    """n question types for one image: each type n // 4 times, the rest drawn at random."""
    base = [c for c in st.CATEGORIES for _ in range(n // len(st.CATEGORIES))]
    extra = [st.CATEGORIES[int(i)] for i in rng.integers(0, 4, n - len(base))]
    return tuple(base + extra)


def train_batch(processor: Processor, cfg: LlavaConfig, tc: TrainConfig, step: int) -> Packed:
    """The training batch of `step` (a pure function of seed and step, so resume is exact)."""
    rng = np.random.default_rng((tc.seed, step))
    cats = train_categories(tc.questions_per_image, rng)
    start = (step * tc.images_per_batch + tc.seed * 10_000_019) % (2**31 - 1)
    return make_packed(
        processor, "train", list(range(start, start + tc.images_per_batch)), cats, cfg
    )


# ----------------------------------------------------------------------------------------------
# Packed forward and loss


def packed_mask(prefix_len: int, num_image: int, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Static attention structure [L, L] and relative positions [L] of a packed sequence."""
    shared = prefix_len + num_image
    length = shared + q * BLOCK_LEN
    block = np.full(length, -1)
    block[shared:] = np.repeat(np.arange(q), BLOCK_LEN)
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    causal = j <= i
    same = (block[:, None] == block[None, :]) & (block[None, :] >= 0)
    allowed = (block[None, :] < 0) & ((block[:, None] >= 0) | causal)
    allowed |= same & causal
    pos = np.arange(length)
    pos[shared:] = shared + np.tile(np.arange(BLOCK_LEN), q)
    return allowed, pos


def packed_forward(
    params: Params, cfg: LlavaConfig, batch: dict[str, Array], with_attn: bool = False
) -> tuple[Array, Array] | tuple[Array, Array, Array]:
    """(logits [B,Q,BLOCK_LEN,vocab] of the question blocks, image features [B,Np,D]).

    with_attn: also return log attention probabilities of head 0: from each block's answer
    slot at layer `attn_layer(cfg)` to the BOS token and the image patches [B,Q,1+Np], and from
    its word slots at layer 0 to the image patches [B,Q,2,Np].
    """
    tcfg = cfg.text
    feats = image_features(params, cfg, batch["pixel_values"])
    b, nimg, d = feats.shape
    q = batch["block_ids"].shape[1]
    table = params["text"]["embed_tokens"]
    prefix = jnp.take(table, batch["prefix_ids"], axis=0)
    p = prefix.shape[0]
    x = jnp.concatenate(
        [
            jnp.broadcast_to(prefix, (b, p, d)),
            feats,
            jnp.take(table, batch["block_ids"].reshape(b, q * BLOCK_LEN), axis=0),
        ],
        axis=1,
    )
    allowed, pos = packed_mask(p, nimg, q)
    key_valid = jnp.concatenate(
        [jnp.ones((b, p + nimg), bool), batch["block_valid"].reshape(b, q * BLOCK_LEN)], axis=1
    )
    mask = jnp.asarray(allowed)[None] & key_valid[:, None, :]
    # Valid block slots are contiguous from the block start, so relative positions are exact.
    positions = jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (b, x.shape[1]))
    layers = params["text"]["layers"]

    def body(h, i):
        out, _, _, _ = llama.prefill_layer(llama.layer_params(layers, i), tcfg, h, positions, mask)
        return out, None

    if not with_attn:
        x, _ = jax.lax.scan(body, x, jnp.arange(tcfg.num_hidden_layers))
        logits = llama.lm_head(params["text"], tcfg, x[:, p + nimg :])
        return logits.reshape(b, q, BLOCK_LEN, -1), feats
    layer = attn_layer(cfg)
    x, q_w, k_w, _ = llama.prefill_layer(llama.layer_params(layers, 0), tcfg, x, positions, mask)
    x, _ = jax.lax.scan(body, x, jnp.arange(1, layer))
    x, q_a, k_a, _ = llama.prefill_layer(
        llama.layer_params(layers, layer), tcfg, x, positions, mask
    )
    x, _ = jax.lax.scan(body, x, jnp.arange(layer + 1, tcfg.num_hidden_layers))
    logits = llama.lm_head(params["text"], tcfg, x[:, p + nimg :])
    starts = p + nimg + jnp.arange(q)[None] * BLOCK_LEN  # [1,Q]
    first = jnp.argmax(batch["targets"] >= 0, axis=-1)  # [B,Q] the answer slot of each block
    answer = slot_logp(q_a, k_a, mask, starts + first, tcfg.head_dim)
    answer = jnp.concatenate([answer[..., :1], answer[..., p : p + nimg]], axis=-1)
    words = (starts[..., None] + batch["word_slots"]).reshape(b, q * 2)
    words = slot_logp(q_w, k_w, mask, words, tcfg.head_dim)[..., p : p + nimg]
    return logits.reshape(b, q, BLOCK_LEN, -1), feats, answer, words.reshape(b, q, 2, nimg)


def slot_logp(qs: Array, ks: Array, mask: Array, slots: Array, head_dim: int) -> Array:
    """Log attention probabilities [B,S,L] of head 0 from query slots [B,S]."""
    q0 = jnp.take_along_axis(qs[:, :, 0], slots[..., None], axis=1)  # [B,S,H]
    scores = jnp.einsum("bsh,bkh->bsk", q0, ks[:, :, 0], preferred_element_type=jnp.float32)
    row_mask = jnp.take_along_axis(mask, slots[..., None], axis=1)
    scores = jnp.where(row_mask, scores / math.sqrt(head_dim), llama.NEG_INF)
    return jax.nn.log_softmax(scores, axis=-1)


def attn_layer(cfg: LlavaConfig) -> int:
    """The decoder layer whose head 0 is taught where to look (a third of the way up)."""
    return max(cfg.text.num_hidden_layers // 4, 1) if cfg.text.num_hidden_layers > 1 else 0


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


# ----------------------------------------------------------------------------------------------
# Checkpoints, logs, curves


def save_tokenizer(tokenizer: Any, out: Path) -> dict[str, Path]:
    """Saves the tokenizer under out/tokenizer; {file name: path} for `checkpoint.save`."""
    d = out / "tokenizer"
    tokenizer.save_pretrained(d)
    return {p.name: p for p in sorted(d.iterdir()) if p.is_file()}


def export_model(
    params: Params, cfg: LlavaConfig, tokenizer_files: dict[str, Path], dest: Path
) -> Path:
    """Writes the model in our checkpoint format (float32) with the tokenizer files."""
    from sparsevlm_jax.checkpoint import save

    host = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    return save(dest, host, cfg, extra_files=tokenizer_files, overwrite=True)


def draw_curve(records: list[dict[str, Any]], path: Path) -> None:
    """The learning curves as a PNG drawn with matplotlib (the `plots` extra), written
    atomically.

    Left: training losses per step (answer loss of the joint phase, per-patch auxiliary loss
    of both phases; faint raw values, a 50-step running mean on top). Right: validation
    accuracy per question type and overall, and the per-patch colour / shape heads' accuracy
    on object patches (dashed; the vision-only first phase has only these). A dotted line
    marks where the joint phase starts. Without matplotlib one line on stderr says what to
    install and training goes on. Self-contained (no `sparsevlm_jax.bench` import), so a
    plotting problem never stops a training run.
    """
    import os
    import sys
    import tempfile

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(
            f"{path}: matplotlib is not installed, so no plot was drawn: "
            'pip install "sparsevlm-jax[plots]"',
            file=sys.stderr,
        )
        return
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    window = 50
    for i, (key, name) in enumerate((("loss", "answer loss"), ("aux_loss", "per-patch loss"))):
        steps = np.array([r["step"] for r in records if key in r])
        values = np.array([r[key] for r in records if key in r])
        if not len(steps):
            continue
        color = f"C{i}"
        loss_ax.plot(steps, values, color=color, lw=0.8, alpha=0.25)
        if len(values) >= window:
            mean = np.convolve(values, np.ones(window) / window, mode="valid")
            loss_ax.plot(
                steps[window - 1 :], mean, color=color, lw=1.6, label=f"{name} (mean of {window})"
            )
        else:
            loss_ax.plot([], [], color=color, label=name)
    for i, cat in enumerate(("overall", *st.CATEGORIES)):
        pts = [(r["step"], r[f"val_{cat}"]) for r in records if f"val_{cat}" in r]
        if pts:
            style = {"color": "0.35", "lw": 2.4} if cat == "overall" else {"color": f"C{i - 1}"}
            acc_ax.plot(*zip(*pts, strict=True), marker="o", ms=3.5, label=cat, **style)
    for i, part in enumerate(("color", "shape")):
        pts = [(r["step"], r[f"val_patch_{part}"]) for r in records if f"val_patch_{part}" in r]
        if pts:
            acc_ax.plot(
                *zip(*pts, strict=True),
                "--s",
                color=f"C{5 + i}",
                ms=3.5,
                label=f"patch {part} head",
            )
    joint = [r["step"] for r in records if "loss" in r]
    for ax in (loss_ax, acc_ax):
        if joint and joint[0] > 1:
            ax.axvline(joint[0] - 1, color="0.35", ls=":", lw=1)
            ax.annotate(
                "joint phase",
                (joint[0] - 1, 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -10),
                textcoords="offset points",
                fontsize=8,
                color="0.35",
            )
        ax.set_xlabel("step")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    loss_ax.set(title="training loss", ylabel="loss")
    loss_ax.set_ylim(bottom=0)
    acc_ax.set(title="validation accuracy", ylabel="accuracy", ylim=(0, 1.02))
    fig.suptitle(path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def restore_or_init(
    mgr: Any, cfg: LlavaConfig, tc: TrainConfig, opt: optax.GradientTransformation, resume: bool
) -> tuple[dict[str, Any], int]:
    """(state, first step): the latest checkpoint with `resume`, else a fresh init."""
    import orbax.checkpoint as ocp

    params = init_params(cfg, seed=tc.seed)
    aux = init_aux(cfg, tc.seed)
    state = {"params": params, "aux": aux, "opt_state": opt.init({"params": params, "aux": aux})}
    latest = mgr.latest_step() if resume else None
    if latest is None:
        return state, 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = mgr.restore(latest, args=ocp.args.StandardRestore(abstract))
    return restored, int(latest)


def train(
    out: str | Path,
    tc: TrainConfig,
    resume: bool = False,
    log_dir: str | Path | None = None,
    progress: bool = True,
    max_minutes: float | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged record."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "train_config.json"
    if resume and cfg_path.exists():
        saved = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
        tc = dataclasses.replace(saved, steps=tc.steps)
    cfg_path.write_text(json.dumps(dataclasses.asdict(tc), indent=2) + "\n")
    log_dir = Path(log_dir) if log_dir else out
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{out.name}.jsonl"

    tokenizer = st.build_tokenizer()
    tok_files = save_tokenizer(tokenizer, out)
    cfg = model_config(tc.preset, tokenizer)
    processor = Processor.from_pretrained(out / "tokenizer", cfg)
    opt = make_optimizer(tc)
    opt_vision = make_optimizer(tc, "vision")
    mgr = ocp.CheckpointManager(
        out / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )
    state, start = restore_or_init(mgr, cfg, tc, opt, resume)
    records = [json.loads(x) for x in log_path.read_text().splitlines()] if resume else []
    records = [r for r in records if r["step"] <= start]
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    val_batches = [
        make_packed(processor, "val", list(range(i, i + 16)), st.CATEGORIES, cfg)
        for i in range(0, tc.val_images, 16)
    ]
    best = max([r["val_overall"] for r in records if "val_overall" in r] + [-1.0])
    t0 = time.time()
    last: dict[str, Any] = {}
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=not progress)
    # Batches are built in a thread while XLA runs the previous step (it releases the GIL).
    pool = ThreadPoolExecutor(max_workers=1)
    ahead = {s: pool.submit(train_batch, processor, cfg, tc, s) for s in range(start, start + 2)}
    for step in bar:
        batch = ahead.pop(step).result().device()
        if step + 2 < tc.steps:
            ahead[step + 2] = pool.submit(train_batch, processor, cfg, tc, step + 2)
        vision = step < tc.vision_steps
        if step == tc.vision_steps and step > 0:  # phase 2 starts with a fresh optimizer
            state["opt_state"] = opt.init({"params": state["params"], "aux": state["aux"]})
        if vision:
            state, metrics = vision_step(state, batch, cfg, opt_vision)
        else:
            state, metrics = train_step(state, batch, cfg, opt, tc.aux_weight, tc.attn_weight)
        done = step + 1
        rec: dict[str, Any] = {"step": done, **{k: float(v) for k, v in metrics.items()}}
        rec["seconds"] = time.time() - t0
        bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k.endswith("loss")})
        stop = max_minutes is not None and rec["seconds"] > max_minutes * 60
        if done % tc.eval_every == 0 or done == tc.steps or stop:
            acc = np.mean(
                [
                    np.asarray(patch_accuracy(state["aux"], state["params"], cfg, vb.device()))
                    for vb in val_batches
                ],
                axis=0,
            )
            rec["val_patch_color"], rec["val_patch_shape"] = float(acc[0]), float(acc[1])
            if not vision:
                rec.update(validate(state["params"], cfg, val_batches))
            bar.write(json.dumps({k: round(v, 4) for k, v in rec.items()}))
            if rec.get("val_overall", -1.0) > best:
                best = rec["val_overall"]
                export_model(state["params"], cfg, tok_files, out / "best")
        records.append(rec)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if done % tc.save_every == 0 or done == tc.steps or stop:
            mgr.save(done, args=ocp.args.StandardSave(state))
            mgr.wait_until_finished()
            export_model(state["params"], cfg, tok_files, out / "model")
            draw_curve(records, log_dir / f"{out.name}.png")
        last = rec
        if stop:
            break
    pool.shutdown(cancel_futures=True)
    mgr.close()
    return last


def main(argv: list[str] | None = None) -> int:
    """`python -m sparsevlm_jax.train --out DIR [--steps N] [--resume]`."""
    ap = argparse.ArgumentParser(prog="python -m sparsevlm_jax.train", description=__doc__)
    ap.add_argument("--out", required=True, help="run directory (checkpoints, exported model)")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--preset", default="demo", choices=("demo", "tiny"))
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument(
        "--vision-steps",
        type=int,
        default=TrainConfig.vision_steps,
        help="phase 1: train the vision tower alone on the per-patch heads for N steps",
    )
    ap.add_argument("--vision-lr", type=float, default=TrainConfig.vision_lr)
    ap.add_argument("--images-per-batch", type=int, default=TrainConfig.images_per_batch)
    ap.add_argument("--questions-per-image", type=int, default=TrainConfig.questions_per_image)
    ap.add_argument("--aux-weight", type=float, default=TrainConfig.aux_weight)
    ap.add_argument("--attn-weight", type=float, default=TrainConfig.attn_weight)
    ap.add_argument("--save-every", type=int, default=TrainConfig.save_every)
    ap.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    ap.add_argument("--val-images", type=int, default=TrainConfig.val_images)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--log-dir", default="benchmarks/train_logs")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    tc = TrainConfig(
        preset=args.preset,
        steps=args.steps,
        images_per_batch=args.images_per_batch,
        questions_per_image=args.questions_per_image,
        lr=args.lr,
        vision_steps=args.vision_steps,
        vision_lr=args.vision_lr,
        aux_weight=args.aux_weight,
        attn_weight=args.attn_weight,
        seed=args.seed,
        save_every=args.save_every,
        eval_every=args.eval_every,
        val_images=args.val_images,
    )
    last = train(args.out, tc, args.resume, args.log_dir, not args.no_progress, args.max_minutes)
    print(json.dumps(last))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
