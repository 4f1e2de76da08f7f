"""Running the evaluation: every question under dense and each preset (resuming from the
answers file), one summary per method, and the outputs written into the output directory."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsevlm_jax.bench.accuracy.ablation import figure_ablation, markdown_ablation
from sparsevlm_jax.bench.accuracy.methods import config_json, method_configs
from sparsevlm_jax.bench.accuracy.progress import PROGRESS_FILE, Progress, model_digest
from sparsevlm_jax.bench.accuracy.questions import Item, answer_prior, question_items
from sparsevlm_jax.bench.accuracy.report import figure, markdown
from sparsevlm_jax.bench.accuracy.report import header as report_header
from sparsevlm_jax.bench.accuracy.stats import Z95, proportion
from sparsevlm_jax.bench.plot import write_png_or_say
from sparsevlm_jax.bench.report import write_atomic
from sparsevlm_jax.sparse.config import REFERENCE_IMAGE_TOKENS, SparseConfig, named_presets


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
    """One method's entry of `results` (the package docstring), retention not yet set."""
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
        "switched": sparse.switched,
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
    ablation = markdown_ablation(report)
    if ablation:
        title = "SparseVLM+ ablation on the bundled demo model"
        text = "\n".join([*report_header(report, title), "", *ablation[2:]]) + "\n"
        write_atomic(out / "ablation.md", text)
        write_png_or_say(out / "ablation.png", figure_ablation(report), write_atomic)
    progress.remove()
    return report
