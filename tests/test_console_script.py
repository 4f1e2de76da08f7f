"""The INSTALLED `sparsevlm` console script, run as a user runs it: one subprocess per case.

In-process tests call `sparsevlm_jax.cli.main` with a list of arguments, so they cannot see
what only the real entry point sees (the arguments as the shell hands them over, the Python
version's argparse, the script's own imports): `sparsevlm bench ARGS` once failed only there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from sparsevlm_jax.cli import build_parser

SCRIPT = shutil.which("sparsevlm")
pytestmark = pytest.mark.skipif(
    SCRIPT is None, reason="the `sparsevlm` console script is not installed (pip install -e .)"
)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _commands() -> list[str]:
    """Every subcommand of the parser, so a new one is covered without editing this list."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return list(sub.choices)


def sparsevlm(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SCRIPT, *argv], env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


def smallest_shape() -> str:
    """The named benchmark shape with the fewest parameters."""
    import numpy as np

    from sparsevlm_jax.params import flatten, param_shapes
    from sparsevlm_jax.presets import SHAPES

    def size(name: str) -> int:
        shapes = flatten(param_shapes(SHAPES[name]()))
        return sum(int(np.prod(s)) for s in shapes.values())

    return min(SHAPES, key=size)


def test_top_level_help():
    proc = sparsevlm("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: sparsevlm ")
    for command in _commands():
        assert command in proc.stdout


@pytest.mark.parametrize("command", _commands())
def test_subcommand_help(command):
    proc = sparsevlm(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: sparsevlm {command}"), proc.stdout[:200]
    assert "examples:" in proc.stdout


def test_bench_flops_only_json(tmp_path):
    """Every argument after `bench` reaches the benchmark's own parser (issue 12, item 3)."""
    shape = smallest_shape()
    proc = sparsevlm(
        "bench", "--shape", shape, "--flops-only", "--json",
        "--count", "lowered", "--methods", "v1-64", "--no-save", "--quiet",
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["kind"] == "flops"
    assert [r["label"] for r in report["results"]] == ["dense", "v1-64"]
    assert report["workload"]["shape"] == shape
