"""The bundled demo model: its files, its prompt, its answers, and the accuracy benchmark on it.

The task generator itself is tested in tests/test_shapes_task.py.
"""

from __future__ import annotations

import json

from PIL import Image

import sparsevlm_jax
from sparsevlm_jax import shapes_task as st
from sparsevlm_jax.checkpoint import is_checkpoint, load_config
from sparsevlm_jax.eval import is_correct
from sparsevlm_jax.processing import Processor

# The first FIXED_QUESTIONS questions of the shapes-v2 test split (test images 0-8, in
# test-set order), asked dense and greedy. A model that learnt task v2 (>= 90% dense test
# accuracy, issue 11) answers nearly all of them; the shapes-v1 model bundled before
# (40% on its own task, at the answer prior) fails this test (12 of 32 right). Observed: 30 of
# 32 on the v2 model before its counting fine-tune (89.9% dense test accuracy), 32 of 32 on
# the one bundled now (96.9%, issue 23).
FIXED_QUESTIONS = 32
MIN_CORRECT = 30


def first_test_questions(n: int) -> tuple[list[Image.Image], list[st.Question]]:
    """The first n questions of the test split and their images (one image per question)."""
    images, questions = [], []
    i = 0
    while len(questions) < n:
        ex = st.example("test", i)
        for q in ex.questions:
            images.append(Image.fromarray(ex.image))
            questions.append(q)
        i += 1
    return images[:n], questions[:n]


def test_demo_model_is_bundled() -> None:
    assert is_checkpoint(st.demo_model_path())


def test_demo_model_prompt_layout() -> None:
    path = st.demo_model_path()
    cfg = load_config(path)
    proc = Processor.from_pretrained(path, cfg)
    pre, text = proc.encode("how many circles ?")
    words = proc.tokenizer.convert_ids_to_tokens(pre)
    assert words[0] == "<s>" and words.count("<s>") == 1 and words[-2:] == ["user", ":"]
    assert proc.tokenizer.convert_ids_to_tokens(text)[-2:] == ["assistant", ":"]
    assert 0 not in pre + text
    assert cfg.num_image_tokens == (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    assert cfg.text.num_hidden_layers >= 8


def test_demo_model_answers_fixed_questions_dense() -> None:
    """Not skipped on a weak model: a model that has not learnt task v2 must fail here.
    Exact match as `sparsevlm eval` scores it (`eval.is_correct`)."""
    pipe = sparsevlm_jax.load(st.demo_model_path())
    images, questions = first_test_questions(FIXED_QUESTIONS)
    out = pipe.generate(
        images, [q.text for q in questions], max_new_tokens=4, batch_size=FIXED_QUESTIONS
    )
    wrong = [
        f"{q.text!r} -> {r.text!r} (gold {q.answer!r})"
        for q, r in zip(questions, out, strict=True)
        if not is_correct(r.text, q.answer)
    ]
    correct = FIXED_QUESTIONS - len(wrong)
    assert correct >= MIN_CORRECT, (
        f"the bundled model answers {correct} of the first {FIXED_QUESTIONS} {st.TASK_NAME} "
        f"test questions correctly, needs {MIN_CORRECT}: it has not learnt task "
        f"{st.TASK_VERSION} (issue 11). Wrong: " + "; ".join(wrong)
    )


def test_accuracy_benchmark_writes_table_plot_and_json(tmp_path) -> None:
    from sparsevlm_jax.bench import accuracy
    from sparsevlm_jax.bench.accuracy.methods import Preset

    no_recycling = Preset("v1_5", 64, (("recycling", False),))
    presets = [("v1_5", 64), no_recycling]
    report = accuracy.run(st.demo_model_path(), 1, tmp_path, "test", presets=presets, show=False)
    dense, v15, ablated = report["results"]
    assert ablated["method"] == "v1_5@64-recycling" and ablated["switched"] == {"recycling": False}
    assert (dense["method"], v15["method"]) == ("dense", "v1_5@64")
    assert v15["equivalent_tokens"] < dense["equivalent_tokens"] == 256
    assert 0 < v15["flops_reduction"] < 1 and dense["flops_reduction"] == 0
    n = report["num_questions"]
    assert n == len(st.example("test", 0).questions) and report["task"] == "shapes-v2"
    for r in (dense, v15):
        assert r["n"] == n and len(r["correct_bits"]) == n
        assert r["ci"][0] <= r["accuracy"] <= r["ci"][1]
        assert sum(t["n"] for t in r["per_type"].values()) == n
    assert dense["retention"] == 1.0 or dense["accuracy"] == 0
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    assert saved["num_questions"] == n
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "accuracy.md").read_text()
    assert "| v1_5@64 |" in md and "At equal kept counts" in md
    assert "v1_5@64-recycling" not in md  # the ablation's variants have their own table
    ablation = (tmp_path / "ablation.md").read_text()
    assert "| `v1_5@64-recycling` |" in ablation and "v1.5 without recycling" in ablation
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / accuracy.PROGRESS_FILE).exists()  # removed once outputs exist


def test_demo_shows_sparsevlm_plus_and_no_torch_advice(tmp_path) -> None:
    """`sparsevlm demo` as a torch-less install runs it (torch made unimportable): every
    column headed by what it is, SparseVLM+ among them, and no "PyTorch was not found"."""
    import os
    import subprocess

    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["torch"] = None\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run(
        ["sparsevlm", "demo", "--num-images", "1"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "PyTorch was not found" not in out.stdout + out.stderr
    lines = out.stdout.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("question"))
    names, versions, kept = (lines[top + k].split() for k in range(3))
    assert names[2:] == ["dense", "SparseVLM+", "SparseVLM", "SparseVLM", "FastV", "random"]
    assert " ".join(versions) == "v2.0 @64 v1.5 @64 v1 @64 @64 @64"
    assert kept[:2] == ["256", "tokens"] and len(kept) == 12
    assert any(line.startswith("v2_0@64") for line in lines)  # the summary table
