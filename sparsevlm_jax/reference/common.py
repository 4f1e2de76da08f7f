"""Small helpers shared by the reference's modules: the lazy torch import, margin
bookkeeping, and the stable descending order every ranking uses (ties to the lower index).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def import_torch() -> Any:
    """The torch module, or an ImportError that says how to install it."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise ImportError(
            "sparsevlm_jax.reference needs PyTorch and transformers "
            "(pip install 'sparsevlm-jax[torch]')"
        ) from e
    return torch


def note_margin(margins: dict[str, float], kind: str, value: float) -> None:
    """Keep the smallest margin seen of each kind."""
    margins[kind] = min(margins.get(kind, math.inf), float(value))


def merge_margins(into: dict[str, float], other: dict[str, float]) -> None:
    for kind, value in other.items():
        note_margin(into, kind, value)


def descending_order(x: torch.Tensor) -> torch.Tensor:
    """Indices sorting the 1-D `x` by descending value, ties to the lower index."""
    torch = import_torch()
    return torch.sort(-x, stable=True).indices


def boundary_margin(sorted_values: torch.Tensor, k: int, scale: float) -> float:
    """Relative gap between the k-th and (k+1)-th of descending `sorted_values`, or inf."""
    if k <= 0 or k >= sorted_values.numel() or scale <= 0:
        return math.inf
    return float(sorted_values[k - 1] - sorted_values[k]) / scale
