"""Prompts and their tokens: LLaVA's conversation templates, and the token ids around each
visual item of a prompt.

Prompts: `build_prompt` reproduces LLaVA's conversation templates (`vicuna_v1`, `llava_v1`) and
llava-hf's system-less one (`llava_hf`); `<image>` / `<video>` markers place visual items.
`ChatTemplate` renders a checkpoint's own chat template instead (the default when the
tokenizer has one and no template is named).

Tokens: `split_prompt` / `split_spans` return the ids around the items, in one of two styles
picked by the sign of `image_token_index`:
  * placeholder (original LLaVA, index < 0, e.g. -200): LLaVA's `tokenizer_image_token`; each
    chunk around "<image>" is tokenized on its own (so the text chunk starts with the
    tokenizer's dummy-prefix "▁"), a single BOS is kept.
  * expand (llava-hf, index >= 0): the tokenizer knows "<image>" as an added token with that
    id; the whole prompt is tokenized once and split at it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sparsevlm_jax.errors import InputError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
MARKER_RE = re.compile(r"<image>|<video>")
LLAVA_IMAGE_TOKEN_INDEX = -200  # original LLaVA's IMAGE_TOKEN_INDEX (llava/constants.py)

# ----------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class ConvTemplate:
    """A single-turn LLaVA conversation (LLaVA's `SeparatorStyle.TWO`, no history).

    Prompt: `system + sep` (omitted when system is empty) `+ user + ": <image>\\n" + question
    + sep + assistant + ":"`. With several images the question's own `<image>` markers place
    them (one per image); a question without markers gets `<image>\\n` per image in front.
    """

    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "

    def prompt(
        self, question: str, num_images: int = 1, placeholders: Sequence[str] | None = None
    ) -> str:
        """The prompt for `question` about `num_images` visual items, each marked by its
        placeholder (`placeholders`, default all `<image>`; a video is `<video>`)."""
        marks = list(placeholders) if placeholders is not None else [IMAGE_PLACEHOLDER] * num_images
        found = MARKER_RE.findall(question)
        q = MARKER_RE.sub("", question).strip()
        if not q:
            raise InputError("empty prompt")
        head = self.system + self.sep if self.system else ""
        user, assistant = self.roles
        if len(marks) == 1 and (not found or found == marks):  # LLaVA moves it to the front
            return f"{head}{user}: {marks[0]}\n{q}{self.sep}{assistant}:"
        if not found:
            items = "".join(f"{m}\n" for m in marks)
            return f"{head}{user}: {items}{q}{self.sep}{assistant}:"
        check_markers(found, marks)
        return f"{head}{user}: {question.strip()}{self.sep}{assistant}:"


class ChatTemplate:
    """A checkpoint's own chat template (the tokenizer's `chat_template`) as a one-turn prompt
    builder with `ConvTemplate.prompt`'s interface.

    The user turn's content is the visual items, then the question; a question with its own
    `<image>` / `<video>` markers places the items inside it instead. Items render however the
    template renders an `{"type": "image"}` / `{"type": "video"}` entry (llava-hf: `<image>`;
    Qwen-VL: `<|vision_start|><|image_pad|><|vision_end|>`); the generation prompt follows.
    """

    name = "chat_template"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def prompt(
        self, question: str, num_images: int = 1, placeholders: Sequence[str] | None = None
    ) -> str:
        marks = list(placeholders) if placeholders is not None else [IMAGE_PLACEHOLDER] * num_images
        found = MARKER_RE.findall(question)
        check_markers(found, marks)
        if not MARKER_RE.sub("", question).strip():
            raise InputError("empty prompt")
        kind = {IMAGE_PLACEHOLDER: "image", VIDEO_PLACEHOLDER: "video"}
        content: list[dict[str, str]] = []
        if found:  # the question places its items
            for i, piece in enumerate(MARKER_RE.split(question)):
                if piece:
                    content.append({"type": "text", "text": piece})
                if i < len(marks):
                    content.append({"type": kind[marks[i]]})
        else:
            content = [{"type": kind[m]} for m in marks]
            content.append({"type": "text", "text": question.strip()})
        messages = [{"role": "user", "content": content}]
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # noqa: BLE001 - any template failure is the checkpoint's
            msg = " ".join(str(e).split())
            raise InputError(f"the checkpoint's chat template failed: {msg}") from None


def check_markers(found: Sequence[str], marks: Sequence[str]) -> None:
    """InputError unless a question's markers `found` are none or exactly `marks`."""
    if found and list(found) != list(marks):
        kinds = [(m, list(found).count(m)) for m in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER)]
        have = " and ".join(f"{n} {m}" for m, n in kinds if n)
        raise InputError(f"the prompt has {have} markers for {describe_items(marks)}")


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (chat_template.jinja / .json or its
    config's)."""
    return bool(getattr(tokenizer, "chat_template", None))


def describe_items(marks: Sequence[str]) -> str:
    """e.g. "2 images" or "1 image and 1 video" for placeholders in order."""
    images, videos = marks.count(IMAGE_PLACEHOLDER), marks.count(VIDEO_PLACEHOLDER)
    parts = [f"{n} {w}{'s' if n != 1 else ''}" for n, w in ((images, "image"), (videos, "video"))]
    return " and ".join(p for p, n in zip(parts, (images, videos), strict=True) if n) or "0 images"


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


def split_spans(
    prompt: str,
    tokenizer: Any,
    image_token_index: int,
    num_images: int,
    marker_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """Token ids around each of the `num_images` visual items of `prompt` (see
    `split_prompt`): [before the first, between the first and the second, ..., after the last].
    `marker_ids`: the ids that mark an item (default the image token; a video family adds its
    video token).

    Raises:
      InputError: the prompt does not hold exactly `num_images` items, or text is empty.
    """
    if image_token_index < 0:
        ids = tokenizer_image_token(prompt, tokenizer, image_token_index)
    else:
        ids = list(tokenizer(prompt).input_ids)
    markers = set(marker_ids) if marker_ids is not None else {image_token_index}
    where = [i for i, t in enumerate(ids) if t in markers]
    if len(where) != num_images:
        raise InputError(
            f"the prompt holds {len(where)} {IMAGE_PLACEHOLDER} for {num_images} image(s)"
        )
    edges = [-1, *where, len(ids)]
    spans = [ids[a + 1 : b] for a, b in zip(edges[:-1], edges[1:], strict=True)]
    if not spans[0] or not spans[-1]:
        raise InputError("the prompt needs text before the first image and after the last")
    return spans


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
