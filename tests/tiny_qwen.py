"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints with a chat template of their own, built
in-process (no hub), shared by the Qwen tests.

The tokenizer is the tiny sentencepiece one (`tokenizer_fixtures`, 500 pieces, `<image>` 500,
`<pad>` 501) plus Qwen's special tokens at 502-507 and Qwen2-VL's chat template (saved as
`chat_template.jinja` by transformers 5), without a BOS, like Qwen's own tokenizer.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

QWEN_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)  # fmt: skip
IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = range(502, 508)
VOCAB = 512

# Qwen2-VL-Instruct's chat template (the hub's chat_template.json), as a user's checkpoint has it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.cache
def qwen_tokenizer_dir() -> str:
    """A per-process folder holding the tiny Qwen-style tokenizer (with its chat template)."""
    from tokenizer_fixtures import tiny_tokenizer_dir
    from transformers import AddedToken, AutoTokenizer

    d = tempfile.mkdtemp(prefix="tiny_qwen_tok_")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir("expand"), local_files_only=True)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_TOKENS],
                   special_tokens=True)  # fmt: skip
    tok.add_bos_token = False
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    ids = tok.convert_tokens_to_ids(list(QWEN_TOKENS))
    assert ids == list(range(IM_START, VIDEO_PAD + 1)), ids
    assert tok("hi").input_ids[0] != tok.bos_token_id
    return d


def tiny_qwen(kind: str = "qwen2_vl", layers: int = 4, seed: int = 0, qk_std: float = 0.3,
              embed_std: float = 1.0):  # fmt: skip
    """A tiny random `Qwen2VLForConditionalGeneration` ("qwen2_vl") or
    `Qwen2_5_VLForConditionalGeneration` ("qwen2_5_vl") in float32, eval mode.

    Decoder: width 64, 4 heads of 16 (2 kv-heads), mrope_section (2, 3, 3). Tower: width 32,
    2 blocks (Qwen2.5: window 112 px, block 1 full attention), merged to width 64. q/k and the
    embeddings are redrawn larger (`qk_std`, `embed_std`) so attention is peaked and greedy
    tokens have clear margins.
    """
    import torch
    import transformers

    text = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
        bos_token_id=None, eos_token_id=IM_END, pad_token_id=None,
    )  # fmt: skip
    ids = dict(image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
               vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)  # fmt: skip
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2)
        cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
        cls = transformers.Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                      out_hidden_size=64, window_size=112, fullatt_block_indexes=[1],
                      tokens_per_second=2)  # fmt: skip
        cfg = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        lm = model.model.language_model
        for layer in lm.layers:
            for w in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight):
                w.copy_(torch.randn(w.shape, generator=gen) * qk_std)
        emb = lm.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape, generator=gen) * embed_std)
    return model


def save_tiny_qwen(model, out_dir: str | Path, chat_template: bool = True) -> Path:
    """`save_pretrained` plus the tiny Qwen tokenizer (and its chat template unless told not),
    and the image processor's settings (`preprocessor_config.json`)."""
    out = Path(out_dir)
    model.save_pretrained(out)
    for f in Path(qwen_tokenizer_dir()).iterdir():
        if f.is_file() and (chat_template or f.name != "chat_template.jinja"):
            shutil.copy(f, out / f.name)
    image_processor().save_pretrained(os.fspath(out))
    return out


def image_processor(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 256):
    """transformers' (PIL) Qwen2-VL image processor with small pixel bounds (tiny images)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def hf_inputs(tokenizer, images: list, question: str, processor=None, videos: tuple = ()) -> dict:
    """transformers' model inputs for one prompt about `images` (PIL) then `videos` (lists of
    frames as [T, H, W, 3] uint8), built as `Qwen2VLProcessor` does (its composite processor
    needs torchvision): the chat template, each pad expanded to the item's merged-token count,
    `mm_token_type_ids` (without it transformers silently uses 1-D positions)."""
    import torch

    processor = processor or image_processor()
    content = [{"type": "image"} for _ in images] + [{"type": "video"} for _ in videos]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt).input_ids
    out: dict = {}
    counts = []
    if images:
        px = processor(images=images, return_tensors="pt")
        out.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        counts += [(IMAGE_PAD, int(g.prod()) // 4) for g in px["image_grid_thw"]]
    if videos:  # TODO(video): pixel_values_videos by hand
        raise NotImplementedError("video inputs are not built yet")
    expanded, k = [], 0
    for t in ids:
        if t in (IMAGE_PAD, VIDEO_PAD):
            expanded += [t] * counts[k][1]
            k += 1
        else:
            expanded.append(t)
    input_ids = torch.tensor([expanded])
    types = torch.zeros_like(input_ids)
    types[input_ids == IMAGE_PAD] = 1
    types[input_ids == VIDEO_PAD] = 2
    out.update(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
               mm_token_type_ids=types)  # fmt: skip
    return out


def hf_greedy(model, inputs: dict, new_tokens: int) -> list[int]:
    """transformers' greedy tokens (exactly `new_tokens`, cut at <|im_end|>)."""
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    return ids[: ids.index(IM_END)] if IM_END in ids else ids
