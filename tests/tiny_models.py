"""Tiny random transformers LLaVA models, built in-process (no hub), shared by the tests.

`tiny_llava(...)` builds a `LlavaForConditionalGeneration`; `save_tiny_llava(model, dir)`
writes it in the llava-hf layout together with the tiny tokenizer (expand style: `<image>` is
id 500), so `sparsevlm_jax.load(dir)` and the converter treat it like a real checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

IMAGE_TOKEN = 500  # the tiny expand-style tokenizer's <image> id
VIDEO_TOKEN = 502  # <video>, added after <image> and <pad> for video models
VOCAB = 512


def tiny_llava(
    num_layers: int = 4,
    image_size: int = 56,
    patch_size: int = 14,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vision_layers: int = 3,
    vocab: int = VOCAB,
    seed: int = 0,
    qk_std: float | None = None,
    embed_std: float | None = None,
    projector_std: float | None = None,
):
    """A tiny random Llava in float32, eval mode.

    qk_std: if set, the decoder's q/k projections are redrawn with this std so attention is
    peaked (random init at 0.02 gives near-uniform attention where any two implementations
    disagree on rounding). embed_std / projector_std likewise redraw the token embeddings and
    the projector weights, so that text and image embeddings are far apart and varied (raters
    and scores then have clear margins).
    """
    import torch
    import transformers

    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=16,
    )
    text = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        eos_token_id=2,
        bos_token_id=1,
    )
    cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    return redraw_weights(model, seed, qk_std, embed_std, projector_std)


def redraw_weights(model, seed: int, qk_std=None, embed_std=None, projector_std=None, vo_std=None):
    """Redraws a transformers LLaVA's decoder q/k projections, token embeddings, projector
    weights and decoder v/o projections at the given stds (None: keep them), seeded; returns
    the model. (At the 0.02 init attention adds so little to the residual stream that greedy
    tokens barely depend on the visual input: vo_std makes them.)"""
    import torch

    if vo_std is not None:
        gen = torch.Generator().manual_seed(seed + 4)
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                for proj in (layer.self_attn.v_proj, layer.self_attn.o_proj):
                    proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * vo_std)

    if qk_std is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * qk_std)
    redraw = []
    if embed_std is not None:
        redraw.append((model.model.language_model.embed_tokens.weight, embed_std))
    if projector_std is not None:
        proj = model.model.multi_modal_projector
        redraw += [(proj.linear_1.weight, projector_std), (proj.linear_2.weight, projector_std)]
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for w, std in redraw:
            w.copy_(torch.randn(w.shape, generator=gen) * std)
    return model


def save_tiny_llava(model, out_dir: str | Path) -> Path:
    """Writes the model (transformers `save_pretrained`) plus the tiny tokenizer to out_dir."""
    from tokenizer_fixtures import tiny_tokenizer_dir

    out = Path(out_dir)
    model.save_pretrained(out)
    tok = Path(tiny_tokenizer_dir("expand"))
    for f in tok.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


def random_pixels(n: int, image_size: int = 56, seed: int = 0) -> np.ndarray:
    """[n, S, S, 3] float32 normalised-looking pixels (channels last)."""
    return (
        np.random.default_rng(seed).normal(size=(n, image_size, image_size, 3)).astype(np.float32)
    )


def hf_logits(model, prefix: list[int], text: list[int], pixels: np.ndarray, n_image: int):
    """transformers' logits [N, vocab] for one example (image token expanded)."""
    import torch

    ids = torch.tensor([prefix + [IMAGE_TOKEN] * n_image + text])
    pix = torch.tensor(pixels[None]).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pix).logits[0].numpy()


def hf_greedy(model, prefix, text, pixels, n_image: int, max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation (no EOS stop) for one example."""
    import torch

    ids = torch.tensor([prefix + [IMAGE_TOKEN] * n_image + text])
    pix = torch.tensor(pixels[None]).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            pixel_values=pix,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, ids.shape[1] :].tolist()


# --- LLaVA-NeXT ------------------------------------------------------------------------------

# Tiles of 56 px (4x4 patches of 14): a base tile plus grids of 1x2, 2x1, 2x2, 1x3, 3x1 tiles.
NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]


def tiny_llava_next(
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    decoder: str = "llama",
    qk_std: float | None = None,
    embed_std: float | None = None,
    projector_std: float | None = None,
    video: bool = False,
    vo_std: float | None = None,
):
    """A tiny random `LlavaNextForConditionalGeneration` in float32, eval mode (tile 56 px,
    patch 14, `NEXT_PINPOINTS`); `decoder` "mistral" gives a Mistral text model with a
    sliding window of 256 tokens. qk_std / embed_std / projector_std as in `tiny_llava`.
    `video`: a `LlavaNextVideoForConditionalGeneration` instead (`<video>` = `VIDEO_TOKEN`,
    2x2 average pooling: 4 tokens a frame, linear RoPE scaling by 2). vo_std as in
    `redraw_weights`."""
    import torch
    import transformers

    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=56, patch_size=14, projection_dim=16,
    )  # fmt: skip
    common = dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=VOCAB,
        eos_token_id=2, bos_token_id=1,
    )  # fmt: skip
    if decoder == "mistral":
        text = transformers.MistralConfig(sliding_window=256, **common)
    elif video:  # LLaVA-NeXT-Video's Vicuna runs linear RoPE scaling: read from the config
        rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
        text = transformers.LlamaConfig(rope_parameters=rope, **common)
    else:
        text = transformers.LlamaConfig(**common)
    kind = "LlavaNextVideo" if video else "LlavaNext"
    extra = {"video_token_index": VIDEO_TOKEN} if video else {}
    cfg = getattr(transformers, f"{kind}Config")(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=NEXT_PINPOINTS, **extra,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForConditionalGeneration")(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():  # a visible newline token (init is zeros-ish otherwise)
        model.model.image_newline.copy_(torch.randn(model.model.image_newline.shape, generator=gen))
    return redraw_weights(model, seed, qk_std, embed_std, projector_std, vo_std)


def next_image_processor():
    """transformers' LlavaNextImageProcessor for `tiny_llava_next` (CLIP mean / std)."""
    import transformers

    cls = getattr(transformers, "LlavaNextImageProcessorPil", None)
    cls = cls or transformers.LlavaNextImageProcessor
    return cls(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=NEXT_PINPOINTS,
    )  # fmt: skip


def save_tiny_llava_next(model, out_dir: str | Path) -> Path:
    """`save_tiny_llava` plus the image processor's preprocessor_config.json."""
    out = save_tiny_llava(model, out_dir)
    next_image_processor().save_pretrained(out)
    return out


def save_tiny_llava_next_video(model, out_dir: str | Path) -> Path:
    """`save_tiny_llava_next` with `<video>` (id `VIDEO_TOKEN`) added to the tokenizer."""
    from transformers import AddedToken, AutoTokenizer

    out = save_tiny_llava_next(model, out_dir)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    tok.add_tokens([AddedToken("<video>", special=True, normalized=False)], special_tokens=True)
    tok.save_pretrained(out)
    assert tok.convert_tokens_to_ids("<video>") == VIDEO_TOKEN
    return out


# --- Video-LLaVA -----------------------------------------------------------------------------


def tiny_video_llava(
    num_layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    qk_std: float | None = None,
    embed_std: float | None = None,
    projector_std: float | None = None,
    vo_std: float | None = None,
):
    """A tiny random `VideoLlavaForConditionalGeneration` in float32, eval mode: two CLIP
    towers (image, video) of 56 px, patch 14 (16 image tokens with CLS dropped, 17 per frame
    with CLS kept), `<image>` = `IMAGE_TOKEN`, `<video>` = `VIDEO_TOKEN`. qk_std / embed_std /
    projector_std as in `tiny_llava`; vo_std redraws the decoder's v / o projections (at the
    0.02 init, attention adds so little to the residual that greedy tokens barely depend on
    the visual input)."""
    import torch
    import transformers

    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=56, patch_size=14, projection_dim=16,
    )  # fmt: skip
    text = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=VOCAB,
        eos_token_id=2, bos_token_id=1,
    )  # fmt: skip
    cfg = transformers.VideoLlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN, image_seq_length=16, video_seq_length=8 * 17,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.VideoLlavaForConditionalGeneration(cfg).eval()
    return redraw_weights(model, seed, qk_std, embed_std, projector_std, vo_std)


def video_llava_image_processor():
    """transformers' VideoLlavaImageProcessor for `tiny_video_llava` (56 px, CLIP mean / std)."""
    import transformers

    return transformers.VideoLlavaImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}
    )


def save_tiny_video_llava(model, out_dir: str | Path) -> Path:
    """`save_tiny_llava` plus the image processor's preprocessor_config.json, with `<video>`
    (id `VIDEO_TOKEN`) added to the tokenizer."""
    from transformers import AddedToken, AutoTokenizer

    out = save_tiny_llava(model, out_dir)
    video_llava_image_processor().save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    tok.add_tokens([AddedToken("<video>", special=True, normalized=False)], special_tokens=True)
    tok.save_pretrained(out)
    assert tok.convert_tokens_to_ids("<video>") == VIDEO_TOKEN
    return out
