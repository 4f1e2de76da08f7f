"""The GPU benchmark driver's CPU dry run (`benchmarks/gpu_run.py --dry-run`) and its merge."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parts_cover_the_issue_methods():
    mod = load_script()
    labels = {x for part in mod.PARTS.values() for x in part}
    for method in ("v1", "v1_5", "v2_0", "fastv"):
        assert {f"{method}-{b}" for b in (192, 128, 64)} <= labels
    argv = mod.part_argv(mod.main.__globals__["argparse"].Namespace(
        part=1, dry_run=False, methods="", deadline=480.0, out=None
    ))  # fmt: skip
    assert argv[argv.index("--shape") + 1] == "llava-1.5-7b"
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert argv[argv.index("--init") + 1] == "device"
    assert argv[argv.index("--count") + 1] == "none"


def test_dry_run_then_merge(tmp_path):
    mod = load_script()
    assert mod.main(["--dry-run", "--part", "1", "--methods", "v1-64", "--out", str(tmp_path)]) == 0
    part = tmp_path / "mini-cpu-part1.json"
    report = json.loads(part.read_text())
    assert report["kind"] == "full" and report["part"] == 1
    assert [e["label"] for e in report["results"]] == ["dense", "v1-64"]
    probe = report["attention_probe"]
    assert {"xla_full_mask", "xla_blocks"} <= set(probe["ms"])
    assert probe["max_abs_diff_vs_xla_full_mask"]["xla_blocks"] < 1e-4
    dense, v1 = report["results"]
    assert v1["sparse_config"]["capacity"] == "bucketed"
    assert v1["capacity"]["policy"] == "bucketed"
    assert v1["counted_config"]["capacity"] == "static"
    assert v1["flops"]["xla_decoder"] is None  # counted at the merge
    for e in (dense, v1):
        assert e["jax"]["prefill"]["runs"] == 1 and e["jax"]["decode_step"]["runs"] == 1
        assert e["torch"]["torch"]["prefill"]["runs"] == 1
    assert report["workload"]["prefix_bucket"] == report["workload"]["prefix_tokens"]

    args = ["--merge", str(part), "--out", str(tmp_path), "--count", "lowered"]
    assert mod.main(args) == 0
    merged = json.loads((tmp_path / "mini-cpu-dry-run.json").read_text())
    assert merged["parts"][0]["labels"] == ["dense", "v1-64"]
    for e in merged["results"]:
        assert e["flops"]["xla_decoder"] > 0
    assert 0 < merged["results"][1]["flops_ratio"]["xla_total"] < 1
    assert "latency_vs_xla_total_flops" in merged["results"][1]["ratios"]
    assert any("sparse/dense prefill latency" in t["name"] for t in merged["targets"])
    md = (tmp_path / "mini-cpu-dry-run.md").read_text()
    assert "Part 1" in md and "Attention probe" in md and "| v1-64 |" in md
