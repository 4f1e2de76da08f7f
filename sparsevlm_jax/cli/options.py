"""The option groups several `sparsevlm` commands share, and their checks.

model (--model, --clip, --dtype, --template, --image-mode), sparsity (--sparse, --budget,
--scale, --bias, --layers, --capacity) and generation (--max-new-tokens, --temperature,
--top-p, --seed); what they mean for the model is decided in `models` and `sparsity`.
"""

from __future__ import annotations

import argparse

from sparsevlm_jax.errors import InputError
from sparsevlm_jax.sparse.config import METHODS, NAMED_BUDGETS

DEFAULT_BUDGET = 192


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in the epilog as written."""


def comma_ints(text: str, what: str) -> tuple[int, ...]:
    """Parses "2,6,15" as (2, 6, 15); InputError naming the option otherwise."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"{what}: expected comma-separated integers, got {text!r}") from None
    return values


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --clip, --dtype, --template, --image-mode."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        metavar="CKPT",
        help="converted checkpoint (sparsevlm convert) or a llava-hf / original LLaVA directory",
    )
    add_loading_args(g)


def add_loading_args(g: argparse._ActionsContainer) -> None:
    """How a model is read: --clip, --dtype, --template, --image-mode, --min/max-pixels."""
    g.add_argument("--clip", metavar="DIR", help="CLIP directory, for original LLaVA checkpoints")
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="weight and compute dtype (default: the stored one)",
    )
    g.add_argument(
        "--template",
        metavar="NAME",
        help="conversation template: vicuna_v1 (default), llava_v1 or llava_hf; Qwen-VL uses "
        "the checkpoint's chat template unless one is named",
    )
    g.add_argument(
        "--image-mode",
        choices=("pad", "crop"),
        help="pad to square with the mean colour (LLaVA-1.5, default) or centre crop",
    )
    g.add_argument(
        "--min-pixels",
        type=int,
        metavar="N",
        help="Qwen-VL: smallest resized image area in pixels (default: the checkpoint's)",
    )
    g.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        help="Qwen-VL: largest resized image area in pixels (default: the checkpoint's)",
    )


def add_sparse_args(p: argparse.ArgumentParser) -> None:
    """--sparse, --budget, --scale, --bias, --layers, --capacity, --ladder-steps."""
    g = p.add_argument_group(
        "sparsity",
        "Default: dense, or v1 when any other sparsity option is given. Pick a named budget "
        "(--budget) or, for v1, an explicit rule k = floor(rank*scale + bias) (--scale/--bias).",
    )
    g.add_argument(
        "--sparse",
        metavar="METHOD",
        help=f"{', '.join(METHODS)}, or video: the authors' video setting (SPEC §9.6: one "
        "pruning layer, layer 1, k = rank, recycling, positions renumbered)",
    )
    budgets = "; ".join(f"{m}: {','.join(map(str, b))}" for m, b in NAMED_BUDGETS.items())
    g.add_argument(
        "--budget",
        type=int,
        metavar="N",
        help=f"named budget (visual tokens of 576-token LLaVA-1.5; default {DEFAULT_BUDGET}): "
        f"{budgets}. Schedules and FastV's ratio are rescaled to the model's token count; "
        "v1's rank rules are not, so a v1 budget must be below it",
    )
    g.add_argument("--scale", type=float, metavar="S", help="v1 budget rule: scale")
    g.add_argument("--bias", type=float, metavar="B", help="v1 budget rule: bias (default 0)")
    g.add_argument(
        "--layers",
        metavar="L1,L2,...",
        help="pruning layers, 0-based (default: the authors' 2,6,15,19 for v1, 2,6,15 for "
        "v1.5/v2.0, 2 for FastV; scaled only on models too shallow for them, SPEC §6)",
    )
    add_capacity_arg(g)
    add_ingredient_args(p)


INGREDIENT_HELP = {
    "top_heads": "average only the v2_heads heads with the most rater-to-visual attention "
    "(SparseVLM+) instead of every head",
    "gravity": "divide attention by the RoPE bias before scoring (SparseVLM+'s gravity "
    "correction, SPEC §6)",
    "original_positions": "kept tokens keep their original position ids, a recycled token its "
    "centre's (SparseVLM+); off: renumbered (v1, v1.5)",
    "recycling": "merge pruned tokens into recycled ones (v1, v1.5, SPEC §4)",
}


def add_ingredient_args(p: argparse.ArgumentParser) -> None:
    """--[no-]top-heads, --[no-]gravity, --[no-]original-positions, --[no-]recycling."""
    g = p.add_argument_group(
        "SparseVLM+'s ingredients",
        "Switch one of the four things SparseVLM+ (v2_0) does differently from v1.5 on or off, "
        "on v1, v1_5 or v2_0 (default: the method's own).",
    )
    for name, text in INGREDIENT_HELP.items():
        g.add_argument(
            "--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, help=text
        )


def ingredient_switches(args: argparse.Namespace) -> dict[str, bool]:
    """The ingredients switched on the command line: {name: on}."""
    return {k: getattr(args, k) for k in INGREDIENT_HELP if getattr(args, k, None) is not None}


def add_capacity_arg(g: argparse._ActionsContainer) -> None:
    """--capacity: the capacity policy (DESIGN.md, "Capacity policies")."""
    g.add_argument(
        "--capacity",
        metavar="POLICY",
        help="bucketed: run stage by stage, each pruned stage compiled for the batch's budget "
        "rounded up to a bucket; static: v1's calibrated capacities stored beside the "
        "checkpoint (sparse_defaults.json, see `sparsevlm calibrate`), a fixed schedule's own "
        "sizes; N,N,...: static capacities, one per pruning layer; exact: keep every slot "
        "(saves no compute; for parity tests). Default: fixed schedules and FastV their "
        "static sizes; v1 static when the checkpoint ships calibrated capacities for its "
        "budget and layers, else bucketed",
    )
    g.add_argument(
        "--ladder-steps",
        type=int,
        metavar="N",
        help="bucketed policy: capacity buckets per octave (default 4: at most 25%% padding). "
        "Fewer buckets compile fewer stage programs for more padded compute (2: 50%%, 1: "
        "100%%); more do the opposite. Decisions are the same whatever N",
    )


def add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """--max-new-tokens, --temperature, --top-p, --seed."""
    g = p.add_argument_group("generation")
    g.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, metavar="N", help="(%(default)s)"
    )
    g.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (%(default)s)"
    )
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="(%(default)s)")
    g.add_argument("--seed", type=int, default=0, metavar="K", help="(%(default)s)")


def check_generation_args(args: argparse.Namespace) -> None:
    """InputError for a generation option out of range."""
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {args.top_p}")
