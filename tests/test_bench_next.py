"""`sparsevlm bench` on LLaVA-NeXT shapes: the FLOPs-only report over image sets (lowered
counts on `mini-next`) and the CPU latency driver's dry run (`benchmarks/next_cpu_run.py`),
whose measured per-layer counts must equal what the FLOPs-only path assumes."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest

from sparsevlm_jax import bench
from sparsevlm_jax.bench.counts import expected_counts, static_capacities
from sparsevlm_jax.bench.workloads import parse_image_sets
from sparsevlm_jax.presets import SHAPES
from sparsevlm_jax.sparse.config import named_sparse_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "next_cpu_run.py"


def test_named_shapes():
    cfg = SHAPES["llava-next-7b"]()
    assert cfg.family == "llava_next" and cfg.max_tiles == 5
    t = cfg.text
    assert (t.hidden_size, t.num_hidden_layers, cfg.num_image_tokens) == (4096, 32, 576)
    mini = SHAPES["mini-next"]()
    assert mini.family == "llava_next" and mini.text == SHAPES["mini"]().text
    wl = bench.Workload("llava-next-7b", cfg, images=((672, 672),))
    assert wl.visual_counts == [2928] and wl.visual_slots == 2944  # 16-step visual ladder


def test_image_sets_and_methods():
    sets = parse_image_sets("672x672; m=480x640, 336x336;each:e=336x336")
    assert sets == {"672x672": ((672, 672),), "m": ((480, 640), (336, 336)),
                    "each:e": ((336, 336),)}  # fmt: skip
    for bad in ("672", "axb", "0x5", ";"):
        with pytest.raises(ValueError):
            parse_image_sets(bad)
    labels = [bench.method_label(m, b) for m, b in bench.method_list(variable=True)]
    for b in (640, 320, 160, 192):
        assert {f"v1_5-{b}", f"v2_0-{b}", f"fastv-{b}"} <= set(labels)
    assert "v1-640" in labels and "v1-160" not in labels  # v1 has no rule for 32 of 576
    assert labels[0] == "dense" and "v1_5-128" not in labels  # = v1_5-640 (SPEC §9.3)


def test_expected_counts_scale_per_example():
    sparse = named_sparse_config("v1_5", 640, 32, variable_visual=True)  # 128 of 576
    per_layer, decided = expected_counts(sparse, 2928, 32)
    assert [k for k, _ in decided] == [1540, 559, 183]  # round((303, 110, 36) * 2928 / 576)
    assert per_layer[:3] == [2928] * 3 and per_layer[3] == 1540 + decided[0][1]
    static = static_capacities(sparse, [1176, 2928])
    assert static.capacity == "static" and static.capacities == (1540, 559, 183)


@pytest.fixture(scope="module")
def flops_report(tmp_path_factory):
    """A lowered-count FLOPs run on `mini-next`: a batch of two aspect ratios and the same
    images one per batch, dense + v1.5 at 160."""
    out = tmp_path_factory.mktemp("bench-next")
    argv = ["--shape", "mini-next", "--flops-only", "--json", "--count", "lowered", "--quiet"]
    argv += ["--methods", "v1_5-160", "--out", str(out)]
    argv += ["--images", "b=336x336,336x672;each:e=336x336,336x672"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert bench.main(argv) == 0
    return json.loads(buf.getvalue()), out


def test_flops_report_over_image_sets(flops_report):
    report, out = flops_report
    assert sorted(p.name for p in out.iterdir()) == [f"mini-next-flops.{x}" for x in
                                                     ("json", "md", "png")]  # fmt: skip
    assert list(report["image_sets"]) == ["b", "e"]
    by_set = {}
    for e in report["results"]:
        by_set.setdefault(e["image_set"], []).append(e)
    assert [e["label"] for e in by_set["b"]] == ["dense", "v1_5-160"]
    batch, each = by_set["b"], by_set["e"]
    assert batch[0]["workload"]["visual_counts"] == [1176, 1752]
    assert batch[0]["workload"]["visual_slots"] == 1792  # every row at the batch's largest
    assert each[0]["workload"]["visual_slots"] == [1216, 1792]  # each image on its own rung
    for group in (batch, each):
        dense, v15 = group
        assert dense["flops"]["ideal_valid"] == pytest.approx(each[0]["flops"]["ideal_valid"])
        for e in group:
            f = e["flops"]
            assert f["ideal_valid"] <= f["ideal_capacity"] <= f["ideal_padded"]
            assert f["xla_decoder"] > 0 and f["xla_decoder_full_attention"] > f["xla_decoder"]
        assert 0.7 < v15["flops_reduction"]["ideal_valid"] < 1
        assert abs(v15["flops_reduction"]["xla_decoder_full_attention"]
                   - v15["flops_reduction"]["ideal_valid"]) < 0.02  # fmt: skip
    # padding rows to the batch's largest example costs the batch more than one by one
    assert batch[0]["flops"]["xla_decoder"] > each[0]["flops"]["xla_decoder"]
    names = [t["name"] for t in report["targets"]]
    assert any(n.startswith("v1_5-160 [e]: XLA decoder FLOPs reduction") for n in names)
    md = (out / "mini-next-flops.md").read_text()
    assert "## Image set `e`" in md and "Each image its own batch" in md and "| v1_5-160 |" in md


def load_script():
    spec = importlib.util.spec_from_file_location("next_cpu_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_timed_run_command():
    mod = load_script()
    ns = mod.main.__globals__["argparse"].Namespace(dry_run=False, out=None, methods="")
    argv = mod.bench_argv(ns)
    assert argv[argv.index("--shape") + 1] == "mini-next"
    assert argv[argv.index("--images") + 1] == "480x640"
    methods = argv[argv.index("--methods") + 1].split(",")
    assert {"v1-640", "v1_5-640", "v1_5-320", "v1_5-160", "fastv-320"} <= set(methods)


def test_dry_run(tmp_path):
    pytest.importorskip("torch")
    mod = load_script()
    assert mod.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "mini-next-cpu-dry-run.json").read_text())
    assert report["kind"] == "full" and report["workload"]["visual_counts"] == [1176]
    dense, v15 = report["results"]
    assert dense["torch"]["torch"]["impl"] == "TorchDense"  # LlavaNextForConditionalGeneration
    assert v15["torch"]["torch"]["impl"] == "TorchReference"
    # equal decisions: the reference (given image_sizes) kept and recycled what JAX did
    assert v15["torch"]["torch"]["budget"] == v15["pruning"]["budget"]
    assert v15["torch"]["torch"]["recycled"] == v15["pruning"]["recycled"]
    # the measured per-layer counts are the FLOPs-only path's expected ones
    sparse = named_sparse_config("v1_5", 160, 32, variable_visual=True)
    assert v15["visual_tokens_per_example"] == [expected_counts(sparse, 1176, 32)[0]]
    for e in (dense, v15):
        assert e["jax"]["prefill"]["runs"] == 1 and e["torch"]["torch"]["prefill"]["runs"] == 1
    assert "torch_over_jax_prefill" in v15["ratios"]
