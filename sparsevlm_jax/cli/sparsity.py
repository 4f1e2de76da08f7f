"""The `SparseConfig` that the sparsity options ask for, checked against the model.

Also where the capacity policy is chosen: `--capacity` when given, else the default policy of
`sparsevlm_jax.calibrated` (calibrated static capacities beside the checkpoint for v1 when
they fit, bucketed otherwise; fixed schedules keep their own static sizes).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from sparsevlm_jax.calibrated import calibrated_capacity, default_capacity
from sparsevlm_jax.cli.errors import PROG
from sparsevlm_jax.cli.options import DEFAULT_BUDGET, comma_ints, ingredient_switches
from sparsevlm_jax.config import ConfigError, LlavaConfig
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.sparse.config import (
    AUTHORS_VIDEO,
    INGREDIENT_METHODS,
    METHODS,
    NAMED_BUDGETS,
    NEXT_BUDGETS,
    V1_LAYERS_32,
    SparseConfig,
    authors_video_config,
    named_sparse_config,
    preset_layers,
    variable_visual_budgets,
)

REFERENCE_DEPTH = 32  # LLaVA-1.5-7B's decoder depth, for which the presets are stated
POLICIES = ("bucketed", "static", "exact")

Capacity = str | tuple[int, ...] | None  # None: the default policy


def print_note(text: str) -> None:
    """A one-line remark on stderr that is not an error."""
    print(f"{PROG}: note: {text}", file=sys.stderr)


def parse_capacity(spec: str | None, num_image_tokens: int) -> Capacity:
    """--capacity: None (not given), a policy name, or static capacities (one per layer)."""
    if spec is None or spec in POLICIES:
        return spec
    caps = comma_ints(spec, "--capacity")
    for c in caps:
        if c < 1:
            raise InputError(f"--capacity: capacities must be >= 1, got {c}")
        if c > num_image_tokens:
            raise InputError(
                f"--capacity: capacity {c} is larger than the model's {num_image_tokens} "
                "visual tokens"
            )
    return caps


def apply_capacity(
    sparse: SparseConfig,
    capacity: Capacity,
    model: Path | None,
    note: Callable[[str], None] = print_note,
) -> SparseConfig:
    """`sparse` under the policy `--capacity` asked for (None: the default policy).

    static: v1 takes the calibrated capacities beside `model` (an error when there are none
    that fit), the other methods their schedule's static sizes (their presets' default).
    """
    if capacity is None:
        sparse, remark = default_capacity(sparse, model)
        if remark is not None:
            note(remark)
        return sparse
    if capacity == "static":
        return calibrated_capacity(sparse, model) if sparse.method == "v1" else sparse
    if isinstance(capacity, tuple):
        return sparse.replace(capacity="static", capacities=capacity, recycled_capacities=())
    return sparse.replace(capacity=capacity, capacities=(), recycled_capacities=())


def sparse_from_args(
    args: argparse.Namespace,
    cfg: LlavaConfig,
    model: Path | None = None,
    note: Callable[[str], None] = print_note,
) -> SparseConfig:
    """The `SparseConfig` the sparsity options ask for, checked against the model.

    `--budget N` names a preset of `config.NAMED_BUDGETS`, stated for LLaVA-1.5's 576 visual
    tokens. The fixed schedules (v1_5, v2_0, random) and FastV's ratio are rescaled to the
    model's visual token count (`config.named_sparse_config`); v1's budgets are rank rules
    `k = floor(rank*scale + bias)` that are not rescaled, so a v1 budget must be below the
    model's visual token count (use --scale/--bias on smaller models). `model` is the model
    directory, where calibrated capacities may be stored (`apply_capacity`); `note` receives
    a remark when calibrated capacities are there but do not fit.

    Raises:
      InputError / ConfigError: unknown method or budget, conflicting options, a v1 budget
        not below the visual token count, bad layers or capacities, `--capacity static`
        without calibrated capacities that fit.
    """
    rule = (args.budget, args.scale, args.bias, args.layers, args.capacity)
    explicit = any(x is not None for x in rule)
    method = args.sparse if args.sparse is not None else ("v1" if explicit else "dense")
    if method == AUTHORS_VIDEO:
        if explicit and (args.budget, args.scale, args.bias, args.layers) != (None,) * 4:
            raise InputError(
                "--sparse video is the authors' video setting (layer 1, k = rank, recycling): "
                "it takes no --budget/--scale/--bias/--layers (use --sparse v1 for those)"
            )
        sparse = authors_video_config(**ingredient_switches(args))
        sparse = apply_capacity(
            sparse, parse_capacity(args.capacity, cfg.num_image_tokens), model, note
        )
        sparse = with_ladder_steps(sparse, args)
        sparse.validate_for(cfg.text.num_hidden_layers)
        return sparse
    if method not in METHODS:
        known = ", ".join((*METHODS, AUTHORS_VIDEO))
        raise ConfigError(f"unknown sparse method {method!r}; known: {known}")
    switches = ingredient_switches(args)
    if method == "dense":
        if explicit or switches or getattr(args, "ladder_steps", None) is not None:
            raise InputError(
                "--budget/--scale/--bias/--layers/--capacity/--ladder-steps and the ingredient "
                "switches need a sparse method"
            )
        return SparseConfig()
    if switches and method not in INGREDIENT_METHODS:
        named = ", ".join(
            "--" + ("" if on else "no-") + k.replace("_", "-") for k, on in switches.items()
        )
        raise InputError(f"{named}: switches of {', '.join(INGREDIENT_METHODS)}, not of {method}")
    if method != "v1" and (args.scale is not None or args.bias is not None):
        raise InputError(f"--scale/--bias are v1's budget rule; {method} takes --budget")
    if args.budget is not None and (args.scale is not None or args.bias is not None):
        raise InputError("give either --budget or --scale/--bias, not both")
    if args.bias is not None and args.scale is None:
        raise InputError("--bias needs --scale")
    num_layers, num_visual = cfg.text.num_hidden_layers, cfg.num_image_tokens
    budget = None if args.scale is not None else args.budget
    if budget is None and args.scale is None:
        budget = DEFAULT_BUDGET
    variable = cfg.variable_visual
    if budget is not None:
        check_budget(method, budget, num_visual, variable)
    capacity = parse_capacity(args.capacity, num_visual)
    layers = comma_ints(args.layers, "--layers") if args.layers is not None else None
    if budget is None:
        sparse = SparseConfig(
            method="v1",
            layers=layers if layers is not None else default_layers(num_layers),
            scale=args.scale,
            bias=args.bias or 0.0,
            **switches,
        )
    elif method == "v1":
        layers = layers if layers is not None else default_layers(num_layers)
        rule = NEXT_BUDGETS.get(budget, budget) if variable else budget  # 640 of 2880 = 128
        sparse = SparseConfig.v1(rule, num_layers, layers)
        sparse = sparse.replace(budget_name=budget, **switches)
    else:
        # With explicit --layers the preset is built for the reference depth, then moved.
        depth = num_layers if layers is None else REFERENCE_DEPTH
        try:
            sparse = named_sparse_config(
                method, budget, depth, num_visual, variable_visual=variable, **switches
            )
        except ConfigError as e:
            raise ConfigError(f"{e}; pass --layers" if "too shallow" in str(e) else e) from None
        if layers is not None:
            sparse = moved_to(sparse, layers)
    sparse = apply_capacity(sparse, capacity, model, note)
    sparse = with_ladder_steps(sparse, args)
    sparse.validate_for(num_layers)
    return sparse


def with_ladder_steps(sparse: SparseConfig, args: argparse.Namespace) -> SparseConfig:
    """--ladder-steps N: the bucketed policy's capacity ladder; an error under another policy
    (which has no buckets to size)."""
    steps = getattr(args, "ladder_steps", None)
    if steps is None:
        return sparse
    if sparse.capacity != "bucketed":
        raise InputError(
            f"--ladder-steps sizes the bucketed policy's stages; this run's policy is "
            f"{sparse.capacity} (pass --capacity bucketed)"
        )
    if not 1 <= steps <= 64:
        raise InputError(f"--ladder-steps must be in 1..64, got {steps}")
    return sparse.replace(ladder_steps=steps)


def moved_to(sparse: SparseConfig, layers: tuple[int, ...]) -> SparseConfig:
    """A preset at explicit `--layers`: fixed schedules (and their static capacities) keep
    their first len(layers) entries; more layers than the schedule has is an error."""
    if not sparse.schedule:
        return sparse.replace(layers=layers)
    n = len(layers)
    if n > len(sparse.schedule):
        raise InputError(
            f"--layers: {sparse.name} prunes at {len(sparse.schedule)} layers, got {n} layers"
        )
    cut = {k: getattr(sparse, k)[:n] for k in ("schedule", "capacities", "recycled_capacities")}
    return sparse.replace(layers=layers, **cut)


def check_budget(method: str, budget: int, num_visual: int, variable: bool = False) -> None:
    """A named budget of `method`; a v1 budget must be below the visual token count.
    `variable`: the family's visual count varies per example (LLaVA-NeXT's budgets too)."""
    known = variable_visual_budgets(method) if variable else NAMED_BUDGETS[method]
    if budget not in known:
        named = ", ".join(map(str, known))
        raise InputError(f"--budget: no {method} budget named {budget}; named budgets: {named}")
    if method == "v1" and not variable and budget >= num_visual:
        raise InputError(
            f"--budget {budget} is not below the model's {num_visual} visual tokens (v1's "
            "named budgets are rank rules for 576-token LLaVA-1.5; use --scale/--bias)"
        )


def default_layers(num_layers: int) -> tuple[int, ...]:
    """SparseVLM v1's pruning layers on a model of `num_layers` decoder layers (SPEC §6:
    the authors' 2,6,15,19, scaled only when the model is too shallow; `preset_layers`)."""
    try:
        return preset_layers(V1_LAYERS_32, num_layers)
    except ConfigError as e:
        raise ConfigError(f"{e}; pass --layers") from None
