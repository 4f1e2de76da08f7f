"""From (image, question) pairs to a model `Batch`: LLaVA images, prompts and tokens.

Images (`sparsevlm_jax.images`, re-exported here): `load_image` (RGB, one-line
`InputError`s), `preprocess_image` ("pad": LLaVA-1.5's `expand2square` onto the CLIP-mean
colour, then CLIP's resize / centre crop / normalise; "crop": the plain CLIP processor, as
llava-hf ships it). Output is channels last, [H, W, 3].
LLaVA-NeXT checkpoints ("anyres") go through `sparsevlm_jax.anyres` instead: tiles, plus a
per-image visual index that says how the model packs their features. Video families (LLaVA-NeXT-
Video, Video-LLaVA) take `sparsevlm_jax.video.Video`s too: each frame one tower input, "crop"
preprocessed; their examples always carry a visual index (`Processor._several_images`).

Prompts and tokens: `sparsevlm_jax.prompts` (re-exported here).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from sparsevlm_jax.anyres import AnyresSpec, packed_indices, preprocess_anyres
from sparsevlm_jax.batch import TEXT_SLOT, Batch, BucketError, Buckets, make_batch
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.images import (  # noqa: F401 - re-exported: processing's public image API
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageMode,
    _one_line,
    clip_image_processor,
    expand2square,
    load_image,
    pad_color,
    preprocess_image,
    to_rgb,
)
from sparsevlm_jax.prompts import (  # noqa: F401 - re-exported: processing's public prompt API
    IMAGE_PLACEHOLDER,
    LLAVA_IMAGE_TOKEN_INDEX,
    MARKER_RE,
    TEMPLATE_ALIASES,
    TEMPLATES,
    VIDEO_PLACEHOLDER,
    ChatTemplate,
    ConvTemplate,
    build_prompt,
    describe_items,
    expanded_input_ids,
    get_template,
    has_chat_template,
    split_prompt,
    split_spans,
    tokenizer_image_token,
)
from sparsevlm_jax.video import Video

ImageLike = Image.Image | str | os.PathLike


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
        template: str | None = "vicuna_v1",
        image_mode: ImageMode = "pad",
        buckets: Buckets | None = None,
        anyres: AnyresSpec | None = None,
        max_tiles: int = 1,
        video_token_index: int | None = None,
        video_pool_stride: int = 2,
        video_tokens_per_frame: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.anyres = anyres  # LLaVA-NeXT: tiles + packed visual index (`sparsevlm_jax.anyres`)
        self.max_tiles = int(max_tiles)
        self.image_size = int(image_size)
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.image_token_index = int(image_token_index)
        self.num_image_tokens = int(num_image_tokens)
        # None: the checkpoint's own chat template when the tokenizer has one
        if template is None and has_chat_template(tokenizer):
            self.template: ConvTemplate | ChatTemplate = ChatTemplate(tokenizer)
        else:
            self.template = get_template(template or "vicuna_v1")
        if image_mode not in ("pad", "crop"):
            raise InputError(f"image mode must be 'pad' or 'crop', got {image_mode!r}")
        self.image_mode: ImageMode = image_mode
        self.buckets = buckets if buckets is not None else Buckets()
        # Video families: "<video>"'s id, and a frame's visual tokens (LLaVA-NeXT-Video: its
        # patch grid pooled `video_pool_stride` x `video_pool_stride`; Video-LLaVA: the video
        # tower's patches + CLS, `video_tokens_per_frame`)
        self.video_token_index = video_token_index
        self.video_pool_stride = int(video_pool_stride)
        self.video_tokens_per_frame = video_tokens_per_frame
        if video_token_index is not None:
            tid = tokenizer.convert_tokens_to_ids(VIDEO_PLACEHOLDER)
            if tid != video_token_index:
                raise InputError(
                    f"the tokenizer's {VIDEO_PLACEHOLDER} token has id {tid}, but the model's "
                    f"video_token_index is {video_token_index}"
                )
        if self.image_token_index >= 0:
            tid = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
            if tid != self.image_token_index:
                raise InputError(
                    f"the tokenizer's {IMAGE_PLACEHOLDER} token has id {tid}, but the model's "
                    f"image_token_index is {self.image_token_index}"
                )

    @property
    def variable(self) -> bool:
        """Examples carry a visual index (anyres images, or a video family's items)."""
        return self.anyres is not None or self.video_token_index is not None

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
        config.json says `image_aspect_ratio` other than "pad" (original LLaVA). Prompt: the
        checkpoint's chat template when its tokenizer has one (llava-hf ships them), else
        LLaVA's `vicuna_v1`; `template=` names one instead. `overrides` replace any
        constructor argument. A Qwen-VL config gets a
        `sparsevlm_jax.qwen_processor.QwenProcessor` instead.
        """
        from transformers import AutoTokenizer

        if getattr(config, "qwen", False):  # Qwen-VL: chat template, dynamic resolution
            from sparsevlm_jax.qwen_processor import QwenProcessor

            return QwenProcessor.from_pretrained(ckpt_dir, config, **overrides)  # type: ignore[return-value]
        for name in ("min_pixels", "max_pixels"):
            if name in overrides:
                flag = "--" + name.replace("_", "-")
                raise InputError(f"{flag} is a Qwen-VL setting; this is a {config.family} model")
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
        kw["template"] = None  # the chat template if the tokenizer has one, else vicuna_v1
        if config.anyres:
            kw["anyres"] = _anyres_spec(d, config, pre, kw)
            kw["max_tiles"] = config.max_tiles
        if config.takes_video:
            kw["video_token_index"] = config.video_token_index
            kw["video_pool_stride"] = config.spatial_pool_stride
            kw["video_tokens_per_frame"] = config.video_tokens_per_frame
        if config.family == "video_llava":  # VideoLlavaImageProcessor: CLIP's resize + crop
            kw["image_mode"] = "crop"
        elif not config.takes_video and aspect not in (None, "pad"):
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

    def encode_spans(
        self, question: str, num_images: int, placeholders: Sequence[str] | None = None
    ) -> list[list[int]]:
        """[prefix_ids, text between items 1 and 2, ..., text_ids] for a prompt about
        `num_images` visual items (`num_images + 1` lists), marked by `placeholders`
        (default all images; `<video>` for a video)."""
        if num_images > 1 and not self.variable:
            raise InputError("this model takes one image per prompt (several need LLaVA-NeXT)")
        if placeholders is not None and VIDEO_PLACEHOLDER in placeholders:
            if self.video_token_index is None:
                raise InputError("this model takes no video (LLaVA-NeXT-Video and Video-LLaVA do)")
        prompt = self.template.prompt(question, num_images, placeholders)
        markers = [self.image_token_index]
        if self.video_token_index is not None:
            markers.append(self.video_token_index)
        return split_spans(prompt, self.tokenizer, self.image_token_index, num_images, markers)

    def pixel_values(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Images (PIL or paths) -> [n, image_size, image_size, 3] float32, or with anyres
        [n, max_tiles, image_size, image_size, 3] (tile 0 the base image, unused tiles 0)."""
        return self.visual_inputs(images)[0]

    def _tiles(self, img: Image.Image, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """One image's anyres tiles and its visual index into the example's feature table,
        whose rows for this image start at `offset`."""
        tiles = preprocess_anyres(to_rgb(img), self.anyres)
        index = packed_indices((img.height, img.width), self.anyres)
        return tiles, np.where(index >= 0, index + offset, index).astype(np.int32)

    def visual_inputs(
        self, images: Sequence[ImageLike]
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """(pixel values as `pixel_values`, per image its [V_i] visual index or None).

        The visual index (anyres only) lists, for each visual token of the image, its row in
        the image's tile-feature table (`sparsevlm_jax.anyres.packed_indices`).
        """
        imgs = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        if self.anyres is None:
            pix = [
                preprocess_image(
                    img, self.image_size, self.image_mean, self.image_std, self.image_mode
                )
                for img in imgs
            ]
            return np.stack(pix), None
        s = self.image_size
        out = np.zeros((len(imgs), self.max_tiles, s, s, 3), np.float32)
        index = []
        for i, img in enumerate(imgs):
            tiles, idx = self._tiles(img, 0)
            out[i, : len(tiles)] = tiles
            index.append(idx)
        return out, index

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
        several = any(isinstance(im, list | tuple | Video) for im in images)
        if several or (self.variable and self.anyres is None):  # Video-LLaVA: always indexed
            return self._several_images(images, questions)
        encoded = [self.encode(q) for q in questions]
        pixels, index = self.visual_inputs(images)
        try:
            return make_batch(
                [p for p, _ in encoded], [t for _, t in encoded], pixels, self.buckets, index
            )
        except BucketError as e:
            raise InputError(str(e)) from None

    def frame_pixels(self, video: Video) -> np.ndarray:
        """A video's frames -> [frames, image_size, image_size, 3] float32: each resized
        (shortest edge) and centre-cropped to the tower's size, then normalised, as
        LLaVA-NeXT-Video's and Video-LLaVA's video processors do."""
        return np.stack(
            [
                preprocess_image(f, self.image_size, self.image_mean, self.image_std, "crop")
                for f in video.frames
            ]
        )

    def _several_images(
        self,
        images: Sequence[ImageLike | Video | Sequence[ImageLike | Video]],
        questions: Sequence[str],
    ) -> tuple[Batch, int]:
        """Examples with any number of visual items each (images, videos): visual spans with
        the text between them kept in place (`sparsevlm_jax.batch`, "several visual spans").

        An image takes `max_tiles` tower inputs (its anyres tiles; one without anyres), a video
        one per frame; the example's feature table lists every input's image features, then
        (video families) every input's video features (LLaVA-NeXT-Video: the pooled grid,
        `model.llava_next`; Video-LLaVA: the video tower's, `model.video_llava`), which a
        video's slots point at."""
        if not self.variable:
            raise InputError("this model takes one image per prompt (several need LLaVA-NeXT)")
        per = [list(im) if isinstance(im, list | tuple) else [im] for im in images]
        if any(not items for items in per):
            raise InputError("an example without an image")
        items = [
            [it if isinstance(it, Image.Image | Video) else load_image(it) for it in row]
            for row in per
        ]
        sizes = [[len(it.frames) if isinstance(it, Video) else self.max_tiles for it in row]
                 for row in items]  # fmt: skip
        tile_cap = max(sum(row) for row in sizes)
        if self.anyres is not None:
            feats = self.anyres.patches_per_side**2  # table rows per tile ("default" strategy)
        else:
            feats = self.num_image_tokens  # one tile: its features as the model splices them
        pooled = self.video_tokens_per_frame  # table rows per frame
        if pooled is None and self.anyres is not None:
            pooled = (self.anyres.patches_per_side // self.video_pool_stride) ** 2
        if pooled is None and any(isinstance(it, Video) for row in items for it in row):
            raise InputError("this processor has no video_tokens_per_frame for a video")
        s = self.image_size
        pixels = np.zeros((len(per), tile_cap, s, s, 3), np.float32)
        prefixes, texts, index, ids = [], [], [], []
        for i, (row, q) in enumerate(zip(items, questions, strict=True)):
            marks = [
                VIDEO_PLACEHOLDER if isinstance(it, Video) else IMAGE_PLACEHOLDER for it in row
            ]
            spans = self.encode_spans(q, len(row), marks)
            prefixes.append(spans[0])
            texts.append(spans[-1])
            region, region_ids, start = [], [], 0
            for j, (it, size) in enumerate(zip(row, sizes[i], strict=True)):
                if isinstance(it, Video):
                    tiles = self.frame_pixels(it)
                    # frame t's features: rows tile_cap*F + (start+t)*P + p of the table
                    idx = tile_cap * feats + start * pooled + np.arange(len(tiles) * pooled)
                elif self.anyres is None:  # one tile: its F rows, as the model splices them
                    tiles = self.pixel_values([it])
                    idx = start * feats + np.arange(feats)
                else:
                    tiles, idx = self._tiles(it, start * feats)
                pixels[i, start : start + len(tiles)] = tiles
                between = spans[j + 1] if j + 1 < len(row) else []
                region += [*idx.tolist(), *([TEXT_SLOT] * len(between))]
                region_ids += [-1] * len(idx) + list(between)
                start += size
            index.append(np.asarray(region, np.int32))
            ids.append(np.asarray(region_ids, np.int32))
        try:
            return make_batch(prefixes, texts, pixels, self.buckets, index, ids)
        except BucketError as e:
            raise InputError(str(e)) from None

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids -> text (special tokens skipped, ids outside the vocab dropped)."""
        n = len(self.tokenizer)
        keep = [int(i) for i in ids if 0 <= int(i) < n]
        return self.tokenizer.decode(keep, skip_special_tokens=True).strip()


def _anyres_spec(d: Path, config: Any, pre: dict[str, Any], kw: dict[str, Any]) -> AnyresSpec:
    """LLaVA-NeXT preprocessing from the checkpoint: the config's pinpoints (the model packs
    with them; a preprocessor config that names others is refused), mean/std, base size."""
    pinpoints = tuple(tuple(int(x) for x in p) for p in config.image_grid_pinpoints)
    theirs = pre.get("image_grid_pinpoints")
    if theirs and tuple(tuple(int(x) for x in p) for p in theirs) != pinpoints:
        raise InputError(
            f"{d}: preprocessor_config.json's image_grid_pinpoints {theirs} differ from "
            f"config.json's {[list(p) for p in pinpoints]}"
        )
    size = pre.get("size") or {}
    return AnyresSpec(
        pinpoints=pinpoints,
        tile_size=config.vision.image_size,
        patch_size=config.vision.patch_size,
        image_mean=tuple(kw.get("image_mean", OPENAI_CLIP_MEAN)),
        image_std=tuple(kw.get("image_std", OPENAI_CLIP_STD)),
        shortest_edge=int(size.get("shortest_edge", config.vision.image_size)),
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read ({_one_line(e)})") from None
    return d if isinstance(d, dict) else {}
