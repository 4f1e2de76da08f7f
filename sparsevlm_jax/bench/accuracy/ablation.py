"""The ablation of SparseVLM+: v2.0 with each of its four ingredients undone and v1.5 with each
done (`SparseConfig.switched`), at equal budgets, as a table and a plot.

Each variant is compared with its base method on the same questions: accuracy with its 95%
Wilson interval, and the paired difference (variant - base) with a 95% interval from the
per-question differences (normal approximation; the two runs answer the same questions, so
the paired interval is much narrower than the difference of two Wilson intervals).
"""

from __future__ import annotations

import math
from typing import Any

from sparsevlm_jax.bench.accuracy.stats import Z95
from sparsevlm_jax.bench.plot import Figure, Panel, Reference, Series

INGREDIENT_LABELS = {
    "top_heads": "top heads (vs mean over heads)",
    "gravity": "RoPE-gravity correction",
    "original_positions": "original positions (vs renumbered)",
    "recycling": "recycling",
}
BASES = ("v2_0", "v1_5")


def switched(r: dict[str, Any]) -> dict[str, bool]:
    """The ingredients a result's config switched away from its method's own choice."""
    return dict(r.get("switched") or {})


def paired_difference(bits: str, base_bits: str, z: float = Z95) -> tuple[float, float, float]:
    """(mean of variant - base per question, lo, hi): 95% normal interval of paired diffs."""
    d = [int(a) - int(b) for a, b in zip(bits, base_bits, strict=True)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    half = z * math.sqrt(var / n)
    return mean, mean - half, mean + half


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (budget, base method): the base then each variant, with the paired difference."""
    results = report["results"][1:]
    bases = {(r["family"], r["budget"]): r for r in results if not switched(r)}
    out = []
    for budget in sorted({r["budget"] for r in results if switched(r)}, reverse=True):
        for family in BASES:
            base = bases.get((family, budget))
            variants = [
                r
                for r in results
                if switched(r) and r["family"] == family and r["budget"] == budget
            ]
            if base is None or not variants:
                continue
            out.append({"budget": budget, "family": family, "result": base, "diff": None})
            for r in variants:
                diff = paired_difference(r["correct_bits"], base["correct_bits"])
                out.append({"budget": budget, "family": family, "result": r, "diff": diff})
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def describe(r: dict[str, Any]) -> str:
    """e.g. "v2.0 without RoPE-gravity correction", "v1.5 with top heads (...)"."""
    version = {"v2_0": "v2.0 (SparseVLM+)", "v1_5": "v1.5"}[r["family"]]
    sw = switched(r)
    if not sw:
        return f"{version} as published"
    return f"{version} " + ", ".join(
        ("with " if on else "without ") + INGREDIENT_LABELS[k] for k, on in sw.items()
    )


def markdown_ablation(report: dict[str, Any]) -> list[str]:
    """The ablation table (empty when the run measured no switched variant)."""
    table = rows(report)
    if not table:
        return []
    v = report["num_image_tokens"]
    lines = [
        "## Ablation: what makes SparseVLM+ keep accuracy",
        "",
        "SparseVLM+ (v2.0) differs from v1.5 in four things (SPEC §6): the top heads instead of "
        "the mean over heads, the RoPE-gravity correction, original positions instead of "
        "renumbered ones, and no recycling. Each is a `SparseConfig` switch (`--[no-]top-heads`, "
        "`--[no-]gravity`, `--[no-]original-positions`, `--[no-]recycling`). Rows: each base "
        "method, then that method with one ingredient switched. Δ: accuracy minus the base's "
        "on the same questions, with a 95% interval of the paired per-question differences. "
        "Kept: equivalent visual tokens (SPEC §6, mean over questions) of this model's "
        f"{v}; the schedules are each method's own (v1.5's and v2.0's differ slightly).",
        "",
        "| budget | variant | name | accuracy [95% CI] | Δ vs base [95% CI] | kept |",
        "|---|---|---|---|---|---|",
    ]
    for row in table:
        r, d = row["result"], row["diff"]
        lo, hi = r["ci"]
        delta = "—" if d is None else f"{_signed(d[0])} [{_signed(d[1])}, {_signed(d[2])}]"
        lines.append(
            f"| {row['budget']} | {describe(r)} | `{r['method']}` | "
            f"{_pct(r['accuracy'])} [{_pct(lo)}, {_pct(hi)}] | {delta} | "
            f"{r['equivalent_tokens']:.1f} |"
        )
    return lines


def figure_ablation(report: dict[str, Any]) -> Figure | None:
    """Accuracy of every variant with its interval, one panel per budget (None without
    variants): x = variant (base first), the base's accuracy as a reference line."""
    table = rows(report)
    if not table:
        return None
    dense = report["results"][0]
    panels = []
    for budget in sorted({row["budget"] for row in table}, reverse=True):
        series = []
        x = 0
        for i, family in enumerate(BASES):
            members = [
                row["result"]
                for row in table
                if row["budget"] == budget and row["family"] == family
            ]
            if not members:
                continue
            points = [(x + j, 100 * r["accuracy"]) for j, r in enumerate(members)]
            labels = ["as published"] + [
                ("+" if on else "−") + k.replace("_", " ")
                for r in members[1:]
                for k, on in switched(r).items()
            ]
            series.append(
                Series(
                    {"v2_0": "SparseVLM+ (v2.0)", "v1_5": "v1.5"}[family],
                    points,
                    color=i,
                    yerr=[(100 * r["ci"][0], 100 * r["ci"][1]) for r in members],
                    labels=labels,
                    line=False,
                )
            )
            x += len(members) + 1
        refs = [Reference(f"dense {_pct(dense['accuracy'])}%", 100 * dense["accuracy"])]
        panels.append(
            Panel(
                f"budget {budget} of 576 ({report['num_questions']} questions, 95% CI)",
                "variant (each base method, then one ingredient switched)",
                "accuracy (%)",
                series,
                references=refs,
                legend=True,
            )
        )
    return Figure("SparseVLM+ ablation on the bundled model", panels, panel_size=(7.0, 4.6))
