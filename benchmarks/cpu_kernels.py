"""Where XLA:CPU loses to PyTorch on one `mini-next` decoder layer: kernel by kernel.

    python benchmarks/cpu_kernels.py   # writes benchmarks/results/cpu-kernels.{json,md,png}

The dense `mini-next` prefill (2,432 slots, 32 layers of width 256, 4 heads of 64, float32) is
1.2x transformers' on 2 CPU cores. This splits one layer into what both sides compute and
times each piece on both, same shapes and float32, medians after warm-up:

- `layer`: one whole decoder layer (ours: `llama.prefill_layer` with the block-skipping causal
  mask, which is the online-softmax tiled attention at this length; theirs:
  `LlamaDecoderLayer`, sdpa).
- `projections + MLP`: the layer's seven weight matmuls ([2432, 256] by the weights).
- `causal attention`: ours (`llama.causal_attend`) against `scaled_dot_product_attention`
  (is_causal, PyTorch's fused CPU flash kernel).
- `QK tile` / `PV tile`: one attention tile's product, [4, Q, 64] x [4, 64, S] and
  [4, Q, S] x [4, S, 64], repeated 20 times inside one jitted `fori_loop` (no dispatch cost)
  against `torch.bmm`.

Nothing else should run meanwhile (two cores). torch runs on 2 threads.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparsevlm_jax.model import llama  # noqa: E402
from sparsevlm_jax.presets import mini_next  # noqa: E402

T, REPEAT, INNER = 2432, 15, 20
TILES = ((256, 512), (512, 512), (256, 1024), (1024, 1024))


def median_ms(fn, repeat: int = REPEAT) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.set_num_threads(2)
    cfg = mini_next().text
    d, m, n, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim
    hf = LlamaConfig(
        hidden_size=d,
        intermediate_size=m,
        num_attention_heads=n,
        num_key_value_heads=n,
        head_dim=h,
        attn_implementation="sdpa",
    )
    layer = LlamaDecoderLayer(hf, 0).eval()
    sd = {k: v.detach().numpy() for k, v in layer.state_dict().items()}
    names = {
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
    }
    lp = {ours: {"kernel": jnp.asarray(sd[f"{theirs}.weight"].T)} for ours, theirs in names.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        lp[norm] = {"scale": jnp.asarray(sd[f"{norm}.weight"])}

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((1, T, d), np.float32)
    q_np = rng.standard_normal((1, T, n, h), np.float32)
    x, q = jnp.asarray(x_np), jnp.asarray(q_np)
    pos = jnp.arange(T)[None]
    mask = llama.CausalMask(jnp.ones((1, T), bool), llama.query_block_ends(T))

    ours_layer = jax.jit(lambda lp, x: llama.prefill_layer(lp, cfg, x, pos, mask)[0])
    ours_mm = jax.jit(
        lambda lp, x: (
            llama.mlp(lp, x)
            + sum(llama.linear(x, lp[k]) for k in ("q_proj", "k_proj", "v_proj", "o_proj"))
        )
    )
    ours_att = jax.jit(lambda q: llama.causal_attend(q, q, q, mask))
    tx, tq = torch.from_numpy(x_np), torch.from_numpy(q_np).transpose(1, 2).contiguous()
    tpos = torch.arange(T)[None]
    rows = []
    with torch.inference_mode():
        emb = LlamaRotaryEmbedding(hf)(tx, tpos)
        att = layer.self_attn
        pieces = [
            (
                "layer",
                lambda: ours_layer(lp, x),
                lambda: layer(tx, attention_mask=None, position_embeddings=emb, position_ids=tpos),
            ),
            (
                "projections + MLP",
                lambda: ours_mm(lp, x),
                lambda: (
                    layer.mlp(tx)
                    + att.q_proj(tx)
                    + att.k_proj(tx)
                    + att.v_proj(tx)
                    + att.o_proj(tx)
                ),
            ),
            (
                "causal attention",
                lambda: ours_att(q),
                lambda: torch.nn.functional.scaled_dot_product_attention(
                    tq, tq, tq, is_causal=True
                ),
            ),
        ]
        # mini-qwen's tower at 720x1280: 4,864 patches attending within the one frame
        # (4 heads of 16, no causal mask), as the tower runs it (256-row query tiles, key tiles
        # with an online softmax) against PyTorch's fused kernel
        from sparsevlm_jax import qwen_images
        from sparsevlm_jax.model import qwen_vision
        from sparsevlm_jax.presets import mini_qwen

        vq = mini_qwen().qwen_vision
        img = rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8)
        vin, _ = qwen_images.prepare([[img]], vq)
        pv = vin.capacity
        vq_np = rng.standard_normal((1, pv, vq.num_heads, vq.head_dim), np.float32)
        vqj = jnp.asarray(vq_np)
        tile_att = jax.jit(
            lambda q: qwen_vision.segment_attend(
                q, q, q, jnp.asarray(vin.segments), jnp.asarray(vin.block_ranges)[:, 0], vin.block
            )
        )
        vqt = torch.from_numpy(vq_np).transpose(1, 2).contiguous()
        pieces.append(
            (
                f"tower attention ({pv} patches, heads of {vq.head_dim})",
                lambda: tile_att(vqj),
                lambda: torch.nn.functional.scaled_dot_product_attention(vqt, vqt, vqt),
            )
        )
        for name, ours, theirs in pieces:
            rows.append({"piece": name, "jax_ms": median_ms(ours), "torch_ms": median_ms(theirs)})
        for qr, sc in TILES:
            a = rng.standard_normal((n, qr, h), np.float32)
            b = rng.standard_normal((n, sc, h), np.float32)
            p = rng.standard_normal((n, qr, sc), np.float32)
            flops = 2 * n * qr * sc * h
            ta, tb, tp = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(p)
            for name, f, args, targs in (
                (
                    "QK tile",
                    lambda u, w: jnp.einsum("nqh,nsh->nqs", u, w),
                    (a, b),
                    lambda ta=ta, tb=tb: torch.bmm(ta, tb.transpose(1, 2)),
                ),
                (
                    "PV tile",
                    lambda u, w: jnp.einsum("nqs,nsh->nqh", u, w),
                    (p, b),
                    lambda tp=tp, tb=tb: torch.bmm(tp, tb),
                ),
            ):

                def looped(u, w, f=f):
                    body = lambda i, c: c + f(u + i * 1e-3, w)[0, 0, 0]  # noqa: E731
                    return jax.lax.fori_loop(0, INNER, body, 0.0)

                jf = jax.jit(looped)
                ja, jb = jnp.asarray(args[0]), jnp.asarray(args[1])
                jms = median_ms(lambda jf=jf, ja=ja, jb=jb: jf(ja, jb)) / INNER
                tms = median_ms(targs)
                rows.append(
                    {
                        "piece": f"{name} {qr}x{sc}",
                        "jax_ms": jms,
                        "torch_ms": tms,
                        "jax_gflops": flops / jms / 1e6,
                        "torch_gflops": flops / tms / 1e6,
                    }
                )
    for r in rows:
        r["jax_over_torch"] = r["jax_ms"] / r["torch_ms"]
    write(rows, torch.__version__)


def write(rows: list[dict], torch_version: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = REPO / "benchmarks" / "results"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if "model name" in ln
        )
    except (OSError, StopIteration):
        pass
    meta = {
        "hardware": f"{cpu}, {len(jax.devices())} JAX device, 2 usable cores",
        "jax": jax.__version__,
        "torch": torch_version,
        "slots": T,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python benchmarks/cpu_kernels.py",
    }
    (out / "cpu-kernels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# XLA:CPU against PyTorch, kernel by kernel, on one `mini-next` layer",
        "",
        f"Generated by `{meta['command']}` on {meta['when']}; {meta['hardware']}; JAX "
        f"{meta['jax']}, torch {meta['torch']} (2 threads); float32, {T} slots, 4 heads of 64; "
        "nothing else ran. Tiles: one product repeated inside a jitted `fori_loop` "
        "(per-call dispatch excluded) against `torch.bmm`.",
        "",
        "| piece | JAX ms | PyTorch ms | JAX / PyTorch | JAX GFLOP/s | PyTorch GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        gf = f"{r['jax_gflops']:.0f} | {r['torch_gflops']:.0f}" if "jax_gflops" in r else "– | –"
        lines.append(
            f"| {r['piece']} | {r['jax_ms']:.3f} | {r['torch_ms']:.3f} | "
            f"{r['jax_over_torch']:.2f} | {gf} |"
        )
    (out / "cpu-kernels.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([r["piece"] for r in rows], [r["jax_over_torch"] for r in rows], color="tab:blue")
    ax.axvline(1.0, color="k", lw=1)
    ax.axvline(0.9, color="tab:red", ls="--", lw=1, label="0.9 (issue target, whole prefill)")
    ax.set_xlabel("JAX time / PyTorch time (lower is better)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title(f"mini-next layer pieces, {T} slots, float32, 2 cores")
    fig.tight_layout()
    fig.savefig(out / "cpu-kernels.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
