"""The name table: every source tensor name -> our flat parameter key plus a transform.

Resolution is two-stage and ordered (first match wins):

1. A *prefix* rule says which part of the model a name belongs to and strips the layout's
   prefix. `MODEL_PREFIXES` covers the three layouts of a LLaVA checkpoint:
   - llava-hf hub files: `language_model.model.*`, `language_model.lm_head.*`,
     `vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`;
   - transformers 5 `save_pretrained` (`vision_tower.embeddings.*`, no `vision_model`) and its
     in-memory state dict (`model.language_model.*`, `model.vision_tower.*`,
     `model.multi_modal_projector.*`, `lm_head.*`);
   - original LLaVA-1.5: `model.*`, `lm_head.*`, `model.mm_projector.{0,2}.*` and optionally
     embedded CLIP weights `model.vision_tower.vision_tower.vision_model.*`.
   Qwen-VL: `visual.*` (hub, save_pretrained) / `model.visual.*` (in-memory) is its tower,
   the decoder `model.*` (hub) / `model.language_model.*` (in-memory).
   Video-LLaVA's two towers: `image_tower.*` goes where `vision_tower.*` goes, `video_tower.*`
   to the part "video_vision" (hub `*.vision_model.*`, `save_pretrained` without it,
   in-memory `model.*_tower.*`).
   `CLIP_PREFIXES` covers a separate CLIP checkpoint (`CLIPModel` / `CLIPVisionModel`).
2. A *body* rule of that part maps the rest of the name to a flat key of `params.flatten`
   (a template filled from the regex's named groups; the `layer` group picks the slot of a
   stacked `[L, ...]` array) and a transform kind.

A rule whose target is `None` names a known-ignorable tensor (rotary `inv_freq`, `position_ids`
buffers, CLIP's `post_layernorm` that LLaVA never applies, CLIP's text half). Everything else
that matches no rule is unknown, and the converter refuses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from sparsevlm_jax.model.qwen_vision import VISION_NAME_RULES

# Transform kinds.
COPY = "copy"  # same layout (embeddings, norms, biases)
LINEAR = "linear"  # HF Linear weight [out, in] -> kernel [in, out]
PATCH = "patch"  # CLIP conv [Dv, C, P, P] -> [P*P*C, Dv], rows ordered (row, col, channel)
CONV3D = "conv3d"  # Qwen-VL conv [D, C, T, P, P] -> [C*T*P*P, D], rows in the conv's own order

# (regex, part): part None = a known-ignorable top-level tensor.
MODEL_PREFIXES: tuple[tuple[str, str | None], ...] = (
    (r"language_model\.model\.", "text"),  # hub, save_pretrained
    (r"model\.language_model\.", "text"),  # transformers in-memory
    (r"language_model\.lm_head\.", "lm_head"),  # hub, save_pretrained
    (r"lm_head\.", "lm_head"),  # transformers in-memory, original LLaVA
    (r"vision_tower\.vision_model\.", "vision"),  # hub
    (r"model\.vision_tower\.vision_tower\.vision_model\.", "vision"),  # original, embedded CLIP
    (r"model\.vision_tower\.vision_model\.", "vision"),  # transformers 4.x in-memory
    (r"model\.vision_tower\.", "vision"),  # transformers 5 in-memory
    (r"vision_tower\.", "vision"),  # transformers 5 save_pretrained
    # Video-LLaVA: hub, transformers 4.x / 5 in-memory, transformers 5 save_pretrained
    (r"(?:model\.)?image_tower\.(?:vision_model\.)?", "vision"),
    (r"(?:model\.)?video_tower\.(?:vision_model\.)?", "video_vision"),
    (r"multi_modal_projector\.", "projector"),  # hub, save_pretrained
    (r"model\.multi_modal_projector\.", "projector"),  # transformers in-memory
    (r"model\.mm_projector\.", "projector"),  # original LLaVA
    (r"(?:model\.)?(?=image_newline$)", "newline"),  # LLaVA-NeXT: hub / in-memory, original
    (r"(?:model\.)?visual\.", "qwen_vision"),  # Qwen-VL: hub / save_pretrained, in-memory
    (r"model\.", "text"),  # original LLaVA (after every other model.* prefix)
)

CLIP_PREFIXES: tuple[tuple[str, str | None], ...] = (
    (r"vision_model\.", "vision"),
    (r"text_model\.", None),
    (r"visual_projection\.", None),
    (r"text_projection\.", None),
    (r"logit_scale$", None),
)

_L = r"layers\.(?P<layer>\d+)\."  # text decoder layer
_E = r"encoder\.layers\.(?P<layer>\d+)\."  # CLIP encoder layer

# part -> ((regex of the rest of the name, flat key template or None, kind), ...)
BODY_RULES: dict[str, tuple[tuple[str, str | None, str], ...]] = {
    "text": (
        (r"embed_tokens\.weight", "text/embed_tokens", COPY),
        (r"norm\.weight", "text/norm/scale", COPY),
        (_L + r"self_attn\.(?P<p>[qkvo])_proj\.weight", "text/layers/{p}_proj/kernel", LINEAR),
        (_L + r"self_attn\.(?P<p>[qkvo])_proj\.bias", "text/layers/{p}_proj/bias", COPY),
        (_L + r"mlp\.(?P<p>gate|up|down)_proj\.weight", "text/layers/{p}_proj/kernel", LINEAR),
        (_L + r"mlp\.(?P<p>gate|up|down)_proj\.bias", "text/layers/{p}_proj/bias", COPY),
        (_L + r"(?P<n>input|post_attention)_layernorm\.weight", "text/layers/{n}_layernorm/scale",
         COPY),
        (r"(?:layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq", None, COPY),
    ),
    "lm_head": ((r"weight", "text/lm_head", LINEAR),),
    "vision": (
        (r"embeddings\.class_embedding", "vision/class_embedding", COPY),
        (r"embeddings\.patch_embedding\.weight", "vision/patch_embedding", PATCH),
        (r"embeddings\.position_embedding\.weight", "vision/position_embedding", COPY),
        (r"embeddings\.position_ids", None, COPY),
        (r"pre_layrnorm\.weight", "vision/pre_layrnorm/scale", COPY),
        (r"pre_layrnorm\.bias", "vision/pre_layrnorm/bias", COPY),
        (r"post_layernorm\.(?:weight|bias)", None, COPY),
        (_E + r"self_attn\.(?P<p>q|k|v|out)_proj\.weight", "vision/layers/{p}_proj/kernel", LINEAR),
        (_E + r"self_attn\.(?P<p>q|k|v|out)_proj\.bias", "vision/layers/{p}_proj/bias", COPY),
        (_E + r"(?P<n>layer_norm[12])\.weight", "vision/layers/{n}/scale", COPY),
        (_E + r"(?P<n>layer_norm[12])\.bias", "vision/layers/{n}/bias", COPY),
        (_E + r"mlp\.(?P<n>fc[12])\.weight", "vision/layers/{n}/kernel", LINEAR),
        (_E + r"mlp\.(?P<n>fc[12])\.bias", "vision/layers/{n}/bias", COPY),
    ),
    "newline": ((r"image_newline", "image_newline", COPY),),
    "projector": (
        (r"(?:linear_1|0)\.weight", "projector/linear_1/kernel", LINEAR),
        (r"(?:linear_1|0)\.bias", "projector/linear_1/bias", COPY),
        (r"(?:linear_2|2)\.weight", "projector/linear_2/kernel", LINEAR),
        (r"(?:linear_2|2)\.bias", "projector/linear_2/bias", COPY),
    ),
}  # fmt: skip
BODY_RULES["qwen_vision"] = VISION_NAME_RULES
# Video-LLaVA's video tower: the vision rules into `video_vision/...`
BODY_RULES["video_vision"] = tuple(
    (body, key and "video_" + key, kind) for body, key, kind in BODY_RULES["vision"]
)


@dataclass(frozen=True)
class Target:
    """Where one source tensor goes: flat key, layer slot (None: not stacked), transform."""

    key: str
    layer: int | None
    kind: str


IGNORED = "ignored"  # resolve() result for a known-ignorable tensor


def resolve(name: str, prefixes: tuple[tuple[str, str | None], ...]) -> Target | str | None:
    """Maps a source tensor name through the tables.

    Returns:
        a `Target`, `IGNORED` for a known-ignorable tensor, or None for an unknown name.
    """
    for rx, part in prefixes:
        m = re.match(rx, name)
        if m is None:
            continue
        if part is None:
            return IGNORED
        rest = name[m.end() :]
        for body, key, kind in BODY_RULES[part]:
            b = re.fullmatch(body, rest)
            if b is None:
                continue
            if key is None:
                return IGNORED
            groups = b.groupdict()
            layer = groups.pop("layer", None)
            return Target(key.format(**groups), None if layer is None else int(layer), kind)
        return None
    return None


def is_stacked(key: str) -> bool:
    """Whether a flat key is a stacked [L, ...] array (decoder layers, tower blocks)."""
    return "/layers/" in key or "/blocks/" in key


def source_shape(
    kind: str, target_shape: tuple[int, ...], num_channels: int, temporal_patch: int = 2
) -> tuple[int, ...]:
    """The source tensor shape that `transform(kind, .)` turns into `target_shape`."""
    if kind == CONV3D:
        rows, d = target_shape
        p = int(round((rows // (num_channels * temporal_patch)) ** 0.5))
        return (d, num_channels, temporal_patch, p, p)
    if kind == LINEAR:
        return tuple(reversed(target_shape))
    if kind == PATCH:
        rows, dv = target_shape
        p = int(round((rows // num_channels) ** 0.5))
        return (dv, num_channels, p, p)
    return tuple(target_shape)


def transform(kind: str, w: np.ndarray) -> np.ndarray:
    """Source layout -> ours (a view where possible; the caller copies into the target)."""
    if kind == LINEAR:
        return w.T
    if kind == PATCH:
        return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])  # [P*P*C, Dv]
    if kind == CONV3D:
        return w.reshape(w.shape[0], -1).T  # [C*T*P*P, D]
    return w
