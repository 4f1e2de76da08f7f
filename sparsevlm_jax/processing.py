"""From (image, question) pairs to a model `Batch`: LLaVA-1.5 images, prompts and tokens.

Images: `load_image` (RGB, one-line `InputError`s), `preprocess_image` ("pad": LLaVA-1.5's
`expand2square` onto the CLIP-mean colour, then CLIP's resize / centre crop / normalise;
"crop": the plain CLIP processor, as llava-hf ships it). Output is channels last, [H, W, 3].

Prompts: `build_prompt` reproduces LLaVA's conversation templates (`vicuna_v1`, `llava_v1`) and
llava-hf's system-less one (`llava_hf`).

Tokens: `split_prompt` returns the ids before and after the image, in one of two styles picked
by the sign of `image_token_index`:
  * placeholder (original LLaVA, index < 0, e.g. -200): LLaVA's `tokenizer_image_token`; each
    chunk around "<image>" is tokenized on its own (so the text chunk starts with the
    tokenizer's dummy-prefix "▁"), a single BOS is kept.
  * expand (llava-hf, index >= 0): the tokenizer knows "<image>" as an added token with that
    id; the whole prompt is tokenized once and split at it.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from sparsevlm_jax.batch import Batch, BucketError, Buckets, make_batch
from sparsevlm_jax.errors import InputError

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGE_PLACEHOLDER = "<image>"
LLAVA_IMAGE_TOKEN_INDEX = -200  # original LLaVA's IMAGE_TOKEN_INDEX (llava/constants.py)

ImageMode = Literal["pad", "crop"]
ImageLike = Image.Image | str | os.PathLike


# ----------------------------------------------------------------------------------------------
# Images


def _one_line(s: object) -> str:
    return " ".join(str(s).split())


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as RGB, the way LLaVA does it (`.convert("RGB")`; alpha is dropped).

    16-bit and 32-bit integer images (modes I;16*, I) are scaled to 8 bits (>> 8) first, since
    PIL's own conversion would clip them to 255; float images (F) are clipped to [0, 255].
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.int64)
        img = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), mode="L")
    elif img.mode == "F":
        a = np.asarray(img, np.float64)
        img = Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes an image file as RGB.

    Raises:
      InputError: (one line, naming the file) missing file, not an image, truncated or corrupt.
    """
    name = os.fspath(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped the global: truncation must fail
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False")
    if not os.path.exists(name):
        raise InputError(f"{name}: no such image file")
    if os.path.isdir(name):
        raise InputError(f"{name}: is a directory, not an image file")
    try:
        with Image.open(name) as img:
            img.load()  # full decode: truncated / corrupt data fails here, not later
            return to_rgb(img)
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: image too large ({_one_line(e)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{name}: truncated or corrupt image ({_one_line(e)})") from None


def pad_color(image_mean: Sequence[float] = OPENAI_CLIP_MEAN) -> tuple[int, ...]:
    """LLaVA's padding colour: `int(255 * m)` per channel, (122, 116, 104) for the CLIP mean."""
    return tuple(int(x * 255) for x in image_mean)


def expand2square(img: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """LLaVA-1.5's pad: pastes `img` centred on a square canvas of colour `fill`.

    A wide W x H image lands at rows [(W - H) // 2, ...) of a W x W canvas (tall: columns).
    """
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), fill)
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


@functools.lru_cache(maxsize=8)
def clip_image_processor(
    image_size: int = 336,
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
    image_std: tuple[float, ...] = OPENAI_CLIP_STD,
) -> Any:
    """transformers' PIL-backed `CLIPImageProcessor` (shortest side -> image_size, bicubic,
    centre crop image_size, /255, normalise)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(image_mean),
        image_std=list(image_std),
    )


def preprocess_image(
    img: Image.Image,
    image_size: int = 336,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    mode: ImageMode = "pad",
) -> np.ndarray:
    """One image to normalised pixels.

    Args:
      img: any PIL image (converted to RGB).
      mode: "pad" (LLaVA-1.5, `image_aspect_ratio=pad`: expand2square then the processor) or
        "crop" (the plain processor, as llava-hf does).
    Returns:
      [image_size, image_size, 3] float32, channels last.
    """
    if mode not in ("pad", "crop"):
        raise InputError(f"image mode must be 'pad' or 'crop', got {mode!r}")
    mean, std = tuple(float(m) for m in image_mean), tuple(float(s) for s in image_std)
    img = to_rgb(img)
    if mode == "pad":
        img = expand2square(img, pad_color(mean))
    proc = clip_image_processor(int(image_size), mean, std)
    chw = proc(img, return_tensors="np")["pixel_values"][0]
    return np.ascontiguousarray(np.transpose(chw, (1, 2, 0)), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class ConvTemplate:
    """A single-turn LLaVA conversation (LLaVA's `SeparatorStyle.TWO`, no history).

    Prompt: `system + sep` (omitted when system is empty) `+ user + ": <image>\\n" + question
    + sep + assistant + ":"`.
    """

    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "

    def prompt(self, question: str) -> str:
        q = question.replace(IMAGE_PLACEHOLDER, "").strip()
        if not q:
            raise InputError("empty prompt")
        head = self.system + self.sep if self.system else ""
        user, assistant = self.roles
        return f"{head}{user}: {IMAGE_PLACEHOLDER}\n{q}{self.sep}{assistant}:"


TEMPLATES: dict[str, ConvTemplate] = {
    "vicuna_v1": ConvTemplate(
        "vicuna_v1",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    ),
    "llava_v1": ConvTemplate(
        "llava_v1",
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    ),
    "llava_hf": ConvTemplate("llava_hf", ""),
}
TEMPLATE_ALIASES: dict[str, str] = {"v1": "vicuna_v1"}


def get_template(name: str) -> ConvTemplate:
    """The template called `name` (or an alias of it); InputError listing the known ones."""
    t = TEMPLATES.get(TEMPLATE_ALIASES.get(name, name))
    if t is None:
        known = ", ".join(sorted([*TEMPLATES, *TEMPLATE_ALIASES]))
        raise InputError(f"unknown conversation template {name!r} (known: {known})")
    return t


def build_prompt(question: str, template: str = "vicuna_v1") -> str:
    """The full prompt for one question; "<image>" in the question moves to the turn's front.

    >>> build_prompt("What is it?", "llava_hf")
    'USER: <image>\\nWhat is it? ASSISTANT:'
    """
    return get_template(template).prompt(question)


# ----------------------------------------------------------------------------------------------
# Tokens


def tokenizer_image_token(
    prompt: str, tokenizer: Any, image_token_index: int = LLAVA_IMAGE_TOKEN_INDEX
) -> list[int]:
    """LLaVA's `tokenizer_image_token` (llava/mm_utils.py), list output.

    Splits on "<image>", tokenizes each chunk with special tokens, keeps one leading BOS and
    puts one `image_token_index` between chunks.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    input_ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    sep = [image_token_index] * (offset + 1)
    with_seps = [x for chunk in chunks for x in (chunk, sep)][:-1]
    for x in with_seps:
        input_ids.extend(x[offset:])
    return input_ids


def split_prompt(
    prompt: str, tokenizer: Any, image_token_index: int
) -> tuple[list[int], list[int]]:
    """Token ids before and after the (single) image in `prompt`.

    Placeholder style (`image_token_index < 0`): LLaVA's `tokenizer_image_token`. Expand style
    (`>= 0`): one tokenization, "<image>" being an added token with that id.
    Returns:
      (prefix_ids, text_ids); the image itself is in neither.
    Raises:
      InputError: the prompt does not hold exactly one image.
    """
    if image_token_index < 0:
        ids = tokenizer_image_token(prompt, tokenizer, image_token_index)
    else:
        ids = list(tokenizer(prompt).input_ids)
    count = ids.count(image_token_index)
    if count != 1:
        raise InputError(f"the prompt must hold exactly one {IMAGE_PLACEHOLDER}, found {count}")
    i = ids.index(image_token_index)
    return ids[:i], ids[i + 1 :]


def expanded_input_ids(
    prefix_ids: Sequence[int],
    text_ids: Sequence[int],
    image_token_index: int,
    num_image_tokens: int,
) -> list[int]:
    """llava-hf style full input_ids: the image as `num_image_tokens` copies of its id.

    Length `len(prefix_ids) + num_image_tokens + len(text_ids)`.
    """
    return [*prefix_ids, *([image_token_index] * num_image_tokens), *text_ids]


# ----------------------------------------------------------------------------------------------
# Processor


class Processor:
    """Images + questions -> a bucketed `Batch` (see batch.py) for one LLaVA checkpoint."""

    def __init__(
        self,
        tokenizer: Any,
        image_size: int = 336,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        image_token_index: int = LLAVA_IMAGE_TOKEN_INDEX,
        num_image_tokens: int = 576,
        template: str = "vicuna_v1",
        image_mode: ImageMode = "pad",
        buckets: Buckets | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.image_token_index = int(image_token_index)
        self.num_image_tokens = int(num_image_tokens)
        self.template = get_template(template)
        if image_mode not in ("pad", "crop"):
            raise InputError(f"image mode must be 'pad' or 'crop', got {image_mode!r}")
        self.image_mode: ImageMode = image_mode
        self.buckets = buckets if buckets is not None else Buckets()
        if self.image_token_index >= 0:
            tid = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
            if tid != self.image_token_index:
                raise InputError(
                    f"the tokenizer's {IMAGE_PLACEHOLDER} token has id {tid}, but the model's "
                    f"image_token_index is {self.image_token_index}"
                )

    @property
    def style(self) -> Literal["placeholder", "expand"]:
        return "placeholder" if self.image_token_index < 0 else "expand"

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @classmethod
    def from_pretrained(
        cls, ckpt_dir: str | os.PathLike, config: Any, **overrides: Any
    ) -> Processor:
        """A processor for a checkpoint folder and its `sparsevlm_jax.config.LlavaConfig`.

        Tokenizer: `AutoTokenizer.from_pretrained(ckpt_dir)` (local files only). Image
        mean/std: `preprocessor_config.json` when present, else OpenAI CLIP's. Image size,
        image token id and count: from `config`. Image mode: "pad" unless the folder's
        config.json says `image_aspect_ratio` other than "pad" (original LLaVA). `overrides`
        replace any constructor argument.
        """
        from transformers import AutoTokenizer

        d = Path(ckpt_dir)
        kw: dict[str, Any] = dict(
            image_size=config.vision.image_size,
            image_token_index=config.image_token_index,
            num_image_tokens=config.num_image_tokens,
        )
        pre = _read_json(d / "preprocessor_config.json")
        if pre.get("image_mean") is not None:
            kw["image_mean"] = tuple(pre["image_mean"])
        if pre.get("image_std") is not None:
            kw["image_std"] = tuple(pre["image_std"])
        aspect = _read_json(d / "config.json").get("image_aspect_ratio")
        if aspect not in (None, "pad"):
            if aspect == "anyres":
                raise InputError(f"{d}: image_aspect_ratio 'anyres' (LLaVA-1.6) is not supported")
            kw["image_mode"] = "crop"
        kw.update(overrides)
        if "tokenizer" not in kw:
            try:
                kw["tokenizer"] = AutoTokenizer.from_pretrained(os.fspath(d), local_files_only=True)
            except (OSError, ValueError) as e:
                raise InputError(f"{d}: cannot load the tokenizer ({_one_line(e)})") from None
        return cls(**kw)

    def prompt(self, question: str) -> str:
        """The full prompt string for one question."""
        return self.template.prompt(question)

    def encode(self, question: str) -> tuple[list[int], list[int]]:
        """(prefix_ids, text_ids) around the image for one question."""
        return split_prompt(self.prompt(question), self.tokenizer, self.image_token_index)

    def pixel_values(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Images (PIL or paths) -> [n, image_size, image_size, 3] float32."""
        out = []
        for im in images:
            img = im if isinstance(im, Image.Image) else load_image(im)
            out.append(
                preprocess_image(
                    img, self.image_size, self.image_mean, self.image_std, self.image_mode
                )
            )
        return np.stack(out)

    def __call__(self, images: Sequence[ImageLike], questions: Sequence[str]) -> tuple[Batch, int]:
        """One bucketed batch of examples.

        Returns:
          (batch, n): see `sparsevlm_jax.batch.make_batch`.
        Raises:
          InputError: a bad image or prompt, or one that fits no bucket.
        """
        if len(images) != len(questions) or not images:
            raise InputError(
                f"need the same non-zero number of images and questions, "
                f"got {len(images)} and {len(questions)}"
            )
        encoded = [self.encode(q) for q in questions]
        pixels = self.pixel_values(images)
        try:
            return make_batch(
                [p for p, _ in encoded], [t for _, t in encoded], pixels, self.buckets
            )
        except BucketError as e:
            raise InputError(str(e)) from None

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids -> text (special tokens skipped, ids outside the vocab dropped)."""
        n = len(self.tokenizer)
        keep = [int(i) for i in ids if 0 <= int(i) < n]
        return self.tokenizer.decode(keep, skip_special_tokens=True).strip()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read ({_one_line(e)})") from None
    return d if isinstance(d, dict) else {}
