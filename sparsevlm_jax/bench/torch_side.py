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


def hf_llava_config(cfg: LlavaConfig) -> Any:
    """A transformers `LlavaConfig` of the same shape (sdpa attention)."""
    import transformers

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


@dataclasses.dataclass
class TorchPixels:
    """Pixel values as the transformers model takes them, with LLaVA-NeXT's image sizes;
    `key` "pixel_values_videos" for a video's frames [1, frames, C, H, W]."""

    values: Any
    image_sizes: Any = None
    key: str = "pixel_values"

    def kwargs(self) -> dict[str, Any]:
        """`pixel_values` (or `pixel_values_videos`, and `image_sizes`) keyword arguments."""
        out = {self.key: self.values}
        if self.image_sizes is not None:
            out["image_sizes"] = self.image_sizes
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
    """The PyTorch reference SparseVLM prefill (`reference_prefill`) and its decode step."""

    def __init__(self, model: Any, ids: Any, pixels: Any, params: Any, device: str):
        self.model, self.ids, self.pixels, self.params = model, ids, pixels, params
        self.device = device
        self.state: tuple[list, int] | None = None

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
        )
        _sync(self.device)
        return res

    def prefill(self) -> None:
        self._prefill()

    def ttft(self) -> int:
        return int(self._prefill().logits[-1].argmax())

    def start_decode(self) -> Any:
        res = self._prefill()
        self.state = (res.kv_caches, int(res.logits[-1].argmax()))
        return res

    def decode(self) -> None:
        from sparsevlm_jax.reference import reference_decode_step

        caches, tok = self.state
        logits, caches, _ = reference_decode_step(self.model, caches, tok)
        self.state = (caches, int(logits.argmax()))
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
