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
from tiny_qwen import hf_greedy, hf_inputs, qwen_tokenizer_dir, save_tiny_qwen, tiny_qwen
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
