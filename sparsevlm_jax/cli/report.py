"""How `generate` and `visualize` show a run: the sparsity line, the `--stats` block, `--json`.

Statistics come as from `eval.stats_to_json`; the capacity policy that ran and the
capacities it used (the statistics' `capacity` entry) are named in both outputs.
"""

from __future__ import annotations

from typing import Any

from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.sparse.config import SparseConfig

RATER_METHODS = ("v1", "v1_5", "v2_0")  # the methods that score with text raters


def human_bytes(n: float) -> str:
    """e.g. "1.5 MiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def human_flops(n: float) -> str:
    """e.g. "22.90 MFLOPs"."""
    for unit in ("", "K", "M", "G", "T", "P"):
        if n < 1000 or unit == "P":
            return f"{n:.2f} {unit}FLOPs"
        n /= 1000
    raise AssertionError


def describe_sparse(sparse: SparseConfig) -> str:
    """One line: method, budget rule or schedule, layers, capacity policy."""
    if not sparse.enabled:
        return "dense (no pruning)"
    parts = [sparse.method]
    if sparse.budget_name is not None:
        parts.append(f"budget {sparse.budget_name}")
    if sparse.method == "v1":
        parts.append(f"k = floor(rank*{sparse.scale:g} + {sparse.bias:g})")
    elif sparse.method == "fastv":
        parts.append(f"ratio {sparse.fastv_ratio:.3f}")
    else:
        per = ""
        if sparse.schedule_tokens:
            per = f" of {sparse.schedule_tokens}, scaled to each image's count"
        parts.append(f"schedule {','.join(map(str, sparse.schedule))}{per}")
    parts.append(f"layers {','.join(map(str, sparse.layers))}")
    if sparse.switched:
        switched = " ".join(("+" if on else "-") + k for k, on in sparse.switched.items())
        parts.append(f"ingredients switched {switched}")
    cap = sparse.capacity
    if sparse.capacities:
        cap += " " + ",".join(map(str, sparse.capacities))
    elif cap == "bucketed":
        steps = sparse.ladder_steps
        cap += f" ({steps} step{'s' if steps > 1 else ''} per octave)"
    parts.append(f"capacity {cap}")
    return ", ".join(parts)


def _values(v: Any) -> str:
    if isinstance(v, list | tuple):
        return ",".join(map(_values, v))
    return "-" if v is None else str(v)


def describe_capacity(capacity: dict[str, Any]) -> str:
    """The statistics' `capacity` entry (policy, capacities per pruning layer, ...) as text."""
    parts = [str(capacity.get("policy", "?"))]
    if capacity.get("capacities") is not None:
        parts.append(f"capacities {_values(capacity['capacities'])} (per pruning layer)")
    parts += [
        f"{k.replace('_', ' ')} {_values(v)}"
        for k, v in capacity.items()
        if k not in ("policy", "capacities")
    ]
    return ", ".join(parts)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def format_stats(
    stats: dict[str, Any], sparse: SparseConfig, cfg: LlavaConfig, max_new_tokens: int
) -> str:
    """The readable `--stats` block (stats as from `stats_to_json`)."""
    lines = [f"sparsity:      {describe_sparse(sparse)}"]
    if isinstance(stats.get("capacity"), dict):
        lines.append(f"capacity:      {describe_capacity(stats['capacity'])}")
    if sparse.enabled:
        raters = stats.get("raters") or []
        if sparse.method in RATER_METHODS:
            shown = ", ".join(map(str, raters[:16])) + (", ..." if len(raters) > 16 else "")
            lines.append(f"raters:        {len(raters)} text tokens ({shown})")
        extra = any("recycled_overflow" in x for x in stats["layers"])
        header = "layer   rank  budget  kept  recycled  overflow"
        lines.append(header + ("  recycled overflow" if extra else ""))
        for x in stats["layers"]:
            row = (
                f"{x['layer']:>5}  {_cell(x.get('rank')):>5}  {_cell(x.get('budget')):>6}  "
                f"{len(x['kept']):>4}  {_cell(x.get('recycled')):>8}  {_cell(x.get('overflow')):>8}"
            )
            if extra:
                row += f"  {_cell(x.get('recycled_overflow')):>17}"
            lines.append(row)
        for x, per_frame in zip(stats["layers"], stats.get("frames_kept", []), strict=False):
            lines.append(
                f"layer {x['layer']} kept per video frame: {' '.join(map(str, per_frame))}"
            )
        counts = " ".join(map(str, stats["visual_counts"]))
        flops, dense_flops = stats["flops"], stats["dense_flops"]
        kv, dense_kv = stats["kv_cache_bytes"], stats["dense_kv_cache_bytes"]
        lines += [
            f"visual tokens after each decoder layer: {counts}",
            f"equivalent visual tokens: {stats['equivalent_tokens']:.1f} of "
            f"{stats.get('visual_tokens', cfg.num_image_tokens)}",
            f"prefill FLOPs: {human_flops(flops)} ({100 * flops / dense_flops:.1f}% of dense "
            f"{human_flops(dense_flops)})",
            f"KV cache:      {human_bytes(kv)} ({100 * kv / dense_kv:.1f}% of dense "
            f"{human_bytes(dense_kv)}; room for {max_new_tokens} new tokens included)",
        ]
    lines.append(
        f"time:          prefill {stats['prefill_seconds']:.3f} s, decode "
        f"{stats['decode_seconds']:.3f} s (first call: includes compilation)"
    )
    return "\n".join(lines)


def result_json(result: Any, sparse: SparseConfig, cfg: LlavaConfig) -> dict[str, Any]:
    """`generate --json`: {"text", "token_ids", "stats": {..., "layers": [...]}, "sparse"}."""
    from sparsevlm_jax.eval import sparse_to_json, stats_to_json

    return {
        "text": result.text,
        "token_ids": [int(t) for t in result.token_ids],
        "stats": stats_to_json(result.stats, sparse, cfg.num_image_tokens),
        "sparse": sparse_to_json(sparse),
    }
