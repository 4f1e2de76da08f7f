"""Merging the parts of a full run measured in separate processes (e.g. short GPU leases).

A part is one `sparsevlm bench` full-run report; each measures dense next to its methods, so
its ratios compare measurements of one process and stay as they were. A part run with
`--count none` has no XLA FLOPs: they are counted here, by abstract lowering on whatever
machine merges (the static program with the capacities the run chose, `counted_config`), and
the part's FLOPs ratios and latency-vs-FLOPs gaps are computed from them. The merged report
is part 1's dense entry followed by every part's sparse entries, with the targets recomputed
and each part's command, wall time, skipped methods and probes kept under `parts`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsevlm_jax.bench.flops import (
    add_reductions,
    flops_report,
    xla_prefill_cost,
    xla_vision_cost,
)
from sparsevlm_jax.bench.report import save_outputs, xla_counted
from sparsevlm_jax.bench.targets import flops_targets, latency_targets
from sparsevlm_jax.bench.timing import add_latency_ratios
from sparsevlm_jax.bench.workloads import Workload
from sparsevlm_jax.presets import SHAPES
from sparsevlm_jax.sparse.config import SparseConfig

IDEALS = ("ideal_uniform", "ideal_valid", "ideal_capacity", "ideal_padded")


def sparse_from_json(d: dict[str, Any]) -> SparseConfig:
    """The SparseConfig of `eval.sparse_to_json`'s dict (lists back to tuples)."""
    names = {f.name for f in dataclasses.fields(SparseConfig)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    return SparseConfig(**kw)


def workload_of(report: dict[str, Any]) -> Workload:
    w = report["workload"]
    return Workload(
        shape=w["shape"],
        cfg=SHAPES[w["shape"]](w["model_dtype"]),
        prefix_tokens=w["prefix_tokens"],
        text_tokens=w["text_tokens"],
        max_new_tokens=w["max_new_tokens"],
        count_dtype=w["count_dtype"],
        images=tuple(tuple(hw) for hw in w.get("images", [])),
        image_set=w.get("image_set", ""),
    )


def count_flops(report: dict[str, Any], compile_: bool) -> None:
    """Fills in the XLA FLOPs of a `--count none` report and what derives from them."""
    wl = workload_of(report)
    vision = xla_vision_cost(wl, compile_)
    costs: dict[str, dict[str, float]] = {}
    for e in report["results"]:
        conf = e.get("counted_config") or e["sparse_config"]
        key = json.dumps(conf, sort_keys=True)
        if key not in costs:
            costs[key], _ = xla_prefill_cost(wl, sparse_from_json(conf), compile_)
        e["flops"] = flops_report(wl, costs[key], vision, {k: e[k] for k in IDEALS})
    report["vision_count"] = vision
    add_reductions(report["results"])
    add_latency_ratios(report["results"])
    source = "compiled" if compile_ else "lowered"
    report["xla_count"]["source"] = f"{source} (counted when the parts were merged)"


def merge_reports(
    paths: Sequence[Path], out_dir: Path, count: str = "compiled", stem: str | None = None
) -> list[Path]:
    """Merges part reports into `<stem>.json|md|png` in `out_dir` (default stem
    `<shape>-<backend>`); returns the paths written."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    parts.sort(key=lambda r: r.get("part") or 0)
    for r in parts:
        if r["kind"] != "full":
            raise ValueError("only full-run reports can be merged")
        if not xla_counted(r):
            count_flops(r, count == "compiled")
    merged = dict(parts[0])
    results = []
    for i, r in enumerate(parts):
        for e in r["results"][1 if i else 0 :]:
            results.append({**e, "part": r.get("part", i + 1)})
    merged["results"] = results
    merged["parts"] = [
        {
            "part": r.get("part", i + 1),
            "command": r["command"],
            "created": r["created"],
            "wall_s": r.get("wall_s"),
            "labels": [e["label"] for e in r["results"]],
            "skipped_for_time": r.get("skipped_for_time", []),
            "dense_jax_prefill": r["results"][0]["jax"].get("prefill"),
            "attention_probe": r.get("attention_probe"),
            "load_average": [
                r["hardware"].get("load_average_start"),
                r["hardware"].get("load_average_end"),
            ],
        }
        for i, r in enumerate(parts)
    ]
    merged["skipped_for_time"] = [x for r in parts for x in r.get("skipped_for_time", [])]
    merged["command"] = " + ".join(r["command"] for r in parts)
    merged["targets"] = flops_targets(results) + latency_targets(results)
    if stem is None:
        stem = f"{merged['workload']['shape']}-{merged['hardware']['jax_backend']}"
    return save_outputs(merged, out_dir, stem)
