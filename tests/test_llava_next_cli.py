"""LLaVA-NeXT through the commands (issue 20), on one tiny NeXT checkpoint for the module.

`sparsevlm info` / `convert` name the family, the pinpoints and the visual-token range (checked
against `num_visual_tokens` size by size); `visualize` draws kept tokens on the original image
(`packed_regions`: every pixel lies in one base cell and at most one grid cell); `eval` over
mixed aspect ratios compiles no more prefill programs than the buckets its batches meet, and a
truncated image stops it with one line; an original LLaVA-1.6 folder (+ `--clip`) converts to
the llava-hf layout's weights and logits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tiny_models import NEXT_PINPOINTS, save_tiny_llava_next, tiny_llava_next

from sparsevlm_jax.anyres import AnyresSpec, num_visual_tokens, unpadded_shape
from sparsevlm_jax.cli.info import count_table, visual_range
from sparsevlm_jax.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from sparsevlm_jax.visualize import BASE, GRID, NEWLINE, packed_regions, render_anyres

pytest.importorskip("torch")  # the tiny checkpoint is built with transformers

SCRIPT = str(Path(sys.executable).with_name("sparsevlm"))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
SIZES = [(100, 300), (300, 100), (224, 224), (50, 100)]  # (h, w): 68, 76, 88, 52 tokens
TEMPLATE = ("--template", "llava_hf")
REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # llava-v1.6


def spec_of(pinpoints, tile: int) -> AnyresSpec:
    return AnyresSpec(
        pinpoints=tuple(tuple(p) for p in pinpoints), tile_size=tile, patch_size=14,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, shortest_edge=tile,
    )  # fmt: skip


TINY, REAL = spec_of(NEXT_PINPOINTS, 56), spec_of(REAL_PINPOINTS, 336)


def sparsevlm(*argv: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SCRIPT, "--compile-cache", "off", *map(str, argv)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The tiny NeXT model in the llava-hf layout, converted by the command; four images."""
    d = tmp_path_factory.mktemp("next-cli")
    model = tiny_llava_next(num_layers=6, qk_std=0.3, embed_std=1.0, projector_std=0.5)
    save_tiny_llava_next(model, d / "hf")
    rng = np.random.default_rng(0)
    (d / "img").mkdir()
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"img/a{i}.png")
    r = sparsevlm("convert", d / "hf", d / "ckpt", "--dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(dir=d, model=model, convert_out=r.stdout)


# --- visual-token counts: info and convert ---------------------------------------------------


def test_count_table_equals_num_visual_tokens_at_every_size():
    limit = max(max(p) for p in NEXT_PINPOINTS)  # 168: all 28,224 sizes of the tiny spec
    table = count_table(TINY, limit)
    expected = [[num_visual_tokens((h, w), TINY) for w in range(1, limit + 1)]
                for h in range(1, limit + 1)]  # fmt: skip
    np.testing.assert_array_equal(table, expected)
    rng = np.random.default_rng(1)
    real = count_table(REAL, 1008)
    for h, w in rng.integers(1, 1009, (300, 2)):
        assert real[h - 1, w - 1] == num_visual_tokens((h, w), REAL), (h, w)


def test_visual_range_of_llava_v16():
    r = visual_range(REAL)
    assert (r.fewest, r.most, r.band, r.band_fewest) == (576, 2928, 3, 792)
    assert r.most_at == (672, 672) and r.band_fewest_at == (336, 112)
    h, w = r.fewest_at
    assert num_visual_tokens((h, w), REAL) == 576 and max(h, w) > 3 * min(h, w)


def test_convert_summary_names_family_and_range(work):
    line = work.convert_out.strip().splitlines()[-1]
    assert "llava_next (anyres), 16-88 visual tokens per image (by size)" in line, line
    assert "16 visual tokens," not in line


def test_info_on_next_checkpoint(work):
    r = sparsevlm("info", work.dir / "ckpt")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "family:      llava_next (LLaVA-1.6 anyres)" in out
    assert "pinpoints:   56x112, 112x56, 112x112, 56x168, 168x56 (h x w px" in out
    assert "16-88 visual tokens per image" in out and "most: 88 at 112x112 (square)" in out
    # every size up to 168x168 (the range is over all of them)
    table = [num_visual_tokens((h, w), TINY) for h in range(1, 169) for w in range(1, 169)]
    assert (min(table), max(table)) == (16, 88)


def test_info_on_llava_v16_config_without_weights(tmp_path, capsys):
    """A llava-v1.6-vicuna-7b config.json alone (no weights needed): the real counts."""
    from sparsevlm_jax.cli import main

    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14)  # fmt: skip
    text = dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32064, torch_dtype="float16")  # fmt: skip
    cfg = dict(model_type="llava_next", image_grid_pinpoints=REAL_PINPOINTS, torch_dtype="float16",
               image_token_index=32000, vision_config=vision, text_config=text)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "576-2,928 visual tokens per image" in out
    assert "common sizes: 672x672 2,928, 480x640 2,340, 720x1280 1,948, 336x336 1,176" in out
    assert "fewest: 792 at 336x112 (portrait 1:3) among aspect ratios up to 3:1" in out


# --- visualize -------------------------------------------------------------------------------


def _coverage(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """[h, w]: how many boxes hold each pixel's centre."""
    yc, xc = np.arange(h) + 0.5, np.arange(w) + 0.5
    count = np.zeros((h, w), int)
    for y0, x0, y1, x1 in boxes:
        count[np.ix_((yc >= y0) & (yc < y1), (xc >= x0) & (xc < x1))] += 1
    return count


@pytest.mark.parametrize(
    "spec, size",
    [(REAL, (480, 640)), (REAL, (720, 1280)), (REAL, (336, 336)), (REAL, (300, 100)),
     (TINY, (100, 300)), (TINY, (224, 224)), (TINY, (50, 100)), (TINY, (226, 285)),
     (TINY, (151, 79)), (TINY, (6, 225))],
)  # fmt: skip
def test_packed_regions_cover_the_original_image(spec, size):
    """Base cells tile the image exactly once; grid cells at most once, all of it except a
    sliver (under one grid cell) at two opposite edges that transformers' unpadding drops."""
    h, w = size
    boxes, kinds = packed_regions(size, spec)
    uh, uw = unpadded_shape(size, spec)
    assert len(kinds) == num_visual_tokens(size, spec)
    assert (kinds[: spec.patches_per_side**2] == BASE).all()
    assert (kinds == NEWLINE).sum() == uh and (kinds == GRID).sum() == uh * uw
    assert (boxes[kinds == NEWLINE] == 0).all()
    assert (_coverage(boxes[kinds == BASE], h, w) == 1).all()
    grid = _coverage(boxes[kinds == GRID], h, w)
    assert grid.max() <= 1
    cell = max(h / uh if uh else h, w / uw if uw else w)  # a grid cell's size, at most
    ys, xs = np.nonzero(grid == 0)
    edge = np.minimum(np.minimum(ys + 0.5, h - ys - 0.5), np.minimum(xs + 0.5, w - xs - 0.5))
    assert (edge < cell).all()
    if size in ((480, 640), (720, 1280), (336, 336), (100, 300), (224, 224)):
        assert (grid == 1).all()  # no sliver at these sizes


def test_render_anyres_lights_exactly_the_kept_cells():
    """A 112x112 image on the tiny spec (a 2x2 grid, no padding; 4x4 base cells of 28 px,
    8x8 grid cells of 14 px): keep base cell 5 (row 1, col 1), the grid's first cell and a
    newline; the views show the image scaled 3x (336 / 112)."""
    rgb = np.full((112, 112, 3), 200, np.uint8)
    kept = [5, 16, 16 + 8]  # base (1, 1); grid (0, 0); the first row's newline
    assert packed_regions((112, 112), TINY)[1][kept].tolist() == [BASE, GRID, NEWLINE]
    layers = [{"layer": 1, "kept": kept, "recycled": 1, "budget": 3, "rank": None}]
    pic = np.asarray(render_anyres(Image.fromarray(rgb), TINY, layers), np.int32)
    from sparsevlm_jax.visualize import CAPTION, GAP, LABEL

    x0 = 336 + GAP  # the layer's panel
    base = pic[CAPTION + LABEL : CAPTION + LABEL + 336, x0 : x0 + 336]
    grid_top = CAPTION + LABEL + 336 + GAP + LABEL
    grid = pic[grid_top : grid_top + 336, x0 : x0 + 336]
    for view, (y, x, size) in ((base, (84, 84, 84)), (grid, (0, 0, 42))):
        inner = view[y + 4 : y + size - 4, x + 4 : x + size - 4]
        assert (inner == 200).all()  # kept: as the image (inside the outline)
        dim = view.copy()
        dim[max(0, y - 4) : y + size + 4, max(0, x - 4) : x + size + 4] = 50
        assert (dim == 50).all()  # everything else dimmed to 200 * 0.25


def test_visualize_command_draws_on_the_original_image(work):
    out_png = work.dir / "kept.png"
    r = sparsevlm("visualize", "--model", work.dir / "ckpt", "--image", work.dir / "img/a0.png",
                  "--prompt", "What is in the image?", "--out", out_png, "--sparse", "fastv",
                  "--budget", "64", "--max-new-tokens", "1", *TEMPLATE)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "image 100x300 (h x w): 68 visual tokens" in r.stdout
    kept = int(re.search(r"layer \d+: (\d+) kept", r.stdout).group(1))
    assert 0 < kept < 68
    with Image.open(out_png) as img:  # 2 panels of two 112x336 views (300 px wide -> 336)
        assert img.format == "PNG" and img.size == (2 * 336 + 8, 40 + 2 * (18 + 112) + 8)
        pic = np.asarray(img.convert("RGB"), np.int32)
    src = np.asarray(Image.open(work.dir / "img/a0.png").resize((336, 112), Image.BICUBIC))
    views = [pic[40 + 18 : 40 + 130, 344:], pic[40 + 130 + 8 + 18 :, 344:]]  # base, grid
    lit = np.mean([np.abs(v - src).max(axis=2) <= 1 for v in views])
    assert 0 < lit < 0.5  # some cells kept as they are, most dimmed


# --- eval ------------------------------------------------------------------------------------

QUESTIONS = ["What is in the image?", "What color is it?", "Describe it.", "Is there a cat?"]
# Images per question, batches of 4: all four aspect ratios (at most 88 tokens: visual bucket
# 88), then twice 52 / 68 tokens (bucket 72): three batches, two buckets.
ORDER = [0, 1, 2, 3, 3, 0, 3, 0, 0, 3, 3, 0]


def _questions(path: Path, images: list[str]) -> None:
    with open(path, "w") as f:
        for k, name in enumerate(images):
            q = {"question_id": k, "image": name, "text": QUESTIONS[k % 4]}
            f.write(json.dumps(q) + "\n")


def test_eval_mixed_aspect_ratios_compiles_per_bucket(work):
    from sparsevlm_jax.loading import load_model_config
    from sparsevlm_jax.processing import Processor

    images = [f"a{i}.png" for i in ORDER]
    _questions(work.dir / "q.jsonl", images)
    answers = work.dir / "answers.jsonl"
    r = sparsevlm("eval", "--model", work.dir / "ckpt", "--questions", work.dir / "q.jsonl",
                  "--image-folder", work.dir / "img", "--answers", answers, "--batch-size", 4,
                  "--max-new-tokens", 1, "--quiet", *TEMPLATE)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in answers.read_text().splitlines()]
    assert sorted(x["question_id"] for x in lines) == list(range(12))
    # The buckets the three batches meet, from the processor itself.
    ckpt = work.dir / "ckpt"
    proc = Processor.from_pretrained(ckpt, load_model_config(ckpt), template="llava_hf")
    keys = set()
    for lo in range(0, 12, 4):
        paths = [work.dir / "img" / name for name in images[lo : lo + 4]]
        keys.add(proc(paths, [QUESTIONS[k % 4] for k in range(lo, lo + 4)])[0].shape_key)
    assert len({k[2] for k in keys}) == len(keys) == 2  # two visual buckets, three batches
    m = re.search(r"prefill (\d+) fused \+ (\d+) stage programs", r.stdout)
    assert m, r.stdout
    assert 0 < int(m.group(1)) + int(m.group(2)) <= len(keys), (r.stdout, keys)


def test_eval_truncated_image_is_one_line_and_writes_nothing(work, capsys):
    """In-process `main` (the command itself ran above): the batch's second image is cut."""
    from sparsevlm_jax.cli import main

    data = (work.dir / "img/a2.png").read_bytes()
    (work.dir / "img/broken.png").write_bytes(data[: len(data) // 2])
    _questions(work.dir / "qb.jsonl", ["a0.png", "broken.png", "a1.png", "a3.png", "a0.png"])
    answers = work.dir / "broken-answers.jsonl"
    rc = main([str(a) for a in ("eval", "--model", work.dir / "ckpt", "--questions",
               work.dir / "qb.jsonl", "--image-folder", work.dir / "img", "--answers", answers,
               "--batch-size", 4, "--max-new-tokens", 1, "--quiet", *TEMPLATE)])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (out, err)
    err = err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsevlm: error: ") and "broken.png" in err[0]
    assert "truncated" in err[0] and not answers.exists()


# --- the original LLaVA-1.6 layout -----------------------------------------------------------


def _original_next(work) -> tuple[Path, Path]:
    """The module's weights as liuhaotian/llava-v1.6-* saves them (Llama `model.*`,
    `model.mm_projector.{0,2}`, `model.image_newline`, no vision) and a CLIP directory."""
    import torch
    from safetensors.numpy import save_file

    sd = {k: v.detach().numpy().copy() for k, v in work.model.state_dict().items()}
    orig, clip = work.dir / "orig", work.dir / "clip"
    orig.mkdir()
    clip.mkdir()
    rules = [("model.language_model.", "model."),
             ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
             ("model.multi_modal_projector.linear_2.", "model.mm_projector.2.")]  # fmt: skip
    weights = {}
    for name, value in sd.items():
        if name.startswith("model.vision_tower."):
            continue
        for old, new in rules:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        weights[name] = value
    assert "model.image_newline" in weights and "lm_head.weight" in weights
    save_file(weights, str(orig / "model.safetensors"))
    cfg = work.model.config
    d = cfg.text_config.to_dict()
    d.update(
        model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower="openai/clip-vit-large-patch14-336", mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu",
        mm_hidden_size=cfg.vision_config.hidden_size, image_aspect_ratio="anyres",
        mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=NEXT_PINPOINTS,
    )  # fmt: skip
    (orig / "config.json").write_text(json.dumps(d))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(work.dir / "hf" / name, orig / name)
    vision = {"vision_model." + k[len("model.vision_tower.") :]: torch.from_numpy(v)
              for k, v in sd.items() if k.startswith("model.vision_tower.")}  # fmt: skip
    vision["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    vision["visual_projection.weight"] = torch.zeros(16, 32)  # CLIPModel's other half
    vision["logit_scale"] = torch.tensor(2.6)
    torch.save(vision, clip / "pytorch_model.bin")
    clip_cfg = {"model_type": "clip", "vision_config": cfg.vision_config.to_dict()}
    (clip / "config.json").write_text(json.dumps(clip_cfg))
    pre = {"crop_size": {"height": 56, "width": 56}, "size": {"shortest_edge": 56},
           "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}  # fmt: skip
    (clip / "preprocessor_config.json").write_text(json.dumps(pre))
    return orig, clip


def test_original_llava_16_layout_converts_to_the_same_logits(work):
    import jax

    import sparsevlm_jax as sv
    from sparsevlm_jax.model.llava import prefill
    from sparsevlm_jax.params import flatten

    orig, clip = _original_next(work)
    r = sparsevlm("convert", orig, work.dir / "orig-ckpt", "--clip", clip, "--dtype", "float32",
                  "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "llava_next (anyres), 16-88 visual tokens" in r.stdout
    pipes = [sv.load(work.dir / name, template="llava_hf") for name in ("ckpt", "orig-ckpt")]
    hf, og = pipes
    assert og.cfg.family == "llava_next"
    assert og.cfg.image_grid_pinpoints == hf.cfg.image_grid_pinpoints
    assert og.cfg.image_token_index == -200 and hf.cfg.image_token_index == 500
    a, b = flatten(hf.params), flatten(og.params)
    assert a.keys() == b.keys() and "image_newline" in a
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    # One batch (the llava-hf processor's; the original's -200 placeholder splits the prompt
    # text as LLaVA does, so its token ids differ) through both models.
    images = [work.dir / "img/a0.png", work.dir / "img/a3.png"]  # 1x3 and 1x2 grids
    batch, _ = hf.processor(images, QUESTIONS[:2])
    run = jax.jit(prefill, static_argnums=(1, 3, 4))
    logits = [np.asarray(run(p.params, p.cfg, batch, 1, True)[0]) for p in pipes]
    slots = batch.prefix_ids.shape[1] + batch.visual_index.shape[1] + batch.text_ids.shape[1]
    assert logits[0].shape[:2] == (2, slots)  # every slot's logits
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-6, atol=1e-6)
