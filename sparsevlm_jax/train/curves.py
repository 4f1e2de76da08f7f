"""The learning curves of a run as a PNG (losses, validation accuracy), from its log records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sparsevlm_jax import shapes_task as st


def draw_curve(records: list[dict[str, Any]], path: Path) -> None:
    """The learning curves as a PNG drawn with matplotlib (the `plots` extra), written
    atomically.

    Left: training losses per step (answer loss of the joint phase, per-patch auxiliary loss
    of both phases; faint raw values, a 50-step running mean on top). Right: validation
    accuracy per question type and overall, and the per-patch colour / shape heads' accuracy
    on object patches (dashed; the vision-only first phase has only these). A dotted line
    marks where the joint phase starts. Without matplotlib one line on stderr says what to
    install and training goes on. Self-contained (no `sparsevlm_jax.bench` import), so a
    plotting problem never stops a training run.
    """
    import os
    import sys
    import tempfile

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(
            f"{path}: matplotlib is not installed, so no plot was drawn: "
            'pip install "sparsevlm-jax[plots]"',
            file=sys.stderr,
        )
        return
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    window = 50
    for i, (key, name) in enumerate((("loss", "answer loss"), ("aux_loss", "per-patch loss"))):
        steps = np.array([r["step"] for r in records if key in r])
        values = np.array([r[key] for r in records if key in r])
        if not len(steps):
            continue
        color = f"C{i}"
        loss_ax.plot(steps, values, color=color, lw=0.8, alpha=0.25)
        if len(values) >= window:
            mean = np.convolve(values, np.ones(window) / window, mode="valid")
            loss_ax.plot(
                steps[window - 1 :], mean, color=color, lw=1.6, label=f"{name} (mean of {window})"
            )
        else:
            loss_ax.plot([], [], color=color, label=name)
    for i, cat in enumerate(("overall", *st.CATEGORIES)):
        pts = [(r["step"], r[f"val_{cat}"]) for r in records if f"val_{cat}" in r]
        if pts:
            style = {"color": "0.35", "lw": 2.4} if cat == "overall" else {"color": f"C{i - 1}"}
            acc_ax.plot(*zip(*pts, strict=True), marker="o", ms=3.5, label=cat, **style)
    for i, part in enumerate(("color", "shape")):
        pts = [(r["step"], r[f"val_patch_{part}"]) for r in records if f"val_patch_{part}" in r]
        if pts:
            acc_ax.plot(
                *zip(*pts, strict=True),
                "--s",
                color=f"C{5 + i}",
                ms=3.5,
                label=f"patch {part} head",
            )
    joint = [r["step"] for r in records if "loss" in r]
    for ax in (loss_ax, acc_ax):
        if joint and joint[0] > 1:
            ax.axvline(joint[0] - 1, color="0.35", ls=":", lw=1)
            ax.annotate(
                "joint phase",
                (joint[0] - 1, 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -10),
                textcoords="offset points",
                fontsize=8,
                color="0.35",
            )
        ax.set_xlabel("step")
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    loss_ax.set(title="training loss", ylabel="loss")
    loss_ax.set_ylim(bottom=0)
    acc_ax.set(title="validation accuracy", ylabel="accuracy", ylim=(0, 1.02))
    fig.suptitle(path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
