"""The methods measured: `--methods`, and each named preset's config under the default
capacity policy, as plain JSON for the outputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsevlm_jax.sparse.config import (
    METHODS,
    SparseConfig,
    named_presets,
    named_sparse_config,
)


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
