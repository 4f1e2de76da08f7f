"""PyTorch side of a full run: transformers (dense) and the reference SparseVLM (sparse)."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sparsevlm_jax.bench.timing import JaxMethod
from sparsevlm_jax.bench.workloads import Options, Workload, device_init_params, image_token_id
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.eval import jsonable
from sparsevlm_jax.params import param_shapes
from sparsevlm_jax.sparse.config import SparseConfig

# Rank-adaptive methods are also timed against a fixed-schedule reference that keeps what
# the JAX run kept (`matched_reference_params`).
RANK_ADAPTIVE = ("v1",)


def hf_qwen_config(cfg: LlavaConfig) -> Any:
    """A transformers `Qwen2_5_VLConfig` / `Qwen2VLConfig` of the same shape (sdpa attention).

    Raises ValueError for what transformers' Qwen2 decoder cannot express (a head dim other
    than hidden / heads, biases other than q/k/v's)."""
    import transformers

    v, t = cfg.qwen_vision, cfg.text
    if t.head_dim != t.hidden_size // t.num_attention_heads:
        raise ValueError(f"Qwen2's head dim is hidden / heads, not {t.head_dim}")
    if not t.attention_bias or t.o_bias or t.mlp_bias or t.rope_scaling:
        raise ValueError("Qwen2's decoder has q/k/v biases only and M-RoPE without scaling")
    rope = {"rope_type": "default", "mrope_section": list(t.mrope_section),
            "rope_theta": t.rope_theta}  # fmt: skip
    text = dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings, rope_parameters=rope,
        use_sliding_window=False, bos_token_id=t.bos_token_id,
        eos_token_id=list(t.eos_token_ids) or None,
    )  # fmt: skip
    common = dict(depth=v.depth, num_heads=v.num_heads, in_channels=v.in_channels,
                  patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                  spatial_merge_size=v.spatial_merge_size, hidden_act=v.hidden_act)  # fmt: skip
    start = cfg.vision_start_token_id
    ids = dict(image_token_id=cfg.image_token_index, video_token_id=cfg.video_token_index,
               tie_word_embeddings=t.tie_word_embeddings)  # fmt: skip
    if start is not None:
        ids.update(vision_start_token_id=start, vision_end_token_id=start + 1)
    if cfg.family == "qwen2_5_vl":
        if not float(v.tokens_per_second).is_integer():
            raise ValueError("transformers' tokens_per_second is a whole number")
        vision = dict(
            hidden_size=v.embed_dim, intermediate_size=v.intermediate_size,
            out_hidden_size=v.out_hidden_size, window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            tokens_per_second=int(v.tokens_per_second), **common,
        )  # fmt: skip
        out = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    else:
        if v.intermediate_size % v.embed_dim:
            raise ValueError("Qwen2-VL's tower MLP is a whole multiple (mlp_ratio) of its width")
        vision = dict(embed_dim=v.embed_dim, hidden_size=v.out_hidden_size,
                      mlp_ratio=v.intermediate_size // v.embed_dim, **common)  # fmt: skip
        out = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    out._attn_implementation = "sdpa"
    return out


def hf_llava_config(cfg: LlavaConfig) -> Any:
    """A transformers `LlavaConfig` of the same shape (sdpa attention); Qwen-VL shapes:
    `hf_qwen_config`."""
    import transformers

    if cfg.qwen:
        return hf_qwen_config(cfg)
    v, t = cfg.vision, cfg.text
    vision = transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        layer_norm_eps=v.layer_norm_eps,
        hidden_act=v.hidden_act,
    )
    rope = {}
    if t.rope_scaling:  # e.g. LLaVA-NeXT-Video's linear scaling
        rope = {"rope_parameters": {"rope_theta": t.rope_theta, **dict(t.rope_scaling)}}
    text = transformers.LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim,
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        attention_bias=t.attention_bias,
        mlp_bias=t.mlp_bias,
        tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=t.bos_token_id,
        eos_token_id=list(t.eos_token_ids) or None,
        **rope,
    )
    kw: dict[str, Any] = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id(cfg),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        projector_hidden_act=cfg.projector_hidden_act,
        multimodal_projector_bias=cfg.projector_bias,
    )
    if cfg.family == "llava_next_video":
        pins = [list(p) for p in cfg.image_grid_pinpoints]
        out = transformers.LlavaNextVideoConfig(
            image_grid_pinpoints=pins,
            video_token_index=cfg.video_token_index,
            spatial_pool_stride=cfg.spatial_pool_stride,
            spatial_pool_mode=cfg.spatial_pool_mode,
            **kw,
        )
    elif cfg.family == "llava_next":
        pins = [list(p) for p in cfg.image_grid_pinpoints]
        out = transformers.LlavaNextConfig(image_grid_pinpoints=pins, **kw)
    else:
        out = transformers.LlavaConfig(**kw)
    out._attn_implementation = "sdpa"
    return out


def hf_model_class(cfg: LlavaConfig) -> Any:
    """transformers' model class of the family (LLaVA-NeXT: LlavaNextForConditionalGeneration)."""
    import transformers

    if cfg.family == "qwen2_5_vl":
        return transformers.Qwen2_5_VLForConditionalGeneration
    if cfg.family == "qwen2_vl":
        return transformers.Qwen2VLForConditionalGeneration
    if cfg.family == "llava_next_video":
        return transformers.LlavaNextVideoForConditionalGeneration
    if cfg.family == "llava_next":
        return transformers.LlavaNextForConditionalGeneration
    return transformers.LlavaForConditionalGeneration


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def same_shape(a: LlavaConfig, b: LlavaConfig) -> bool:
    return (
        param_shapes(a) == param_shapes(b)
        and a.num_image_tokens == b.num_image_tokens
        and a.text.rope_theta == b.text.rope_theta
        and a.vision_layers_used == b.vision_layers_used
        and a.family == b.family
        and a.qwen_vision == b.qwen_vision
        and a.text.mrope_section == b.text.mrope_section
        and a.tokens_per_second == b.tokens_per_second
    )


def shared_weights(cfg: LlavaConfig, device: str, seed: int) -> tuple[Any, dict, LlavaConfig]:
    """A random transformers model and the SAME weights in JAX (save_pretrained + convert)."""
    import torch

    from convert import load_transformers

    torch.manual_seed(seed)
    model = (
        hf_model_class(cfg)
        ._from_config(hf_llava_config(cfg), dtype=torch.float32, attn_implementation="sdpa")
        .eval()
    )
    with tempfile.TemporaryDirectory(prefix="sparsevlm-bench-") as d:
        model.save_pretrained(d)
        params, converted = load_transformers(d, dtype=cfg.dtype)
    if not same_shape(cfg, converted):
        raise RuntimeError("the converted model does not have the benchmark shape")
    model = model.to(device=device, dtype=torch_dtype(cfg.dtype))
    return model, params, cfg.replace(image_token_index=converted.image_token_index)


def device_weights(cfg: LlavaConfig, device: str | None, seed: int) -> tuple[Any, dict]:
    """JAX weights from `jax.random` on the device; torch weights initialised on `device`
    (different values: speed does not depend on them)."""
    params = device_init_params(cfg, seed)
    if device is None:
        return None, params
    import torch

    torch.manual_seed(seed)
    with torch.device(device):
        model = (
            hf_model_class(cfg)
            ._from_config(
                hf_llava_config(cfg), dtype=torch_dtype(cfg.dtype), attn_implementation="sdpa"
            )
            .eval()
        )
    return model, params


def torch_inputs(wl: Workload, prefix: list[int], text: list[int], pixels: np.ndarray, dev: str):
    """(input_ids, pixel_values) of example 0; LLaVA-NeXT: pixel_values [1, tiles, C, H, W]
    of its real tiles, the image token repeated its visual count, and `image_sizes`."""
    import torch

    from sparsevlm_jax.bench.workloads import VIDEO

    n_img = wl.visual_counts[0]
    dtype = torch_dtype(wl.cfg.dtype)
    if wl.variable and wl.images[0][0] == VIDEO:  # a video: its frames, the video token
        ids = torch.tensor([prefix + [wl.cfg.video_token_index] * n_img + text], device=dev)
        frames = torch.tensor(pixels[:1, : wl.images[0][1]], device=dev).permute(0, 1, 4, 2, 3)
        return ids, TorchPixels(frames.to(dtype), key="pixel_values_videos")
    ids = torch.tensor([prefix + [image_token_id(wl.cfg)] * n_img + text], device=dev)
    if not wl.variable:
        return ids, TorchPixels(torch.tensor(pixels, device=dev).permute(0, 3, 1, 2).to(dtype))
    from sparsevlm_jax.anyres import anyres_grid
    from sparsevlm_jax.presets import anyres_spec

    rows, cols = anyres_grid(wl.images[0], anyres_spec(wl.cfg))
    tiles = torch.tensor(pixels[:1, : 1 + rows * cols], device=dev).permute(0, 1, 4, 2, 3)
    sizes = torch.tensor([list(wl.images[0])], device=dev)
    return ids, TorchPixels(tiles.to(dtype), sizes)


def torch_qwen_inputs(wl: Workload, inputs: Any, dev: str) -> tuple[Any, TorchPixels]:
    """(input_ids, pixels) of example 0 of a Qwen-VL workload (`workloads.qwen_inputs`): the
    item's patch rows [N, K] in transformers' `pixel_values` order (not the tower's window
    order of `VisionInputs.patches`), its `image_grid_thw` / `video_grid_thw` (and Qwen2.5's
    `second_per_grid_ts` for a video), and `mm_token_type_ids` (1 image, 2 video), without
    which transformers' model falls back to 1-D positions."""
    import torch

    video = inputs.video[0]
    ids = torch.tensor([inputs.input_ids[0]], device=dev)
    rows = torch.tensor(inputs.rows[0], device=dev).to(torch_dtype(wl.cfg.dtype))
    grids: dict[str, Any] = {
        "video_grid_thw" if video else "image_grid_thw": torch.tensor([inputs.grids[0]], device=dev)
    }
    if video and inputs.second_per_grid is not None:
        grids["second_per_grid_ts"] = torch.tensor([inputs.second_per_grid], device=dev)
    types = torch.zeros_like(ids)
    types[ids == (wl.cfg.video_token_index if video else wl.cfg.image_token_index)] = 1 + video
    key = "pixel_values_videos" if video else "pixel_values"
    return ids, TorchPixels(rows, key=key, grids=grids, token_types=types)


@dataclasses.dataclass
class TorchPixels:
    """Pixel values as the transformers model takes them, with LLaVA-NeXT's image sizes;
    `key` "pixel_values_videos" for a video's frames [1, frames, C, H, W]. Qwen-VL: the patch
    rows [N, K], their grids (`image_grid_thw` / `video_grid_thw`, `second_per_grid_ts`) and
    `mm_token_type_ids` (`token_types`)."""

    values: Any
    image_sizes: Any = None
    key: str = "pixel_values"
    grids: dict[str, Any] = dataclasses.field(default_factory=dict)
    token_types: Any = None

    def kwargs(self) -> dict[str, Any]:
        """`pixel_values` (or `pixel_values_videos`, and `image_sizes`; Qwen-VL: the grids and
        `mm_token_type_ids`) keyword arguments of the transformers model."""
        out = {self.key: self.values, **self.grids}
        if self.image_sizes is not None:
            out["image_sizes"] = self.image_sizes
        if self.token_types is not None:
            out["mm_token_type_ids"] = self.token_types
        return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _cache_kw(model: Any) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def torch_cache_bytes(cache: Any) -> int:
    """Bytes of a transformers cache (DynamicCache layers or legacy tuples) or of a list of
    per-layer (k, v) pairs."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(layer.keys, layer.values) for layer in layers]
    else:
        pairs = list(cache)
    return int(sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in pairs))


class TorchDense:
    """transformers' `LlavaForConditionalGeneration` (sdpa): prefill and greedy decode."""

    def __init__(self, model: Any, ids: Any, pixels: Any, device: str):
        self.model, self.ids, self.pixels, self.device = model, ids, pixels, device
        self.cache_kw = _cache_kw(model)
        self.state: tuple[Any, Any] | None = None

    def _prefill(self) -> Any:
        import torch

        with torch.no_grad():
            out = self.model(
                input_ids=self.ids, **self.pixels.kwargs(), use_cache=True, logits_to_keep=1
            )
        _sync(self.device)
        return out

    def prefill(self) -> None:
        self._prefill()

    def ttft(self) -> int:
        return int(self._prefill().logits[0, -1].argmax())

    def start_decode(self) -> int:
        out = self._prefill()
        cache = getattr(out, "cache", None) or out.past_key_values
        self.last_logits = out.logits[0, -1].float().cpu().numpy()
        self.state = (cache, out.logits[:, -1:].argmax(-1))
        return torch_cache_bytes(cache)

    def decode(self) -> None:
        import torch

        cache, tok = self.state
        with torch.no_grad():
            out = self.model(input_ids=tok, use_cache=True, **{self.cache_kw: cache})
            self.state = (cache, out.logits[:, -1:].argmax(-1))
        _sync(self.device)


class TorchReference:
    """The PyTorch reference SparseVLM prefill (`reference_prefill`) and its decode step
    (SPEC §5 positions, as `reference_generate` decodes: on M-RoPE positions and for methods
    that keep positions, one past the original prompt's largest plus the step at every layer;
    else each layer's cache length)."""

    def __init__(self, model: Any, ids: Any, pixels: Any, params: Any, device: str):
        self.model, self.ids, self.pixels, self.params = model, ids, pixels, params
        self.device = device
        self.state: tuple[list, int] | None = None
        self.position: int | None = None

    def _prefill(self) -> Any:
        from sparsevlm_jax.reference import reference_prefill

        video = self.pixels.key == "pixel_values_videos"
        res = reference_prefill(
            self.model,
            self.ids,
            None if video else self.pixels.values,
            self.params,
            track_margins=False,
            image_sizes=self.pixels.image_sizes,
            pixel_values_videos=self.pixels.values if video else None,
            **self.pixels.grids,
        )
        _sync(self.device)
        return res

    def prefill(self) -> None:
        self._prefill()

    def ttft(self) -> int:
        return int(self._prefill().logits[-1].argmax())

    def start_decode(self) -> Any:
        res = self._prefill()
        self.last_logits = res.logits[-1].float().cpu().numpy()
        self.state = (res.kv_caches, int(res.logits[-1].argmax()))
        fixed = self.params.keeps_positions or res.positions.ndim == 2
        self.position = res.next_position if fixed else None
        return res

    def decode(self) -> None:
        from sparsevlm_jax.reference import reference_decode_step

        caches, tok = self.state
        pos = self.position
        logits, caches, _ = reference_decode_step(self.model, caches, tok, position=pos)
        self.state = (caches, int(logits.argmax()))
        self.position = None if pos is None else pos + 1
        _sync(self.device)


def reference_params(sparse: SparseConfig) -> Any:
    """The reference's parameters for a SparseConfig (same method, layers and numbers)."""
    from sparsevlm_jax.reference import RefSparseParams

    if not sparse.enabled:
        return RefSparseParams.dense()
    names = {f.name for f in dataclasses.fields(RefSparseParams)} - {"method", "layers"}
    kw = {n: getattr(sparse, n) for n in names if hasattr(sparse, n)}
    return RefSparseParams(method=sparse.method.replace(".", "_"), layers=sparse.layers, **kw)


def matched_reference_params(sparse: SparseConfig, num_kept: Sequence[int]) -> Any:
    """A fixed-schedule reference run that keeps what the JAX static run kept at each layer
    (same recycling and compaction: the same work without the rank decision)."""
    from sparsevlm_jax.reference import RefSparseParams

    return RefSparseParams(
        method="v1_5", layers=sparse.layers, schedule=tuple(int(k) for k in num_kept)
    )


def reference_summary(res: Any) -> dict[str, Any]:
    """Realized counts of a reference run."""
    return {
        "visual_counts_after_layer": list(res.visual_counts),
        "equivalent_tokens": float(res.equivalent_tokens),
        "rank": [p.rank for p in res.prunes],
        "budget": [p.budget for p in res.prunes],
        "recycled": [p.n_recycled for p in res.prunes],
        "kv_cache_bytes": torch_cache_bytes(res.kv_caches),
    }


def logit_agreement(torch_logits: np.ndarray, jax_logits: np.ndarray) -> dict[str, Any]:
    """The PyTorch side's last-prompt-token logits against JAX's (example 0): first tokens
    and the largest absolute difference (relative to JAX's largest logit). Both sides run the
    same weights on the same inputs, so this checks the inputs as much as the models."""
    a, b = np.asarray(torch_logits, np.float32), np.asarray(jax_logits, np.float32)
    diff = float(np.max(np.abs(a - b)))
    return {
        "first_token": int(np.argmax(a)),
        "jax_first_token": int(np.argmax(b)),
        "logits_max_abs_diff_vs_jax": diff,
        "logits_max_rel_diff_vs_jax": diff / max(float(np.max(np.abs(b))), 1e-30),
    }


def add_torch_runners(
    entry: dict[str, Any],
    model: Any,
    ids: Any,
    pix: Any,
    sparse: SparseConfig,
    jm: JaxMethod,
    opts: Options,
    prefill_fns: dict[str, Callable[[], Any]],
    decode_fns: dict[str, Callable[[], Any]],
) -> None:
    """The PyTorch counterparts of one method: transformers (dense) or the reference (sparse),
    plus, for rank-adaptive methods, the reference with the JAX run's kept counts."""
    import torch

    dev, label = opts.torch_device, entry["label"]
    runners: dict[str, Any] = {}
    if not sparse.enabled:
        runners["torch"] = TorchDense(model, ids, pix, dev)
    else:
        try:
            runners["torch"] = TorchReference(model, ids, pix, reference_params(sparse), dev)
        except (ValueError, TypeError) as e:
            entry["torch"]["error"] = f"no reference for {label}: {e}"
        if sparse.method in RANK_ADAPTIVE and "num_kept" in jm.stats:
            ref = matched_reference_params(sparse, jm.stats["num_kept"])
            runners["torch_matched"] = TorchReference(model, ids, pix, ref, dev)
    entry["_ttft"] = {}
    for kind, runner in runners.items():
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        info: dict[str, Any] = {"impl": type(runner).__name__}
        started = runner.start_decode()
        info.update(logit_agreement(runner.last_logits, jm.last_logits))
        if isinstance(started, int):
            info["kv_cache_bytes"] = started
        else:
            info.update(reference_summary(started))
            info["params"] = jsonable(dataclasses.asdict(runner.params))
        if dev.startswith("cuda"):
            info["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
        entry["torch"][kind] = info
        prefill_fns[f"{kind}/{label}"] = runner.prefill
        decode_fns[f"{kind}/{label}"] = runner.decode
        entry["_ttft"][f"{kind}/{label}"] = runner.ttft
