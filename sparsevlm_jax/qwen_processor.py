"""From (images / videos, question) to a model `Batch` for Qwen2-VL and Qwen2.5-VL.

The prompt comes from the checkpoint's chat template (`chat_template.jinja`,
`chat_template.json` or the tokenizer config's): one user turn whose content is the visual
items, then the question (a question's own `<image>` / `<video>` markers place the items
inside it), and the generation prompt. Each item renders as `<|vision_start|><|image_pad|>
<|vision_end|>` (`<|video_pad|>` for a video); the pad becomes the item's merged-token count
(one per 28x28 pixels; a video's per frame pair). A checkpoint without a chat template needs
`--template` (a LLaVA conversation template), whose `<image>` markers become the same spans.

The batch follows the shared layout (`sparsevlm_jax.batch`): prefix = everything up to the
first pad (`<|vision_start|>` included), the visual region = every item's tokens with the text
between items in place (`TEXT_SLOT`), text = from the last `<|vision_end|>` on. Its
`pixel_values` is the tower's own input pytree (`qwen_images.VisionInputs`) and
`positions` the M-RoPE (t, h, w) triples of every slot (`sparsevlm_jax.mrope`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sparsevlm_jax import mrope, qwen_images
from sparsevlm_jax.batch import TEXT_SLOT, Batch, BucketError, Buckets, make_batch
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.images import _one_line, load_image
from sparsevlm_jax.prompts import (
    IMAGE_PLACEHOLDER,
    MARKER_RE,
    VIDEO_PLACEHOLDER,
    ChatTemplate,
    ConvTemplate,
    describe_items,
    get_template,
    has_chat_template,
)
from sparsevlm_jax.video import Video

VISION_SPAN = {
    IMAGE_PLACEHOLDER: "<|vision_start|><|image_pad|><|vision_end|>",
    VIDEO_PLACEHOLDER: "<|vision_start|><|video_pad|><|vision_end|>",
}


class QwenProcessor:
    """Images, videos and questions -> a bucketed `Batch` for one Qwen-VL checkpoint."""

    anyres = None  # (the LLaVA processor's attribute: no anyres tiles here)
    variable = True

    def __init__(
        self,
        tokenizer: Any,
        config: Any,
        image_settings: qwen_images.QwenPreprocess,
        template: str | None = None,
        buckets: Buckets | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.vision = config.qwen_vision
        self.settings = image_settings
        self.image_mean, self.image_std = image_settings.image_mean, image_settings.image_std
        if template is not None:
            self.template: ConvTemplate | ChatTemplate = get_template(template)
        elif has_chat_template(tokenizer):
            self.template = ChatTemplate(tokenizer)
        else:
            raise InputError(
                "the checkpoint has no chat template (chat_template.jinja, chat_template.json "
                "or the tokenizer config's); pass --template to use a LLaVA template"
            )
        self.buckets = buckets if buckets is not None else Buckets()
        self.image_token_index = int(config.image_token_index)
        self.video_token_index = int(config.video_token_index)
        for name, want in (("<|image_pad|>", self.image_token_index),
                           ("<|video_pad|>", self.video_token_index)):  # fmt: skip
            got = tokenizer.convert_tokens_to_ids(name)
            if got != want:
                raise InputError(f"the tokenizer's {name} has id {got}, the model expects {want}")

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @classmethod
    def from_pretrained(
        cls, ckpt_dir: str | os.PathLike, config: Any, **overrides: Any
    ) -> QwenProcessor:
        """The processor of a checkpoint folder: its tokenizer and chat template, and its
        image processor's settings (`preprocessor_config.json`; `min_pixels` / `max_pixels`
        overrides)."""
        from transformers import AutoTokenizer

        d = Path(ckpt_dir)
        pixels = {k: overrides.pop(k) for k in ("min_pixels", "max_pixels") if k in overrides}
        overrides.pop("image_mode", None)  # LLaVA's pad / crop: not a Qwen setting
        image_cfg = _read_json(d / "preprocessor_config.json")
        # the video processor's settings where transformers 5 finds them: the composite
        # processor's "video_processor" entry, its own file, else the image processor's file
        video_cfg = (
            _read_json(d / "processor_config.json").get("video_processor")
            or _read_json(d / "video_preprocessor_config.json")
            or image_cfg
            or None
        )
        settings = qwen_images.QwenPreprocess.from_hf(image_cfg, video_cfg)
        if pixels:
            settings = dataclasses.replace(settings, **pixels)
        if settings.min_pixels > settings.max_pixels:
            raise InputError(
                f"min pixels {settings.min_pixels} exceed max pixels {settings.max_pixels}"
            )
        tok = overrides.pop("tokenizer", None)
        if tok is None:
            try:
                tok = AutoTokenizer.from_pretrained(os.fspath(d), local_files_only=True)
            except (OSError, ValueError) as e:
                raise InputError(f"{d}: cannot load the tokenizer ({_one_line(e)})") from None
        return cls(tok, config, settings, **overrides)

    # ------------------------------------------------------------------------------------------
    # Prompts

    def prompt(self, question: str, marks: Sequence[str] = (IMAGE_PLACEHOLDER,)) -> str:
        """The prompt string, one `<|vision_start|>...<|vision_end|>` span per visual item."""
        marks = list(marks)
        if isinstance(self.template, ChatTemplate):
            return self.template.prompt(question, len(marks), marks)
        text = self.template.prompt(question, len(marks), marks)
        return MARKER_RE.sub(lambda m: VISION_SPAN[m.group(0)], text)

    def encode_spans(
        self, question: str, num_images: int, placeholders: Sequence[str] | None = None
    ) -> list[list[int]]:
        """[prefix_ids, text between items 1 and 2, ..., text_ids] (see the module docstring)."""
        marks = list(placeholders) if placeholders is not None else [IMAGE_PLACEHOLDER] * num_images
        ids = list(self.tokenizer(self.prompt(question, marks)).input_ids)
        pads = {self.image_token_index, self.video_token_index}
        where = [i for i, t in enumerate(ids) if t in pads]
        if len(where) != len(marks):
            raise InputError(
                f"the prompt holds {len(where)} visual placeholders for {describe_items(marks)}"
            )
        edges = [-1, *where, len(ids)]
        return [ids[a + 1 : b] for a, b in zip(edges[:-1], edges[1:], strict=True)]

    def encode(self, question: str) -> tuple[list[int], list[int]]:
        spans = self.encode_spans(question, 1)
        return spans[0], spans[-1]

    # ------------------------------------------------------------------------------------------
    # Batches

    def __call__(self, images: Sequence[Any], questions: Sequence[str]) -> tuple[Batch, int]:
        """One bucketed batch; each entry of `images` is an image (PIL or path), a `Video`, or
        a list of them (several items in one prompt, in order).

        Returns (batch, n) as `sparsevlm_jax.batch.make_batch`. Raises InputError on a bad
        image, prompt or size (aspect ratio past 200:1), or one that fits no bucket."""
        if len(images) != len(questions) or not images:
            raise InputError(
                f"need the same non-zero number of images and questions, "
                f"got {len(images)} and {len(questions)}"
            )
        per = [list(im) if isinstance(im, list | tuple) else [im] for im in images]
        if any(not row for row in per):
            raise InputError("an example without an image")
        items = [
            [it if isinstance(it, Image.Image | Video) else load_image(it) for it in row]
            for row in per
        ]
        n = len(items)
        try:
            b = Buckets.pick(self.buckets.batch, n, "batch size")
        except BucketError as e:
            raise InputError(str(e)) from None
        rows = list(range(n)) + [n - 1] * (b - n)
        tower = [[list(it.frames) if isinstance(it, Video) else it for it in items[r]]
                 for r in rows]  # fmt: skip
        try:
            inputs, grids = qwen_images.prepare(tower, self.vision, self.settings)
        except ValueError as e:
            raise InputError(_one_line(e)) from None
        prefixes, texts, index, ids, positions = [], [], [], [], []
        merge = self.vision.spatial_merge_size
        timed = self.config.tokens_per_second is not None  # Qwen2.5: video time in seconds
        for i, (row, q) in enumerate(zip(items, questions, strict=True)):
            marks = [VIDEO_PLACEHOLDER if isinstance(it, Video) else IMAGE_PLACEHOLDER
                     for it in row]  # fmt: skip
            spans = self.encode_spans(q, len(row), marks)
            region, region_ids, full, offset = [], [], list(spans[0]), 0
            for j, (it, (t, h, w)) in enumerate(zip(row, grids[i], strict=True)):
                count = t * h * w // (merge * merge)
                pad = self.video_token_index if isinstance(it, Video) else self.image_token_index
                between = spans[j + 1] if j + 1 < len(row) else []
                region += [*range(offset, offset + count), *([TEXT_SLOT] * len(between))]
                region_ids += [-1] * count + list(between)
                full += [pad] * count + list(between)
                offset += count
            full += spans[-1]
            pos, _ = mrope.rope_index(
                np.asarray(full),
                None,
                [g for g, it in zip(grids[i], row, strict=True) if not isinstance(it, Video)],
                [g for g, it in zip(grids[i], row, strict=True) if isinstance(it, Video)],
                self.image_token_index,
                self.video_token_index,
                None,
                merge,
                second_per_grid_ts=[seconds_per_grid(it, self.vision.temporal_patch_size)
                                    for it in row if isinstance(it, Video)] if timed else None,
                tokens_per_second=self.config.tokens_per_second,
            )  # fmt: skip
            prefixes.append(spans[0])
            texts.append(spans[-1])
            index.append(np.asarray(region, np.int32))
            ids.append(np.asarray(region_ids, np.int32))
            positions.append(pos)
        try:
            return make_batch(prefixes, texts, inputs, self.buckets, index, ids, positions)
        except BucketError as e:
            raise InputError(str(e)) from None

    def token_frames(self, items: Sequence[Any]) -> list[tuple[int, ...] | None]:
        """The video frames each visual token of one prompt's items (PIL images and `Video`s,
        in order) stands for: None for an image's tokens; a video token covers one temporal
        patch, frames (2g, 2g + 1) of its pair g (an odd count's last pair: its last frame
        only), frames of several videos numbered on. Counts from the sizes alone."""
        v, s = self.vision, self.settings
        factor, tp = v.patch_size * v.spatial_merge_size, v.temporal_patch_size
        out: list[tuple[int, ...] | None] = []
        first = 0
        for it in items:
            frames = list(it.frames) if isinstance(it, Video) else [it]
            lo, hi = (s.video_min_pixels, s.video_max_pixels) if isinstance(it, Video) else (
                s.min_pixels, s.max_pixels)  # fmt: skip
            h, w = qwen_images.smart_resize(frames[0].height, frames[0].width, factor, lo, hi)
            per = (h // factor) * (w // factor)
            if not isinstance(it, Video):
                out += [None] * per
                continue
            n = len(frames)
            for g in range(0, n, tp):
                out += [tuple(range(first + g, first + min(g + tp, n)))] * per
            first += n
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids -> text (special tokens skipped, ids outside the vocab dropped)."""
        n = len(self.tokenizer)
        keep = [int(i) for i in ids if 0 <= int(i) < n]
        return self.tokenizer.decode(keep, skip_special_tokens=True).strip()


# The frame rate a video is sampled at when its container does not say (Qwen's processor's
# default `fps`).
DEFAULT_FPS = 2.0


def seconds_per_grid(video: Video, temporal_patch: int) -> float:
    """Seconds one temporal grid step (`temporal_patch` sampled frames) spans: Qwen2.5-VL's
    `second_per_grid_ts`. The sampled frames cover the clip evenly (`video.sample_indices`),
    so a step is temporal_patch * duration / frames; without a frame rate, DEFAULT_FPS."""
    if video.fps:
        per_frame = video.total_frames / float(video.fps) / max(len(video.frames), 1)
    else:
        per_frame = 1.0 / DEFAULT_FPS
    return temporal_patch * per_frame


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read ({_one_line(e)})") from None
