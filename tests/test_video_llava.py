"""Video-LLaVA end to end on a tiny random transformers checkpoint.

A tiny `VideoLlavaForConditionalGeneration` (two CLIP towers, `image_tower` and `video_tower`,
one projector, a Llama decoder) saved with `save_pretrained` and converted with the installed
`sparsevlm convert`. Dense greedy tokens of `sparsevlm generate --video` equal transformers'
on an 8-frame clip (an mp4 written here with PyAV, more frames than sampled), on an image and
on an image and a video in one prompt. transformers' video processor needs torchvision, which
is not installable here, so `pixel_values_videos` is built by hand from the frames we decode
(at the tower's size, so only the normalisation is shared) and the `<video>` token is expanded
to frames x (patches + 1): the video tower keeps each frame's class token (the model checks
that count itself). Images go through transformers' own `VideoLlavaImageProcessor` (resize,
centre crop) and `<image>` is expanded to the patches (class token dropped). Every method's
decisions equal the PyTorch reference's on a batch of a video and an image prompt.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from tiny_models import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    save_tiny_video_llava,
    tiny_video_llava,
    video_llava_image_processor,
)
from video_helpers import (
    METHODS,
    QUESTION,
    hf_greedy_tokens,
    method_under_test,
    sparsevlm,
    video_pixels,
    write_mp4,
)
from video_helpers import ours as our_tokens

from sparsevlm_jax import reference as ref
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.video import load_video

torch = pytest.importorskip("torch")  # optional extra: the transformers side and the reference

FRAMES, CLIP_FRAMES, TILE = 8, 20, 56
PER_IMAGE, PER_FRAME = 16, 17  # 4x4 patches; a frame keeps its class token
NEW_TOKENS = 6
VO_STD = 0.3  # attention outputs that move the residual: greedy tokens follow the pixels


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("video-llava")
    model = tiny_video_llava(
        num_layers=6, qk_std=0.3, embed_std=1.0, projector_std=0.5, vo_std=VO_STD
    )
    save_tiny_video_llava(model, d / "hf")
    rng = np.random.default_rng(0)
    # Smooth frames (a coarse random pattern upsampled) survive lossy coding as distinct frames.
    coarse = rng.integers(0, 255, (CLIP_FRAMES, 7, 7, 3), dtype=np.uint8)
    write_mp4(d / "clip.mp4", coarse.repeat(8, axis=1).repeat(8, axis=2))
    Image.fromarray(rng.integers(0, 255, (100, 300, 3), dtype=np.uint8)).save(d / "img.png")
    r = sparsevlm("convert", d / "hf", d / "ckpt", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(dir=d, model=model)


def image_pixels(path: Path) -> torch.Tensor:
    """[1, 3, 56, 56] from transformers' VideoLlavaImageProcessor."""
    out = video_llava_image_processor()(images=[Image.open(path)], return_tensors="np")
    return torch.tensor(next(iter(out.values())))


def hf_inputs(work, video: Path | None, image: Path | None, question: str) -> dict:
    """transformers' inputs: the llava_hf prompt (image first, then video, as the command
    orders them) with each marker expanded to its feature count."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work.dir / "hf")
    marks = ("<image>\n" if image else "") + ("<video>\n" if video else "")
    ids = tok(f"USER: {marks}{question} ASSISTANT:").input_ids
    out: dict = {}
    expanded = []
    for t in ids:
        if t == IMAGE_TOKEN:
            expanded += [IMAGE_TOKEN] * PER_IMAGE
            out["pixel_values"] = image_pixels(image)
        elif t == VIDEO_TOKEN:
            expanded += [VIDEO_TOKEN] * (FRAMES * PER_FRAME)
            out["pixel_values_videos"] = video_pixels(video, FRAMES)
        else:
            expanded.append(t)
    out["input_ids"] = torch.tensor([expanded])
    return out


def hf_greedy(work, video=None, image=None, question=QUESTION) -> list[int]:
    return hf_greedy_tokens(work.model, hf_inputs(work, video, image, question), NEW_TOKENS)


def ours(work, *args: str | Path) -> list[int]:
    return our_tokens(work.dir / "ckpt", NEW_TOKENS, *args)


def test_real_config_token_counts():
    """LanguageBind/Video-LLaVA-7B-hf's shape (transformers' defaults: ViT-L/14 at 224 px):
    256 tokens an image (CLS dropped), 257 a frame (CLS kept), 2056 for 8 frames."""
    import transformers

    cfg = LlavaConfig.from_hf(transformers.VideoLlavaConfig().to_dict())
    assert cfg.family == "video_llava" and cfg.takes_video and cfg.variable_visual
    assert not cfg.anyres and cfg.max_tiles == 1 and cfg.separate_video_tower
    assert (cfg.image_token_index, cfg.video_token_index) == (32000, 32001)
    assert cfg.num_image_tokens == 256 and cfg.video_tokens_per_frame == 257
    assert 8 * cfg.video_tokens_per_frame == 2056
    assert LlavaConfig.from_json(cfg.to_json()) == cfg


def test_converted_config_and_two_towers(work):
    import sparsevlm_jax as sv
    from sparsevlm_jax.checkpoint import load_config
    from sparsevlm_jax.params import flatten, param_shapes

    cfg = load_config(work.dir / "ckpt")
    assert cfg.family == "video_llava" and cfg.video_token_index == VIDEO_TOKEN
    assert cfg.num_image_tokens == PER_IMAGE and cfg.video_tokens_per_frame == PER_FRAME
    shapes = flatten(param_shapes(cfg))
    assert {k[len("video_") :]: v for k, v in shapes.items() if k.startswith("video_vision/")} == {
        k: v for k, v in shapes.items() if k.startswith("vision/")
    }
    assert "image_newline" not in shapes
    pipe = sv.load(work.dir / "ckpt", template="llava_hf")
    towers = work.model.model
    for ours_key, tower in (("vision", towers.image_tower), ("video_vision", towers.video_tower)):
        got = np.asarray(pipe.params[ours_key]["class_embedding"])
        np.testing.assert_array_equal(got, tower.embeddings.class_embedding.detach().numpy())
    assert pipe.processor.image_mode == "crop"


def test_conversion_names_missing_and_unexpected_tower_tensors(work, tmp_path):
    """A Video-LLaVA checkpoint without one video-tower tensor and with an unknown one: one
    error naming both."""
    from safetensors.numpy import load_file, save_file

    from convert.errors import ConversionError
    from convert.llava import convert_to_numpy

    src = tmp_path / "hf"
    src.mkdir()
    for f in (work.dir / "hf").iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    tensors = load_file(work.dir / "hf" / "model.safetensors")
    del tensors["video_tower.encoder.layers.1.self_attn.q_proj.weight"]
    tensors["video_tower.temporal_attn.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(ConversionError) as e:
        convert_to_numpy(src, progress=False)
    msg = str(e.value)
    assert "video_vision/layers/q_proj/kernel[layer 1]" in msg
    assert "video_tower.temporal_attn.weight" in msg


def test_video_gives_transformers_greedy_tokens(work):
    path = work.dir / "clip.mp4"
    tokens = ours(work, "--video", path, "--frames", FRAMES, "--prompt", QUESTION)
    assert tokens == hf_greedy(work, video=path)
    # The check has power: frames through the image tower answer otherwise.
    swapped = copy.deepcopy(work.model)
    swapped.model.video_tower.load_state_dict(work.model.model.image_tower.state_dict())
    assert tokens != hf_greedy(SimpleNamespace(dir=work.dir, model=swapped), video=path)


def test_prefill_logits_equal_transformers(work, pipe):
    """Logits at the last prompt token of a batch of a video, an image, and an image and a
    video in one prompt (one program, two towers, one feature table per example)."""
    from sparsevlm_jax.prefill import prefill_jit
    from sparsevlm_jax.sparse.config import SparseConfig

    clip, img = work.dir / "clip.mp4", work.dir / "img.png"
    video, image = load_video(clip, FRAMES), Image.open(img)
    batch, n = pipe.processor([video, image, [image, video]], [QUESTION] * 3)
    assert n == 3 and batch.visual_index is not None
    logits = np.asarray(prefill_jit(pipe.params, batch, pipe.cfg, SparseConfig(), 1)[0])
    for j, (v, i) in enumerate([(clip, None), (None, img), (clip, img)]):
        with torch.no_grad():
            theirs = work.model(**hf_inputs(work, v, i, QUESTION)).logits[0, -1].numpy()
        np.testing.assert_allclose(logits[j], theirs, atol=1e-4, rtol=0)


def test_image_and_image_plus_video_give_transformers_greedy_tokens(work):
    img, clip = work.dir / "img.png", work.dir / "clip.mp4"
    assert ours(work, "--image", img, "--prompt", QUESTION) == hf_greedy(work, image=img)
    both = ours(work, "--image", img, "--video", clip, "--frames", FRAMES, "--prompt", QUESTION)
    assert both == hf_greedy(work, video=clip, image=img)
    assert both != hf_greedy(work, image=img)  # the answers follow the pixels


def test_image_pixels_are_transformers(work):
    """Our "crop" preprocessing equals VideoLlavaImageProcessor on a 100x300 image."""
    import sparsevlm_jax as sv

    pipe = sv.load(work.dir / "ckpt", template="llava_hf")
    ours_px = pipe.processor.pixel_values([Image.open(work.dir / "img.png")])[0]
    theirs = image_pixels(work.dir / "img.png")[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours_px, theirs, atol=1e-5)


@pytest.fixture(scope="module")
def pipe(work):
    import sparsevlm_jax as sv

    return sv.load(work.dir / "ckpt", template="llava_hf")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_the_reference_on_video(work, pipe, method):
    """A batch of a video prompt (8 x 17 = 136 visual tokens) and an image prompt (16): each
    example's kept indices, recycled counts and greedy tokens equal the reference's."""

    sparse, params = method_under_test(method)
    clip, img = work.dir / "clip.mp4", work.dir / "img.png"
    items = [load_video(clip, FRAMES), Image.open(img)]
    results = pipe.generate(items, [QUESTION, QUESTION], sparse, max_new_tokens=NEW_TOKENS)
    for r, (video, image) in zip(results, [(clip, None), (None, img)], strict=True):
        inputs = hf_inputs(work, video, image, QUESTION)
        toks, rr = ref.reference_generate(
            work.model, inputs["input_ids"], inputs.get("pixel_values"), params,
            max_new_tokens=NEW_TOKENS, pixel_values_videos=inputs.get("pixel_values_videos"),
        )  # fmt: skip
        assert all(rec.pruned for rec in rr.prunes), method
        if method != "random":  # random draws with JAX's RNG, the reference with numpy's
            kept = [[int(k) for k in layer["kept"]] for layer in r.stats["layers"]]
            assert kept == [list(rec.kept) for rec in rr.prunes]
            assert r.token_ids == (toks[: toks.index(2)] if 2 in toks else toks)
        assert [int(x["recycled"]) for x in r.stats["layers"]] == [
            rec.n_recycled for rec in rr.prunes
        ]
        assert r.stats["visual_tokens"] == (FRAMES * PER_FRAME if video else PER_IMAGE)


def test_authors_video_setting_by_name(work):
    """`--sparse video` on Video-LLaVA (the authors' model): one pruning layer, per-frame
    counts over the 17 tokens of each frame."""
    r = sparsevlm("generate", "--model", work.dir / "ckpt", "--template", "llava_hf",
                  "--video", work.dir / "clip.mp4", "--prompt", QUESTION, "--sparse", "video",
                  "--max-new-tokens", 2, "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["sparse"]["preset"] == "video" and out["sparse"]["layers"] == [1]
    (per_frame,) = out["stats"]["frames_kept"]
    assert len(per_frame) == FRAMES and all(0 <= n <= PER_FRAME for n in per_frame)
    assert sum(per_frame) == len(out["stats"]["layers"][0]["kept"])
    assert out["stats"]["visual_tokens"] == FRAMES * PER_FRAME


def test_visualize_draws_the_frames(work, tmp_path):
    """`visualize --video`: a grid of the frames (each frame's class token counted, not
    drawn)."""
    out = tmp_path / "kept.png"
    r = sparsevlm("visualize", "--model", work.dir / "ckpt", "--template", "llava_hf",
                  "--video", work.dir / "clip.mp4", "--frames", FRAMES, "--prompt", QUESTION,
                  "--sparse", "v1_5", "--budget", 64, "--layers", "1,2", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"{FRAMES * PER_FRAME} visual tokens" in r.stdout
    assert Image.open(out).width > FRAMES * TILE
