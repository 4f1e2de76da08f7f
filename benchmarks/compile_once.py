"""Compile once, answer many (issue 24): what compilation costs an eval, and the ladder choice.

    python benchmarks/compile_once.py                 # the full run (mini shape, 200 questions)
    python benchmarks/compile_once.py --dry-run       # a tiny model, 8 questions (seconds)

Steps, each kept in WORK/state.json so an interrupted run resumes where it stopped:

1. setup: a `mini`-shaped checkpoint (576 visual tokens, 32 layers, width 256, float32, random
   weights, the bundled model's word-level tokenizer) and a question file of N questions:
   four question lengths (text buckets 16, 32, 48, 80) about eight images (drawn shapes,
   noise, flat colours, gradients: different v1 ranks).
2. eval runs through the installed `sparsevlm` command, in fresh processes, under the default
   policy (v1 `bucketed`, no calibration file): `first` with an empty persistent cache,
   `second` the same command again on the same cache (new answers file), `off` without the
   cache, `warmup` with `--warmup` on an empty cache. Wall time, and the summary's programs
   compiled / loaded and compilation seconds.
3. ladder: from `first`'s answer records (the decisions; every policy makes the same ones),
   the stage programs and the FLOPs padding each bucketing would cost on these questions, for
   1/2/4/8 steps per octave, candidates on their own ladder or derived from the kept bucket.
4. reference: `sparsevlm bench --shape mini --methods v1` (the prefill at equal decisions vs
   the PyTorch reference), unless --skip-reference.

Writes OUT/compile-once.json|.md|.png (OUT: benchmarks/results; --dry-run: WORK). Time the
full run on idle cores; the load average is recorded at the start and end of every step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STEM = "compile-once"
LENGTHS = (1, 4, 7, 12)  # question words x this: text buckets 16, 32, 48, 80 with the template
WORDS = "what color is the circle square triangle cross red green blue how many there ?".split()


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def model_config(dry: bool) -> Any:
    from sparsevlm_jax.checkpoint import load_config
    from sparsevlm_jax.config import TextConfig, VisionConfig
    from sparsevlm_jax.shapes_task import demo_model_path

    demo = load_config(demo_model_path())
    if dry:
        return demo
    vision = VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    text = demo.text.__class__(
        **{
            **{f: getattr(demo.text, f) for f in TextConfig.__dataclass_fields__},
            **dict(hidden_size=256, intermediate_size=688, num_hidden_layers=32, head_dim=64),
        }
    )
    return demo.replace(vision=vision, text=text)


def images(n: int, size: int) -> list[Any]:
    """Drawn shapes, noise, flat colours and gradients (different v1 ranks)."""
    from PIL import Image

    from sparsevlm_jax.shapes_task import example

    rng = np.random.default_rng(0)
    out = [Image.fromarray(example("test", i, size).image) for i in range(3)]
    out.append(Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)))
    out += [Image.new("RGB", (size, size), c) for c in ((200, 40, 40), (250, 250, 250))]
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    out.append(Image.fromarray(np.stack([np.tile(ramp, (size, 1))] * 3, -1)))
    out.append(Image.fromarray(np.stack([np.tile(ramp[:, None], (1, size))] * 3, -1)))
    return out[:n]


def setup(work: Path, dry: bool, n_questions: int) -> dict[str, Any]:
    """The checkpoint, images and question file (kept when they exist)."""
    from sparsevlm_jax.checkpoint import save
    from sparsevlm_jax.params import init_params
    from sparsevlm_jax.shapes_task import demo_model_path

    model, folder, qfile = work / "model", work / "images", work / "questions.jsonl"
    cfg = model_config(dry)
    if not (model / "config.json").exists():
        extra = {f: demo_model_path() / f for f in ("tokenizer.json", "tokenizer_config.json")}
        save(model, init_params(cfg, seed=0), cfg, extra_files=extra, overwrite=True)
    pics = images(3 if dry else 8, cfg.vision.image_size)
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(pics):
        im.save(folder / f"{i}.png")
    rng = np.random.default_rng(1)
    lines = []
    for q in range(n_questions):
        words = rng.choice(WORDS, LENGTHS[q % len(LENGTHS)] * 5 - 1).tolist() + ["?"]
        lines.append(
            json.dumps(
                {"question_id": q, "image": f"{(q // 4) % len(pics)}.png", "text": " ".join(words)}
            )  # fmt: skip
        )
    qfile.write_text("\n".join(lines) + "\n")
    return {"model": str(model), "images": str(folder), "questions": str(qfile),
            "num_questions": n_questions, "num_images": len(pics),
            "config": cfg.to_dict()}  # fmt: skip


SUMMARY = re.compile(
    r"compilation: (\d+) programs, (\d+) compiled, (\d+) from the cache; ([\d.]+) s "
    r"\(XLA ([\d.]+) s, cache loads ([\d.]+) s, tracing \+ lowering ([\d.]+) s\)"
)
KINDS = re.compile(r"by program \(XLA or cache load\): (.*)$", re.M)
KIND = re.compile(r"([a-z ]+) (\d+) \(([\d.]+) s\)")
PROGRAMS = re.compile(r"prefill (\d+) fused \+ (\d+) stage programs .*, decode (\d+)")


def parse_summary(text: str) -> list[dict[str, Any]]:
    """Every `compilation:` line of a run (warm-up first when there is one)."""
    keys = ("programs", "compiled", "from_cache", "total_s", "xla_s", "load_s", "trace_s")
    out = [
        {k: (float(v) if k.endswith("_s") else int(v)) for k, v in zip(keys, m, strict=True)}
        for m in SUMMARY.findall(text)
    ]
    for line, kinds in zip(out, KINDS.findall(text), strict=False):  # XLA seconds by kind
        line["by_kind"] = {k.strip(): {"programs": int(n), "xla_s": float(t)}
                           for k, n, t in KIND.findall(kinds)}  # fmt: skip
    return out


def run_eval(work: Path, setup_: dict, name: str, cache: str, args: argparse.Namespace) -> dict:
    """One `sparsevlm eval` in a fresh process; wall time and its compilation summary."""
    answers = work / f"answers-{name}.jsonl"
    answers.unlink(missing_ok=True)
    cmd = [
        shutil.which("sparsevlm") or "sparsevlm", "--compile-cache", cache, "eval",
        "--model", setup_["model"], "--questions", setup_["questions"],
        "--image-folder", setup_["images"], "--answers", str(answers), "--quiet",
        "--sparse", "v1", "--budget", str(args.budget),
        "--max-new-tokens", str(args.max_new_tokens),
    ]  # fmt: skip
    if name.startswith("warmup"):
        cmd.append("--warmup")
    if name.startswith("steps"):  # e.g. steps2: the bucketed policy on a 2-step ladder
        cmd += ["--ladder-steps", name[len("steps") :]]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    before = load()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: sparsevlm eval failed ({proc.returncode}):\n{proc.stderr}")
    lines = parse_summary(proc.stdout)
    progs = PROGRAMS.search(proc.stdout)
    main = lines[-1]  # the whole process (a warm-up's own line comes first)
    return {
        "command": " ".join(cmd[1:]),
        "wall_s": round(wall, 2),
        "compilation": main,
        "warmup": lines[0] if len(lines) > 1 else None,
        "compile_share": round(main["total_s"] / wall, 3),  # cumulative: warm-up included
        "held_programs": dict(
            zip(("fused", "stage", "decode"), map(int, progs.groups()), strict=True)
        )
        if progs
        else None,  # fmt: skip
        "stdout_tail": proc.stdout.strip().splitlines()[-4:],
        "load_before": before,
        "load_after": load(),
    }


def traces(answers: Path) -> list[dict[str, Any]]:
    """Per question: text length and per pruning layer (valid in, kept, candidates)."""
    out = []
    for line in answers.read_text().splitlines():
        rec = json.loads(line)
        meta = rec["metadata"]
        n_vis = meta["visual_counts"][0]
        layers = []
        for layer in meta["layers"]:
            keep = len(layer["kept"])
            cand = (3 * (n_vis - keep)) // 10 + 1 if n_vis > keep else 0
            layers.append((n_vis, keep, cand))
            n_vis = keep + layer["recycled"]
        out.append({"prompt": rec["prompt"], "layers": layers, "final": n_vis})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny model, 8 questions")
    p.add_argument("--work", type=Path, help="work dir (default: /tmp/sparsevlm-compile-once)")
    p.add_argument("--out", type=Path, help="results dir (default: benchmarks/results)")
    p.add_argument("--questions", type=int, help="(200; dry run 8)")
    p.add_argument("--budget", type=int, default=192, help="v1 budget (%(default)s)")
    p.add_argument("--max-new-tokens", type=int, help="(8; dry run 2)")
    p.add_argument("--runs", default="first,second,off,warmup,steps2", help="(%(default)s)")
    p.add_argument("--skip-reference", action="store_true", help="no PyTorch comparison")
    p.add_argument("--fresh", action="store_true", help="forget earlier steps' results")
    args = p.parse_args(argv)
    dry = args.dry_run
    work = args.work or Path("/tmp/sparsevlm-compile-once" + ("-dry" if dry else ""))
    out = args.out or (work if dry else REPO / "benchmarks" / "results")
    args.max_new_tokens = args.max_new_tokens or (2 if dry else 8)
    n = args.questions or (8 if dry else 200)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}

    def save_state() -> None:
        state_path.write_text(json.dumps(state, indent=1))

    if "setup" not in state:
        state["setup"] = setup(work, dry, n)
        save_state()
    cache_dir = work / "cache"
    for name in args.runs.split(","):
        if name in state.get("runs", {}):
            continue
        if name in ("first", "warmup") and cache_dir.exists():
            shutil.rmtree(cache_dir)  # an empty cache
        own = work / f"cache-{name}"  # warm-up and ladder runs: an empty cache of their own
        cache = "off" if name == "off" else str(cache_dir if name in ("first", "second") else own)
        shutil.rmtree(own, ignore_errors=True)
        print(f"eval run {name} ...", flush=True)
        state.setdefault("runs", {})[name] = run_eval(work, state["setup"], name, cache, args)
        save_state()
    if "ladder" not in state:
        state["ladder"] = ladder_study(work / "answers-first.jsonl", state["setup"])
        save_state()
    if not args.skip_reference and not dry and "reference" not in state:
        state["reference"] = reference(work)
        save_state()
    for path in write_report(state, out, STEM, dry):
        print(f"wrote {path}")
    return 0


def reference(work: Path) -> dict[str, Any]:
    """`sparsevlm bench --shape mini --methods v1`: JAX prefill vs the PyTorch reference."""
    bench_out = work / "bench"
    before = load()
    cmd = ["sparsevlm", "bench", "--shape", "mini", "--methods", "v1", "--out", str(bench_out),
           "--quiet"]  # fmt: skip
    subprocess.run(cmd, check=True)
    report = json.loads((bench_out / "mini-cpu.json").read_text())
    rows = []
    for e in report["results"]:
        r = e.get("ratios", {})
        rows.append({
            "label": e["label"],
            "jax_ms": e["jax"].get("prefill", {}).get("median_ms"),
            "jax_over_reference": 1 / r["torch_matched_over_jax_prefill"]
            if r.get("torch_matched_over_jax_prefill") else None,
            "latency_vs_flops": r.get("latency_vs_ideal_valid_flops"),
            "capacity": e.get("capacity"),
        })  # fmt: skip
    return {"command": " ".join(cmd), "rows": rows, "load_before": before, "load_after": load()}


# ---------------------------------------------------------------------------------------------
# The ladder study: programs and FLOPs padding of each bucketing, on the recorded decisions


def ladder(steps: int):
    """`sparsevlm_jax.prefill.capacity_bucket` with `steps` steps per octave."""
    from sparsevlm_jax.prefill import capacity_bucket

    return lambda n, limit: capacity_bucket(n, limit, steps)


def layer_caps(bucket, derived: bool, vis_in: int, keep: int, cand: int) -> tuple[int, int, int]:
    """(kept, candidates, recycled) slots, candidates on their own ladder or from the kept
    bucket (the most candidates any count in the kept bucket can give)."""
    from sparsevlm_jax.sparse.recycle import max_candidates_for, max_clusters_for

    kept = bucket(keep, vis_in)
    if cand <= 0:
        return kept, 0, 0
    own = bucket(cand, max_candidates_for(vis_in))
    if derived:
        lower = max([k for k in range(1, kept) if bucket(k, vis_in) < kept], default=0) + 1
        most = bucket(max_candidates_for(vis_in - lower), max_candidates_for(vis_in))
        own = max(own, most)
    return kept, own, max_clusters_for(own)


def ladder_study(answers: Path, setup_: dict) -> dict[str, Any]:
    """Stage programs and FLOPs padding per (steps per octave, candidate keying), with the
    programs a keying by the whole capacity history would compile and the history-free
    keying `prefill` uses (stage, incoming width, capacities), on the decisions the `first`
    run recorded."""
    from sparsevlm_jax.batch import Buckets
    from sparsevlm_jax.config import LlavaConfig
    from sparsevlm_jax.flops import prefill_flops
    from sparsevlm_jax.processing import Processor

    cfg = LlavaConfig.from_dict(setup_["config"])
    proc = Processor.from_pretrained(setup_["model"], cfg)
    rows_in = traces(answers)
    meta = json.loads(answers.read_text().splitlines()[0])["metadata"]
    layers, depth = meta["pruning_layers"], cfg.text.num_hidden_layers
    stage_of = np.searchsorted(np.asarray(layers), np.arange(depth))  # layer -> stage
    texts = {}
    for r in rows_in:
        pre, txt = proc.encode(r["prompt"])
        texts[r["prompt"]] = (len(pre), len(txt), Buckets.pick(Buckets().text, len(txt), "text"))
    out = []
    for steps in (1, 2, 4, 8):
        for derived in (False, True):
            bucket = ladder(steps)
            hist, free, first = set(), set(), set()
            padded, exact = [], []
            for r in rows_in:
                p, t, tb = texts[r["prompt"]]
                first.add(tb)
                vis_in, caps = cfg.num_image_tokens, []
                widths = [vis_in]
                valid = [x[0] for x in r["layers"]] + [r["final"]]  # valid visual per stage
                for _, keep, cand in r["layers"]:
                    kept, _, rec = layer_caps(bucket, derived, vis_in, keep, cand)
                    caps.append((vis_in, kept, rec))
                    hist.add((tb, tuple(caps)))
                    free.add((tb, len(caps), caps[-1]))  # stage, width in, capacities
                    vis_in = kept + rec
                    widths.append(vis_in)
                padded.append([p + tb + widths[s] for s in stage_of])
                exact.append([p + tb + valid[s] for s in stage_of])
            f_pad = prefill_flops(np.asarray(padded), cfg.text)
            f_exact = prefill_flops(np.asarray(exact), cfg.text)
            out.append({
                "steps_per_octave": steps,
                "candidates": "from kept bucket" if derived else "own ladder",
                "buckets_576": len({bucket(n, 576) for n in range(1, 577)}),
                "programs_history_keyed": len(first) + len(hist),
                "programs_history_free": len(first) + len(free),
                "flops_padding_mean": float(np.mean(f_pad / f_exact - 1)),
                "flops_padding_max": float(np.max(f_pad / f_exact - 1)),
            })  # fmt: skip
    return {"questions": len(rows_in), "text_buckets": sorted({v[2] for v in texts.values()}),
            "rows": out}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Report


def write_report(state: dict, out: Path, stem: str, dry: bool) -> list[Path]:
    """JSON, markdown table and PNG plot (matplotlib) of the state."""
    from sparsevlm_jax.bench.report import write_atomic
    from sparsevlm_jax.bench.timing import cpu_model, usable_cores

    out.mkdir(parents=True, exist_ok=True)
    state["hardware"] = {"cpu_model": cpu_model(), "usable_cores": usable_cores(),
                         "dry_run": dry}  # fmt: skip
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    write_atomic(paths[0], json.dumps(state, indent=1) + "\n")
    s = state["setup"]
    md = [f"# Compile once, answer many ({s['num_questions']} questions, "
          f"{s['num_images']} images)", "",
          f"Hardware: {state['hardware']['cpu_model']}, {usable_cores()} cores. "
          "`python benchmarks/compile_once.py`" + (" --dry-run" if dry else ""), "",
          "| run | wall s | programs | compiled | from cache | compilation s (XLA / load / "
          "trace+lower) | by program: programs (XLA or cache load s) | share of wall | "
          "load avg before |",
          "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in state.get("runs", {}).items():
        c = r["compilation"]
        w = r["warmup"]
        extra = f" ({w['compiled']} in the warm-up, {w['total_s']:.1f} s)" if w else ""
        kinds = ", ".join(f"{k} {v['programs']} ({v['xla_s']:.1f})"
                          for k, v in c.get("by_kind", {}).items())  # fmt: skip
        md.append(
            f"| {name} | {r['wall_s']:.1f} | {c['programs']} | {c['compiled']}{extra} | "
            f"{c['from_cache']} | {c['total_s']:.1f} ({c['xla_s']:.1f} / {c['load_s']:.1f} / "
            f"{c['trace_s']:.1f}) | {kinds or '–'} | {100 * r['compile_share']:.0f}% | "
            f"{r['load_before'][0]} |"
        )
    md += cost_lines(state)
    lad = state.get("ladder")
    if lad:
        md += ["", f"Ladder study ({lad['questions']} questions, text buckets "
               f"{lad['text_buckets']}): stage programs and FLOPs padding vs exact sizes", "",
               "| steps/octave | candidates | buckets (576) | programs (history-keyed) | "
               "programs (history-free) | FLOPs padding mean | max |",
               "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in lad["rows"]:
            md.append(
                f"| {r['steps_per_octave']} | {r['candidates']} | {r['buckets_576']} | "
                f"{r['programs_history_keyed']} | {r['programs_history_free']} | "
                f"{100 * r['flops_padding_mean']:.1f}% | {100 * r['flops_padding_max']:.1f}% |"
            )
    ref = state.get("reference")
    if ref:
        md += [
            "",
            f"Prefill vs the PyTorch reference at equal decisions (`{ref['command']}`, "
            f"load {ref['load_before'][0]}):",
            "",
            "| method | JAX ms | JAX / reference | latency vs FLOPs ratio |",
            "|---|---|---|---|",
        ]
        for r in ref["rows"]:
            jr = "–" if r["jax_over_reference"] is None else f"{r['jax_over_reference']:.2f}x"
            lf = "–" if r["latency_vs_flops"] is None else f"{100 * r['latency_vs_flops']:+.0f}%"
            md.append(f"| {r['label']} | {r['jax_ms']:.0f} | {jr} | {lf} |")
    write_atomic(paths[1], "\n".join(md) + "\n")
    try:
        write_atomic(paths[2], plot(state))
    except ImportError as e:
        print(f"no plot: {e}", file=sys.stderr)
        return paths[:2]
    return paths


def cost_lines(state: dict) -> list[str]:
    """What one program costs against what one question costs, from the `first` run."""
    first = state.get("runs", {}).get("first")
    kinds = (first or {}).get("compilation", {}).get("by_kind")
    if not kinds:
        return []
    c, n = first["compilation"], state["setup"]["num_questions"]
    rest = first["wall_s"] - c["total_s"]
    per = ", ".join(f"{k} {v['xla_s'] / v['programs']:.2f} s" for k, v in kinds.items()
                    if v["programs"])  # fmt: skip
    budget = 0.25 * rest  # compilation at 20% of the wall: a quarter of everything else
    mean = c["xla_s"] / max(c["compiled"], 1)
    return ["", f"First run: XLA seconds per program: {per}; everything but compilation "
            f"{rest:.1f} s = {1000 * rest / n:.0f} ms a question. Compilation at 20% of the "
            f"wall would allow {budget:.1f} s, {budget / mean:.0f} programs at their mean "
            f"{mean:.2f} s (tracing and lowering included in neither)."]  # fmt: skip


def plot(state: dict) -> bytes:
    from sparsevlm_jax.bench.plot import matplotlib_figure, png_bytes

    fig = matplotlib_figure((11, 4))
    a, b = fig.subplots(1, 2)
    runs = state.get("runs", {})
    names = list(runs)
    comp = [r["compilation"]["total_s"] for r in runs.values()]  # warm-up included
    rest = [r["wall_s"] - c for r, c in zip(runs.values(), comp, strict=True)]
    a.bar(names, comp, label="compilation (XLA + loads + tracing)", color="#c44")
    a.bar(names, rest, bottom=comp, label="everything else", color="#48c")
    a.set_ylabel("wall seconds")
    a.set_title("sparsevlm eval, one process per run")
    a.legend()
    for steps_rows, marker in ((False, "o"), (True, "s")):
        rows = [r for r in state.get("ladder", {}).get("rows", [])
                if (r["candidates"] != "own ladder") == steps_rows]  # fmt: skip
        for key, style in (("programs_history_keyed", "-"), ("programs_history_free", ":")):
            b.plot([100 * r["flops_padding_mean"] for r in rows], [r[key] for r in rows],
                   marker=marker, linestyle=style,
                   label=f"{key[9:].replace('_', '-')}, candidates: "
                   f"{rows[0]['candidates'] if rows else ''}")  # fmt: skip
        for r in rows:
            for key in ("programs_history_keyed", "programs_history_free"):
                b.annotate(str(r["steps_per_octave"]), (100 * r["flops_padding_mean"], r[key]))
    b.set_xlabel("mean FLOPs padding vs exact sizes (%)")
    b.set_ylabel("prefill programs (first stage + stages)")
    b.set_title("ladder: steps per octave (labels)")
    b.legend()
    return png_bytes(fig)


if __name__ == "__main__":
    sys.exit(main())
