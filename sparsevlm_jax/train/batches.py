"""Packed training batches: each image with its question blocks, answer targets and the
labels of the auxiliary losses (per-patch classes, where attention should look).

A packed row is `[system prompt + USER: | image | q1 a1 </s> | q2 a2 </s> | ...]`, one block of
BLOCK_LEN slots per question; a batch is a pure function of the seed and the step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from sparsevlm_jax import shapes_task as st
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Processor
from sparsevlm_jax.train.config import TrainConfig

Array = jax.Array
BLOCK_LEN = 12  # slots per question block: longest question text + answer + EOS is 11


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


def train_categories(
    n: int, rng: np.random.Generator, count_share: float | None = None
) -> tuple[str, ...]:
    """n question types for one image: each type n // 4 times, the rest drawn at random.

    With `count_share`, round(n * count_share) blocks are count questions and the others are
    split over the remaining types the same way.
    """
    if count_share is not None:
        counts = ["count"] * round(n * count_share)
        others = [c for c in st.CATEGORIES if c != "count"]
        base = [c for c in others for _ in range((n - len(counts)) // len(others))]
        extra = [others[int(i)] for i in rng.integers(0, len(others), n - len(counts) - len(base))]
        return tuple(counts + base + extra)
    base = [c for c in st.CATEGORIES for _ in range(n // len(st.CATEGORIES))]
    extra = [st.CATEGORIES[int(i)] for i in rng.integers(0, 4, n - len(base))]
    return tuple(base + extra)


def train_batch(processor: Processor, cfg: LlavaConfig, tc: TrainConfig, step: int) -> Packed:
    """The training batch of `step` (a pure function of seed and step, so resume is exact)."""
    rng = np.random.default_rng((tc.seed, step))
    cats = train_categories(tc.questions_per_image, rng, tc.count_share)
    start = (step * tc.images_per_batch + tc.seed * 10_000_019) % (2**31 - 1)
    return make_packed(
        processor, "train", list(range(start, start + tc.images_per_batch)), cats, cfg
    )
