"""LLaVA-NeXT (anyres) end to end on a tiny random transformers checkpoint.

Converted with the installed `sparsevlm convert`; dense greedy tokens equal transformers'
`LlavaNextForConditionalGeneration` for four aspect ratios that select four different tile
grids (one by one through the `sparsevlm generate` command, all four in one batch through the
Python API); every method's decisions equal the PyTorch reference's on a batch mixing visual
counts (52-88 visual tokens padded to one visual bucket); bad checkpoints get one line, exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tiny_models import IMAGE_TOKEN, NEXT_PINPOINTS, save_tiny_llava_next, tiny_llava_next

from sparsevlm_jax import reference as ref
from sparsevlm_jax.anyres import AnyresSpec, num_visual_tokens, preprocess_anyres
from sparsevlm_jax.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

torch = pytest.importorskip("torch")  # optional extra: the transformers side and the reference

SCRIPT = str(Path(sys.executable).with_name("sparsevlm"))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
SIZES = [(100, 300), (300, 100), (224, 224), (50, 100)]  # (h, w): grids 1x3, 3x1, 2x2, 1x2
QUESTIONS = ["What is in the image?", "What color is the car?",
             "Describe this photo briefly.", "Is there a cat on the table?"]  # fmt: skip
NEW_TOKENS = 6
SPEC = AnyresSpec(
    pinpoints=tuple(tuple(p) for p in NEXT_PINPOINTS), tile_size=56, patch_size=14,
    image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, shortest_edge=56,
)  # fmt: skip


def sparsevlm(*argv: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SCRIPT, *map(str, argv)], env=ENV, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("next")
    model = tiny_llava_next(num_layers=6, qk_std=0.3, embed_std=1.0, projector_std=0.5)
    save_tiny_llava_next(model, d / "hf")
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate(SIZES):
        images.append(d / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images[-1])
    r = sparsevlm("convert", d / "hf", d / "ckpt", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(dir=d, model=model, images=images)


@pytest.fixture(scope="module")
def pipe(work):
    import sparsevlm_jax as sv

    return sv.load(work.dir / "ckpt", template="llava_hf")


def hf_inputs(work, i: int) -> dict:
    """transformers' inputs for example i: tiles, image size and the llava_hf prompt with the
    image token repeated the model's visual count (the model checks that count itself)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work.dir / "hf")
    img = Image.open(work.images[i])
    ids = tok(f"USER: <image>\n{QUESTIONS[i]} ASSISTANT:").input_ids
    k = ids.index(IMAGE_TOKEN)
    n = num_visual_tokens((img.height, img.width), SPEC)
    tiles = preprocess_anyres(img, SPEC)  # equal to transformers' processor (test_anyres.py)
    return {
        "input_ids": torch.tensor([ids[:k] + [IMAGE_TOKEN] * n + ids[k + 1 :]]),
        "pixel_values": torch.tensor(tiles).permute(0, 3, 1, 2)[None],
        "image_sizes": torch.tensor([[img.height, img.width]]),
    }


def hf_greedy(work, i: int) -> list[int]:
    inputs = hf_inputs(work, i)
    with torch.no_grad():
        out = work.model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return until_eos(out[0, inputs["input_ids"].shape[1] :].tolist())


def until_eos(ids: list[int], eos: int = 2) -> list[int]:
    """What `Result.token_ids` holds: the tokens before the first EOS."""
    return ids[: ids.index(eos)] if eos in ids else ids


def test_grids_differ_and_counts_vary():
    from sparsevlm_jax.anyres import anyres_grid

    assert len({anyres_grid(s, SPEC) for s in SIZES}) == 4
    assert [num_visual_tokens(s, SPEC) for s in SIZES] == [68, 76, 88, 52]


@pytest.mark.parametrize("i", range(len(SIZES)))
def test_generate_command_gives_transformers_greedy_tokens(work, i):
    r = sparsevlm("generate", "--model", work.dir / "ckpt", "--image", work.images[i],
                  "--prompt", QUESTIONS[i], "--template", "llava_hf",
                  "--max-new-tokens", NEW_TOKENS, "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert until_eos(json.loads(r.stdout)["token_ids"]) == hf_greedy(work, i)


def test_mixed_batch_equals_transformers_per_example(work, pipe):
    from sparsevlm_jax.sparse.config import SparseConfig

    out = pipe.generate(work.images, QUESTIONS, sparse=SparseConfig(), max_new_tokens=NEW_TOKENS)
    assert [o.token_ids for o in out] == [hf_greedy(work, i) for i in range(len(SIZES))]


# --- every method against the reference ------------------------------------------------------

LAYERS = (1, 3)
METHODS = {  # name -> (our SparseConfig kwargs, the reference's kwargs)
    "v1": ({"method": "v1", "scale": 2.0, "bias": 0.0}, {"method": "v1", "scale": 2.0}),
    "v1_5": ({"method": "v1_5", "schedule": (300, 120), "schedule_tokens": 576},
             {"method": "v1_5", "schedule": (300, 120), "schedule_tokens": 576}),
    "v2_0": ({"method": "v2_0", "schedule": (300, 120), "schedule_tokens": 576},
             {"method": "v2_0", "schedule": (300, 120), "schedule_tokens": 576}),
    "fastv": ({"method": "fastv", "fastv_ratio": 0.5}, {"method": "fastv", "fastv_ratio": 0.5}),
}  # fmt: skip


_REFERENCE: dict[tuple[str, int], tuple] = {}  # (method, example) -> reference_generate's


def reference(work, method: str, i: int, layers: tuple[int, ...]):
    if (method, i) not in _REFERENCE:
        inputs = hf_inputs(work, i)
        _REFERENCE[method, i] = ref.reference_generate(
            work.model, inputs["input_ids"], inputs["pixel_values"],
            ref.RefSparseParams(layers=layers, **METHODS[method][1]),
            max_new_tokens=NEW_TOKENS, image_sizes=inputs["image_sizes"],
        )  # fmt: skip
    return _REFERENCE[method, i]


@pytest.mark.parametrize("capacity", ["exact", "bucketed"])
@pytest.mark.parametrize("method", list(METHODS))
def test_methods_match_reference_on_mixed_batch(work, pipe, method, capacity):
    from sparsevlm_jax.sparse.config import SparseConfig

    ours = METHODS[method][0]
    layers = (1,) if method == "fastv" else LAYERS
    sparse = SparseConfig(layers=layers, capacity=capacity, **ours)
    out = pipe.generate(work.images, QUESTIONS, sparse=sparse, max_new_tokens=NEW_TOKENS)
    pruned = 0
    for i, o in enumerate(out):
        toks, r = reference(work, method, i, layers)
        assert o.stats["visual_tokens"] == r.num_image_tokens == num_visual_tokens(SIZES[i], SPEC)
        if method != "fastv":
            assert o.stats["raters"] == list(r.raters)
        for mine, rec in zip(o.stats["layers"], r.prunes, strict=True):
            assert mine["budget"] == rec.budget and mine["kept"] == list(rec.kept), rec.layer
            assert mine["recycled"] == rec.n_recycled and mine["overflow"] == 0
            pruned += rec.pruned
        assert o.stats["visual_counts"] == list(r.visual_counts)
        assert o.token_ids == until_eos(toks)
    assert pruned > 0


# --- bad checkpoints -------------------------------------------------------------------------


def _copy_hf(work, name: str) -> Path:
    import shutil

    dst = work.dir / name
    shutil.copytree(work.dir / "hf", dst)
    return dst


def test_checkpoint_without_image_newline_is_refused(work):
    from safetensors.numpy import load_file, save_file

    src = _copy_hf(work, "no-newline")
    tensors = load_file(src / "model.safetensors")
    del tensors[next(k for k in tensors if k.endswith("image_newline"))]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    r = sparsevlm("convert", src, work.dir / "no-newline-out")
    assert r.returncode == 2 and "image_newline" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (work.dir / "no-newline-out").exists()


def test_pinpoints_not_multiples_of_the_tile_are_refused(work):
    src = _copy_hf(work, "bad-pinpoints")
    cfg = json.loads((src / "config.json").read_text())
    cfg["image_grid_pinpoints"] = [[56, 100]]
    (src / "config.json").write_text(json.dumps(cfg))
    r = sparsevlm("convert", src, work.dir / "bad-pinpoints-out")
    assert r.returncode == 2 and "[56, 100]" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# --- several images in one prompt ------------------------------------------------------------

MULTI = [  # (images by index into SIZES, question): markers in front, and placed by the text
    ([0, 3], "Compare the two images."),
    ([3, 1], "<image> is the first and <image> the second: which is brighter?"),
]


def hf_multi_inputs(work, images: list[int], prompt: str) -> dict:
    """transformers' inputs for several images: each image token expanded to its count."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work.dir / "hf")
    imgs = [Image.open(work.images[i]) for i in images]
    counts = iter(num_visual_tokens((im.height, im.width), SPEC) for im in imgs)
    ids = []
    for x in tok(prompt).input_ids:
        ids += [x] * next(counts) if x == IMAGE_TOKEN else [x]
    tiles = [preprocess_anyres(im, SPEC) for im in imgs]
    pix = np.zeros((len(imgs), max(map(len, tiles)), 56, 56, 3), np.float32)
    for i, t in enumerate(tiles):
        pix[i, : len(t)] = t
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.tensor(pix).permute(0, 1, 4, 2, 3),
        "image_sizes": torch.tensor([[im.height, im.width] for im in imgs]),
    }


def test_two_images_in_one_prompt_equal_transformers(work, pipe):
    """Logits at the last prompt token and greedy tokens, with a one-image example in the same
    batch: the text between the images stays between them (and is text, not visual)."""
    from sparsevlm_jax.prefill import prefill_jit
    from sparsevlm_jax.sparse.config import SparseConfig

    images = [[work.images[i] for i in ims] for ims, _ in MULTI] + [work.images[2]]
    questions = [q for _, q in MULTI] + [QUESTIONS[2]]
    batch, n = pipe.processor(images, questions)
    assert batch.span_text_slots is not None  # "\n" or words between the two images
    logits = np.asarray(prefill_jit(pipe.params, batch, pipe.cfg, SparseConfig(), 1)[0])
    out = pipe.generate(images, questions, sparse=SparseConfig(), max_new_tokens=NEW_TOKENS)
    for j, (ims, q) in enumerate(MULTI):
        prompt = pipe.processor.template.prompt(q, len(ims))
        inputs = hf_multi_inputs(work, ims, prompt)
        with torch.no_grad():
            theirs = work.model(**inputs).logits[0, -1].numpy()
            gen = work.model.generate(
                **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        np.testing.assert_allclose(logits[j], theirs, atol=1e-4, rtol=0)
        assert out[j].token_ids == until_eos(gen[0, inputs["input_ids"].shape[1] :].tolist())
    assert out[2].token_ids == hf_greedy(work, 2)


def test_generate_command_takes_several_images(work):
    ims, q = MULTI[1]
    r = sparsevlm("generate", "--model", work.dir / "ckpt", "--image", work.images[ims[0]],
                  "--image", work.images[ims[1]], "--prompt", q, "--template", "llava_hf",
                  "--max-new-tokens", NEW_TOKENS, "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    prompt = f"USER: {q} ASSISTANT:"
    inputs = hf_multi_inputs(work, ims, prompt)
    with torch.no_grad():
        gen = work.model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    theirs = until_eos(gen[0, inputs["input_ids"].shape[1] :].tolist())
    assert until_eos(json.loads(r.stdout)["token_ids"]) == theirs


@pytest.mark.parametrize(
    ("images", "prompt", "needle"),
    [([0], "<image> and <image>: same?", "2 <image> markers for 1 image"),
     ([0, 1, 2], "<image> and <image>: same?", "2 <image> markers for 3 images")],
)  # fmt: skip
def test_marker_and_image_counts_must_agree(work, images, prompt, needle):
    argv = [x for i in images for x in ("--image", work.images[i])]
    r = sparsevlm("generate", "--model", work.dir / "ckpt", *argv, "--prompt", prompt)
    assert r.returncode == 2 and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout


# --- Mistral decoder (sliding window) --------------------------------------------------------


def test_mistral_decoder_matches_and_refuses_prompts_past_its_window(work):
    """llava-v1.6-mistral's decoder: equal to transformers while the prompt and answer fit
    the sliding window (256 tokens here); past it, one line and exit 2, never a silent
    difference."""
    import sparsevlm_jax as sv
    from sparsevlm_jax.sparse.config import SparseConfig

    model = tiny_llava_next(num_layers=2, decoder="mistral", seed=5)
    hf = save_tiny_llava_next(model, work.dir / "mistral")
    pipe = sv.load(hf, template="llava_hf", dtype="float32")
    assert pipe.cfg.text.sliding_window == 256
    out = pipe.generate([work.images[1]], [QUESTIONS[1]], SparseConfig(), NEW_TOKENS)[0]
    inputs = hf_inputs(work, 1)
    with torch.no_grad():
        gen = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    assert out.token_ids == until_eos(gen[0, inputs["input_ids"].shape[1] :].tolist())
    r = sparsevlm("generate", "--model", hf, "--image", work.images[1], "--prompt",
                  QUESTIONS[1], "--template", "llava_hf", "--max-new-tokens", 250)  # fmt: skip
    assert r.returncode == 2 and "sliding window (256)" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout


@pytest.mark.parametrize("method", list(METHODS))
def test_methods_match_reference_on_several_images(work, pipe, method):
    """Two images per prompt, the text between them in place (SPEC §9): raters among all the
    text after the first image, kept indices over both spans, recycled tokens after the last
    span, positions; equal to the reference's, one for one, under `exact` and `bucketed`, in a
    batch that also holds a one-image prompt (V0 = both images' tokens, text excluded)."""
    from sparsevlm_jax.sparse.config import SparseConfig

    layers = (1,) if method == "fastv" else LAYERS
    images = [[work.images[i] for i in ims] for ims, _ in MULTI] + [work.images[2]]
    questions = [q for _, q in MULTI] + [QUESTIONS[2]]
    refs = []
    for ims, q in MULTI:
        inputs = hf_multi_inputs(work, ims, pipe.processor.template.prompt(q, len(ims)))
        refs.append(ref.reference_generate(
            work.model, inputs["input_ids"], inputs["pixel_values"],
            ref.RefSparseParams(layers=layers, **METHODS[method][1]),
            max_new_tokens=NEW_TOKENS, image_sizes=inputs["image_sizes"],
        ))  # fmt: skip
        assert refs[-1][1].num_image_tokens == sum(num_visual_tokens(SIZES[i], SPEC) for i in ims)
    refs.append(reference(work, method, 2, layers))
    for capacity in ("exact", "bucketed"):
        sparse = SparseConfig(layers=layers, capacity=capacity, **METHODS[method][0])
        out = pipe.generate(images, questions, sparse=sparse, max_new_tokens=NEW_TOKENS)
        for o, (toks, r) in zip(out, refs, strict=True):
            assert o.stats["visual_tokens"] == r.num_image_tokens
            if method != "fastv":
                assert o.stats["raters"] == list(r.raters)
            for mine, rec in zip(o.stats["layers"], r.prunes, strict=True):
                assert mine["budget"] == rec.budget and mine["kept"] == list(rec.kept)
                assert mine["recycled"] == rec.n_recycled
            assert o.stats["visual_counts"] == list(r.visual_counts)
            assert o.token_ids == until_eos(toks)
        assert all(o.stats["visual_counts"][-1] < o.stats["visual_tokens"] for o in out)
