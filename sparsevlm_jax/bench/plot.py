"""The PNG plot: prefill latency and FLOPs vs kept visual tokens (matplotlib if installed,
else drawn with PIL)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

COLORS = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
]


@dataclass
class Series:
    """A line with points; `color` indexes COLORS (one per method family)."""

    name: str
    points: list[tuple[float, float]]
    color: int = 0
    dashed: bool = False


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]


@dataclass
class Figure:
    title: str
    panels: list[Panel]
    legend: list[Series]  # entries only (name, color, style)


def _families(results: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(e["method"] for e in results[1:]))


def plot_figure(report: dict[str, Any], title: str = "") -> Figure:
    """Prefill latency and FLOPs vs kept visual tokens (equivalent tokens), one colour per
    method family, each line starting at dense; solid = JAX / XLA, dashed = PyTorch / ideal."""
    results = report["results"]
    dense = results[0]
    latency: list[Series] = []
    flops: list[Series] = []
    legend: list[Series] = []
    for i, fam in enumerate(_families(results)):
        members = [dense] + [e for e in results[1:] if e["method"] == fam]
        jax_pts, torch_pts, xla_pts, ideal_pts = [], [], [], []
        for e in members:
            eq = e["equivalent_tokens"]
            if e["jax"].get("prefill"):
                jax_pts.append((eq, e["jax"]["prefill"]["median_ms"]))
            t = e["torch"].get("torch", {})
            if t.get("prefill"):
                torch_pts.append((t.get("equivalent_tokens", eq), t["prefill"]["median_ms"]))
            xla_pts.append((eq, e["flops"]["xla_decoder"] / 1e9))
            ideal_pts.append((eq, e["flops"]["ideal_valid"] / 1e9))
        if len(jax_pts) > 1:
            latency.append(Series(f"JAX {fam}", sorted(jax_pts), i))
        if len(torch_pts) > 1:
            latency.append(Series(f"PyTorch {fam}", sorted(torch_pts), i, True))
        flops.append(Series(f"XLA {fam}", sorted(xla_pts), i))
        flops.append(Series(f"ideal {fam}", sorted(ideal_pts), i, True))
        legend.append(Series(fam, [], i))
    legend += [
        Series("solid: JAX latency / XLA-counted FLOPs", [], -1),
        Series("dashed: PyTorch latency / ideal FLOPs (SPEC 8)", [], -1, True),
    ]
    x = "kept visual tokens (equivalent, SPEC 6)"
    panels = [Panel("prefill FLOPs (decoder)", x, "GFLOPs", flops)]
    if latency:
        panels.insert(0, Panel("prefill latency (median)", x, "ms", latency))
    return Figure(title, panels, legend)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _fmt_tick(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 10 or v == int(v) else f"{v:.2g}"


def _color(i: int) -> tuple[int, int, int]:
    return (90, 90, 90) if i < 0 else COLORS[i % len(COLORS)]


def _line(draw: Any, a: tuple[float, float], b: tuple[float, float], color: Any, dashed: bool):
    if not dashed:
        draw.line([a, b], fill=color, width=2)
        return
    n = max(int(math.dist(a, b) // 6), 1)
    for k in range(0, n, 2):
        t0, t1 = k / n, min((k + 1) / n, 1.0)
        p = (a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0)
        q = (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)
        draw.line([p, q], fill=color, width=2)


def draw_panel_pil(draw: Any, box: tuple[int, int, int, int], panel: Panel, font: Any) -> None:
    """Axes, grid, ticks, labels, lines and points inside box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 80, x1 - 25, y0 + 35, y1 - 55
    pts = [p for s in panel.series for p in s.points] or [(1.0, 1.0)]
    xs = nice_ticks(0, max(p[0] for p in pts) * 1.05)
    ys = nice_ticks(0, max(p[1] for p in pts) * 1.08)
    xmax, ymax = xs[-1], ys[-1]

    def to_px(x: float, y: float) -> tuple[float, float]:
        return left + (right - left) * x / xmax, bottom - (bottom - top) * y / ymax

    draw.text(((left + right) / 2, y0 + 14), panel.title, fill="black", font=font, anchor="mm")
    for v in ys:
        _, py = to_px(0, v)
        draw.line([(left, py), (right, py)], fill=(230, 230, 230))
        draw.text((left - 6, py), _fmt_tick(v), fill="black", font=font, anchor="rm")
    for v in xs:
        px, _ = to_px(v, 0)
        draw.line([(px, bottom), (px, bottom + 5)], fill="black")
        draw.text((px, bottom + 8), _fmt_tick(v), fill="black", font=font, anchor="mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=2)
    draw.text(((left + right) / 2, bottom + 34), panel.xlabel, fill="black", font=font, anchor="mm")
    draw.text((x0 + 12, (top + bottom) / 2), panel.ylabel, fill="black", font=font, anchor="lm")
    for s in panel.series:
        color, px = _color(s.color), [to_px(*p) for p in s.points]
        for a, b in zip(px[:-1], px[1:], strict=True):
            _line(draw, a, b, color, s.dashed)
        for cx, cy in px:
            if s.dashed:
                draw.rectangle([cx - 3, cy - 3, cx + 3, cy + 3], outline=color, width=2)
            else:
                draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=color)


def draw_legend_pil(draw: Any, x: int, y: int, width: int, legend: list[Series], font: Any):
    """Legend entries left to right, wrapping at `width`."""
    cx, cy = x, y
    for s in legend:
        w = 40 + int(draw.textlength(s.name, font=font)) + 24
        if cx + w > x + width:
            cx, cy = x, cy + 20
        _line(draw, (cx, cy), (cx + 30, cy), _color(s.color), s.dashed)
        draw.text((cx + 36, cy), s.name, fill="black", font=font, anchor="lm")
        cx += w


def render_png(fig: Figure) -> bytes:
    """The figure as PNG bytes (matplotlib when installed, else drawn with PIL)."""
    try:
        return _render_matplotlib(fig)
    except ImportError:
        pass
    from PIL import Image, ImageDraw, ImageFont

    w, h, legend_h = 600, 430, 70
    img = Image.new("RGB", (w * len(fig.panels), h + 30 + legend_h), "white")
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    draw.text((img.width / 2, 14), fig.title, fill="black", font=font, anchor="mm")
    for i, panel in enumerate(fig.panels):
        draw_panel_pil(draw, (i * w, 30, (i + 1) * w, 30 + h), panel, font)
    draw_legend_pil(draw, 80, h + 40, img.width - 100, fig.legend, font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _render_matplotlib(fig: Figure) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, axes = plt.subplots(1, len(fig.panels), figsize=(6 * len(fig.panels), 4.6))
    for ax, panel in zip(np.atleast_1d(axes), fig.panels, strict=True):
        for s in panel.series:
            xs, ys = zip(*s.points, strict=True)
            color = tuple(c / 255 for c in _color(s.color))
            ax.plot(xs, ys, "--s" if s.dashed else "-o", color=color, label=s.name, ms=4)
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D(
            [], [], color=tuple(c / 255 for c in _color(s.color)), ls="--" if s.dashed else "-"
        )
        for s in fig.legend
    ]
    out.legend(handles, [s.name for s in fig.legend], loc="lower center", ncol=4, fontsize=8)
    out.suptitle(fig.title)
    out.tight_layout(rect=(0, 0.12, 1, 1))
    buf = io.BytesIO()
    out.savefig(buf, format="png", dpi=100)
    plt.close(out)
    return buf.getvalue()
