"""What determines a training run (`TrainConfig`, saved beside its checkpoints) and the
model presets it names ("demo": the shipped model, "tiny": for tests)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from sparsevlm_jax import shapes_task as st
from sparsevlm_jax.config import LlavaConfig, TextConfig, VisionConfig


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (saved beside its checkpoints)."""

    preset: str = "demo"
    steps: int = 1000
    images_per_batch: int = 8
    questions_per_image: int = 16
    lr: float = 1.5e-3
    warmup: int = 60
    vision_steps: int = 0
    vision_lr: float = 2e-3
    vision_warmup: int = 100
    weight_decay: float = 0.05
    aux_weight: float = 1.0
    attn_weight: float = 0.5
    seed: int = 0
    save_every: int = 50
    eval_every: int = 50
    val_images: int = 128
    # Fine-tuning: start from a model in our checkpoint format (auxiliary heads and optimizer
    # fresh) instead of a random init; `count_share` of each image's question blocks are count
    # questions (None: every type equally often).
    init_from: str | None = None
    count_share: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


def model_config(preset: str, tokenizer: Any) -> LlavaConfig:
    """The LlavaConfig of a preset ("demo": the shipped model, "tiny": for tests)."""
    vocab = int(math.ceil(len(tokenizer) / 8) * 8)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_id = tokenizer.convert_tokens_to_ids(st.IMAGE_TOKEN)
    if preset == "demo":
        vision = VisionConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=14,
        )
        text = TextConfig(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=32,
            max_position_embeddings=512,
            **ids,
        )
    elif preset == "tiny":
        vision = VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        )
        text = TextConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            **ids,
        )
    else:
        raise ValueError(f"unknown preset {preset!r} (demo, tiny)")
    return LlavaConfig(
        vision=vision, text=text, image_token_index=image_id, vision_feature_layer=-1
    )
