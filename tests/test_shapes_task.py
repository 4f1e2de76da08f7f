"""The shapes task generator (version 2): placement rule, questions, tokenizer, test-set files."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sparsevlm_jax import shapes_task as st

CELL = st.DEFAULT_IMAGE_SIZE // st.GRID  # 56 px
PATCHES_PER_CELL = CELL // st.PATCH  # 4 per side


def scenes(num: int = 1500):
    """(split, index, objects) of `num` scenes per split (placement only, no rendering)."""
    for split in st.SPLIT_SEEDS:
        for i in range(num):
            yield split, i, st.make_scene(st.rng_for(split, i))


def test_task_version_is_v2() -> None:
    assert st.TASK_VERSION == "v2" and st.TASK_NAME == "shapes-v2"
    assert "v2" in st.DEFAULT_TEST_DIR
    assert (st.PATCH, st.OBJECT_SIDES) == (14, (9, 13))


def test_every_object_lies_inside_one_patch_of_its_cell() -> None:
    sides: Counter[int] = Counter()
    offsets: Counter[tuple[int, int]] = Counter()
    for split, i, objs in scenes():
        where = f"{split} {i}: {objs}"
        assert 3 <= len(objs) <= 6, where
        assert len({o.cell for o in objs}) == len(objs), where  # distinct cells
        assert max(Counter(o.shape for o in objs).values()) <= st.MAX_PER_SHAPE, where
        for o in objs:
            x0, y0, x1, y1 = o.box  # inclusive pixel box
            side = x1 - x0 + 1
            assert side == y1 - y0 + 1 and 9 <= side <= 13, where
            assert 0 <= x0 <= x1 < st.DEFAULT_IMAGE_SIZE and 0 <= y0 <= y1 < st.DEFAULT_IMAGE_SIZE
            # exactly one 14-px patch: first and last pixel in the same patch column / row
            assert x0 // st.PATCH == x1 // st.PATCH and y0 // st.PATCH == y1 // st.PATCH, where
            # ... and that patch is in the object's own grid cell
            assert (y0 // CELL, x0 // CELL) == divmod(o.cell, st.GRID), where
            sides[side] += 1
            offsets[(x0 % CELL) // st.PATCH, (y0 % CELL) // st.PATCH] += 1
    assert set(sides) == set(range(9, 14))  # every side occurs
    assert len(offsets) == PATCHES_PER_CELL**2  # every patch of a cell occurs


def test_rendered_objects_stay_inside_their_patch() -> None:
    for i in range(60):
        ex, index_map = st.example_with_maps("val", i, st.DEFAULT_IMAGE_SIZE, st.CATEGORIES)
        assert ex.image.shape == (224, 224, 3) and ex.image.dtype == np.uint8
        for k, o in enumerate(ex.objects):
            ys, xs = np.nonzero(index_map == k + 1)
            assert len(xs) > 0, f"val {i}: object {o} not drawn"
            px, py = (o.box[0] // st.PATCH) * st.PATCH, (o.box[1] // st.PATCH) * st.PATCH
            assert px <= xs.min() and xs.max() < px + st.PATCH, f"val {i}: {o}"
            assert py <= ys.min() and ys.max() < py + st.PATCH, f"val {i}: {o}"
        background = ex.image[index_map == 0]
        assert ((background >= 60) & (background <= 120)).all()
        assert (background[:, 0] == background[:, 2]).all()  # grey


def test_generator_is_deterministic() -> None:
    a, b = st.example("test", 7), st.example("test", 7)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.objects == b.objects and a.questions == b.questions
    c = st.example("train", 7)
    assert not np.array_equal(a.image, c.image)


def test_check_question_accepts_every_generated_question() -> None:
    seen: dict[str, set[str]] = {c: set() for c in st.CATEGORIES}
    exists = []
    for split in st.SPLIT_SEEDS:
        for i in range(400):
            rng = st.rng_for(split, i)
            objs = st.make_scene(rng)
            st.render(objs, rng)  # the questions draw from the generator after the image
            for category in st.CATEGORIES:
                q = st.ask(objs, category, rng)
                if q is None:
                    continue
                st.check_question(objs, q)  # raises on a wrong answer or broken rule
                seen[q.category].add(q.answer)
                if q.category == "exists":
                    exists.append(q.answer == "yes")
    assert seen["color"] == set(st.COLOR_NAMES)
    assert seen["shape"] == set(st.SHAPES)
    assert seen["exists"] == {"yes", "no"}
    assert {"zero", "one", "two", "three"} <= seen["count"]
    assert 0.4 < np.mean(exists) < 0.6


def test_examples_ask_what_the_generator_asks() -> None:
    for i in range(30):
        ex = st.example("test", i)
        rng = st.rng_for("test", i)
        objs = st.make_scene(rng)
        st.render(objs, rng)
        asked = [st.ask(objs, c, rng) for c in st.CATEGORIES]
        assert ex.objects == objs and ex.questions == tuple(q for q in asked if q is not None)


def test_check_question_rejects_wrong_answers() -> None:
    ex = st.example("test", 0)
    for q in ex.questions:
        with pytest.raises(ValueError):
            st.check_question(ex.objects, st.Question(q.text, "nonsense", q.category))


def test_tokenizer_prompt_has_one_bos() -> None:
    tok = st.build_tokenizer()
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok("USER: <image>\nwhat color is the circle ? ASSISTANT:").input_ids
    assert ids.count(1) == 1 and ids[0] == 1
    assert 0 not in ids  # every word of the prompt is in the vocabulary


def test_written_test_set_names_the_task_version(tmp_path) -> None:
    out = tmp_path / st.DEFAULT_TEST_DIR
    path = st.write_test(out, num_images=3)
    assert path == out / "questions.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    examples = [st.example("test", i) for i in range(3)]
    expected = [(i, j, q) for i, ex in enumerate(examples) for j, q in enumerate(ex.questions)]
    assert len(rows) == len(expected)
    for row, (i, j, q) in zip(rows, expected, strict=True):
        assert row == {
            "question_id": f"{i:05d}-{j}",
            "image": f"{i:05d}.png",
            "text": q.text,
            "category": q.category,
            "answer": q.answer,
            "task": "shapes-v2",
        }
    for i, ex in enumerate(examples):  # lossless images, identical to the generator's
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / "images" / f"{i:05d}.png")), ex.image
        )
    readme = (out / "README.md").read_text()
    assert "shapes-v2" in readme and f"{len(rows)} questions about 3 images" in readme
    assert st.read_test(out) == rows


def test_old_test_sets_are_refused(tmp_path) -> None:
    path = st.write_test(tmp_path, num_images=1)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        del r["task"]  # as written before task versions were recorded (task v1)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="shapes-v1.*not shapes-v2.*write-test"):
        st.read_test(tmp_path)


def test_write_test_cli_defaults_to_a_v2_directory(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    from sparsevlm_jax.shapes_task.__main__ import main

    assert main(["write-test", "--images", "2"]) == 0
    assert (tmp_path / "shapes-v2-test" / "questions.jsonl").is_file()
    assert "shapes-v2" in capsys.readouterr().out


def test_default_test_set_has_at_least_2000_questions() -> None:
    n = sum(len(ex.questions) for ex in st.test_examples())
    assert len(st.test_examples(3)) == 3
    assert n >= 2000, n
