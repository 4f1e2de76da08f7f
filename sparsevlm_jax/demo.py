"""`sparsevlm demo`: SparseVLM's mechanics on a tiny random LLaVA, built in-process.

The model has LLaVA-1.5's shapes where they matter to SparseVLM (a 336 px / 14 px CLIP, so 576
visual tokens, and 32 decoder layers, so the default pruning layers 2, 6, 15, 19 apply) but is
narrow, and its weights are RANDOM: the generated token ids are meaningless. What the demo shows
is the machinery: how many visual tokens each budget keeps per pruning layer, the equivalent
token count, analytic prefill FLOPs and KV-cache bytes against dense, and prefill time, for the
same prompt token ids (no tokenizer is involved).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sparsevlm_jax.batch import Batch, make_batch
from sparsevlm_jax.config import LlavaConfig, TextConfig, VisionConfig
from sparsevlm_jax.flops import prefill_flops
from sparsevlm_jax.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, preprocess_image
from sparsevlm_jax.sparse.config import SparseConfig

PREFIX_LEN = 35  # BOS + vicuna_v1 system prompt + "USER: ": the image starts at position 35
TEXT_LEN = 20  # question + " ASSISTANT:"
VOCAB = 512
DEFAULT_BUDGETS = (192, 128, 64)
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def demo_config() -> LlavaConfig:
    """LLaVA-1.5 geometry (576 visual tokens, 32 decoder layers), narrow widths."""
    vision = VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=336,
        patch_size=14,
    )
    text = TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
    )
    return LlavaConfig(vision=vision, text=text, image_token_index=-200)


def synthetic_image(width: int = 448, height: int = 336) -> Image.Image:
    """A deterministic non-square test card: gradient sky, sun, house, tree."""
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (1 - y) * np.array([110, 170, 240]) + y * np.array([230, 240, 255])
    img = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.rectangle([0, int(height * 0.72), width, height], fill=(70, 150, 60))
    d.ellipse([width - 120, 30, width - 50, 100], fill=(255, 215, 60))
    d.rectangle([70, 150, 220, 260], fill=(190, 60, 50))
    d.polygon([(55, 150), (145, 80), (235, 150)], fill=(90, 50, 40))
    d.rectangle([125, 200, 165, 260], fill=(80, 50, 30))
    d.rectangle([290, 170, 310, 260], fill=(100, 70, 40))
    d.ellipse([255, 100, 345, 190], fill=(40, 120, 50))
    return img


def demo_prompt(seed: int = 1) -> tuple[list[int], list[int]]:
    """Fixed prompt token ids: (prefix with BOS, text after the image)."""
    rng = np.random.default_rng(seed)
    prefix = [1, *rng.integers(3, VOCAB, PREFIX_LEN - 1).tolist()]
    return prefix, rng.integers(3, VOCAB, TEXT_LEN).tolist()


def demo_batch(cfg: LlavaConfig, image: Image.Image) -> tuple[Batch, np.ndarray]:
    """The one-example batch and its [S, S, 3] normalised pixels."""
    pixels = preprocess_image(image, cfg.vision.image_size, mode="pad")
    prefix, text = demo_prompt()
    batch, _ = make_batch([prefix], [text], pixels[None])
    return batch, pixels


@dataclass
class Row:
    """One method's line of the table."""

    method: str
    equivalent_tokens: float
    kept: str
    flops: float
    dense_flops: float
    kv_bytes: int
    dense_kv_bytes: int
    first_call_s: float
    prefill_ms: float
    token_ids: list[int]
    layers: list[dict] = field(default_factory=list)


def dense_tokens(batch: Batch, cfg: LlavaConfig) -> int:
    """Valid tokens of the (single-example) unpruned prompt."""
    return int(batch.prefix_mask.sum() + batch.text_mask.sum()) + cfg.num_image_tokens


def run_method(
    params: dict,
    cfg: LlavaConfig,
    batch: Batch,
    sparse: SparseConfig,
    max_new_tokens: int,
    name: str,
) -> Row:
    """Runs `generate_ids` twice (compile, then timed) and summarises the second run."""
    from sparsevlm_jax.generate import generate_ids
    from sparsevlm_jax.pipeline import example_stats, kv_cache_bytes

    t0 = time.perf_counter()
    generate_ids(params, cfg, batch, 1, sparse, max_new_tokens, eos_ids=())
    first = time.perf_counter() - t0
    gen = generate_ids(params, cfg, batch, 1, sparse, max_new_tokens, eos_ids=())
    n = dense_tokens(batch, cfg)
    dense_layers = np.full(cfg.text.num_hidden_layers, n)
    dense_flops = float(prefill_flops(dense_layers, cfg.text))
    dense_kv = kv_cache_bytes(cfg, dense_layers, max_new_tokens)
    prefill_ms = 1000.0 * gen.timings["prefill"]
    if not sparse.enabled:
        return Row(
            name, float(cfg.num_image_tokens), "-", dense_flops, dense_flops, dense_kv, dense_kv,
            first, prefill_ms, gen.token_ids[0],
        )  # fmt: skip
    s = example_stats(cfg, sparse, gen, 0, max_new_tokens)
    kept = " ".join(f"{len(x['kept'])}+{x['recycled']}" for x in s["layers"])
    return Row(
        name, s["equivalent_tokens"], kept, s["flops"], s["dense_flops"], s["kv_cache_bytes"],
        s["dense_kv_cache_bytes"], first, prefill_ms, gen.token_ids[0], s["layers"],
    )  # fmt: skip


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def format_table(rows: Sequence[Row]) -> str:
    """The side-by-side comparison, one line per method."""
    head = (
        "method",
        "visual tokens",
        "kept+recycled per pruning layer",
        "prefill FLOPs",
        "KV cache",
        "1st call s",
        "prefill ms",
    )
    body = [
        (
            r.method,
            f"{r.equivalent_tokens:.1f}",
            r.kept,
            f"{100 * r.flops / r.dense_flops:.1f}%",
            f"{human_bytes(r.kv_bytes)} ({100 * r.kv_bytes / r.dense_kv_bytes:.1f}%)",
            f"{r.first_call_s:.1f}",
            f"{r.prefill_ms:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i in (0, 2) else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*line).rstrip() for line in (head, *body))


def write_pictures(out: Path, image: Image.Image, pixels: np.ndarray, rows: Sequence[Row]) -> list:
    """The test card and one kept-patches picture per sparse method, written atomically."""
    from sparsevlm_jax.visualize import display_pixels, render, save_atomic

    cfg = demo_config()
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "demo_image.png"]
    save_atomic(image, written[0])
    rgb = display_pixels(pixels, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    for r in rows:
        if not r.layers:
            continue
        budget = int(r.method.split()[-1])
        path = out / f"demo_kept_v1_{budget}.png"
        save_atomic(render(rgb, cfg.vision.patch_size, r.layers, cfg.num_image_tokens), path)
        written.append(path)
    return written


def request_fast_compile() -> bool:
    """Asks XLA for quick, lightly optimised CPU compiles; True when that will apply.

    The demo compiles a prefill per method and runs each twice, so compilation dominates its
    run time; optimisation level 0 roughly halves it (the code then runs slower). XLA reads
    the flag when JAX starts its backend, so this only works before the first computation
    (a fresh `sparsevlm demo` process); an explicit level in XLA_FLAGS is left alone.
    """
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return False
    except (ImportError, AttributeError):  # private API: assume it is too late
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAG}".strip()
    return FAST_COMPILE_FLAG in os.environ["XLA_FLAGS"].split()


def run_demo(
    budgets: Sequence[int] = DEFAULT_BUDGETS,
    max_new_tokens: int = 8,
    out: str | Path | None = None,
    echo: Callable[[str], None] = print,
    fast_compile: bool = True,
) -> list[Row]:
    """Builds the random model, runs dense and v1 at each named budget, prints the table.

    fast_compile: use `request_fast_compile` (timings are then of lightly optimised code).
    """
    from sparsevlm_jax.params import count_params, init_params

    t0 = time.perf_counter()
    fast = request_fast_compile() if fast_compile else False
    cfg = demo_config()
    params = init_params(cfg, seed=0)
    image = synthetic_image()
    batch, pixels = demo_batch(cfg, image)
    layers = SparseConfig.v1(DEFAULT_BUDGETS[0], cfg.text.num_hidden_layers).layers
    echo(
        "SparseVLM demo on a tiny RANDOM LLaVA (weights are random: generated token ids are "
        "meaningless; this shows the mechanics)."
    )
    echo(
        f"model: CLIP {cfg.vision.image_size}px/{cfg.vision.patch_size} -> "
        f"{cfg.num_image_tokens} visual tokens, {cfg.text.num_hidden_layers} decoder layers "
        f"(hidden {cfg.text.hidden_size}), {count_params(params):,} parameters; "
        f"prompt: {PREFIX_LEN} tokens + image + {TEXT_LEN} tokens; pruning layers "
        f"{', '.join(map(str, layers))}"
    )
    rows = [run_method(params, cfg, batch, SparseConfig(), max_new_tokens, "dense")]
    for b in budgets:
        sparse = SparseConfig.v1(b, cfg.text.num_hidden_layers)
        rows.append(run_method(params, cfg, batch, sparse, max_new_tokens, f"v1 {b}"))
    echo("")
    echo(format_table(rows))
    echo("")
    for r in rows:
        echo(f"{r.method:>7} generated ids: {r.token_ids}")
    echo(
        "\nvisual tokens: mean over decoder layers of the visual tokens each layer sees "
        "(recycled included). FLOPs: analytic prefill FLOPs (SPEC §8) vs dense. KV cache: "
        f"K+V bytes incl. room for {max_new_tokens} new tokens. 1st call: includes compilation. "
        "prefill ms: second call; v1 runs the bucketed capacity policy (each stage sized to "
        "the batch's largest budget, rounded up to a bucket)."
    )
    if fast:
        echo(
            f"Compiled with XLA_FLAGS={FAST_COMPILE_FLAG} to compile quickly (slower code); "
            "`sparsevlm demo --optimized` times fully optimised code."
        )
    if out is not None:
        for path in write_pictures(Path(out), image, pixels, rows):
            echo(f"wrote {path}")
    echo(f"total {time.perf_counter() - t0:.1f} s")
    return rows


# ----------------------------------------------------------------------------------------------
# The bundled model: real answers, dense and pruned side by side

DEMO_METHODS = (("v2_0", 64), ("v1_5", 64), ("v1", 64), ("fastv", 64), ("random", 64))
# Column headings: (what the method is, its version) per SparseConfig.method.
METHOD_HEADINGS = {
    "dense": ("dense", ""),
    "v2_0": ("SparseVLM+", "v2.0"),
    "v1_5": ("SparseVLM", "v1.5"),
    "v1": ("SparseVLM", "v1"),
    "fastv": ("FastV", ""),
    "random": ("random", ""),
}


def clip_text(text: str, width: int) -> str:
    """`text`, cut to `width` characters with a trailing "…" when longer."""
    return text if len(text) <= width else text[: width - 1] + "…"


def column_heading(sparse: SparseConfig, visual_tokens: float) -> tuple[str, str, str]:
    """Three heading lines for a method's column: what it is, version and named budget, and
    the visual tokens it kept (mean over decoder layers), e.g. ("SparseVLM+", "v2.0 @64",
    "16 tokens")."""
    what, version = METHOD_HEADINGS[sparse.method]
    budget = f"@{sparse.budget_name}" if sparse.budget_name else ""
    return what, " ".join(x for x in (version, budget) if x), f"{visual_tokens:.0f} tokens"


def sparse_defaults(model: str | Path, method: str, budget: int, cfg: LlavaConfig) -> SparseConfig:
    """A named preset for `cfg` under the default capacity policy (`calibrated.default_capacity`):
    v1 takes the calibrated capacities the model ships in `sparse_defaults.json` when they fit
    its layers, else runs `bucketed`; a note on stderr says when they do not fit."""
    import sys

    from sparsevlm_jax.calibrated import default_capacity
    from sparsevlm_jax.sparse.config import named_sparse_config

    sparse = named_sparse_config(method, budget, cfg.text.num_hidden_layers, cfg.num_image_tokens)
    sparse, note = default_capacity(sparse, model)
    if note is not None:
        print(f"note: {note}", file=sys.stderr)
    return sparse


def run_model_demo(
    model: str | Path,
    num_images: int = 2,
    methods: Sequence[tuple[str, int]] = DEMO_METHODS,
    out: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """Asks the model the shapes task's questions about a few test images, dense and pruned.

    Prints every answer side by side with the gold answer, then per method the accuracy on
    these questions, the equivalent visual tokens and the analytic prefill FLOPs and KV bytes
    against dense; writes the kept-patches picture of the first pruned method to `out`.
    Returns the per-method summary.
    """
    from sparsevlm_jax import shapes_task
    from sparsevlm_jax.pipeline import LlavaPipeline
    from sparsevlm_jax.visualize import kept_picture, save_atomic

    t0 = time.perf_counter()
    pipe = LlavaPipeline.from_pretrained(model)
    cfg = pipe.cfg
    examples = [shapes_task.example("test", i, cfg.vision.image_size) for i in range(num_images)]
    images = [Image.fromarray(ex.image) for ex in examples for _ in ex.questions]
    questions = [q for ex in examples for q in ex.questions]
    configs = {"dense": SparseConfig()}
    configs.update({f"{m}@{b}": sparse_defaults(model, m, b, cfg) for m, b in methods})
    echo(
        f"model: {model} ({cfg.num_image_tokens} visual tokens, "
        f"{cfg.text.num_hidden_layers} decoder layers); {len(questions)} questions about "
        f"{num_images} test images of the shapes task"
    )
    answers, summary = {}, {}
    for name, sparse in configs.items():
        res = pipe.generate(images, [q.text for q in questions], sparse, max_new_tokens=4)
        answers[name] = res
        st = [r.stats for r in res]
        correct = sum(r.text.strip() == q.answer for r, q in zip(res, questions, strict=True))
        summary[name] = {
            "accuracy": correct / len(questions),
            "visual_tokens": float(
                np.mean([s.get("equivalent_tokens", cfg.num_image_tokens) for s in st])
            ),
            "flops": float(
                np.mean([s["flops"] / s["dense_flops"] if "flops" in s else 1.0 for s in st])
            ),
            "kv": float(
                np.mean(
                    [
                        s["kv_cache_bytes"] / s["dense_kv_cache_bytes"]
                        if "kv_cache_bytes" in s
                        else 1.0
                        for s in st
                    ]
                )
            ),
        }
    names = list(configs)
    width, col = max(len(q.text) for q in questions), 12
    headings = [column_heading(configs[n], summary[n]["visual_tokens"]) for n in names]
    echo("")
    for line in range(3):
        first = ("question", "gold") if line == 0 else ("", "")
        echo(f"{first[0]:<{width}}  {first[1]:<7}" + "".join(f"{h[line]:>{col}}" for h in headings))
    for i, q in enumerate(questions):
        echo(
            f"{q.text:<{width}}  {q.answer:<7}"
            + "".join(f"{clip_text(answers[n][i].text.strip(), col - 2):>{col}}" for n in names)
        )
    echo("")
    echo(f"{'method':<12}{'correct':>9}{'visual tokens':>15}{'prefill FLOPs':>15}{'KV cache':>10}")
    for n in names:
        s = summary[n]
        echo(
            f"{n:<12}{s['accuracy']:>9.0%}{s['visual_tokens']:>15.1f}"
            f"{s['flops']:>15.0%}{s['kv']:>10.0%}"
        )
    echo(
        "(visual tokens: mean over decoder layers; FLOPs: SPEC §8 analytic prefill count vs "
        "dense; KV: K+V bytes vs dense)"
    )
    pruned = [n for n in names if n != "dense"]
    if out is not None and pruned:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        first = answers[pruned[0]][0]
        picture = kept_picture(images[0], pipe.processor, cfg, first.stats["layers"])
        target = path / f"kept_{pruned[0].replace('@', '_')}.png"
        save_atomic(picture, target)
        echo(f"wrote {target} (patches kept by {pruned[0]} for '{questions[0].text}')")
    echo(f"total {time.perf_counter() - t0:.1f} s")
    return summary
