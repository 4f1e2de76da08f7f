"""The `sparsevlm` command, driven in-process through `sparsevlm_jax.cli.main` (fast) and in a
few real subprocesses (exit codes, kill + resume).

One tiny model per module: `tiny_llava()` (56 px images -> 16 visual tokens, 4 decoder layers)
saved in the llava-hf layout, then converted with `sparsevlm convert`. Every sparse run uses
the same config and `--max-new-tokens` so the compiled programs are shared across tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparsevlm_jax import cli
from sparsevlm_jax.cli import info as cli_info
from sparsevlm_jax.cli import main
from sparsevlm_jax.cli import models as cli_models
from sparsevlm_jax.cli import sparsity as cli_sparsity
from sparsevlm_jax.cli.report import describe_sparse
from sparsevlm_jax.errors import InputError

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
PROMPT = "What is in the image?"
# `exact` keeps these mechanics tests independent of the default policy (tested on its own).
SPARSE = ["--sparse", "v1", "--layers", "1,2", "--scale", "1", "--bias", "0", "--capacity", "exact"]
GEN = ["--max-new-tokens", "4"]
NUM_VISUAL = 16


# ----------------------------------------------------------------------------------------------
# Fixtures


def _write_images(d: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(rgb[:, :, 0]).save(d / "gray.png")
    rgba = np.concatenate([rgb, np.full((48, 64, 1), 128, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16)).save(d / "png16.png")
    (d / "notimage.png").write_text("this is not an image\n")
    Image.fromarray(rgb).save(d / "full.jpg", quality=90)
    data = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """A persistent compilation cache for this module, so the subprocess runs reuse what the
    in-process tests compiled (the environment of `subprocess_env` points them at it)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    d = tmp_path_factory.mktemp("xla-cache")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {n: getattr(jax.config, n) for n in names}
    jax.config.update(names[0], str(d))
    jax.config.update(names[1], 0.0)
    cc.reset_cache()
    yield d
    for n, v in saved.items():
        jax.config.update(n, v)
    cc.reset_cache()


@pytest.fixture(scope="module")
def work(tmp_path_factory, xla_cache) -> Path:
    """A folder with `ckpt/` (the converted tiny model), `hf/` (its source) and images."""
    from tiny_models import save_tiny_llava, tiny_llava

    d = tmp_path_factory.mktemp("cli")
    save_tiny_llava(tiny_llava(), d / "hf")
    assert main(["convert", str(d / "hf"), str(d / "ckpt"), "--dtype", "float32", "--quiet"]) == 0
    _write_images(d)
    assert Image.open(d / "png16.png").mode.startswith("I;16")
    return d


def subprocess_env(xla_cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(xla_cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }


def run(capsys, *argv: str | Path) -> tuple[int, str, str]:
    """main(argv) -> (exit status, stdout, stderr); argparse's SystemExit becomes a status."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def gen_args(work: Path, *extra: str | Path, image: str = "rgb.png") -> list[str | Path]:
    return ["generate", "--model", work / "ckpt", "--image", work / image, "--prompt", PROMPT,
            *GEN, *extra]  # fmt: skip


def assert_input_error(rc: int, out: str, err: str, *needles: str) -> None:
    """Exit 2, nothing on stdout, ONE stderr line `sparsevlm: error: ...` naming the problem."""
    assert rc == 2, (rc, out, err)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sparsevlm: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def files_in(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


# ----------------------------------------------------------------------------------------------
# generate


def test_generate_prints_the_answer(work, capsys):
    rc, out, err = run(capsys, *gen_args(work, *SPARSE))
    assert rc == 0, err
    assert out.endswith("\n") and "sparsevlm: error" not in err


def test_generate_stats_block(work, capsys):
    rc, out, _ = run(capsys, *gen_args(work, *SPARSE, "--stats"))
    assert rc == 0
    assert "layer   rank  budget  kept  recycled  overflow" in out
    rows = [line.split() for line in out.splitlines() if line[:5].strip() in ("1", "2")]
    assert [r[0] for r in rows] == ["1", "2"]
    for label in ("equivalent visual tokens", "prefill FLOPs", "% of dense", "KV cache", "decode"):
        assert label in out


def test_generate_json_schema(work, capsys):
    rc, out, _ = run(capsys, *gen_args(work, *SPARSE, "--json"))
    assert rc == 0
    assert len(out.strip().splitlines()) == 1
    obj = json.loads(out)
    assert set(obj) >= {"text", "token_ids", "stats"}
    assert isinstance(obj["text"], str) and all(isinstance(t, int) for t in obj["token_ids"])
    stats = obj["stats"]
    keys = ("equivalent_tokens", "flops", "dense_flops", "kv_cache_bytes", "dense_kv_cache_bytes",
            "visual_counts", "prefill_seconds", "decode_seconds")  # fmt: skip
    assert set(keys) <= set(stats)
    assert len(stats["visual_counts"]) == 4 and stats["flops"] < stats["dense_flops"]
    assert [x["layer"] for x in stats["layers"]] == [1, 2]
    size = NUM_VISUAL  # each layer's kept indices index the previous layer's kept + recycled
    for x in stats["layers"]:
        assert set(x) >= {"layer", "rank", "budget", "kept", "recycled", "overflow"}
        assert x["kept"] == sorted(set(x["kept"])) and all(0 <= k < size for k in x["kept"])
        assert len(x["kept"]) == min(x["budget"], size)
        size = len(x["kept"]) + x["recycled"]
    assert obj["sparse"]["layers"] == [1, 2]


def test_generate_dense_stats(work, capsys):
    rc, out, _ = run(capsys, *gen_args(work, "--stats"))
    assert rc == 0
    assert "dense (no pruning)" in out and "prefill" in out


@pytest.mark.parametrize("image", ["gray.png", "rgba.png", "png16.png"])
def test_generate_accepts_other_image_modes(work, capsys, image):
    rc, _, err = run(capsys, *gen_args(work, *SPARSE, image=image))
    assert rc == 0, err


# ----------------------------------------------------------------------------------------------
# Input errors: exit 2, one line, nothing written


def _bad_checkpoint(work: Path, name: str) -> Path:
    """A copy of the checkpoint whose params lack `text/norm/scale`."""
    from sparsevlm_jax import checkpoint
    from sparsevlm_jax.params import flatten, unflatten

    bad = work / name
    if bad.exists():
        return bad
    params, cfg = checkpoint.load(work / "ckpt")
    flat = {k: np.asarray(v) for k, v in flatten(params).items() if k != "text/norm/scale"}
    checkpoint.save(work / f"{name}-tmp", unflatten(flat), cfg)
    shutil.copytree(work / "ckpt", bad, ignore=shutil.ignore_patterns("params"))
    shutil.move(work / f"{name}-tmp" / "params", bad / "params")
    shutil.rmtree(work / f"{name}-tmp")
    return bad


def test_missing_image_file(work, capsys):
    assert_input_error(*run(capsys, *gen_args(work, image="nope.png")), "nope.png", "no such")


def test_not_an_image(work, capsys):
    assert_input_error(*run(capsys, *gen_args(work, image="notimage.png")), "not an image")


def test_truncated_jpeg(work, capsys):
    assert_input_error(*run(capsys, *gen_args(work, image="truncated.jpg")), "truncated")


def test_empty_prompt(work, capsys):
    argv = gen_args(work)
    argv[argv.index(PROMPT)] = "   "
    assert_input_error(*run(capsys, *argv), "empty prompt")


def test_prompt_longer_than_largest_bucket(work, capsys):
    argv = gen_args(work)
    argv[argv.index(PROMPT)] = "describe the picture " * 600
    assert_input_error(*run(capsys, *argv), "does not fit the largest bucket")


def test_directory_that_is_not_a_checkpoint(work, capsys):
    (work / "junk").mkdir(exist_ok=True)
    (work / "junk" / "notes.txt").write_text("hello")
    argv = gen_args(work)
    argv[argv.index(work / "ckpt")] = work / "junk"
    assert_input_error(*run(capsys, *argv), "junk", "not a checkpoint")


def test_checkpoint_with_a_missing_tensor(work, capsys):
    bad = _bad_checkpoint(work, "ckpt-missing")
    argv = gen_args(work)
    argv[argv.index(work / "ckpt")] = bad
    assert_input_error(*run(capsys, *argv), "1 missing (text/norm/scale)")


def test_checkpoint_with_a_deleted_orbax_file(work, capsys):
    bad = work / "ckpt-nometa"
    if not bad.exists():
        shutil.copytree(work / "ckpt", bad)
        (bad / "params" / "_METADATA").unlink()
    argv = gen_args(work)
    argv[argv.index(work / "ckpt")] = bad
    assert_input_error(*run(capsys, *argv), "ckpt-nometa")


def test_unknown_sparse_method(work, capsys):
    assert_input_error(*run(capsys, *gen_args(work, "--sparse", "v3")), "unknown sparse method")


@pytest.mark.parametrize(
    "extra, needle",
    [
        # Named budgets are visual-token counts of 576-token LLaVA: 64 >= 16 tokens is an error.
        (["--sparse", "v1", "--layers", "1,2", "--budget", "64"], "not below the model's 16"),
        (["--sparse", "v1", "--layers", "1,2", "--budget", "100"], "no v1 budget named 100"),
        ([*SPARSE, "--capacity", "1000,1000"], "capacity 1000 is larger than"),
        ([*SPARSE, "--capacity", "8"], "one capacity per pruning layer"),
        ([*SPARSE, "--capacity", "static"], "has no calibrated v1 capacities"),
        (["--sparse", "v1", "--scale", "1"], "too shallow"),
        (["--sparse", "dense", "--budget", "64"], "need a sparse method"),
        (["--budget", "64", "--scale", "1", "--layers", "1,2"], "either --budget or --scale"),
        (["--sparse", "fastv", "--scale", "1"], "v1's budget rule"),
        (["--sparse", "v2_0", "--budget", "100", "--layers", "0,1,2"], "no v2_0 budget named"),
        ([*SPARSE, "--ladder-steps", "2"], "policy is exact (pass --capacity bucketed)"),
        (["--sparse", "dense", "--ladder-steps", "2"], "need a sparse method"),
        (["--layers", "1,2", "--scale", "1", "--ladder-steps", "0"], "must be in 1..64"),
    ],
)
def test_bad_sparsity_options(work, capsys, extra, needle):
    assert_input_error(*run(capsys, *gen_args(work, *extra)), needle)


def test_large_scale_is_not_an_error(work):
    """An explicit rule's k is clipped to V - 1 by the method (SPEC), so it is accepted."""
    sparse = parse_sparse(work, "--layers", "1,2", "--scale", "100", "--bias", "100")
    assert (sparse.method, sparse.scale, sparse.bias, sparse.layers) == ("v1", 100, 100, (1, 2))


def parse_sparse(work: Path, *extra: str):
    from sparsevlm_jax.checkpoint import load_config

    args = cli.build_parser().parse_args([str(a) for a in gen_args(work, *extra)])
    return cli.sparse_from_args(args, load_config(work / "ckpt"), work / "ckpt")


def test_named_presets_of_the_other_methods(work):
    """Schedules and FastV's ratio are rescaled to the model's 16 visual tokens."""
    fastv = parse_sparse(work, "--sparse", "fastv", "--budget", "64", "--layers", "1")
    assert (fastv.method, fastv.layers, fastv.budget_name) == ("fastv", (1,), 64)
    v15 = parse_sparse(work, "--sparse", "v1_5", "--budget", "96", "--layers", "0,1,2")
    assert v15.layers == (0, 1, 2) and all(1 <= k < NUM_VISUAL for k in v15.schedule)


def test_default_model_is_the_bundled_one():
    from sparsevlm_jax.shapes_task import demo_model_path

    assert cli.default_model_path() == str(demo_model_path())


def test_model_is_required_without_a_bundled_one(work, capsys, monkeypatch):
    monkeypatch.setattr(cli_models, "default_model_path", lambda: None)
    rc, out, err = run(capsys, "generate", "--image", work / "rgb.png", "--prompt", PROMPT)
    assert_input_error(rc, out, err, "a model is required", "--model")


def test_usage_errors_exit_2(capsys):
    rc, _, err = run(capsys, "generate", "--model", "x")
    assert rc == 2 and "required" in err


def test_unexpected_error_exits_1_with_traceback(work, capsys, monkeypatch):
    def boom(args):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(cli_info, "cmd_info", boom)
    rc, _, err = run(capsys, "info", work / "ckpt")
    assert rc == 1 and "Traceback" in err and "kaboom" in err


@pytest.mark.parametrize(
    "command", ["convert", "generate", "eval", "calibrate", "visualize", "info", "demo"]
)
def test_help_has_examples(capsys, command):
    rc, out, _ = run(capsys, command, "--help")
    assert rc == 0 and "examples:" in out and "sparsevlm " + command in out


def test_convert_bad_source(work, capsys):
    (work / "empty-src").mkdir(exist_ok=True)
    rc, out, err = run(capsys, "convert", work / "empty-src", work / "never", "--quiet")
    assert_input_error(rc, out, err, "empty-src")
    assert not (work / "never").exists()


# ----------------------------------------------------------------------------------------------
# info


def test_info(work, capsys):
    rc, out, _ = run(capsys, "info", work / "ckpt")
    assert rc == 0
    for needle in ("sparsevlm-jax checkpoint", "4 layers", "16 visual tokens", "image token index",
                   "vocab 512", "parameters:", "float32"):  # fmt: skip
        assert needle in out, needle
    rc, out, _ = run(capsys, "info", work / "hf")
    assert rc == 0 and "not converted" in out and "16 visual tokens" in out


# ----------------------------------------------------------------------------------------------
# eval


def write_questions(path: Path, n: int, gold: dict | None = None, image: str = "rgb.png") -> None:
    with open(path, "w") as f:
        for i in range(n):
            q = {"question_id": f"q{i}", "image": image, "text": PROMPT, "category": f"c{i % 2}"}
            if gold and f"q{i}" in gold:
                q["answer"] = gold[f"q{i}"]
            f.write(json.dumps(q) + "\n")


def eval_args(work: Path, questions: Path, answers: Path, *extra: str) -> list[str | Path]:
    return ["eval", "--model", work / "ckpt", "--questions", questions, "--image-folder", work,
            "--answers", answers, "--quiet", *SPARSE, *GEN, *extra]  # fmt: skip


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_writes_answers_and_resumes(work, capsys):
    questions, answers = work / "q4.jsonl", work / "a4.jsonl"
    write_questions(questions, 4)
    rc, out, err = run(capsys, *eval_args(work, questions, answers, "--batch-size", "2",
                                          "--limit", "2", "--model-id", "tiny"))  # fmt: skip
    assert rc == 0, err
    assert "2 answers written" in out and "exact match" not in out
    first = read_lines(answers)
    assert [a["question_id"] for a in first] == ["q0", "q1"]
    for a in first:
        assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert a["prompt"] == PROMPT and a["model_id"] == "tiny"
        assert len(a["answer_id"]) == 32 and int(a["answer_id"], 16) >= 0
        assert [x["layer"] for x in a["metadata"]["layers"]] == [1, 2]

    # A killed writer's half line is cut off; the rest is answered exactly once.
    with open(answers, "a") as f:
        f.write('{"question_id": "q2", "prompt": "Wh')
    rc, out, _ = run(capsys, *eval_args(work, questions, answers, "--batch-size", "2"))
    assert rc == 0 and "2 answers written, 2 already there" in out
    ids = [a["question_id"] for a in read_lines(answers)]
    assert ids == ["q0", "q1", "q2", "q3"]

    # Gold answers: exact match after lower-casing and stripping a trailing '.'.
    text = {a["question_id"]: a["text"] for a in read_lines(answers)}
    gold = {"q0": text["q0"].upper() + ".", "q1": "surely wrong", "q2": text["q2"]}
    write_questions(questions, 4, gold)
    rc, out, _ = run(capsys, *eval_args(work, questions, answers, "--batch-size", "2"))
    assert rc == 0 and "0 answers written, 4 already there" in out
    expected = 2 if text["q1"].lower() != "surely wrong" else 3
    assert f"exact match: {expected}/3" in out


def test_eval_malformed_line(work, capsys):
    questions, answers = work / "bad.jsonl", work / "bad-answers.jsonl"
    write_questions(questions, 3)
    lines = questions.read_text().splitlines()
    lines[2] = lines[2][:-5]
    questions.write_text("\n".join(lines) + "\n")
    assert_input_error(*run(capsys, *eval_args(work, questions, answers)), "line 3", "malformed")
    assert not answers.exists()


def test_eval_missing_field(work, capsys):
    questions, answers = work / "nofield.jsonl", work / "nofield-answers.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "text": PROMPT}) + "\n")
    assert_input_error(*run(capsys, *eval_args(work, questions, answers)), "line 1", "'image'")
    assert not answers.exists()


def test_eval_duplicate_question_ids(work, capsys):
    questions, answers = work / "dup.jsonl", work / "dup-answers.jsonl"
    write_questions(questions, 3)
    questions.write_text(questions.read_text() + questions.read_text().splitlines()[1] + "\n")
    assert_input_error(*run(capsys, *eval_args(work, questions, answers)), "duplicate", "'q1'")
    assert not answers.exists()


def test_eval_missing_image(work, capsys):
    questions, answers = work / "noimg.jsonl", work / "noimg-answers.jsonl"
    write_questions(questions, 2, image="missing.jpg")
    assert_input_error(*run(capsys, *eval_args(work, questions, answers)), "missing.jpg", "'q0'")
    assert not answers.exists()


def test_eval_unwritable_answers(work, capsys):
    questions = work / "q1.jsonl"
    write_questions(questions, 1)
    (work / "a-file").write_text("")
    for answers in (work / "a-file" / "out.jsonl", work / "no-such-dir" / "out.jsonl"):
        assert_input_error(*run(capsys, *eval_args(work, questions, answers)), str(answers))
    assert not (work / "no-such-dir").exists()


def test_eval_killed_midway_then_resumed(work, capsys, xla_cache):
    """SIGKILL a real `eval` run once answers are on disk; the rerun completes the file."""
    questions, answers = work / "q50.jsonl", work / "a50.jsonl"
    write_questions(questions, 50)
    argv = [str(a) for a in eval_args(work, questions, answers, "--batch-size", "1")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsevlm_jax.cli", *argv],
        cwd=REPO,
        env=subprocess_env(xla_cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if answers.exists() and answers.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.005)
        assert proc.poll() is None, proc.stderr.read().decode()  # still running: kill it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    before = answers.read_bytes()
    assert 3 <= before.count(b"\n") < 50

    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    ids = [a["question_id"] for a in read_lines(answers)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(50)) and len(set(ids)) == 50
    assert answers.read_bytes().startswith(before.rsplit(b"\n", 1)[0])


def test_subprocess_input_error_exit_code(work):
    proc = subprocess.run(
        [sys.executable, "-m", "sparsevlm_jax.cli", "info", str(work / "junk-does-not-exist")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"sparsevlm: error: {work / 'junk-does-not-exist'}: no such model directory"
    ]


# ----------------------------------------------------------------------------------------------
# Capacity policy: defaults, calibrated capacities, `sparsevlm calibrate`


def sparse_for(model_dir: Path, cfg, *extra: str):
    """(SparseConfig, notes) that generate's options ask for on a model directory."""
    args = cli.build_parser().parse_args(
        ["generate", "--model", str(model_dir), "--image", "x.png", "--prompt", PROMPT, *extra]
    )
    notes: list[str] = []
    return cli.sparse_from_args(args, cfg, model_dir, notes.append), notes


def mini_cfg():
    """576 visual tokens and 32 layers: v1's named budgets and default layers 2,6,15,19."""
    from sparsevlm_jax.presets import mini

    return mini()


def write_calibration(d: Path, layers=(2, 6, 15, 19), budget: int = 64) -> None:
    from sparsevlm_jax.calibrated import write_sparse_defaults
    from sparsevlm_jax.sparse.config import SparseConfig

    sparse = SparseConfig.v1(budget, 32, layers).replace(
        capacity="static", capacities=(70, 50, 40, 30), recycled_capacities=(9, 2, 1, 1)
    )
    write_sparse_defaults(d, {budget: sparse}, 100.0, "test")


def test_v1_defaults_to_bucketed_without_calibration(tmp_path, work):
    for extra in (["--sparse", "v1", "--budget", "64"], ["--scale", "2"]):
        sparse, notes = sparse_for(tmp_path, mini_cfg(), *extra)
        assert (sparse.capacity, sparse.capacities, notes) == ("bucketed", (), []), extra
    assert parse_sparse(work, "--layers", "1,2", "--scale", "1").capacity == "bucketed"


def test_ladder_steps_size_the_bucketed_policy(tmp_path, work):
    """--ladder-steps reaches the config and the summary names it (decisions: test_bucketed)."""
    sparse, _ = sparse_for(tmp_path, mini_cfg(), "--budget", "64", "--ladder-steps", "2")
    assert (sparse.capacity, sparse.ladder_steps) == ("bucketed", 2)
    assert "capacity bucketed (2 steps per octave)" in describe_sparse(sparse)
    write_calibration(tmp_path)  # the default becomes static: no buckets to size
    with pytest.raises(InputError, match="policy is static"):
        sparse_for(tmp_path, mini_cfg(), "--budget", "64", "--ladder-steps", "2")


def test_fixed_schedules_keep_their_static_capacities(tmp_path):
    from sparsevlm_jax.sparse.config import named_sparse_config

    write_calibration(tmp_path)  # only v1's capacities are calibrated
    for method in ("v1_5", "v2_0", "random", "fastv"):
        sparse, _ = sparse_for(tmp_path, mini_cfg(), "--sparse", method, "--budget", "64")
        preset = named_sparse_config(method, 64, 32, 576)
        assert sparse.capacity == "static" and sparse.capacities == preset.capacities, method
        assert sparse_for(tmp_path, mini_cfg(), "--sparse", method, "--budget", "64",
                          "--capacity", "static")[0] == sparse  # fmt: skip


def test_v1_takes_calibrated_capacities(tmp_path):
    write_calibration(tmp_path)
    cfg = mini_cfg()
    for extra in ([], ["--capacity", "static"], ["--layers", "2,6,15,19"]):
        sparse, notes = sparse_for(tmp_path, cfg, "--sparse", "v1", "--budget", "64", *extra)
        assert sparse.capacity == "static" and notes == [], extra
        assert sparse.capacities == (70, 50, 40, 30)
        assert sparse.recycled_capacities == (9, 2, 1, 1)
    assert sparse_for(tmp_path, cfg, "--sparse", "v1", "--budget", "192")[0].capacity == "bucketed"
    for policy in ("exact", "bucketed"):
        sparse, _ = sparse_for(tmp_path, cfg, "--budget", "64", "--capacity", policy)
        assert (sparse.capacity, sparse.capacities) == (policy, ())


def test_calibration_for_other_layers_is_not_applied(tmp_path):
    """Default: bucketed plus a note; asked for explicitly: an error; matching layers: used."""
    from sparsevlm_jax.errors import InputError

    write_calibration(tmp_path, layers=(1, 3, 5, 7))
    cfg = mini_cfg()
    sparse, notes = sparse_for(tmp_path, cfg, "--sparse", "v1", "--budget", "64")
    assert sparse.capacity == "bucketed" and len(notes) == 1
    assert "calibrated for pruning layers 1,3,5,7, not 2,6,15,19" in notes[0]
    assert "sparse_defaults.json" in notes[0] and "bucketed" in notes[0]
    with pytest.raises(InputError, match="calibrated for pruning layers 1,3,5,7"):
        sparse_for(tmp_path, cfg, "--budget", "64", "--capacity", "static")
    sparse, notes = sparse_for(tmp_path, cfg, "--budget", "64", "--layers", "1,3,5,7")
    assert sparse.capacity == "static" and notes == []


def test_calibration_mismatch_through_the_command(tmp_path, capsys):
    """`--capacity static` with calibrated capacities for other layers: exit 2, one line."""
    (tmp_path / "params").mkdir()
    (tmp_path / "config.json").write_text(mini_cfg().to_json())
    write_calibration(tmp_path, layers=(1, 3, 5, 7))
    rc, out, err = run(capsys, "generate", "--model", tmp_path, "--image", "x.png", "--prompt",
                       PROMPT, "--budget", "64", "--capacity", "static")  # fmt: skip
    assert_input_error(rc, out, err, "sparse_defaults.json", "pruning layers 1,3,5,7")


def test_malformed_calibration_file(tmp_path):
    from sparsevlm_jax.errors import InputError

    (tmp_path / "sparse_defaults.json").write_text('{"64": {"layers": [2, 6]')
    with pytest.raises(InputError, match="sparse_defaults.json: unreadable"):
        sparse_for(tmp_path, mini_cfg(), "--budget", "64")
    (tmp_path / "sparse_defaults.json").write_text('{"64": {"layers": [2], "capacities": [0]}}')
    with pytest.raises(InputError, match="'capacities' must be a list of integers >= 1"):
        sparse_for(tmp_path, mini_cfg(), "--budget", "64")


def test_stats_name_the_capacity_policy():
    from sparsevlm_jax.cli.report import format_stats
    from sparsevlm_jax.eval import stats_to_json
    from sparsevlm_jax.sparse.config import SparseConfig

    sparse = SparseConfig(method="v1", layers=(1, 2), scale=1.0, capacity="bucketed")
    layers = [
        {"layer": 1, "rank": 2, "budget": 2, "kept": [0, 3], "recycled": 1, "overflow": 0},
        {"layer": 2, "rank": 1, "budget": 1, "kept": [0], "recycled": 1, "overflow": 0},
    ]
    stats = {"layers": layers, "visual_counts": [16, 3, 2, 2], "equivalent_tokens": 5.0,
             "flops": 1.0, "dense_flops": 2.0, "kv_cache_bytes": 1, "dense_kv_cache_bytes": 2,
             "prefill_seconds": 0.1, "decode_seconds": 0.1}  # fmt: skip
    assert stats_to_json(stats, sparse, NUM_VISUAL)["capacity"]["policy"] == "bucketed"
    ran = {"policy": "bucketed", "capacities": [4, 2], "recycled_capacities": [2, 1]}
    text = format_stats({**stats, "capacity": ran}, sparse, mini_cfg(), 4)
    assert (
        "capacity:      bucketed, capacities 4,2 (per pruning layer), recycled capacities 2,1"
        in text
    )


def test_generate_default_policy_is_named_in_the_statistics(work, capsys):
    sparse = ["--sparse", "v1", "--layers", "1,2", "--scale", "1", "--bias", "0"]
    rc, out, err = run(capsys, *gen_args(work, *sparse, "--json"))
    assert rc == 0, err
    obj = json.loads(out)
    assert obj["sparse"]["capacity"] == "bucketed"
    assert obj["stats"]["capacity"]["policy"] == "bucketed"


@pytest.fixture(scope="module")
def demo_copy(tmp_path_factory) -> Path:
    """A copy of the bundled model (256 visual tokens, 8 layers) without its calibration."""
    from sparsevlm_jax.shapes_task import demo_model_path

    d = tmp_path_factory.mktemp("calibrate") / "model"
    shutil.copytree(demo_model_path(), d, ignore=shutil.ignore_patterns("sparse_defaults.json"))
    return d


def test_calibrate_writes_sparse_defaults(demo_copy, capsys, tmp_path):
    from sparsevlm_jax.checkpoint import load_config
    from sparsevlm_jax.shapes_task import write_test

    questions = write_test(tmp_path / "q", num_images=2, size=224)
    rc, out, err = run(capsys, "calibrate", demo_copy, "--questions", questions, "--image-folder",
                       tmp_path / "q" / "images", "--budgets", "64", "--examples", "3",
                       "--batch-size", "2", "--quiet")  # fmt: skip
    assert rc == 0, err
    d = json.loads((demo_copy / "sparse_defaults.json").read_text())
    assert d["method"] == "v1" and d["percentile"] == 100.0 and "3 questions" in d["calibration"]
    assert set(d) == {"method", "percentile", "calibration", "64"}
    entry = d["64"]
    cfg = load_config(demo_copy)
    layers = cli_sparsity.default_layers(cfg.text.num_hidden_layers)
    assert tuple(entry["layers"]) == layers
    assert all(1 <= c <= cfg.num_image_tokens for c in entry["capacities"])
    assert len(entry["capacities"]) == len(entry["recycled_capacities"]) == len(layers)
    assert not [p.name for p in demo_copy.iterdir() if p.name.startswith(".")]  # no temp file
    caps = ",".join(map(str, entry["capacities"]))
    assert f"v1@64: layers {','.join(map(str, layers))}, capacities {caps}" in out
    assert f"wrote {demo_copy / 'sparse_defaults.json'}" in out
    sparse, notes = sparse_for(demo_copy, cfg, "--sparse", "v1", "--budget", "64")
    assert (sparse.capacity, list(sparse.capacities), notes) == ("static", entry["capacities"], [])


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--budgets", "64", "--layers", "1,2"], "not below the model's 16"),
        (["--budgets", "100", "--layers", "1,2"], "no v1 budget named 100"),
        (["--examples", "0"], "--examples must be >= 1"),
        (["--percentile", "101"], "--percentile must be in [0, 100]"),
    ],
)
def test_calibrate_bad_input(work, capsys, extra, needle):
    questions = work / "qcal.jsonl"
    write_questions(questions, 2)
    rc, out, err = run(capsys, "calibrate", work / "ckpt", "--questions", questions,
                       "--image-folder", work, *extra)  # fmt: skip
    assert_input_error(rc, out, err, needle)
    assert not (work / "ckpt" / "sparse_defaults.json").exists()


# ----------------------------------------------------------------------------------------------
# visualize, demo


def test_visualize_writes_png(work, capsys):
    out_png = work / "pics" / "kept.png"
    out_png.parent.mkdir(exist_ok=True)
    rc, out, err = run(capsys, "visualize", "--model", work / "ckpt", "--image", work / "rgb.png",
                       "--prompt", PROMPT, "--out", out_png, *SPARSE, *GEN)  # fmt: skip
    assert rc == 0, err
    assert "layer 1:" in out and "layer 2:" in out
    with Image.open(out_png) as img:
        assert img.format == "PNG" and img.width > 2 * img.height  # 3 panels side by side
    assert files_in(out_png.parent) == {"kept.png"}  # no temporary file left


@pytest.mark.parametrize(
    "extra, out_name, needle",
    [
        ([], "pics2/kept.png", "visualize needs a sparse method"),
        (SPARSE, "no-dir/kept.png", "no directory"),
        (SPARSE, "pics2/kept.xyz", "picture format"),
    ],
)
def test_visualize_errors(work, capsys, extra, out_name, needle):
    (work / "pics2").mkdir(exist_ok=True)
    rc, out, err = run(capsys, "visualize", "--model", work / "ckpt", "--image", work / "rgb.png",
                       "--prompt", PROMPT, "--out", work / out_name, *extra, *GEN)  # fmt: skip
    assert_input_error(rc, out, err, needle)
    assert files_in(work / "pics2") == set() and not (work / "no-dir").exists()


def test_token_origins_compose_layers():
    from sparsevlm_jax.visualize import token_origins

    layers = [{"kept": [1, 4, 6], "recycled": 2}, {"kept": [0, 2, 3], "recycled": 1}]
    assert token_origins(layers, 8, 8) == [[1, 4, 6, None, None], [1, 6, None, None]]
    assert token_origins(layers[:1], 9, 8)[0] == [0, 3, 5, None, None]  # CLS token first


def test_demo_runs(work):
    """A real `sparsevlm demo` process (exit 0); it compiles with XLA's fast setting."""
    proc = subprocess.run(
        [sys.executable, "-m", "sparsevlm_jax.cli", "demo", "--random", "--budgets", "64",
         "--max-new-tokens", "2", "--out", str(work / "demo")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "RANDOM" in out and "meaningless" in out and "optimization_level=0" in out
    table = [line for line in out.splitlines() if line.startswith(("dense ", "v1 64"))]
    assert len(table) == 2 and "576.0" in table[0] and "100.0%" in table[0]
    assert files_in(work / "demo") == {"demo_image.png", "demo_kept_v1_64.png"}


def test_answer_normalisation():
    from sparsevlm_jax.eval import is_correct

    assert is_correct("Yes.", "yes") and is_correct(" Two ", ["one", "two"])
    assert not is_correct("yes", "no")
