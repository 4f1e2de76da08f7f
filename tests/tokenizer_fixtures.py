"""A tiny LLaMA-style sentencepiece tokenizer, built offline in a few milliseconds.

`make_tiny_tokenizer(out_dir, style)` trains a BPE sentencepiece model (byte fallback, dummy
prefix, split digits, ids 0=<unk> 1=<s> 2=</s>, like LLaMA's) on a small built-in English text
and saves it in transformers format:

  * "placeholder" (original LLaVA): `tokenizer.model` + `tokenizer_config.json` only, like
    liuhaotian/llava-v1.5-7b; no "<image>" token; image_token_index = -200.
  * "expand" (llava-hf): also "<image>" = vocab_size and "<pad>" = vocab_size + 1 as added
    special tokens (like 32000 / 32001), saved with `save_pretrained` (adds tokenizer.json);
    image_token_index = vocab_size.

`AutoTokenizer.from_pretrained(out_dir)` loads either back. Training is deterministic, so ids
are stable across runs and machines with the same sentencepiece version.
"""

from __future__ import annotations

import functools
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

PLACEHOLDER_IMAGE_TOKEN_INDEX = -200

_SYSTEM_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_SYSTEM_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_QUESTIONS = """\
What is in the image? What is the man holding? What color is the car? What colour is the bus?
How many people are in the picture? How many dogs are there? Is there a cat on the table?
Describe the image in detail. Describe this photo briefly. What is written on the sign?
Where is the woman standing? Who is riding the horse? Why is the boy smiling?
Is the light red or green? Which animal is bigger? What time of day is it? What is this?
Answer the question using a single word or phrase. Answer with the option's letter from the
given choices directly. Is there a person in the image? Please answer yes or no.
Reference OCR token: STOP, 25, Main Street. What does the text say?"""
_ANSWERS = """\
Yes. No. A cat sitting on a red sofa next to a window. Two people are walking a dog in the park.
The car is blue. There are three dogs. The man is holding an umbrella because it is raining.
The image shows a kitchen with a white table, four chairs and a bowl of fruit.
A young woman is riding a brown horse on the beach at sunset. The sign says stop.
It is a sunny day in the city, with tall buildings, green trees and many cars on the street.
The number is 1234567890. The answer is A. The answer is B. The answer is C. The answer is D."""


def _corpus() -> list[str]:
    # The system prompts are repeated so BPE merges them into few tokens (the prefix stays short).
    lines = [f"{s} USER: What is in the image? ASSISTANT:" for s in (_SYSTEM_USER, _SYSTEM_HUMAN)]
    text = lines * 8 + _QUESTIONS.splitlines() * 3 + _ANSWERS.splitlines() * 3
    return text


def _train_sentencepiece(vocab_size: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def make_tiny_tokenizer(
    out_dir: str | os.PathLike,
    style: Literal["placeholder", "expand"] = "placeholder",
    vocab_size: int = 500,
) -> tuple[Any, int]:
    """Builds and saves a tiny LLaMA-style tokenizer in `out_dir`.

    Args:
      style: "placeholder" (original LLaVA) or "expand" (llava-hf, adds <image> and <pad>).
      vocab_size: sentencepiece vocabulary (>= 300: 259 are <unk>, <s>, </s> and 256 bytes).
    Returns:
      (tokenizer, image_token_index): the tokenizer as loaded back by `AutoTokenizer`, and -200
      (placeholder) or `vocab_size` (expand; `len(tokenizer) == vocab_size + 2`).
    """
    from transformers import AddedToken, AutoTokenizer

    if style not in ("placeholder", "expand"):
        raise ValueError(f"style must be 'placeholder' or 'expand', got {style!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(_train_sentencepiece(vocab_size))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>" if style == "placeholder" else None,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048 if style == "placeholder" else 4096,
        "padding_side": "right" if style == "placeholder" else "left",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if style == "placeholder":
        tok = AutoTokenizer.from_pretrained(os.fspath(out), local_files_only=True)
        return tok, PLACEHOLDER_IMAGE_TOKEN_INDEX
    tok = AutoTokenizer.from_pretrained(os.fspath(out), local_files_only=True)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(os.fspath(out))
    tok = AutoTokenizer.from_pretrained(os.fspath(out), local_files_only=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert image_id == vocab_size and tok.convert_tokens_to_ids("<pad>") == vocab_size + 1
    return tok, image_id


@functools.cache
def tiny_tokenizer_dir(style: Literal["placeholder", "expand"] = "placeholder") -> str:
    """A per-process cached folder holding `make_tiny_tokenizer(..., style)` (default vocab)."""
    d = tempfile.mkdtemp(prefix=f"tiny_tok_{style}_")
    make_tiny_tokenizer(d, style)
    return d
