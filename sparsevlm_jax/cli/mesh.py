"""`--mesh` for `sparsevlm eval`: the questions of a batch split over the `data` axis, the
weights over `model` (`sparsevlm_jax.sharding`), in one process. The weights are read
straight into their shards (`cli.models.load_pipeline(..., mesh)`), never whole first.

Everything is checked before the weights are read: the mesh text, the device count, the head
counts against `model`, and the batch size against `data` (every device gets the same number
of questions; `LlavaPipeline.from_pretrained` makes the batch buckets multiples of `data`).
"""

from __future__ import annotations

import argparse
from typing import Any

from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.errors import InputError


def add_eval_mesh_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mesh",
        metavar="data=N,model=M",
        help="run on several local devices: each batch split over data (--batch-size a "
        "multiple of N), the weights over model (heads and MLP, Megatron-style); a missing "
        "data takes the devices left. Default: one device",
    )


def check_mesh(args: argparse.Namespace, cfg: LlavaConfig) -> Any:
    """The `MeshShape` of `--mesh` (None without it), checked against the devices, the model
    and `--batch-size`."""
    if getattr(args, "mesh", None) is None:
        return None
    import jax

    from sparsevlm_jax.sharding import param_layouts, parse_mesh

    shape = parse_mesh(args.mesh, jax.local_device_count())
    if args.batch_size % shape.data:
        raise InputError(
            f"--batch-size {args.batch_size} does not split over --mesh data={shape.data}: "
            f"use a multiple of {shape.data}"
        )
    if shape.size > jax.local_device_count():
        raise InputError(
            f"--mesh {shape} needs {shape.size} devices, {jax.local_device_count()} found"
        )
    param_layouts(cfg, shape)  # heads must divide model
    return shape
