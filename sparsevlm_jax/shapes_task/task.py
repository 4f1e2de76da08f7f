"""The synthetic "shapes" visual-question task the bundled demo model is trained on.

Task version 2. An image is a square of grey noise (values 60-120) split into a 4x4 grid of
cells; 3-6 cells hold one solid shape each (circle, square, triangle, cross) in one of six
colours (+-15 jitter per channel). Each object lies inside ONE 14-px patch of its cell (the
patch uniform among the cell's 16, the side uniform in 9-13 px, the offset uniform inside the
patch), so every object is exactly one of the 256 visual tokens. Questions are lower case,
words separated by spaces, with a one-word answer:

    what color is the <shape> ?        -> colour   (exactly one such shape in the image)
    what shape is the <color> object ? -> shape    (exactly one object of that colour)
    is there a <color> <shape> ?       -> yes / no (balanced)
    how many <plural> ?                -> zero ... four

Everything is a pure function of (split, index): `example("test", 17)` is the same image and
questions on every machine, so the test set is regenerated on demand (`write-test`) rather
than stored. The prompt is the project's LLaVA template (`vicuna_v1`), exactly as for real
checkpoints; `build_tokenizer` makes the word-level tokenizer the demo model uses.

The test set, evaluation and calibration are in `testset.py`; the commands:

    python -m sparsevlm_jax.shapes_task write-test [DIR]       # shapes-v2-test/: 544 images
    python -m sparsevlm_jax.shapes_task evaluate MODEL DIR [--sparse v1 --budget 64]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

GRID = 4
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 220, 50),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
CATEGORIES: tuple[str, ...] = ("color", "shape", "exists", "count")
SPLIT_SEEDS: dict[str, int] = {"train": 1000, "val": 2000, "test": 3000}
DEFAULT_IMAGE_SIZE = 224
TASK_VERSION = "v2"
PATCH = 14  # the vision tower's patch size: every object lies inside one patch (task v2)
OBJECT_SIDES = (9, 13)  # inclusive range of an object's side in pixels
MAX_PER_SHAPE = 4
# Words of the vicuna_v1 system prompt and roles (lower-cased, as the tokenizer normalises).
TEMPLATE_WORDS: tuple[str, ...] = (
    "a chat between curious user and an artificial intelligence assistant . the gives "
    "helpful , detailed polite answers to ' s questions : human"
).split()
TASK_WORDS: tuple[str, ...] = (
    "what color is shape object there how many ? yes no".split()
    + list(SHAPES)
    + list(PLURALS.values())
    + list(COLOR_NAMES)
    + list(NUMBERS)
)
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>")
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


@dataclass(frozen=True)
class Obj:
    """One object: its grid cell (row * GRID + col), colour, shape and pixel box."""

    cell: int
    color: str
    shape: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Question:
    """One question about an image, its gold one-word answer and its type (category)."""

    text: str
    answer: str
    category: str


@dataclass(frozen=True)
class Example:
    """An image (uint8 [S, S, 3]), its objects and questions about it."""

    image: np.ndarray
    objects: tuple[Obj, ...]
    questions: tuple[Question, ...]


# ----------------------------------------------------------------------------------------------
# Scenes and images


def rng_for(split: str, index: int) -> np.random.Generator:
    """The generator of example `index` of `split` (train / val / test)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLIT_SEEDS)}")
    return np.random.default_rng((SPLIT_SEEDS[split], int(index)))


def make_scene(rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE) -> tuple[Obj, ...]:
    """3-6 objects in distinct cells, at most MAX_PER_SHAPE of any shape (task v2 placement).

    Each object lies inside one PATCH-px patch of its cell: the patch is drawn uniformly among
    the cell's patches, the side uniformly from OBJECT_SIDES, the offset uniformly so that the
    box stays inside that patch. So every object is exactly one visual token.
    """
    n = int(rng.integers(3, 7))
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, n, replace=False))
    while True:
        shapes = [SHAPES[int(i)] for i in rng.integers(0, len(SHAPES), n)]
        if max(shapes.count(s) for s in SHAPES) <= MAX_PER_SHAPE:
            break
    colors = [COLOR_NAMES[int(i)] for i in rng.integers(0, len(COLOR_NAMES), n)]
    cell_px = size // GRID
    per_side = cell_px // PATCH  # patches along a cell's side
    if per_side < 1 or cell_px * GRID != size:
        raise ValueError(f"image size {size} must be a multiple of {GRID * PATCH}")
    objs = []
    for cell, color, shape in zip(cells, colors, shapes, strict=True):
        patch = int(rng.integers(per_side * per_side))
        side = int(rng.integers(OBJECT_SIDES[0], OBJECT_SIDES[1] + 1))
        px = (cell % GRID) * cell_px + (patch % per_side) * PATCH
        py = (cell // GRID) * cell_px + (patch // per_side) * PATCH
        x0 = px + int(rng.integers(PATCH - side + 1))
        y0 = py + int(rng.integers(PATCH - side + 1))
        objs.append(Obj(cell, color, shape, (x0, y0, x0 + side - 1, y0 + side - 1)))
    return tuple(objs)


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, fill: Any) -> None:
    x0, y0, x1, y1 = obj.box
    if obj.shape == "circle":
        draw.ellipse(obj.box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(obj.box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:  # cross: a horizontal and a vertical bar, a third of the box thick
        t = (x1 - x0) / 3
        draw.rectangle((x0, y0 + t, x1, y1 - t), fill=fill)
        draw.rectangle((x0 + t, y0, x1 - t, y1), fill=fill)


def render(
    objs: tuple[Obj, ...], rng: np.random.Generator, size: int = DEFAULT_IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [S,S,3], object map uint8 [S,S]: 0 background, i+1 object i)."""
    grey = rng.integers(60, 121, (size, size), dtype=np.uint8)
    img = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")
    index = Image.new("L", (size, size), 0)
    draw, draw_index = ImageDraw.Draw(img), ImageDraw.Draw(index)
    for i, obj in enumerate(objs):
        jitter = rng.integers(-15, 16, 3)
        fill = tuple(int(v) for v in np.clip(np.array(COLORS[obj.color]) + jitter, 0, 255))
        _draw(draw, obj, fill)
        _draw(draw_index, obj, i + 1)
    return np.asarray(img), np.asarray(index)


# ----------------------------------------------------------------------------------------------
# Questions


def ask(objs: tuple[Obj, ...], category: str, rng: np.random.Generator) -> Question | None:
    """A question of `category` about the scene, or None when the scene allows none."""
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    if category == "color":
        unique = [s for s in SHAPES if shapes.count(s) == 1]
        if not unique:
            return None
        s = unique[int(rng.integers(len(unique)))]
        return Question(f"what color is the {s} ?", colors[shapes.index(s)], category)
    if category == "shape":
        unique = [c for c in COLOR_NAMES if colors.count(c) == 1]
        if not unique:
            return None
        c = unique[int(rng.integers(len(unique)))]
        return Question(f"what shape is the {c} object ?", shapes[colors.index(c)], category)
    if category == "exists":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            c, s = sorted(present)[int(rng.integers(len(present)))]
            return Question(f"is there a {c} {s} ?", "yes", category)
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        # Mostly hard negatives: the colour or the shape is in the image, not together.
        hard = [(c, s) for c, s in absent if c in colors or s in shapes]
        pool = hard if hard and rng.random() < 0.75 else absent
        c, s = pool[int(rng.integers(len(pool)))]
        return Question(f"is there a {c} {s} ?", "no", category)
    if category == "count":
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        return Question(f"how many {PLURALS[s]} ?", NUMBERS[shapes.count(s)], category)
    raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")


def example(
    split: str,
    index: int,
    size: int = DEFAULT_IMAGE_SIZE,
    categories: tuple[str, ...] = CATEGORIES,
) -> Example:
    """Example `index` of `split`: one question per entry of `categories` the scene allows."""
    rng = rng_for(split, index)
    objs = make_scene(rng, size)
    image, _ = render(objs, rng, size)
    qs = [ask(objs, c, rng) for c in categories]
    return Example(image, objs, tuple(q for q in qs if q is not None))


def example_with_maps(
    split: str, index: int, size: int, categories: tuple[str, ...]
) -> tuple[Example, np.ndarray]:
    """`example` plus its object map (0 background, i+1 object i), for auxiliary labels."""
    rng = rng_for(split, index)
    objs = make_scene(rng, size)
    image, index_map = render(objs, rng, size)
    qs = [ask(objs, c, rng) for c in categories]
    return Example(image, objs, tuple(q for q in qs if q is not None)), index_map


def check_question(objs: tuple[Obj, ...], q: Question) -> None:
    """Raises ValueError unless `q` is well formed and its answer is right for `objs`."""
    words = q.text.split()
    if q.text != q.text.lower() or " ".join(words) != q.text or words[-1] != "?":
        raise ValueError(f"malformed question {q.text!r}")
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    if q.category == "color":
        s = words[4]
        if shapes.count(s) != 1 or colors[shapes.index(s)] != q.answer:
            raise ValueError(f"{q.text!r} -> {q.answer!r} is wrong for {objs}")
    elif q.category == "shape":
        c = words[4]
        if colors.count(c) != 1 or shapes[colors.index(c)] != q.answer:
            raise ValueError(f"{q.text!r} -> {q.answer!r} is wrong for {objs}")
    elif q.category == "exists":
        yes = any(o.color == words[3] and o.shape == words[4] for o in objs)
        if q.answer != ("yes" if yes else "no"):
            raise ValueError(f"{q.text!r} -> {q.answer!r} is wrong for {objs}")
    elif q.category == "count":
        s = {p: s for s, p in PLURALS.items()}[words[2]]
        if q.answer != NUMBERS[shapes.count(s)]:
            raise ValueError(f"{q.text!r} -> {q.answer!r} is wrong for {objs}")
    else:
        raise ValueError(f"unknown category {q.category!r}")


# ----------------------------------------------------------------------------------------------
# Tokenizer


def vocabulary() -> list[str]:
    """The word-level vocabulary: specials (ids 0-2), template words, task words."""
    words: list[str] = list(SPECIAL_TOKENS)
    for w in (*TEMPLATE_WORDS, *TASK_WORDS):
        if w not in words:
            words.append(w)
    return words


def build_tokenizer() -> Any:
    """A transformers `PreTrainedTokenizerFast`: lower-casing WordLevel over `vocabulary()`.

    `<unk>`=0, `<s>`=1, `</s>`=2; `<image>` and `<pad>` are added special tokens after the
    words. A post-processor prepends `<s>` (once) to every encoded text.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<unk>", "<s>", "</s>", IMAGE_TOKEN, PAD_TOKEN])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=PAD_TOKEN,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=1024,
    )


def demo_model_path() -> Path:
    """The bundled demo checkpoint (a small LLaVA trained on this task)."""
    return Path(__file__).resolve().parents[1] / "demo_model"
