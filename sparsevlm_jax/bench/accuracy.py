"""Accuracy benchmark: what pruning costs the bundled demo model, per method and named budget.

    python -m sparsevlm_jax.bench.accuracy [--model DIR] [--images 544] [--out DIR]
        [--methods v1,fastv@64] [--batch-size 16] [--fresh]

Asks the model every question of the first N test images of the shapes task (N = 544: 2078
questions; the same questions as `python -m sparsevlm_jax.shapes_task write-test`), greedy,
exact match, through `LlavaPipeline.generate` in batches of 16, once dense and once per named
preset (`named_presets()`: v1, v1.5, v2.0, FastV and random at their named budgets, schedules
scaled to the model's visual tokens; v1 under the default capacity policy of
`sparsevlm_jax.calibrated`: static with the model's calibrated capacities when
`sparse_defaults.json` has them, else bucketed). Per method it reports accuracy per question
type and overall with 95% Wilson intervals, retention (accuracy ÷ dense accuracy), mean
equivalent visual tokens (SPEC §6) and the analytic prefill FLOPs reduction vs dense (SPEC §8),
and compares SparseVLM v1 / v1.5 / v2.0, FastV and random at each named budget.

Outputs in --out (written atomically): `accuracy.json` (below), `accuracy.md` (tables) and
`accuracy.png` (accuracy vs equivalent visual tokens, one line per method, interval bars; needs
matplotlib, the `plots` extra). Answers are appended batch by batch to
`accuracy.progress.jsonl`, so an interrupted run resumes where it stopped (same model files,
questions and configs; `--fresh` starts over); the file is removed once the outputs exist.

accuracy.json: {"command", "date", "hardware", "model", "model_sha256", "task",
"num_image_tokens", "num_layers", "num_images", "num_questions", "batch_size", "z",
"answer_prior": {"overall", "per_type"}, "notes", "results": [per method, dense first:
{"method", "family", "budget", "budget_tokens", "config", "n", "correct", "accuracy",
"ci": [lo, hi], "per_type": {type: {"n", "correct", "accuracy", "ci"}}, "retention",
"equivalent_tokens", "equivalent_tokens_range": [min, max], "flops_ratio",
"flops_reduction", "overflow_examples", "seconds", "first_batch_seconds" (compiling
included), "correct_bits": "1101..." (per question, in question order)}]}.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsevlm_jax.bench.plot import Figure, Panel, Reference, Series, write_png_or_say
from sparsevlm_jax.bench.report import write_atomic
from sparsevlm_jax.sparse.config import (
    METHODS,
    REFERENCE_IMAGE_TOKENS,
    SparseConfig,
    named_presets,
    named_sparse_config,
)

Z95 = 1.959963984540054  # standard normal quantile of 0.975: 95% two-sided intervals
PROGRESS_FILE = "accuracy.progress.jsonl"
FAMILY_LABELS = {
    "v1": "SparseVLM v1",
    "v1_5": "SparseVLM v1.5",
    "v2_0": "SparseVLM v2.0",
    "fastv": "FastV",
    "random": "random",
}


# ----------------------------------------------------------------------------------------------
# Statistics


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (lo, hi) of a proportion correct / n; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if correct == 0 else max(0.0, center - half)
    return lo, 1.0 if correct == n else min(1.0, center + half)


def proportion(correct: int, n: int) -> dict[str, Any]:
    """{"n", "correct", "accuracy", "ci": [lo, hi]} (95% Wilson)."""
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci": list(wilson(correct, n)),
    }


# ----------------------------------------------------------------------------------------------
# Questions


@dataclass(frozen=True)
class Item:
    """One test question: its id (as in the written test set), image index, text, gold
    answer and type."""

    question_id: str
    image: int
    text: str
    answer: str
    category: str


def question_items(num_images: int, image_size: int) -> tuple[list[Any], list[Item]]:
    """(PIL image per test image [num_images], the questions in test-set order)."""
    from PIL import Image

    from sparsevlm_jax import shapes_task as st

    images, items = [], []
    for i, ex in enumerate(st.test_examples(num_images, image_size)):
        images.append(Image.fromarray(ex.image))
        for j, q in enumerate(ex.questions):
            items.append(Item(st.question_id(i, j), i, q.text, q.answer, q.category))
    return images, items


def answer_prior(items: Sequence[Item]) -> dict[str, Any]:
    """Accuracy of a blind model answering each type's most frequent gold answer."""
    from sparsevlm_jax.shapes_task import CATEGORIES

    per_type: dict[str, dict[str, Any]] = {}
    total = 0
    for cat in [c for c in CATEGORIES if any(it.category == c for it in items)]:
        golds = [it.answer for it in items if it.category == cat]
        top = max(set(golds), key=golds.count)
        per_type[cat] = {**proportion(golds.count(top), len(golds)), "answer": top}
        total += golds.count(top)
    return {"overall": proportion(total, len(items)), "per_type": per_type}


# ----------------------------------------------------------------------------------------------
# Methods


def parse_methods(spec: str) -> list[tuple[str, int]]:
    """`--methods`: "" = every named preset; else comma-separated `method` (all its named
    budgets) or `method@budget` (also `method-budget`), e.g. "v1,fastv@64"."""
    presets = named_presets()
    if not spec:
        return presets
    out: list[tuple[str, int]] = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        name, _, budget = token.replace("-", "@").partition("@")
        if name == "dense":
            continue
        chosen = [p for p in presets if p[0] == name and (not budget or str(p[1]) == budget)]
        if not chosen:
            raise ValueError(
                f"--methods: unknown preset {token!r}; methods: {', '.join(METHODS)}; "
                f"named presets: {', '.join(f'{m}@{b}' for m, b in presets)}"
            )
        out += [p for p in chosen if p not in out]
    return out


def method_configs(
    model: str | Path, cfg: Any, presets: Sequence[tuple[str, int]]
) -> tuple[list[SparseConfig], list[str]]:
    """(dense + each preset under the default capacity policy, notes on capacities)."""
    from sparsevlm_jax.calibrated import default_capacity

    configs, notes = [SparseConfig()], []
    for method, budget in presets:
        sparse = named_sparse_config(
            method, budget, cfg.text.num_hidden_layers, cfg.num_image_tokens
        )
        sparse, note = default_capacity(sparse, model)
        configs.append(sparse)
        if note is not None:
            notes.append(note)
    return configs, notes


def config_json(sparse: SparseConfig) -> dict[str, Any]:
    """Every SparseConfig field as plain JSON."""
    from sparsevlm_jax.eval import jsonable

    return jsonable(dataclasses.asdict(sparse))


# ----------------------------------------------------------------------------------------------
# Resumable answers


def model_digest(model: str | Path) -> str:
    """sha256 over the model directory's files (relative path and bytes, sorted)."""
    root = Path(model)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


class Progress:
    """Answers per method, appended one batch per line to a JSONL file, so a rerun resumes.

    Line 1 is a header (model digest, task, questions); each later line is
    {"method", "config", "lo", "seconds", "rows": [per question of the batch]}. A header that
    differs from this run's (or `fresh`) empties the file; a torn last line is ignored.
    """

    def __init__(self, path: Path, header: dict[str, Any], fresh: bool = False):
        self.path, self.header = path, header
        self.done: dict[tuple[str, int], dict[str, Any]] = {}
        lines = path.read_text().splitlines() if path.is_file() and not fresh else []
        if lines and _loads(lines[0]) == header:
            for line in lines[1:]:
                rec = _loads(line)
                if rec is not None:
                    self.done[(json.dumps(rec["config"], sort_keys=True), rec["lo"])] = rec
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(header) + "\n")

    def get(self, config: dict[str, Any], lo: int) -> dict[str, Any] | None:
        """The stored batch of `config` starting at question `lo`, or None."""
        return self.done.get((json.dumps(config, sort_keys=True), lo))

    def add(self, method: str, config: dict[str, Any], lo: int, seconds: float, rows: list):
        """Appends one batch (flushed and fsync'd)."""
        import os

        rec = {"method": method, "config": config, "lo": lo, "seconds": seconds, "rows": rows}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[(json.dumps(config, sort_keys=True), lo)] = rec

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _loads(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


# ----------------------------------------------------------------------------------------------
# Running


def answer_rows(results: Sequence[Any], items: Sequence[Item]) -> list[dict[str, Any]]:
    """Per question: id, answer text, correct (LLaVA's exact match), equivalent visual tokens,
    prefill FLOPs (sparse runs) and overflowed tokens (static capacities)."""
    from sparsevlm_jax.eval import is_correct

    rows = []
    for r, it in zip(results, items, strict=True):
        s = r.stats
        rows.append(
            {
                "id": it.question_id,
                "answer": r.text,
                "ok": is_correct(r.text, it.answer),
                "eq": s.get("equivalent_tokens"),
                "flops": s.get("flops"),
                "dense_flops": s.get("dense_flops"),
                "overflow": sum(
                    layer["overflow"] + layer["recycled_overflow"] for layer in s.get("layers", [])
                ),
            }
        )
    return rows


def answer_all(
    pipe: Any,
    sparse: SparseConfig,
    images: Sequence[Any],
    items: Sequence[Item],
    progress: Progress,
    batch_size: int = 16,
    show: bool = True,
) -> tuple[list[dict[str, Any]], list[float]]:
    """Every question's row (`answer_rows`) under `sparse`, one `generate` call per batch of
    `batch_size` (a short last batch is padded with its last question, so one compiled
    program serves the whole pass); batches already in `progress` are reused. Returns the
    rows and the seconds of each batch (the first one includes compiling)."""
    from tqdm import tqdm

    config = config_json(sparse)
    rows: list[dict[str, Any]] = []
    seconds: list[float] = []
    bar = tqdm(total=len(items), desc=f"{sparse.name:>10}", unit="q", disable=not show)
    for lo in range(0, len(items), batch_size):
        chunk = list(items[lo : lo + batch_size])
        stored = progress.get(config, lo)
        if stored is None or len(stored["rows"]) != len(chunk):
            t0 = time.perf_counter()
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
            res = pipe.generate(
                [images[it.image] for it in padded],
                [it.text for it in padded],
                sparse,
                max_new_tokens=4,
                batch_size=batch_size,
            )
            batch_rows = answer_rows(res[: len(chunk)], chunk)
            progress.add(sparse.name, config, lo, time.perf_counter() - t0, batch_rows)
            stored = progress.get(config, lo)
        rows += stored["rows"]
        seconds.append(stored["seconds"])
        bar.update(len(chunk))
    bar.close()
    return rows, seconds


def summarize(
    sparse: SparseConfig,
    rows: Sequence[dict[str, Any]],
    items: Sequence[Item],
    num_image_tokens: int,
    seconds: Sequence[float],
) -> dict[str, Any]:
    """One method's entry of `results` (module docstring), retention not yet set."""
    from sparsevlm_jax.shapes_task import CATEGORIES

    per_type = {}
    for cat in [c for c in CATEGORIES if any(it.category == c for it in items)]:
        ok = [r["ok"] for r, it in zip(rows, items, strict=True) if it.category == cat]
        per_type[cat] = proportion(sum(ok), len(ok))
    eq = [r["eq"] if r["eq"] is not None else num_image_tokens for r in rows]
    sparse_rows = [r for r in rows if r["flops"] is not None]
    ratio = (
        sum(r["flops"] for r in sparse_rows) / sum(r["dense_flops"] for r in sparse_rows)
        if sparse_rows
        else 1.0
    )
    budget = sparse.budget_name
    return {
        "method": sparse.name,
        "family": sparse.method,
        "budget": budget,
        "budget_tokens": (
            round(budget * num_image_tokens / REFERENCE_IMAGE_TOKENS) if budget else None
        ),
        "config": config_json(sparse),
        **proportion(sum(r["ok"] for r in rows), len(rows)),
        "per_type": per_type,
        "equivalent_tokens": sum(eq) / len(eq),
        "equivalent_tokens_range": [min(eq), max(eq)],
        "flops_ratio": ratio,
        "flops_reduction": 1.0 - ratio,
        "overflow_examples": sum(r["overflow"] > 0 for r in rows),
        "seconds": sum(seconds),
        "first_batch_seconds": seconds[0] if seconds else 0.0,
        "correct_bits": "".join("1" if r["ok"] else "0" for r in rows),
    }


def hardware() -> str:
    """CPU model and usable cores (or the accelerator), for the report header."""
    import jax

    from sparsevlm_jax.bench.timing import cpu_model, usable_cores

    if jax.default_backend() != "cpu":
        return f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    return f"{cpu_model()}, {usable_cores()} usable cores, JAX on CPU"


def run(
    model: str | Path,
    num_images: int,
    out: Path,
    command: str,
    presets: Sequence[tuple[str, int]] | None = None,
    batch_size: int = 16,
    fresh: bool = False,
    show: bool = True,
) -> dict[str, Any]:
    """Evaluates dense and each preset (default: every named preset) on the first
    `num_images` test images; writes accuracy.json / .md / .png into `out`; the report."""
    from sparsevlm_jax import shapes_task as st
    from sparsevlm_jax.pipeline import LlavaPipeline

    out = Path(out)
    pipe = LlavaPipeline.from_pretrained(model)
    cfg = pipe.cfg
    images, items = question_items(num_images, cfg.vision.image_size)
    configs, notes = method_configs(model, cfg, named_presets() if presets is None else presets)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    digest = model_digest(model)
    header = {
        "model_sha256": digest,
        "task": st.TASK_NAME,
        "num_images": num_images,
        "num_questions": len(items),
        "batch_size": batch_size,
    }
    progress = Progress(out / PROGRESS_FILE, header, fresh)
    results = []
    for sparse in configs:
        rows, seconds = answer_all(pipe, sparse, images, items, progress, batch_size, show)
        results.append(summarize(sparse, rows, items, cfg.num_image_tokens, seconds))
    for r in results:
        dense = results[0]["accuracy"]
        r["retention"] = r["accuracy"] / dense if dense else 0.0
    report = {
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "hardware": hardware(),
        "model": str(model),
        "model_sha256": digest,
        "task": st.TASK_NAME,
        "num_image_tokens": cfg.num_image_tokens,
        "num_layers": cfg.text.num_hidden_layers,
        "num_images": num_images,
        "num_questions": len(items),
        "batch_size": batch_size,
        "z": Z95,
        "answer_prior": answer_prior(items),
        "notes": notes,
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "accuracy.json", json.dumps(report, indent=1) + "\n")
    write_atomic(out / "accuracy.md", markdown(report))
    write_png_or_say(out / "accuracy.png", figure(report), write_atomic)
    progress.remove()
    return report


# ----------------------------------------------------------------------------------------------
# Table and plot


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _with_ci(p: dict[str, Any]) -> str:
    lo, hi = p["ci"]
    return f"{_pct(p['accuracy'])} [{_pct(lo)}, {_pct(hi)}]"


def _capacity(r: dict[str, Any]) -> str:
    c = r["config"]
    if r["family"] == "dense":
        return "—"
    if c["capacity"] == "static":
        return "static " + ",".join(map(str, c["capacities"]))
    return c["capacity"]


def markdown(report: dict[str, Any]) -> str:
    """The tables: every method with intervals, then the methods side by side per budget."""
    results = report["results"]
    types = list(results[0]["per_type"])
    prior = report["answer_prior"]
    v = report["num_image_tokens"]
    lines = [
        "# Accuracy of the bundled demo model under pruning",
        "",
        f"Generated by `{report['command']}` on {report['date']} ({report['hardware']}).",
        f"Model `{report['model']}` (sha256 {report['model_sha256'][:12]}): {v} visual tokens, "
        f"{report['num_layers']} decoder layers. {report['num_questions']} questions about "
        f"{report['num_images']} test images of the {report['task']} task, greedy, exact match, "
        f"batches of {report['batch_size']}. Accuracy in % with 95% Wilson intervals "
        "[lo, hi]; retention = accuracy ÷ dense accuracy; equivalent visual tokens: SPEC §6 "
        "(mean over questions); FLOPs: SPEC §8 analytic prefill count, reduction vs dense. "
        "Budgets are named as tokens of 576 (192/128/96/64 = 1/3, 2/9, 1/6, 1/9) and scaled "
        f"to this model's {v}. A blind model answering each type's most frequent answer "
        f"scores {_with_ci(prior['overall'])} ("
        + ", ".join(
            f"{t} {_pct(p['accuracy'])} ({p['answer']})" for t, p in prior["per_type"].items()
        )
        + ").",
        "",
        "| method | accuracy | retention | "
        + " | ".join(types)
        + " | equiv. visual tokens | prefill FLOPs reduction | capacity |",
        "|---|---|---|" + "---|" * len(types) + "---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {_with_ci(r)} | {_pct(r['retention'])} | "
            + " | ".join(_with_ci(r["per_type"][t]) for t in types)
            + f" | {r['equivalent_tokens']:.1f} | {_pct(r['flops_reduction'])} | "
            f"{_capacity(r)} |"
        )
    lines += ["", *markdown_equal_budgets(report)]
    if report["notes"]:
        lines += ["", "Notes:", *(f"- {n}" for n in report["notes"])]
    return "\n".join(lines) + "\n"


def markdown_equal_budgets(report: dict[str, Any]) -> list[str]:
    """Per named budget, v1 / v1.5 / v2.0 / FastV / random side by side: accuracy [95% CI]
    and the equivalent visual tokens each really kept; then how the budgets line up."""
    results = report["results"][1:]
    if not results:
        return []
    families = list(dict.fromkeys(r["family"] for r in results))
    budgets = sorted({r["budget"] for r in results if r["budget"]}, reverse=True)
    by = {(r["family"], r["budget"]): r for r in results}
    v = report["num_image_tokens"]
    lines = [
        "## At equal kept counts: the methods per named budget",
        "",
        "Each cell: accuracy % [95% CI] · equivalent visual tokens kept (mean).",
        "",
        f"| budget (of 576 → of this model's {v}) | "
        + " | ".join(FAMILY_LABELS.get(f, f) for f in families)
        + " |",
        "|---|" + "---|" * len(families),
    ]
    for b in budgets:
        cells = []
        for f in families:
            r = by.get((f, b))
            cells.append(f"{_with_ci(r)} · {r['equivalent_tokens']:.0f}" if r else "—")
        scaled = round(b * v / REFERENCE_IMAGE_TOKENS)
        lines.append(f"| {b} → {scaled} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "How the budgets line up (pruning layers 0-based: a pruning layer still sees every "
        "token, the layers after it see the kept ones):",
        "",
    ]
    for f in families:
        members = [by[(f, b)] for b in budgets if (f, b) in by]
        lines.append(f"- **{FAMILY_LABELS.get(f, f)}**: " + _line_up(f, members))
    return lines


def _line_up(family: str, members: list[dict[str, Any]]) -> str:
    c = members[0]["config"]
    layers = ",".join(map(str, c["layers"]))
    kept = "; ".join(
        f"@{r['budget']}: {r['equivalent_tokens']:.1f} "
        f"({r['equivalent_tokens_range'][0]:.0f}–{r['equivalent_tokens_range'][1]:.0f})"
        for r in members
    )
    if family == "v1":
        return (
            f"rank-adaptive at layers {layers}: each layer keeps k = floor(rank × scale + bias) "
            "(SPEC §3), so its kept counts follow the text–visual attention rank of each "
            "question and need not match the named budget; equivalent tokens (mean, per-"
            f"question range): {kept}."
        )
    schedules = "; ".join(
        f"@{r['budget']}: " + "→".join(map(str, r["config"]["schedule"])) for r in members
    )
    if family == "v1_5":
        return (
            f"fixed schedule at layers {layers} ({schedules}), plus recycled tokens; equivalent "
            f"tokens: {kept}."
        )
    if family == "v2_0":
        return (
            f"its own fixed schedule at v1.5's layers {layers} ({schedules}), no recycling, "
            f"original positions; equivalent tokens: {kept}."
        )
    if family == "random":
        return (
            f"a seeded uniform subset at v1.5's layers {layers} keeping exactly v1.5's visual "
            f"count after each layer, kept + recycled ({schedules}): the equal-count control "
            f"for v1.5; equivalent tokens: {kept}."
        )
    if family == "fastv":
        ratios = "; ".join(f"@{r['budget']}: R = {r['config']['fastv_ratio']:.3f}" for r in members)
        return (
            f"prunes once, at layer {layers}, keeping round(V × (1 − R)) tokens ({ratios}); "
            f"equivalent tokens: {kept}."
        )
    return f"equivalent tokens: {kept}."


def figure(report: dict[str, Any]) -> Figure:
    """Accuracy (%) vs equivalent visual tokens: one line per method family through its
    named budgets, 95% Wilson interval bars (families drawn up to 3 tokens apart so equal
    counts stay readable); dense and the blind answer prior as references."""
    results = report["results"]
    dense = results[0]
    families: dict[str, list[dict[str, Any]]] = {}
    for r in results[1:]:
        families.setdefault(r["family"], []).append(r)
    series = []
    spread = 1.5  # tokens between families' bars at equal x (drawn offset only)
    for i, (fam, members) in enumerate(families.items()):
        members = sorted(members, key=lambda r: r["equivalent_tokens"])
        series.append(
            Series(
                FAMILY_LABELS.get(fam, fam),
                [(r["equivalent_tokens"], 100 * r["accuracy"]) for r in members],
                color=i,
                yerr=[(100 * r["ci"][0], 100 * r["ci"][1]) for r in members],
                labels=[f"@{r['budget']}" for r in members],
                dodge=(i - (len(families) - 1) / 2) * spread,
            )
        )
    series.append(
        Series(
            "dense",
            [(dense["equivalent_tokens"], 100 * dense["accuracy"])],
            color=-1,
            yerr=[(100 * dense["ci"][0], 100 * dense["ci"][1])],
        )
    )
    prior = report["answer_prior"]["overall"]
    refs = [
        Reference(
            f"dense {_pct(dense['accuracy'])}% (band: 95% CI)",
            100 * dense["accuracy"],
            100 * dense["ci"][0],
            100 * dense["ci"][1],
        ),
        Reference(
            f"blind answer prior {_pct(prior['accuracy'])}%", 100 * prior["accuracy"], style="-."
        ),
    ]
    v = report["num_image_tokens"]
    panel = Panel(
        f"{report['num_questions']} questions, {report['task']}, 95% Wilson intervals",
        f"kept visual tokens (equivalent, SPEC §6; dense = {v})",
        "accuracy (%)",
        series,
        references=refs,
        ylim=(0, 102),
        xlim=(0, v * 1.04),
        legend=True,
    )
    return Figure(
        "bundled demo model: accuracy vs kept visual tokens", [panel], panel_size=(8.0, 5.2)
    )


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    from sparsevlm_jax.bench.timing import limit_blas_threads, prepare_environment
    from sparsevlm_jax.shapes_task import TEST_IMAGES, demo_model_path

    p = argparse.ArgumentParser(
        prog="python -m sparsevlm_jax.bench.accuracy",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=str(demo_model_path()), help="checkpoint directory")
    p.add_argument(
        "--images", type=int, default=TEST_IMAGES, help="test images (544: 2078 questions)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "benchmarks" / "results",
        help="output directory",
    )
    p.add_argument("--methods", default="", help='e.g. "v1,fastv@64" (default: every preset)')
    p.add_argument("--batch-size", type=int, default=16, help="questions per generate call")
    p.add_argument("--fresh", action="store_true", help="ignore answers saved by an earlier run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        presets = parse_methods(args.methods)
    except ValueError as e:
        p.error(str(e))
    prepare_environment()
    limit_blas_threads(1)
    command = "python -m sparsevlm_jax.bench.accuracy " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    report = run(
        args.model,
        args.images,
        args.out,
        command.strip(),
        presets,
        args.batch_size,
        args.fresh,
        not args.quiet,
    )
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
