"""The shapes task generator and the bundled demo model trained on it."""

from __future__ import annotations

import json

import numpy as np
import pytest

import sparsevlm_jax
from sparsevlm_jax import shapes_task as st
from sparsevlm_jax.checkpoint import is_checkpoint, load_config
from sparsevlm_jax.processing import Processor

# (test-split image index, question index) pairs the shipped model answers correctly, two of
# every question type; gold answers come from the generator. The shipped model is weak (40%
# dense test accuracy, see benchmarks/train_logs/README.md): its yes/no and counting answers
# here are its constant answers ("yes", "one"), so these pin behaviour, not competence.
KNOWN_GOOD: list[tuple[int, int]] = [
    (1, 0),
    (2, 0),
    (15, 1),
    (131, 1),
    (0, 1),
    (2, 2),
    (2, 3),
    (5, 3),
]


def test_generator_is_deterministic() -> None:
    a, b = st.example("test", 7), st.example("test", 7)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.objects == b.objects and a.questions == b.questions
    c = st.example("train", 7)
    assert not np.array_equal(a.image, c.image)


def test_images_follow_the_task() -> None:
    for i in range(40):
        ex = st.example("val", i)
        assert ex.image.shape == (224, 224, 3) and ex.image.dtype == np.uint8
        assert 3 <= len(ex.objects) <= 6
        assert len({o.cell for o in ex.objects}) == len(ex.objects)
        cell = 224 / st.GRID
        for o in ex.objects:
            x0, y0, x1, y1 = o.box
            assert 0.5 * cell <= x1 - x0 + 1 <= 0.86 * cell
            r, c = divmod(o.cell, st.GRID)
            assert c * cell - 1 <= x0 and x1 <= (c + 1) * cell
            assert r * cell - 1 <= y0 and y1 <= (r + 1) * cell
        corner = ex.image[:3, :3].reshape(-1, 3)
        if not any(o.cell == 0 and o.box[0] < 3 and o.box[1] < 3 for o in ex.objects):
            assert ((corner >= 60) & (corner <= 120)).all()


def test_questions_are_valid_and_cover_every_type() -> None:
    seen: dict[str, set[str]] = {c: set() for c in st.CATEGORIES}
    exists = []
    for i in range(300):
        ex = st.example("test", i)
        for q in ex.questions:
            st.check_question(ex.objects, q)  # raises on a wrong answer / broken rule
            seen[q.category].add(q.answer)
            if q.category == "exists":
                exists.append(q.answer == "yes")
        for q in ex.questions:
            if q.category == "color":  # exactly one such shape
                assert [o.shape for o in ex.objects].count(q.text.split()[4]) == 1
    assert seen["color"] == set(st.COLOR_NAMES)
    assert seen["shape"] == set(st.SHAPES)
    assert seen["exists"] == {"yes", "no"}
    assert {"zero", "one", "two", "three"} <= seen["count"]
    assert 0.4 < np.mean(exists) < 0.6


def test_check_question_rejects_wrong_answers() -> None:
    ex = st.example("test", 0)
    q = ex.questions[0]
    wrong = st.Question(q.text, "nonsense", q.category)
    with pytest.raises(ValueError):
        st.check_question(ex.objects, wrong)


def test_write_test_set(tmp_path) -> None:
    path = st.write_test(tmp_path, num_images=5)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert {"question_id", "image", "text", "category", "answer"} <= set(rows[0])
    assert all((tmp_path / "images" / r["image"]).is_file() for r in rows)
    assert rows[0]["text"] == st.example("test", 0).questions[0].text


def test_tokenizer_prompt_has_one_bos() -> None:
    tok = st.build_tokenizer()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok("USER: <image>\nwhat color is the circle ? ASSISTANT:").input_ids
    assert ids.count(1) == 1 and ids[0] == 1
    assert 0 not in ids  # every word of the prompt is in the vocabulary


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


def test_demo_model_answers_known_questions() -> None:
    assert KNOWN_GOOD, "KNOWN_GOOD is empty"
    pipe = sparsevlm_jax.load(st.demo_model_path())
    images, questions, gold = [], [], []
    for i, j in KNOWN_GOOD:
        ex = st.example("test", i)
        images.append(ex.image)
        questions.append(ex.questions[j].text)
        gold.append(ex.questions[j].answer)
    from PIL import Image

    pil = [Image.fromarray(im) for im in images]
    out = pipe.generate(pil, questions, max_new_tokens=4, batch_size=len(pil))
    assert [r.text for r in out] == gold


def test_accuracy_benchmark_writes_table_plot_and_json(tmp_path) -> None:
    import json

    from sparsevlm_jax.bench import accuracy

    report = accuracy.run(st.demo_model_path(), 1, tmp_path, "test", presets=[("v1_5", 64)])
    assert [r["method"] for r in report["results"]] == ["dense", "v1_5@64"]
    assert report["results"][1]["equivalent_tokens"] < report["results"][0]["equivalent_tokens"]
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    assert saved["num_questions"] == report["num_questions"] > 0
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "| v1_5@64 |" in (tmp_path / "accuracy.md").read_text()
