"""The decoder written out on transformers' LLaVA modules: input embeddings with the image
features spliced in, and pre-norm Llama layers whose self-attention is computed here (eager,
float32 softmax), because pruning layers need the attention probabilities and every layer
keeps a KV cache of its own length.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparsevlm_jax.reference.common import import_torch

if TYPE_CHECKING:
    import torch


def attention(
    attn: Any,
    rotary_emb: Any,
    x: torch.Tensor,
    positions: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Self-attention of one Llama layer (eager, float32 softmax, GQA via repeat_kv).

    Args:
      attn: the layer's `self_attn` module. x: [1, q, D] normed input.
      positions: int64 [q] positions of the new tokens, or [q, 3] (t, h, w) on M-RoPE models
        (Qwen-VL; `rotary_pos_ids`). past: cached (k, v) or None.
      causal: mask future keys (prefill); decoding attends to every cached key.
    Returns:
      (output [1, q, D], probabilities float32 [1, H, q, kv_len], new cache (k, v) each
      [1, Hkv, kv_len, head_dim]).
    """
    torch = import_torch()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    _, q_len, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(1, q_len, -1, hd).transpose(1, 2)  # [1, H, q, hd]
    k = attn.k_proj(x).view(1, q_len, -1, hd).transpose(1, 2)  # [1, Hkv, q, hd]
    v = attn.v_proj(x).view(1, q_len, -1, hd).transpose(1, 2)  # [1, Hkv, q, hd]
    cos, sin = rotary_emb(v, rotary_pos_ids(positions))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if past is not None:
        k = torch.cat([past[0], k], dim=2)
        v = torch.cat([past[1], v], dim=2)
    kr = repeat_kv(k, attn.num_key_value_groups)  # [1, H, kv, hd]
    vr = repeat_kv(v, attn.num_key_value_groups)
    logits = (q @ kr.transpose(2, 3)) * attn.scaling  # [1, H, q, kv]
    if causal:
        kv_len = kr.shape[2]
        future = torch.ones(q_len, kv_len, dtype=torch.bool, device=x.device).triu(
            kv_len - q_len + 1
        )
        logits = logits.masked_fill(future, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [1, H, q, kv]
    out = (probs.to(vr.dtype) @ vr).transpose(1, 2).reshape(1, q_len, -1)  # [1, q, H*hd]
    return attn.o_proj(out), probs, (k, v)


def rotary_pos_ids(positions: torch.Tensor) -> torch.Tensor:
    """The rotary module's position_ids: [1, q] for positions [q]; [3, 1, q] for (t, h, w)
    positions [q, 3] (Qwen-VL's rotary takes the three streams first)."""
    if positions.ndim == 2:
        return positions.T[:, None, :]
    return positions[None, :]


def decoder_layer(
    layer: Any,
    rotary_emb: Any,
    h: torch.Tensor,
    positions: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One pre-norm Llama decoder layer on hidden states h [1, q, D].

    Returns (output [1, q, D], attention probabilities [1, H, q, kv], cache (k, v))."""
    a, probs, kv = attention(
        layer.self_attn, rotary_emb, layer.input_layernorm(h), positions, past, causal
    )
    h = h + a
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return h, probs, kv


def language_model(model: Any) -> Any:
    return model.model.language_model


def _image_token_id(model: Any) -> int:
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the model config has no image_token_id / image_token_index")


def visual_embeddings(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    image_sizes: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    **grids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings with every image's and video's projected features spliced in
    (llava-hf style), any number of them in any number of spans.

    Args:
      input_ids: int64 [1, N], each image's token id repeated its feature count (a video's
        token id its frames' pooled count: LLaVA-NeXT-Video).
      pixel_values, image_sizes: as `get_image_features` takes them (LLaVA-NeXT: one row of
        tiles per image and the images' (height, width)); None without images.
      pixel_values_videos: [1, frames, 3, H, W] as `get_video_features` takes them, or None.
      grids: Qwen-VL's `image_grid_thw` / `video_grid_thw` (its pixel values are the
        processor's patch rows).
    Returns:
      (E [1, N, D] in the model dtype, the visual tokens' indices [V0] int64, ascending).
    """
    torch = import_torch()
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"the reference runs batch 1: input_ids must be [1, N], got {tuple(input_ids.shape)}"
        )
    embeds = language_model(model).embed_tokens(input_ids).clone()  # [1, N, D]
    parts = []
    qwen = is_qwen(model)
    if pixel_values is not None:
        feats = (_qwen_features(model, "image", pixel_values, grids["image_grid_thw"]) if qwen
                 else _image_features(model, pixel_values, image_sizes))  # fmt: skip
        parts.append((_image_token_id(model), feats))
    if pixel_values_videos is not None:
        if qwen:
            video_id = int(model.config.video_token_id)
            feats = _qwen_features(model, "video", pixel_values_videos, grids["video_grid_thw"])
        else:
            video_id = int(model.config.video_token_index)
            feats = _video_features(model, pixel_values_videos)
        parts.append((video_id, feats))
    if not parts:
        raise ValueError("neither pixel_values nor pixel_values_videos given")
    for token, features in parts:
        where = torch.nonzero(input_ids[0] == token).flatten()
        if features.shape[0] != where.numel():
            raise ValueError(f"{where.numel()} tokens {token} but {features.shape[0]} features")
        embeds[0, where] = features.to(embeds.dtype)
    ids = [token for token, _ in parts]
    visual = torch.nonzero(torch.isin(input_ids[0], torch.tensor(ids))).flatten()
    if visual.numel() == 0:
        raise ValueError("input_ids hold no image token")
    return embeds, visual


def is_qwen(model: Any) -> bool:
    """Qwen2-VL / Qwen2.5-VL (M-RoPE positions, their own tower and grids)."""
    return str(getattr(model.config, "model_type", "")).startswith("qwen2")


def _qwen_features(model: Any, kind: str, pixels: torch.Tensor, grid: torch.Tensor) -> Any:
    """Qwen-VL's merged visual tokens [n, D] of every image (or video) in order."""
    torch = import_torch()
    get = model.model.get_image_features if kind == "image" else model.model.get_video_features
    out = get(pixels, grid)
    if hasattr(out, "pooler_output"):
        out = out.pooler_output
    if isinstance(out, (list, tuple)):
        out = torch.cat([f.reshape(-1, f.shape[-1]) for f in out], dim=0)
    return out.reshape(-1, out.shape[-1])


def mrope_positions(model: Any, input_ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    """[N, 3] (t, h, w) positions of a Qwen-VL prompt from transformers' own `get_rope_index`
    (given `mm_token_type_ids`, which it needs for 3-D positions)."""
    torch = import_torch()
    image, video = int(model.config.image_token_id), int(model.config.video_token_id)
    types = (input_ids == image).long() + 2 * (input_ids == video).long()
    kw = {k: v for k, v in kw.items() if v is not None}
    pos, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=types, **kw)
    return pos[:, 0].T.contiguous().to(torch.long)


def _video_features(model: Any, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """A video's pooled, projected frame features [frames * P, D] (LLaVA-NeXT-Video)."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    out = model.model.get_video_features(
        pixel_values_videos=pixel_values_videos.to(dtype),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    if hasattr(out, "pooler_output"):
        out = out.pooler_output
    return out.reshape(-1, out.shape[-1])


def input_embeddings(
    model: Any,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int, int]:
    """Token embeddings with the projected image features spliced in (llava-hf style).

    Args:
      input_ids: int64 [1, N] with the image token id repeated V0 times, contiguously.
      pixel_values: [1, 3, H, W]; LLaVA-NeXT: [1, tiles, 3, H, W] with `image_sizes` [1, 2]
        (height, width), whose packed features (newlines included) are the V0 tokens.
    Returns:
      (E [1, N, D] in the model dtype, p, V0).
    """
    embeds, where = visual_embeddings(model, input_ids, pixel_values, image_sizes)
    p, v0 = int(where[0]), int(where.numel())
    if int(where[-1]) != p + v0 - 1:
        raise ValueError("image tokens must be contiguous")
    return embeds, p, v0


def _image_features(
    model: Any, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
) -> torch.Tensor:
    """Projected image features [V0, D] from whichever form get_image_features returns."""
    torch = import_torch()
    getter = getattr(model.model, "get_image_features", None) or model.get_image_features
    dtype = next(model.parameters()).dtype
    extra = {} if image_sizes is None else {"image_sizes": image_sizes}
    out = getter(pixel_values=pixel_values.to(dtype), **extra)
    if hasattr(out, "pooler_output"):
        out = out.pooler_output
    if isinstance(out, (list, tuple)):
        out = torch.cat([f.reshape(-1, f.shape[-1]) for f in out], dim=0)
    return out.reshape(-1, out.shape[-1])
