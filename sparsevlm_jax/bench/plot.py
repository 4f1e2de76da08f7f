"""PNG plots drawn with matplotlib (the `plots` extra), described as data first.

A plot is a `Figure` of `Panel`s of `Series` (plain dataclasses, testable without matplotlib);
`render_png` draws one with matplotlib's Agg canvas (object API, no pyplot state, no GUI
backend). `plot_figure` describes the speed benchmark's figure (prefill latency and FLOPs vs
kept visual tokens); `sparsevlm_jax.bench.accuracy` and `sparsevlm_jax.train.draw_curve` build
their own. Without matplotlib, drawing raises `PlotUnavailable`, whose one-line message says
how to install it; callers write their JSON / markdown first and report that line.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLOTS_INSTALL = 'pip install "sparsevlm-jax[plots]"'
# Matplotlib's default colour cycle ("tab10"), indexed by Series.color (one per method family).
COLORS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
)
NEUTRAL = "#5a5a5a"  # Series.color < 0: style-only legend entries, references


class PlotUnavailable(ImportError):
    """matplotlib is not installed; the message is one line naming the extra to install."""


@dataclass
class Series:
    """A line through `points` (x, y).

    color: index into COLORS (one per method family), < 0 for grey.
    dashed: dashed line and square markers (else solid with dots).
    yerr: per point (lower, upper) absolute y bounds, drawn as interval bars; None = none.
    labels: per point text drawn beside it (e.g. the named budget); empty = none.
    markers: draw the points (False for long curves).
    alpha, width: line opacity and width.
    dodge: drawn x offset (data units), so interval bars of series at equal x stay apart.
    line: join the points (False: markers only, for points that are not a curve).
    """

    name: str
    points: list[tuple[float, float]]
    color: int = 0
    dashed: bool = False
    yerr: list[tuple[float, float]] | None = None
    labels: list[str] = field(default_factory=list)
    markers: bool = True
    alpha: float = 1.0
    width: float = 1.6
    dodge: float = 0.0
    line: bool = True


@dataclass
class Reference:
    """A horizontal grey reference line at `y` (matplotlib line style `style`) with an
    optional shaded band [lo, hi] (e.g. dense and its interval)."""

    name: str
    y: float
    lo: float | None = None
    hi: float | None = None
    style: str = ":"


@dataclass
class Panel:
    """One axes. `ylim` / `xlim`: None = from 0 to matplotlib's automatic top;
    `vlines`: (x, label) vertical dotted markers (e.g. a training phase change);
    `legend`: draw this panel's own legend (else only the figure's)."""

    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    references: list[Reference] = field(default_factory=list)
    ylim: tuple[float, float] | None = None
    xlim: tuple[float, float] | None = None
    vlines: list[tuple[float, str]] = field(default_factory=list)
    legend: bool = False


@dataclass
class Figure:
    """Panels side by side; `legend` entries (name, colour, style) go below them."""

    title: str
    panels: list[Panel]
    legend: list[Series] = field(default_factory=list)
    panel_size: tuple[float, float] = (6.0, 4.4)  # inches per panel


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
        Series("dashed: PyTorch latency / ideal FLOPs (SPEC §8)", [], -1, True),
    ]
    x = "kept visual tokens (equivalent, SPEC §6)"
    panels = [Panel("prefill FLOPs (decoder)", x, "GFLOPs", flops)]
    if latency:
        panels.insert(0, Panel("prefill latency (median)", x, "ms", latency))
    return Figure(title, panels, legend)


def flops_sets_figure(report: dict[str, Any], title: str = "") -> Figure:
    """FLOPs-only reports over image sets (LLaVA-NeXT): per set, how far the XLA-counted
    decoder FLOPs reduction vs dense is from the valid-token ideal's (points), against kept
    visual tokens, one colour per method family; solid = the program as run, dashed = with
    the whole causal attention (SPEC §8's count); grey band: the ±1 point target."""
    from sparsevlm_jax.bench.targets import NEXT_REDUCTION_GAP, groups

    panels = []
    families: list[str] = []
    band = 100 * NEXT_REDUCTION_GAP
    for group in groups(report["results"]):
        dense, series = group[0], []
        for fam in _families(group):
            if fam not in families:
                families.append(fam)
            i = families.index(fam)
            members = sorted(
                (e for e in group[1:] if e["method"] == fam), key=lambda e: e["equivalent_tokens"]
            )
            for key, dashed in (("xla_decoder", False), ("xla_decoder_full_attention", True)):
                pts, labels = [], []
                for e in members:
                    red = e["flops_reduction"]
                    if red.get(key) is not None:
                        pts.append((e["equivalent_tokens"], 100 * (red[key] - red["ideal_valid"])))
                        labels.append(str(e["budget"]))
                if pts:
                    series.append(Series(f"{fam} {key}", pts, i, dashed, labels=labels))
        w = dense.get("workload", {})
        counts = ", ".join(map(str, w.get("visual_counts", [])))
        slots = w.get("visual_slots", "?")
        slots = ", ".join(map(str, slots)) if isinstance(slots, list) else slots
        how = "one batch per image" if w.get("separate_batches") else f"batch of {w.get('batch')}"
        lo = min([-3.0] + [y for s in series for _, y in s.points])
        hi = max([3.0] + [y for s in series for _, y in s.points])
        panels.append(
            Panel(
                f"{dense.get('image_set')} ({how})\nV0 = {counts}; slots {slots}",
                "kept visual tokens per example (equivalent, SPEC §6)",
                "XLA reduction − ideal (valid) reduction (points)",
                series,
                references=[Reference("target", 0.0, -band, band, "-")],
                ylim=(lo - 0.3, hi + 0.3),
            )
        )
    legend = [Series(f, [], i) for i, f in enumerate(families)]
    legend += [
        Series("solid: XLA as run (masked attention blocks skipped)", [], -1),
        Series("dashed: XLA with the whole causal attention (SPEC §8's count)", [], -1, True),
        Series("grey band: within ±1 point; labels: named budget", [], -1),
    ]
    return Figure(title, panels, legend)


# ----------------------------------------------------------------------------------------------
# Drawing (matplotlib, imported lazily)


def matplotlib_figure(figsize: tuple[float, float]) -> Any:
    """A new matplotlib `Figure` on an Agg canvas, constrained layout (no pyplot state).

    Raises:
      PlotUnavailable: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure as MplFigure
    except ImportError:
        raise PlotUnavailable(
            f"matplotlib is not installed, so no plot was drawn: {PLOTS_INSTALL}"
        ) from None
    fig = MplFigure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """The matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def color_of(index: int) -> str:
    """The hex colour of a Series.color index (grey when < 0)."""
    return NEUTRAL if index < 0 else COLORS[index % len(COLORS)]


def _draw_series(ax: Any, s: Series) -> None:
    if not s.points:
        return
    xs = [p[0] + s.dodge for p in s.points]
    ys = [p[1] for p in s.points]
    color = color_of(s.color)
    style = dict(
        color=color,
        ls=("--" if s.dashed else "-") if s.line else "none",
        marker=("s" if s.dashed else "o") if s.markers else None,
        ms=4.5,
        lw=s.width,
        alpha=s.alpha,
        label=s.name,
    )
    if s.yerr is not None:
        err = [[y - lo for y, (lo, _) in zip(ys, s.yerr, strict=True)]]
        err.append([hi - y for y, (_, hi) in zip(ys, s.yerr, strict=True)])
        ax.errorbar(xs, ys, yerr=err, capsize=3, elinewidth=1, **style)
    else:
        ax.plot(xs, ys, **style)
    for x, y, text in zip(xs, ys, s.labels, strict=False):
        ax.annotate(
            text, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7, color=color
        )


def _draw_panel(ax: Any, panel: Panel) -> None:
    for ref in panel.references:
        ax.axhline(ref.y, color=NEUTRAL, ls=ref.style, lw=1.2, label=ref.name)
        if ref.lo is not None and ref.hi is not None:
            ax.axhspan(ref.lo, ref.hi, color=NEUTRAL, alpha=0.12, lw=0)
    for s in panel.series:
        _draw_series(ax, s)
    for x, label in panel.vlines:
        ax.axvline(x, color=NEUTRAL, ls=":", lw=1)
        ax.annotate(
            label,
            (x, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -10),
            textcoords="offset points",
            fontsize=8,
            color=NEUTRAL,
        )
    ax.set_title(panel.title, fontsize=11)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.xlim is not None:
        ax.set_xlim(*panel.xlim)
    else:
        ax.set_xlim(left=0)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    else:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if panel.legend:
        ax.legend(fontsize=8)


def _legend_handles(entries: list[Series]) -> list[Any]:
    from matplotlib.lines import Line2D

    return [
        Line2D(
            [],
            [],
            color=color_of(s.color),
            ls="--" if s.dashed else "-",
            marker=("s" if s.dashed else "o") if s.markers and s.color >= 0 else None,
        )
        for s in entries
    ]


def render_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes, drawn with matplotlib.

    Raises:
      PlotUnavailable: matplotlib is not installed (one-line message: what to install).
    """
    w, h = fig.panel_size
    legend_rows = (len(fig.legend) + 3) // 4
    out = matplotlib_figure((w * len(fig.panels), h + 0.3 * legend_rows))
    axes = out.subplots(1, len(fig.panels), squeeze=False)[0]
    for ax, panel in zip(axes, fig.panels, strict=True):
        _draw_panel(ax, panel)
    if fig.legend:
        out.legend(
            _legend_handles(fig.legend),
            [s.name for s in fig.legend],
            loc="outside lower center",
            ncol=min(4, len(fig.legend)),
            fontsize=8,
            frameon=False,
        )
    if fig.title:
        out.suptitle(fig.title)
    return png_bytes(out, dpi)


def write_png_or_say(path: Path, fig: Figure, write: Any) -> bool:
    """Writes `render_png(fig)` with `write(path, bytes)`; without matplotlib prints the
    one-line `PlotUnavailable` message to stderr instead and removes an older PNG at `path`
    (it would not match the data written beside it). True when the PNG was written."""
    try:
        png = render_png(fig)
    except PlotUnavailable as e:
        print(f"{path}: {e}", file=sys.stderr)
        Path(path).unlink(missing_ok=True)
        return False
    write(path, png)
    return True
