"""Long-prompt prefill attention on CPU: memory and time, before / after the key-tiled path.

    python benchmarks/long_prefill.py --parts memory          # compiles only: any load
    python benchmarks/long_prefill.py                         # waits for idle cores, all parts
    python benchmarks/long_prefill.py --parts attention --wait 0   # measure now, whatever the load
    python benchmarks/long_prefill.py --render                # JSON -> markdown + PNG again

"before" is the query-block path (`llama.causal_attend`: ~4 query blocks, each forming whole
score rows against its causal key prefix), forced by raising `attention.FLASH_MIN_LENGTH`
past every length; "after" is the code as it is (`attention.flash_causal_attend` from
`FLASH_MIN_LENGTH` slots on, tiles of `attention.flash_block(T)`).

Parts (each merged into benchmarks/results/long-prefill.json, then .md and .png redrawn):
  memory     XLA `compiled.memory_analysis()` temporaries of the causal attention alone
             ([1, T] slots, mini-next heads: 4 of 64, float32) and of one prefill stage
             (`llama.prefill_stage` over mini-next's 32 layers, batch 1) at 1k-8k slots.
  attention  wall time of the attention alone at 640-8192 slots: before, tiles of 256 / 512 /
             1024 (the block-size sweep behind `flash_block`), and torch's
             `scaled_dot_product_attention(is_causal=True)` on the same threads; medians of
             interleaved rounds.
  prefill    the dense mini-next prefill (one 480x640 image: 2,340 visual tokens, 2,432 slots)
             through `sparsevlm bench --methods dense`, before and after, with transformers'
             (sdpa) prefill from the same runs; each run a fresh process.

Timing needs idle cores: before a timed part the script polls the 1-minute load average once
a minute for up to `--wait` minutes and starts when it is below `--max-load` (exit 3 without
timing when it never is). The load at the start and end of each part is in the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/long_prefill.py` from a plain checkout
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
NAME = "long-prefill"
MEMORY_LENGTHS = (1024, 2048, 4096, 8192)
ATTENTION_LENGTHS = (640, 1024, 1536, 2048, 2432, 4096, 8192)
TILES = (256, 512, 1024)
HEADS, HEAD_DIM = 4, 64  # mini-next's attention (presets.mini)
MAX_LOAD = 0.6
WAIT_MINUTES = 25
BENCH_ARGS = [
    "bench", "--shape", "mini-next", "--dtype", "float32", "--methods", "dense",
    "--images", "480x640", "--warmup", "1", "--repeat", "5", "--decode-steps", "1",
    "--ttft-repeat", "1", "--max-new-tokens", "4", "--count", "none", "--no-save", "--json",
    "--quiet",
]  # fmt: skip


@contextlib.contextmanager
def before_path():
    """Traces inside run the query-block path ("before") at every length."""
    from sparsevlm_jax.model import attention

    old = attention.FLASH_MIN_LENGTH
    attention.FLASH_MIN_LENGTH = 1 << 40
    try:
        yield
    finally:
        attention.FLASH_MIN_LENGTH = old


def hardware() -> dict[str, Any]:
    """The machine and library versions, for the report."""
    import jax

    from sparsevlm_jax.bench.timing import cpu_model, usable_cores

    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
    }
    with contextlib.suppress(ImportError):
        import torch

        info["torch"] = torch.__version__
    return info


def wait_for_idle(minutes: float, max_load: float) -> bool:
    """Polls the 1-minute load average every minute for up to `minutes`; True once it is
    below `max_load`."""
    deadline = time.monotonic() + 60 * minutes
    while True:
        load = os.getloadavg()[0]
        print(f"load average {load:.2f} (need < {max_load})", file=sys.stderr, flush=True)
        if load < max_load:
            return True
        if time.monotonic() + 60 > deadline:
            return False
        time.sleep(60)


def valid_slots(t: int):
    """[1, t] validity of a realistic prompt: 13 slots of prefix-bucket padding on the left,
    1/16 of the slots unused visual capacity in the middle."""
    import numpy as np

    valid = np.ones((1, t), bool)
    valid[:, :13] = False
    valid[:, t // 2 : t // 2 + t // 16] = False
    return valid


# ----------------------------------------------------------------------------- memory


def memory_part() -> dict[str, Any]:
    """Compiled temporaries (bytes) of the attention alone and of one 32-layer prefill stage,
    before and after, per length."""
    import jax
    import jax.numpy as jnp

    from sparsevlm_jax.model import llama
    from sparsevlm_jax.params import init_params
    from sparsevlm_jax.presets import mini_next

    cfg = mini_next()
    layers = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), init_params(cfg, 0)["text"]["layers"]
    )
    shape = jax.ShapeDtypeStruct
    rows = []
    for t in MEMORY_LENGTHS:
        x = shape((1, t, HEADS, HEAD_DIM), jnp.float32)
        valid = shape((1, t), jnp.bool_)
        ends = llama.query_block_ends(t)
        stage_args = (
            layers,
            shape((1, t, cfg.text.hidden_size), jnp.float32),
            shape((1, t), jnp.int32),
            valid,
        )
        row: dict[str, Any] = {"length": t}
        for label, ctx in (("before", before_path), ("after", contextlib.nullcontext)):
            with ctx():  # fresh jit objects: the path is read when a program is traced
                attend = jax.jit(
                    lambda q, k, v, m, e=ends: llama.attend(q, k, v, llama.CausalMask(m, e))
                )
                stage = jax.jit(
                    lambda ly, h, p, m: llama.prefill_stage(
                        ly, cfg.text, 0, 32, h, p, m, query_tail=64
                    )
                )
                a = attend.lower(x, x, x, valid).compile().memory_analysis()
                s = stage.lower(*stage_args).compile().memory_analysis()
            row[f"attention_{label}"] = a.temp_size_in_bytes
            row[f"stage_{label}"] = s.temp_size_in_bytes
        rows.append(row)
        print(f"memory {row}", file=sys.stderr, flush=True)
    return {"rows": rows, "shape": [1, "T", HEADS, HEADS, HEAD_DIM], "dtype": "float32"}


# -------------------------------------------------------------------------- attention


def attention_part(rounds: int) -> dict[str, Any]:
    """Median ms of the attention alone per variant and length (interleaved rounds)."""
    import numpy as np
    import torch

    from sparsevlm_jax.bench.timing import limit_blas_threads, prepare_environment

    prepare_environment()
    limit_blas_threads(1)
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    for t in ATTENTION_LENGTHS:
        rows.append(time_length(t, rounds if t <= 2432 else max(3, rounds // 3), rng))
        print(f"attention {t}: {rows[-1]['ms']}", file=sys.stderr, flush=True)
    return {"rows": rows, "torch_threads": threads, "valid": "13 left padding + T/16 in the middle"}


def time_length(t: int, rounds: int, rng) -> dict[str, Any]:
    """One length: every variant's median / min ms over `rounds` rotating rounds and its
    largest |difference| to before on rows with a valid key."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from sparsevlm_jax.model import attention, llama

    q, k, v = (jnp.asarray(rng.normal(size=(1, t, HEADS, HEAD_DIM)), jnp.float32) for _ in "qkv")
    valid = jnp.asarray(valid_slots(t))
    ends = llama.query_block_ends(t)
    with before_path():
        before = jax.jit(lambda q, k, v, m: llama.attend(q, k, v, llama.CausalMask(m, ends)))
        ref = np.asarray(before(q, k, v, valid))
    fns = {"before": lambda: before(q, k, v, valid)}
    tiled = jax.jit(attention.flash_causal_attend, static_argnums=4)
    for tile in TILES:
        if tile < t:
            fns[f"tiles_{tile}"] = lambda tile=tile: tiled(q, k, v, valid, tile)
    rows_ok = np.cumsum(valid_slots(t), axis=1) > 0
    diffs = {
        name: float(np.abs(np.asarray(jax.block_until_ready(fn())) - ref)[rows_ok].max())
        for name, fn in fns.items()
    }
    tq, tk, tv = (torch.from_numpy(np.asarray(x)).transpose(1, 2).contiguous() for x in (q, k, v))

    def sdpa():
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

    fns["torch_sdpa"] = sdpa
    sdpa()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            out = fns[name]()
            if name != "torch_sdpa":
                jax.block_until_ready(out)
            times[name].append(1e3 * (time.perf_counter() - t0))
    block = attention.flash_block(t)
    ms = {name: statistics.median(ts) for name, ts in times.items()}
    ms["after"] = ms[f"tiles_{block}"] if block else ms["before"]
    return {
        "length": t,
        "after_block": block,
        "ms": ms,
        "min_ms": {name: min(ts) for name, ts in times.items()},
        "rounds": rounds,
        "max_abs_diff_vs_before": diffs,
    }


# ---------------------------------------------------------------------------- prefill


def bench_run(before: bool) -> dict[str, Any]:
    """One `sparsevlm bench` dense run in a fresh process; the dense row's JAX + torch ms."""
    pre = (
        "from sparsevlm_jax.model import attention; attention.FLASH_MIN_LENGTH = 1 << 40; "
        if before
        else ""
    )
    code = f"import sys; {pre}from sparsevlm_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run(
        [sys.executable, "-c", code, *BENCH_ARGS], capture_output=True, text=True, cwd=REPO,
        env=env, check=True,
    )  # fmt: skip
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    dense = next(r for r in report["results"] if r["method"] == "dense")
    return {
        "jax_ms": dense["jax"]["prefill"]["median_ms"],
        "jax_min_ms": dense["jax"]["prefill"]["min_ms"],
        "jax_temp_bytes": dense["jax"]["memory"]["prefill"]["temp"],
        "torch_ms": dense["torch"]["torch"]["prefill"]["median_ms"],
        "torch_min_ms": dense["torch"]["torch"]["prefill"]["min_ms"],
        "slots": report["workload"].get("visual_slots"),
    }


def prefill_part() -> dict[str, Any]:
    runs = {}
    for label in ("before", "after"):
        runs[label] = bench_run(label == "before")
        print(f"prefill {label}: {runs[label]}", file=sys.stderr, flush=True)
    return {"runs": runs, "command": "sparsevlm " + " ".join(BENCH_ARGS)}


# ----------------------------------------------------------------------------- report


def mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def markdown(data: dict[str, Any]) -> str:
    hw = data.get("hardware", {})
    lines = [
        "# Long-prompt prefill attention on CPU: query blocks (before) vs key tiles (after)",
        "",
        "Generated by `python benchmarks/long_prefill.py` (see its docstring).",
        "",
        f"- Hardware: {hw.get('cpu_model', '?')}, {hw.get('usable_cores', '?')} usable cores; "
        f"JAX {hw.get('jax', '?')} on {hw.get('jax_backend', '?')}; torch {hw.get('torch', '?')}",
        "- before: `llama.causal_attend`'s ~4 query blocks, whole score rows against each "
        "block's causal key prefix; after: `attention.flash_causal_attend` (online softmax over "
        "key tiles, only tiles up to the diagonal) from `FLASH_MIN_LENGTH` slots on.",
    ]
    mem = data.get("memory")
    if mem:
        rows = mem["rows"]
        first = rows[0]
        lines += [
            "",
            "## Memory: XLA temporaries (`compiled.memory_analysis().temp_size_in_bytes`)",
            "",
            f"Attention alone: [1, T] slots, {HEADS} heads of {HEAD_DIM}, float32. One prefill "
            "stage: `llama.prefill_stage` over mini-next's 32 layers (d=256, MLP 688), batch 1.",
            "Ratios are to the 1,024-slot program (a full score matrix grows 64x from 1k to 8k).",
            "",
            "| slots | attention before MiB | attention after MiB | after / 1k | "
            "stage before MiB | stage after MiB | after / 1k |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['length']} | {mib(r['attention_before'])} | {mib(r['attention_after'])} "
                f"| {r['attention_after'] / first['attention_after']:.2f} "
                f"| {mib(r['stage_before'])} | {mib(r['stage_after'])} "
                f"| {r['stage_after'] / first['stage_after']:.2f} |"
            )
    att = data.get("attention")
    if att:
        names = ["before", *[f"tiles_{b}" for b in TILES], "after", "torch_sdpa"]
        lines += [
            "",
            "## Attention alone: milliseconds (median of interleaved rounds)",
            "",
            f"{HEADS} heads of {HEAD_DIM}, float32, batch 1, {att['valid']} invalid; torch "
            f"`scaled_dot_product_attention(is_causal=True)` on {att['torch_threads']} threads "
            f"(no padding mask: its fused path). Load average {fmt_load(att)} (the end: this "
            "run's own load). *after* = the tile size `flash_block` picks (*rows*: the "
            "query-block path, below `FLASH_MIN_LENGTH`).",
            "",
            "| slots | " + " | ".join(names) + " | after block | after / before | after / torch |",
            "|---|" + "---|" * (len(names) + 3),
        ]
        for r in att["rows"]:
            ms = r["ms"]
            cells = " | ".join(f"{ms[n]:.1f}" if n in ms else "–" for n in names)
            lines.append(
                f"| {r['length']} | {cells} | {r['after_block'] or 'rows'} | "
                f"{ms['after'] / ms['before']:.2f} | {ms['after'] / ms['torch_sdpa']:.2f} |"
            )
        worst = max(max(r["max_abs_diff_vs_before"].values()) for r in att["rows"])
        lines.append("")
        lines.append(f"Largest |difference| to before over rows with a valid key: {worst:.1e}.")
    pre = data.get("prefill")
    if pre:
        b, a = pre["runs"]["before"], pre["runs"]["after"]
        lines += [
            "",
            "## Dense mini-next prefill (one 480x640 image: 2,432 visual slots, 2,531 in all), "
            "each run a fresh process",
            "",
            f"`{pre['command']}`; load average {fmt_load(pre)} (the end: these runs' own "
            "load). Before, after and transformers come from the same session; compare them "
            "with each other, not with other days' runs.",
            "",
            "| | JAX prefill ms (min) | transformers sdpa ms (min) | JAX / transformers | "
            "JAX prefill temporaries MiB |",
            "|---|---|---|---|---|",
        ]
        for label, r in (("before", b), ("after", a)):
            lines.append(
                f"| {label} | {r['jax_ms']:.0f} ({r['jax_min_ms']:.0f}) | {r['torch_ms']:.0f} "
                f"({r['torch_min_ms']:.0f}) | {r['jax_ms'] / r['torch_ms']:.2f} | "
                f"{mib(r['jax_temp_bytes'])} |"
            )
        lines.append("")
        lines.append(f"after / before: {a['jax_ms'] / b['jax_ms']:.2f}.")
    return "\n".join(lines) + "\n"


def fmt_load(part: dict[str, Any]) -> str:
    s, e = part.get("load_start"), part.get("load_end")
    return f"{s:.2f} at the start, {e:.2f} at the end" if s is not None else "?"


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    parts = [p for p in ("memory", "attention") if data.get(p)]
    if not parts:
        return
    fig = Figure(figsize=(6 * len(parts), 4.2))
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    for ax, part in zip(axes, parts, strict=True):
        if part == "memory":
            rows = data["memory"]["rows"]
            xs = [r["length"] for r in rows]
            for key, style in (
                ("attention_before", "C1--s"),
                ("attention_after", "C0-o"),
                ("stage_before", "C3--s"),
                ("stage_after", "C2-o"),
            ):
                ax.plot(xs, [r[key] / 2**20 for r in rows], style, label=key.replace("_", " "))
            ax.set_title("XLA temporaries (MiB)")
            ax.set_yscale("log")
        else:
            rows = data["attention"]["rows"]
            xs = [r["length"] for r in rows]
            for key, style in (
                ("before", "C1--s"),
                ("after", "C0-o"),
                ("torch_sdpa", "C7:^"),
            ):
                ax.plot(xs, [r["ms"][key] for r in rows], style, label=key.replace("_", " "))
            ax.set_title("causal attention alone (ms, median)")
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("slots")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    hw = data.get("hardware", {})
    fig.suptitle(
        f"{hw.get('cpu_model', '?')}, {hw.get('usable_cores', '?')} cores; mini-next heads "
        f"({HEADS}x{HEAD_DIM}), float32",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(data: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / f"{NAME}.md").write_text(markdown(data))
    plot(data, out / f"{NAME}.png")
    print(f"wrote {out / NAME}.json|md|png", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="memory,attention,prefill", help="(%(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--rounds", type=int, default=9, help="timing rounds (%(default)s)")
    p.add_argument("--wait", type=float, default=WAIT_MINUTES, help="minutes (%(default)s)")
    p.add_argument("--max-load", type=float, default=MAX_LOAD, help="(%(default)s)")
    p.add_argument("--render", action="store_true", help="redraw .md/.png from the JSON")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    path = args.out / f"{NAME}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if args.render:
        write(data, args.out)
        return 0
    data["hardware"] = hardware()
    for part in args.parts.split(","):
        if part != "memory" and not wait_for_idle(args.wait, args.max_load):
            print(f"{part}: the machine stayed busy, nothing timed", file=sys.stderr)
            write(data, args.out)
            return 3
        load_start = os.getloadavg()[0]
        if part == "memory":
            result = memory_part()
        elif part == "attention":
            result = attention_part(args.rounds)
        elif part == "prefill":
            result = prefill_part()
        else:
            raise SystemExit(f"unknown part {part!r}")
        result.update(load_start=load_start, load_end=os.getloadavg()[0])
        data[part] = result
        write(data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
