"""Image files and LLaVA-1.5's image preprocessing: RGB decoding with one-line errors,
`expand2square` onto the CLIP-mean colour and the CLIP processor (resize, centre crop,
normalise), channels last. Shared by `sparsevlm_jax.processing` and `sparsevlm_jax.anyres`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from sparsevlm_jax.errors import InputError

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

ImageMode = Literal["pad", "crop"]


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
