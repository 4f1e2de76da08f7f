"""Proportions with 95% Wilson score intervals, as every accuracy in the report carries."""

from __future__ import annotations

import math
from typing import Any

Z95 = 1.959963984540054  # standard normal quantile of 0.975: 95% two-sided intervals


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
