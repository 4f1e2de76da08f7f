"""Qwen2-VL and Qwen2.5-VL end to end: tiny random transformers checkpoints with a chat
template of their own, converted with the installed command, give transformers' greedy tokens
through `sparsevlm generate` (images of several resolutions, two images in one prompt, a batch
of mixed resolutions), and bad input is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_qwen import (
    assert_reference_decisions,
    hf_greedy,
    hf_inputs,
    qwen_tokenizer_dir,
    save_tiny_qwen,
    tiny_qwen,
)
from video_helpers import sparsevlm

pytest.importorskip("torch")

QUESTION = "What is in the image?"
NEW_TOKENS = 6
# (height, width): smart_resize grids 4x4, 6x10, 8x4, 14x22 patches (4, 15, 8, 77 tokens)
SIZES = ((56, 56), (84, 140), (112, 56), (200, 300))


class Work:
    def __init__(self, root: Path, kind: str):
        self.kind, self.dir = kind, root
        self.model = tiny_qwen(kind)
        save_tiny_qwen(self.model, root / "hf")
        r = sparsevlm("convert", root / "hf", root / "ckpt", "--dtype", "float32")
        assert r.returncode == 0, r.stderr
        rng = np.random.default_rng(3)
        self.images = []
        for i, (h, w) in enumerate(SIZES):
            p = root / f"img{i}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
            self.images.append(p)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())

    def hf_tokens(self, images: list[int], question: str = QUESTION) -> list[int]:
        pil = [Image.open(self.images[i]).convert("RGB") for i in images]
        return hf_greedy(self.model, hf_inputs(self.tokenizer, pil, question), NEW_TOKENS)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def work(request, tmp_path_factory):
    return Work(tmp_path_factory.mktemp(request.param), request.param)


def ours(work: Work, *args) -> list[int]:
    r = sparsevlm("generate", "--model", work.dir / "ckpt", "--max-new-tokens", NEW_TOKENS,
                  "--json", *args)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["token_ids"]


def test_generate_gives_transformers_greedy_tokens_at_several_resolutions(work):
    for i in range(len(SIZES)):
        want = work.hf_tokens([i])
        assert ours(work, "--image", work.images[i], "--prompt", QUESTION) == want, SIZES[i]


def test_two_images_in_one_prompt(work):
    q = "Compare the two pictures."
    want = work.hf_tokens([1, 3], q)
    got = ours(work, "--image", work.images[1], "--image", work.images[3], "--prompt", q)
    assert got == want


def test_mixed_resolution_batch_equals_transformers_per_example(work):
    import sparsevlm_jax

    pipe = sparsevlm_jax.load(work.dir / "ckpt")
    images = [Image.open(work.images[i]).convert("RGB") for i in (0, 3, 1)]
    results = pipe.generate(images, [QUESTION] * 3, max_new_tokens=NEW_TOKENS, batch_size=4)
    for i, res in zip((0, 3, 1), results, strict=True):
        assert res.token_ids == work.hf_tokens([i]), SIZES[i]


def test_checkpoint_without_chat_template_needs_template(work, tmp_path):
    src = tmp_path / "no-template"
    shutil.copytree(work.dir / "hf", src)
    (src / "chat_template.jinja").unlink()
    r = sparsevlm("generate", "--model", src, "--image", work.images[0], "--prompt", QUESTION)
    assert r.returncode == 2 and "chat template" in r.stderr and "--template" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = sparsevlm("generate", "--model", src, "--image", work.images[0], "--prompt", QUESTION,
                  "--template", "llava_hf", "--max-new-tokens", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_extreme_aspect_ratio_and_marker_count_are_refused(work, tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (28 * 201, 28)).save(strip)
    out = tmp_path / "answers.json"
    r = sparsevlm("generate", "--model", work.dir / "ckpt", "--image", strip, "--prompt", QUESTION)
    assert r.returncode == 2 and "200" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = sparsevlm("generate", "--model", work.dir / "ckpt", "--image", work.images[0],
                  "--prompt", "<image> and <image>: what differs?")  # fmt: skip
    assert r.returncode == 2 and "2 <image> markers for 1 image" in r.stderr, r.stderr
    assert not out.exists()


def test_mrope_section_must_sum_to_half_the_head_dim(work, tmp_path):
    src = tmp_path / "bad-mrope"
    shutil.copytree(work.dir / "hf", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 4]
    (src / "config.json").write_text(json.dumps(cfg))
    r = sparsevlm("convert", src, tmp_path / "out")
    assert r.returncode == 2 and "mrope_section" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


# --- pruning: every method's decisions equal the reference's ---------------------------------

LAYERS = (1, 2)
METHODS = {  # name -> (our SparseConfig kwargs, the reference's kwargs)
    "v1": ({"method": "v1", "scale": 2.0, "bias": 0.0}, {"method": "v1", "scale": 2.0}),
    "v1_5": ({"method": "v1_5", "schedule": (300, 120), "schedule_tokens": 576},
             {"method": "v1_5", "schedule": (300, 120), "schedule_tokens": 576}),
    "v2_0": ({"method": "v2_0", "schedule": (300, 120), "schedule_tokens": 576},
             {"method": "v2_0", "schedule": (300, 120), "schedule_tokens": 576}),
    "fastv": ({"method": "fastv", "fastv_ratio": 0.5}, {"method": "fastv", "fastv_ratio": 0.5}),
    "random": ({"method": "random", "schedule": (300, 120), "schedule_tokens": 576},
               {"method": "random", "schedule": (300, 120), "schedule_tokens": 576}),
}  # fmt: skip
BATCH = ((3,), (1,), (1, 3))  # a mixed-resolution batch: 77, 15 and 15 + 77 visual tokens
QUESTIONS = ("What is in the image?", "What color is the car?", "Compare the two pictures.")
_REFERENCE: dict = {}


def reference(work: Work, method: str, example: int, layers: tuple[int, ...]):
    """reference_generate's (tokens, RefResult) on transformers' own inputs and positions."""
    from sparsevlm_jax import reference as ref

    key = (work.kind, method, example)
    if key not in _REFERENCE:
        pil = [Image.open(work.images[i]).convert("RGB") for i in BATCH[example]]
        inputs = hf_inputs(work.tokenizer, pil, QUESTIONS[example])
        _REFERENCE[key] = ref.reference_generate(
            work.model, inputs["input_ids"], inputs["pixel_values"],
            ref.RefSparseParams(layers=layers, **METHODS[method][1]), max_new_tokens=NEW_TOKENS,
            image_grid_thw=inputs["image_grid_thw"],
        )  # fmt: skip
    return _REFERENCE[key]


@pytest.fixture(scope="module")
def pipe(work):
    import sparsevlm_jax

    return sparsevlm_jax.load(work.dir / "ckpt")


@pytest.mark.parametrize("capacity", ["exact", "bucketed"])
@pytest.mark.parametrize("method", list(METHODS))
def test_methods_match_reference_on_mixed_resolution_batch(work, pipe, method, capacity):
    from sparsevlm_jax.sparse.config import SparseConfig

    layers = (1,) if method == "fastv" else LAYERS
    sparse = SparseConfig(layers=layers, capacity=capacity, **METHODS[method][0])
    items = [[Image.open(work.images[i]).convert("RGB") for i in ex] for ex in BATCH]
    out = pipe.generate(items, list(QUESTIONS), sparse=sparse, max_new_tokens=NEW_TOKENS,
                        batch_size=4)  # fmt: skip
    pruned = 0
    for e, o in enumerate(out):
        toks, r = reference(work, method, e, layers)
        pruned += assert_reference_decisions(o.stats, r, method)
        # every method keeps the (t, h, w) of its kept tokens; decoding continues one past the
        # original prompt's largest position at every layer, step after step (SPEC §9.5)
        assert r.positions.ndim == 2
        steps = len(r.decode_positions)
        assert r.decode_positions == [(r.next_position + t,) * 4 for t in range(steps)]
        if method != "random":
            assert o.token_ids == until_im_end(toks)
    assert pruned > 0


def until_im_end(ids: list[int]) -> list[int]:
    from tiny_qwen import IM_END

    return ids[: ids.index(IM_END)] if IM_END in ids else ids


def test_prefill_caches_continue_at_the_original_prompts_largest_position(work, pipe):
    """Our caches' next positions after a pruned prefill equal the reference's, in every
    stage, although pruning dropped the tokens that held the largest positions."""
    import jax

    from sparsevlm_jax.prefill import prefill
    from sparsevlm_jax.sparse.config import SparseConfig

    sparse = SparseConfig(layers=LAYERS, capacity="exact", **METHODS["v1_5"][0])
    items = [[Image.open(work.images[i]).convert("RGB") for i in ex] for ex in BATCH]
    batch, n = pipe.processor(items, list(QUESTIONS))
    _, cache, _, _ = prefill(pipe.params, batch, pipe.cfg, sparse, NEW_TOKENS)
    for e in range(n):
        _, r = reference(work, "v1_5", e, LAYERS)
        got = [int(jax.device_get(p)[e]) for p in cache.position]
        assert got == [r.next_position] * len(cache.position)


# --- eval: a mixed-resolution question file compiles per bucket ------------------------------

EVAL_SIZES = ((56, 56), (84, 140), (112, 56), (200, 300), (300, 200), (150, 150), (90, 300),
              (256, 256))  # fmt: skip


def test_eval_mixed_resolutions_compiles_per_bucket(work, tmp_path):
    """Eight resolutions (4-77 visual tokens) and a two-image line, three questions: the
    compiled prefill programs are at most the buckets the batches meet (visual ladder, text
    bucket, tower patch capacity), which the processor reports itself."""
    import re

    from sparsevlm_jax.loading import load_model_config
    from sparsevlm_jax.processing import Processor

    rng = np.random.default_rng(5)
    (tmp_path / "img").mkdir()
    lines, items = [], []
    for k, (h, w) in enumerate(EVAL_SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / "img" / f"{k}.png"
        )
        image: str | list[str] = f"{k}.png" if k != 7 else ["1.png", "7.png"]
        text = QUESTIONS[k % 3] if k != 7 else "Compare the two pictures."
        lines.append({"question_id": k, "image": image, "text": text})
        items.append(([image] if isinstance(image, str) else image, text))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    answers = tmp_path / "answers.jsonl"
    r = sparsevlm("eval", "--model", work.dir / "ckpt", "--questions", questions,
                  "--image-folder", tmp_path / "img", "--answers", answers, "--batch-size", 4,
                  "--max-new-tokens", 2, "--sparse", "v1_5", "--budget", 64, "--layers", "1,2",
                  "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = sorted(json.loads(x)["question_id"] for x in answers.read_text().splitlines())
    assert got == list(range(len(EVAL_SIZES)))
    ckpt = work.dir / "ckpt"
    proc = Processor.from_pretrained(ckpt, load_model_config(ckpt))
    keys = set()
    for lo in range(0, len(items), 4):
        chunk = items[lo : lo + 4]
        imgs = [[tmp_path / "img" / n for n in names] for names, _ in chunk]
        keys.add(proc(imgs, [t for _, t in chunk])[0].shape_key)
    m = re.search(r"prefill (\d+) fused \+ (\d+) stage programs", r.stdout)
    assert m, r.stdout
    stages = int(m.group(2))
    # per batch bucket: one program per stage (two pruning layers: three stages)
    assert 0 < stages <= len(keys) * (len(LAYERS) + 1), (r.stdout, keys)


def test_visualize_draws_kept_cells_on_the_original_image(work, tmp_path):
    import re

    out = tmp_path / "kept.png"
    r = sparsevlm("visualize", "--model", work.dir / "ckpt", "--image", work.images[3],
                  "--prompt", QUESTION, "--sparse", "v1_5", "--budget", 64, "--layers", "1,2",
                  "--max-new-tokens", 2, "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "image 200x300 (h x w): 77 visual tokens" in r.stdout  # 7 x 11 cells of 28 px
    kept = int(re.search(r"layer 1: (\d+) kept", r.stdout).group(1))
    with Image.open(out) as img:
        pic = np.asarray(img.convert("RGB"), np.int32)
    # the second panel's view (448 x 299 px of the 200x300 image), below its caption + label
    view = pic[40 + 18 : 40 + 18 + 299, 448 + 8 : 448 + 8 + 448]
    src = np.asarray(Image.open(work.images[3]).resize((448, 299), Image.BICUBIC), np.int32)
    lit = np.mean(np.abs(view - src).max(axis=2) <= 1)
    assert abs(lit - kept / 77) < 0.05, (lit, kept)


def test_visualize_video_draws_a_column_per_frame_pair(work, tmp_path):
    from video_helpers import write_mp4

    rng = np.random.default_rng(2)
    coarse = rng.integers(0, 255, (10, 4, 6, 3), dtype=np.uint8)
    write_mp4(tmp_path / "clip.mp4", coarse.repeat(28, axis=1).repeat(28, axis=2))
    out = tmp_path / "video.png"
    r = sparsevlm("visualize", "--model", work.dir / "ckpt", "--video", tmp_path / "clip.mp4",
                  "--frames", 6, "--prompt", "What happens?", "--sparse", "v1_5", "--budget", 64,
                  "--layers", "1,2", "--max-new-tokens", 2, "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "72 visual tokens" in r.stdout  # 3 pairs x 4x6 cells of 28 px
    with Image.open(out) as img:
        assert img.width >= 3 * 112 and img.height > 3 * 100  # 3 columns, 3 rows


def test_mesh_answers_equal_one_devices(work, tmp_path):
    """On 4 forced host devices (data=2, model=2) a pruned eval writes one device's answers
    and decisions (the tower's shared inputs replicated, the batch split over data)."""
    import os
    import subprocess

    from video_helpers import ENV, SCRIPT

    lines = [{"question_id": k, "image": str(work.images[i]), "text": QUESTIONS[k]}
             for k, i in enumerate((3, 1))]  # fmt: skip
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    answers = {}
    for name, extra, env in (
        ("one", [], ENV),
        ("mesh", ["--mesh", "data=2,model=2"],
         {**ENV, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
          + " --xla_force_host_platform_device_count=4"}),
    ):  # fmt: skip
        out = tmp_path / f"{name}.jsonl"
        argv = [SCRIPT, "eval", "--model", work.dir / "ckpt", "--questions", tmp_path / "q.jsonl",
                "--image-folder", "/", "--answers", out, "--batch-size", "2", "--max-new-tokens",
                str(NEW_TOKENS), "--sparse", "v2_0", "--budget", "64", "--layers", "1,2",
                "--quiet", *extra]  # fmt: skip
        r = subprocess.run(list(map(str, argv)), env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr
        rows = sorted((json.loads(x) for x in out.read_text().splitlines()),
                      key=lambda x: x["question_id"])  # fmt: skip
        answers[name] = [(x["text"], x["metadata"]["layers"]) for x in rows]
    assert answers["mesh"] == answers["one"]
