"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints with a chat template of their own, built
in-process (no hub), shared by the Qwen tests.

The tokenizer is the tiny sentencepiece one (`tokenizer_fixtures`, 500 pieces, `<image>` 500,
`<pad>` 501) plus Qwen's special tokens at 502-507 and Qwen2-VL's chat template (saved as
`chat_template.jinja` by transformers 5), without a BOS, like Qwen's own tokenizer.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

QWEN_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)  # fmt: skip
IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = range(502, 508)
VOCAB = 512
# The tiny checkpoints' video pixel budget per frame (`video_preprocessor_config.json`): small
# frames (e.g. 112x168, 24 tokens a frame pair) need no resize.
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 56 * 56, 28 * 28 * 256

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
              embed_std: float = 1.0, vo_std: float | None = None):  # fmt: skip
    """A tiny random `Qwen2VLForConditionalGeneration` ("qwen2_vl") or
    `Qwen2_5_VLForConditionalGeneration` ("qwen2_5_vl") in float32, eval mode.

    Decoder: width 64, 4 heads of 16 (2 kv-heads), mrope_section (2, 3, 3). Tower: width 32,
    2 blocks (Qwen2.5: window 112 px, block 1 full attention), merged to width 64. q/k and the
    embeddings are redrawn larger (`qk_std`, `embed_std`) so attention is peaked and greedy
    tokens have clear margins; `vo_std` also redraws v and o (the default init leaves what
    attention brings from the visual tokens too small to change the greedy tokens).
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
        for layer in lm.layers if vo_std is not None else ():
            for w in (layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight):
                w.copy_(torch.randn(w.shape, generator=gen) * vo_std)
    return model


def save_tiny_qwen(model, out_dir: str | Path, chat_template: bool = True) -> Path:
    """`save_pretrained` plus the tiny Qwen tokenizer (and its chat template unless told not),
    the image processor's settings (`preprocessor_config.json`) and the video processor's
    (`video_preprocessor_config.json`, written by hand: `Qwen2VLVideoProcessor` needs
    torchvision)."""
    out = Path(out_dir)
    model.save_pretrained(out)
    for f in Path(qwen_tokenizer_dir()).iterdir():
        if f.is_file() and (chat_template or f.name != "chat_template.jinja"):
            shutil.copy(f, out / f.name)
    image_processor().save_pretrained(os.fspath(out))
    (out / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PROCESSOR, indent=2))
    return out


def image_processor(min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 256):
    """transformers' (PIL) Qwen2-VL image processor with small pixel bounds (tiny images)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


# What `Qwen2VLVideoProcessor(min_pixels=..., max_pixels=...).save_pretrained` writes (the
# settings that matter; Qwen2.5-VL uses the same video processor).
VIDEO_PROCESSOR = {
    "video_processor_type": "Qwen2VLVideoProcessor",
    "size": {"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
    "do_sample_frames": False,
}  # fmt: skip


def video_inputs(videos: Sequence) -> tuple:
    """(pixel_values_videos [sum t*h*w, 1176] float32, video_grid_thw [n, 3]) of videos (each a
    sequence of frames: PIL images or uint8 [H, W, 3] of one size), as `Qwen2VLVideoProcessor`
    computes them for frames that need no resize (it needs torchvision; our size must already
    be its `smart_resize`'s): the fused rescale-and-normalise in float32 on 0-255 values, the
    last frame repeated to fill the temporal patch, its patchify."""
    import numpy as np
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    cfg = VIDEO_PROCESSOR
    p, m, tp = cfg["patch_size"], cfg["merge_size"], cfg["temporal_patch_size"]
    rows, grids = [], []
    for frames in videos:
        arr = np.stack([np.asarray(f.convert("RGB") if hasattr(f, "convert") else f)
                        for f in frames])  # fmt: skip
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)[None]  # [1, T, 3, H, W] uint8
        h, w = x.shape[-2:]
        size = smart_resize(h, w, p * m, VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
        if size != (h, w):
            raise ValueError(f"frames of {h}x{w} would be resized to {size}: pick another size")
        # BaseVideoProcessor.rescale_and_normalize (fused: mean and std times 1 / rescale)
        mean = torch.tensor(cfg["image_mean"]) * (1.0 / cfg["rescale_factor"])
        std = torch.tensor(cfg["image_std"]) * (1.0 / cfg["rescale_factor"])
        x = (x.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        # Qwen2VLVideoProcessor.patchify
        if pad := -x.shape[1] % tp:
            x = torch.cat((x, x[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        gt, gh, gw = x.shape[1] // tp, h // p, w // p
        x = x.view(1, gt, tp, 3, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(gt * gh * gw, 3 * tp * p * p)
        rows.append(x)
        grids.append([gt, gh, gw])
    return torch.cat(rows), torch.tensor(grids)


def hf_inputs(tokenizer, images: list, question: str, processor=None, videos: Sequence = (),
              video_fps: Sequence[float] | None = None) -> dict:  # fmt: skip
    """transformers' model inputs for one prompt about `images` (PIL) then `videos` (each a
    sequence of frames, see `video_inputs`), built as `Qwen2VLProcessor` /
    `Qwen2_5_VLProcessor` do (their composite processors need torchvision): the chat template,
    each pad expanded to the item's merged-token count, `mm_token_type_ids` (without it
    transformers silently uses 1-D positions).

    video_fps: Qwen2.5-VL: each video's sampled frame rate (transformers'
    `VideoMetadata.sampled_fps`), giving `second_per_grid_ts` = temporal patch / rate as
    `Qwen2_5_VLProcessor` does; None (Qwen2-VL) adds none."""
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
    if videos:
        pixels, grid = video_inputs(videos)
        out.update(pixel_values_videos=pixels, video_grid_thw=grid)
        counts += [(VIDEO_PAD, int(g.prod()) // 4) for g in grid]
        if video_fps is not None:
            tp = VIDEO_PROCESSOR["temporal_patch_size"]
            out["second_per_grid_ts"] = torch.tensor([tp / f for f in video_fps])
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


def assert_reference_decisions(stats: dict, r, method: str) -> int:
    """Our statistics of one example against the PyTorch reference's run `r`: raters,
    budgets, kept indices (not for random, whose RNG differs), recycled counts and visual
    counts per layer. Returns how many of the reference's layers pruned."""
    assert stats["visual_tokens"] == r.num_image_tokens
    if method not in ("fastv", "random"):
        assert stats["raters"] == list(r.raters)
    pruned = 0
    for mine, rec in zip(stats["layers"], r.prunes, strict=True):
        assert mine["budget"] == rec.budget and len(mine["kept"]) == len(rec.kept), rec.layer
        if method != "random":  # random draws with JAX's RNG, the reference with numpy's
            assert mine["kept"] == list(rec.kept), rec.layer
        assert mine["recycled"] == rec.n_recycled and mine["overflow"] == 0
        pruned += rec.pruned
    assert stats["visual_counts"] == list(r.visual_counts)
    return pruned
