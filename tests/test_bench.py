"""Smoke test of `sparsevlm bench --flops-only --json` (the stable interface), no timing."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from sparsevlm_jax import bench
from sparsevlm_jax.sparse.config import named_presets, named_sparse_config


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
    assert (wl["prefix_bucket"], wl["text_bucket"]) == (35, 64)  # exact template prefix
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


def test_without_matplotlib_plots_fail_with_one_line(monkeypatch, tmp_path, capsys):
    import sys

    from sparsevlm_jax.bench import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    fig = plot.Figure("t", [plot.Panel("p", "x", "y", [plot.Series("s", [(0, 1), (1, 2)])])])
    with pytest.raises(plot.PlotUnavailable) as err:
        plot.render_png(fig)
    assert 'pip install "sparsevlm-jax[plots]"' in str(err.value)
    assert "\n" not in str(err.value)
    written = []
    stale = tmp_path / "a.png"
    stale.write_bytes(b"an older plot")
    assert not plot.write_png_or_say(stale, fig, lambda p, b: written.append(p))
    lines = capsys.readouterr().err.strip().splitlines()
    assert written == [] and len(lines) == 1 and "sparsevlm-jax[plots]" in lines[0]
    assert not stale.exists()  # it would not match the JSON / markdown written beside it


def test_wilson_interval():
    from sparsevlm_jax.bench.accuracy import wilson

    lo, hi = wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson(0, 10)
    assert lo == 0 and round(hi, 4) == 0.2775
    lo, hi = wilson(10, 10)
    assert round(lo, 4) == 0.7225 and hi == 1.0
    lo, hi = wilson(1900, 2000)
    assert lo < 0.95 < hi and hi - lo < 0.02
    assert wilson(0, 0) == (0.0, 1.0)


def test_accuracy_methods_option():
    from sparsevlm_jax.bench.accuracy import parse_methods

    def pairs(spec):
        return [(p.method, p.budget) for p in parse_methods(spec) if not p.switches]

    assert pairs("") == named_presets()
    assert pairs("v1") == [p for p in named_presets() if p[0] == "v1"]
    assert pairs("fastv@64,v1_5-96,dense") == [("fastv", 64), ("v1_5", 96)]
    with pytest.raises(ValueError, match="named presets"):
        parse_methods("v1@96")


def test_accuracy_methods_take_switched_ingredients():
    from sparsevlm_jax.bench.accuracy.methods import Preset, ablation_presets, parse_methods

    assert parse_methods("v2_0@64-gravity,v1_5-192+top_heads+gravity") == [
        Preset("v2_0", 64, (("gravity", False),)),
        Preset("v1_5", 192, (("top_heads", True), ("gravity", True))),
    ]
    with pytest.raises(ValueError, match="unknown ingredient 'heads'"):
        parse_methods("v2_0@64-heads")
    presets = ablation_presets()
    assert len(presets) == 16 and len(set(presets)) == 16
    # Every variant toggles one ingredient away from its method's own choice.
    for p in presets:
        sparse = named_sparse_config(p.method, p.budget, 8, 256, **dict(p.switches))
        assert len(sparse.switched) == 1, sparse.name


def test_ablation_table_pairs_each_variant_with_its_base():
    from sparsevlm_jax.bench.accuracy.ablation import (
        figure_ablation,
        markdown_ablation,
        paired_difference,
    )

    # 10 questions: the base answers 8, the variant loses two of them and gains none.
    base_bits, variant_bits = "1111111100", "1111110000"
    mean, lo, hi = paired_difference(variant_bits, base_bits)
    assert mean == pytest.approx(-0.2) and lo < -0.2 < hi and hi - lo < 0.7

    def result(method, family, switched, bits):
        n, k = len(bits), bits.count("1")
        return {
            "method": method, "family": family, "budget": 64, "switched": switched,
            "accuracy": k / n, "ci": [0.0, 1.0], "correct_bits": bits,
            "equivalent_tokens": 16.0,
        }  # fmt: skip

    report = {
        "num_image_tokens": 256,
        "num_questions": 10,
        "results": [
            result("dense", "dense", {}, "1111111110"),
            result("v2_0@64", "v2_0", {}, base_bits),
            result("v2_0@64-gravity", "v2_0", {"gravity": False}, variant_bits),
        ],
    }
    lines = markdown_ablation(report)
    rows = [x for x in lines if x.startswith("| 64 |")]
    assert len(rows) == 2
    assert "as published" in rows[0] and rows[0].endswith("| 80.0 [0.0, 100.0] | — | 16.0 |")
    assert "without RoPE-gravity correction" in rows[1] and "| -20.0 [" in rows[1]
    assert len(figure_ablation(report).panels) == 1
    report["results"] = report["results"][:2]  # no switched variant: no ablation
    assert markdown_ablation(report) == [] and figure_ablation(report) is None


class _FakePipe:
    """`generate` answers "yes" to everything and counts its calls and batch sizes."""

    def __init__(self):
        self.calls = []

    def generate(self, images, questions, sparse, max_new_tokens, batch_size):
        from sparsevlm_jax.pipeline import Result

        self.calls.append(len(questions))
        stats = {"equivalent_tokens": 10.0, "flops": 1.0, "dense_flops": 4.0, "layers": []}
        return [Result("yes", [], dict(stats)) for _ in questions]


def _items(n):
    from sparsevlm_jax.bench.accuracy import Item

    cats = ("color", "shape", "exists", "count")
    return [
        Item(f"{i:05d}-0", 0, "is there a red circle ?", "yes" if i % 2 else "no", cats[i % 4])
        for i in range(n)
    ]


def test_accuracy_answers_resume_from_progress_file(tmp_path):
    from sparsevlm_jax.bench.accuracy import Progress, answer_all, summarize
    from sparsevlm_jax.sparse.config import named_sparse_config

    sparse = named_sparse_config("v1_5", 64, 8, 256)
    items, header = _items(20), {"model_sha256": "abc", "num_questions": 20}
    path = tmp_path / "progress.jsonl"
    pipe = _FakePipe()
    rows, seconds = answer_all(pipe, sparse, [None], items, Progress(path, header), 8, False)
    assert pipe.calls == [8, 8, 8]  # the short last batch is padded to the batch size
    assert [r["ok"] for r in rows] == [i % 2 == 1 for i in range(20)] and len(seconds) == 3
    # an interrupted run: the last batch line torn half-way -> only that batch is redone
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:30])
    pipe = _FakePipe()
    again, _ = answer_all(pipe, sparse, [None], items, Progress(path, header), 8, False)
    assert pipe.calls == [8] and again == rows
    # another model (header) or --fresh: everything is redone
    pipe = _FakePipe()
    answer_all(
        pipe, sparse, [None], items, Progress(path, {**header, "model_sha256": "x"}), 8, False
    )
    assert pipe.calls == [8, 8, 8]
    s = summarize(sparse, rows, items, 256, seconds)
    assert (s["n"], s["correct"], s["method"], s["budget_tokens"]) == (20, 10, "v1_5@64", 28)
    assert s["flops_reduction"] == 0.75 and s["equivalent_tokens"] == 10.0
    assert list(s["per_type"]) == ["color", "shape", "exists", "count"]
    assert s["correct_bits"] == "01" * 10


def _result(method, budget, eq, acc, n=400):
    from sparsevlm_jax.bench.accuracy import config_json, proportion
    from sparsevlm_jax.sparse.config import SparseConfig, named_sparse_config

    sparse = SparseConfig() if method == "dense" else named_sparse_config(method, budget, 8, 256)
    k = round(acc * n)
    return {
        "method": sparse.name,
        "family": method,
        "budget": budget,
        "config": config_json(sparse),
        **proportion(k, n),
        "per_type": {c: proportion(k // 4, n // 4) for c in ("color", "shape", "exists", "count")},
        "equivalent_tokens": eq,
        "equivalent_tokens_range": [eq - 1, eq + 1],
        "flops_ratio": eq / 256,
        "flops_reduction": 1 - eq / 256,
        "retention": acc / 0.95,
    }


def test_accuracy_tables_and_plot_from_a_report():
    from sparsevlm_jax.bench import accuracy
    from sparsevlm_jax.bench.accuracy import proportion

    results = [_result("dense", None, 256.0, 0.95)]
    for method in ("v1", "v1_5", "v2_0", "fastv", "random"):
        for b in (192, 64):
            results.append(_result(method, b, b / 576 * 256, 0.9 if b == 192 else 0.7))
    report = {
        "command": "test",
        "date": "today",
        "hardware": "cpu",
        "model": "m",
        "model_sha256": "0" * 64,
        "task": "shapes-v2",
        "num_image_tokens": 256,
        "num_layers": 8,
        "num_images": 100,
        "num_questions": 400,
        "batch_size": 16,
        "answer_prior": {
            "overall": proportion(140, 400),
            "per_type": {c: {**proportion(35, 100), "answer": "yes"} for c in ("color", "count")},
        },
        "notes": [],
        "results": results,
    }
    md = accuracy.markdown(report)
    assert "| dense | 95.0 [" in md and "| fastv@64 |" in md
    table = md.split("## At equal kept counts")[1]
    assert "| 192 → 85 |" in table and "| 64 → 28 |" in table
    for label in ("SparseVLM v1 ", "SparseVLM v1.5", "SparseVLM v2.0", "FastV", "random"):
        assert label in table
    fig = accuracy.figure(report)
    (panel,) = fig.panels
    assert [s.name for s in panel.series][:5] == [
        "SparseVLM v1",
        "SparseVLM v1.5",
        "SparseVLM v2.0",
        "FastV",
        "random",
    ]
    assert all(s.yerr and len(s.yerr) == len(s.points) for s in panel.series)
    png = bench.render_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
