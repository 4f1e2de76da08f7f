"""Smoke test of `sparsevlm bench --flops-only --json` (the stable interface), no timing."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from sparsevlm_jax import bench
from sparsevlm_jax.sparse.config import named_presets


@pytest.fixture(scope="module")
def flops_report(tmp_path_factory):
    """The JSON report of a lowered-count FLOPs run on `mini` (dense + v1 at 64)."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--shape", "mini", "--flops-only", "--json", "--count", "lowered", "--quiet"]
    argv += ["--methods", "v1-64", "--out", str(out)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert bench.main(argv) == 0
    return json.loads(buf.getvalue()), out


def test_flops_json_fields(flops_report):
    report, _ = flops_report
    assert report["schema"] == bench.SCHEMA and report["kind"] == "flops"
    for key in ("cpu_model", "usable_cores", "jax", "jax_backend", "jax_device_kind"):
        assert key in report["hardware"]
    wl = report["workload"]
    assert (wl["num_image_tokens"], wl["num_layers"]) == (576, 32)
    assert (wl["prefix_bucket"], wl["text_bucket"]) == (48, 64)
    labels = [r["label"] for r in report["results"]]
    assert labels == ["dense", "v1-64"]
    for r in report["results"]:
        assert len(r["visual_tokens_per_layer"]) == 32
        assert len(r["visual_slots_per_layer"]) == 32
        f = r["flops"]
        for key in ("xla_total", "xla_vision", "xla_decoder", "ideal_valid", "ideal_padded"):
            assert f[key] > 0
        assert f["ideal_valid"] <= f["ideal_capacity"] <= f["ideal_padded"]
        assert r["kv_cache"]["bytes"] > r["kv_cache"]["prompt_bytes"] > 0
    dense, v1 = report["results"]
    assert dense["visual_tokens_per_layer"] == [576] * 32
    assert v1["visual_tokens_per_layer"][:3] == [576] * 3
    assert v1["visual_tokens_per_layer"][3] < 576
    assert 0 < v1["flops_ratio"]["xla_decoder"] < 1
    assert v1["kv_cache"]["bytes"] < dense["kv_cache"]["bytes"]
    assert any(t["name"].startswith("v1-64") for t in report["targets"])


def test_flops_files_written(flops_report):
    _, out = flops_report
    names = sorted(p.name for p in out.iterdir())
    assert names == ["mini-flops.json", "mini-flops.md"]
    assert "| v1-64 |" in (out / "mini-flops.md").read_text()


def test_method_registry_is_iterated():
    listed = bench.method_list()
    assert listed[0] == ("dense", None)
    assert listed[1:] == list(named_presets())
    assert bench.method_list(["v1"]) == [("dense", None)] + [
        p for p in named_presets() if p[0] == "v1"
    ]
    with pytest.raises(ValueError):
        bench.method_list(["nope"])


def test_plot_renders_png():
    report = {
        "results": [
            {
                "method": "dense" if v == 576.0 else "v1",
                "equivalent_tokens": v,
                "jax": {"prefill": {"median_ms": ms}},
                "torch": {"torch": {"prefill": {"median_ms": 2 * ms}}},
                "flops": {"xla_decoder": 1e9 * v, "ideal_valid": 0.9e9 * v},
            }
            for v, ms in ((576.0, 100.0), (192.0, 40.0), (64.0, 20.0))
        ]
    }
    png = bench.render_png(bench.plot_figure(report, "test"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_parser_works_as_cli_parent():
    import argparse

    top = argparse.ArgumentParser(prog="sparsevlm")
    sub = top.add_subparsers(dest="command")
    sub.add_parser("bench", parents=[bench.build_parser(add_help=False)])
    args = top.parse_args(["bench", "--shape", "llava-1.5-7b", "--flops-only", "--json"])
    assert (args.shape, args.flops_only, args.json) == ("llava-1.5-7b", True, True)
    assert args.methods == "" and args.count == "auto"
