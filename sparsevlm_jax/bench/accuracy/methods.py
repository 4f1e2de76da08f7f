"""The methods measured: `--methods`, and each named preset's config under the default
capacity policy, as plain JSON for the outputs."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from sparsevlm_jax.sparse.config import (
    INGREDIENTS,
    METHODS,
    SparseConfig,
    named_presets,
    named_sparse_config,
)

# method, then @budget (or -budget), then switched ingredients: "+gravity", "-recycling"
_TOKEN = re.compile(
    r"^(?P<method>[a-z0-9_]+?)(?:[@-](?P<budget>\d+))?(?P<switches>([+-][a-z_]+)*)$"
)


class Preset(NamedTuple):
    """A named preset, with SparseVLM+'s ingredients switched on (True) or off (False)."""

    method: str
    budget: int
    switches: tuple[tuple[str, bool], ...] = ()


def parse_methods(spec: str) -> list[Preset]:
    """`--methods`: "" = every named preset; else comma-separated `method` (all its named
    budgets) or `method@budget` (also `method-budget`), each optionally followed by switched
    ingredients (`+name` on, `-name` off; `INGREDIENTS`), e.g. "v1,fastv@64,v2_0@64-gravity,
    v1_5@64+top_heads+gravity"."""
    presets = named_presets()
    if not spec:
        return [Preset(m, b) for m, b in presets]
    out: list[Preset] = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        match = _TOKEN.match(token)
        name, budget = (match["method"], match["budget"]) if match else (token, None)
        if name == "dense":
            continue
        chosen = [p for p in presets if p[0] == name and (not budget or str(p[1]) == budget)]
        if match is None or not chosen:
            raise ValueError(
                f"--methods: unknown preset {token!r}; methods: {', '.join(METHODS)}; "
                f"named presets: {', '.join(f'{m}@{b}' for m, b in presets)}"
            )
        switches = []
        for sign, ingredient in re.findall(r"([+-])([a-z_]+)", match["switches"]):
            if ingredient not in INGREDIENTS:
                raise ValueError(
                    f"--methods: {token!r}: unknown ingredient {ingredient!r}; "
                    f"known: {', '.join(INGREDIENTS)}"
                )
            switches.append((ingredient, sign == "+"))
        out += [q for q in (Preset(m, b, tuple(switches)) for m, b in chosen) if q not in out]
    return out


ABLATION_BUDGETS = (192, 64)  # where v1.5 and v2.0 part (of 576)


def ablation_presets(budgets: Sequence[int] = ABLATION_BUDGETS) -> list[Preset]:
    """SparseVLM+ (v2.0) with each of its four ingredients undone and v1.5 with each done
    (`INGREDIENTS` toggled away from the method's own choice), at each budget."""
    return [
        Preset(method, budget, ((name, method not in on_in),))
        for budget in budgets
        for method in ("v2_0", "v1_5")
        for name, on_in in INGREDIENTS.items()
    ]


def method_configs(
    model: str | Path, cfg: Any, presets: Sequence[tuple[Any, ...]]
) -> tuple[list[SparseConfig], list[str]]:
    """(dense + each preset under the default capacity policy, notes on capacities).

    A preset is `(method, budget)` or a `Preset` with switched ingredients."""
    from sparsevlm_jax.calibrated import default_capacity

    configs, notes = [SparseConfig()], []
    for method, budget, *rest in presets:
        switches = dict(rest[0]) if rest else {}
        sparse = named_sparse_config(
            method, budget, cfg.text.num_hidden_layers, cfg.num_image_tokens, **switches
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
