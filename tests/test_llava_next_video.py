"""LLaVA-NeXT-Video end to end on a tiny random transformers checkpoint.

Converted with the installed `sparsevlm convert`; dense greedy tokens of `sparsevlm generate
--video` equal transformers' `LlavaNextVideoForConditionalGeneration` on an 8-frame clip (an mp4
written here with PyAV, more frames than sampled, and a folder of frame images), on an image,
and on a video and an image in one prompt. transformers' video processor needs torchvision,
which is not installable here, so `pixel_values_videos` is built by hand from the frames we
decode (at the tower's size, so only the normalisation is shared) and the `<video>` token is
expanded to frames x pooled tokens (the model checks that count itself). Every method's
decisions equal the PyTorch reference's on a batch of a video and an image prompt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import av  # a dependency (video decoding): never skipped
import numpy as np
import pytest
from PIL import Image
from tiny_models import (
    IMAGE_TOKEN,
    NEXT_PINPOINTS,
    VIDEO_TOKEN,
    save_tiny_llava_next_video,
    tiny_llava_next,
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
from sparsevlm_jax.anyres import AnyresSpec, num_visual_tokens, preprocess_anyres
from sparsevlm_jax.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from sparsevlm_jax.video import load_video, sample_indices

torch = pytest.importorskip("torch")  # optional extra: the transformers side and the reference

FRAMES, CLIP_FRAMES, TILE = 8, 20, 56
PER_FRAME = 4  # 4x4 patches pooled 2x2
NEW_TOKENS = 6
SPEC = AnyresSpec(
    pinpoints=tuple(tuple(p) for p in NEXT_PINPOINTS), tile_size=TILE, patch_size=14,
    image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, shortest_edge=TILE,
)  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("next-video")
    model = tiny_llava_next(
        num_layers=6, qk_std=0.3, embed_std=1.0, projector_std=0.5, vo_std=0.3, video=True
    )
    save_tiny_llava_next_video(model, d / "hf")
    rng = np.random.default_rng(0)
    # Smooth frames (a coarse random pattern upsampled) survive lossy coding as distinct frames.
    coarse = rng.integers(0, 255, (CLIP_FRAMES, 7, 7, 3), dtype=np.uint8)
    frames = coarse.repeat(8, axis=1).repeat(8, axis=2)
    write_mp4(d / "clip.mp4", frames)
    (d / "frames").mkdir()
    (d / "reversed").mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(d / "frames" / f"frame_{i}.png")
        Image.fromarray(f).save(d / "reversed" / f"frame_{len(frames) - 1 - i}.png")
    Image.fromarray(rng.integers(0, 255, (100, 300, 3), dtype=np.uint8)).save(d / "img.png")
    r = sparsevlm("convert", d / "hf", d / "ckpt", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    return SimpleNamespace(dir=d, model=model)


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
            img = Image.open(image)
            expanded += [IMAGE_TOKEN] * num_visual_tokens((img.height, img.width), SPEC)
            out["pixel_values"] = torch.tensor(preprocess_anyres(img, SPEC)).permute(0, 3, 1, 2)[
                None
            ]
            out["image_sizes"] = torch.tensor([[img.height, img.width]])
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


def test_rope_scaling_comes_from_the_config(work):
    from sparsevlm_jax.checkpoint import load_config

    cfg = load_config(work.dir / "ckpt")
    assert cfg.family == "llava_next_video" and cfg.video_token_index == VIDEO_TOKEN
    assert dict(cfg.text.rope_scaling) == {"factor": 2.0, "rope_type": "linear"}
    assert cfg.video_tokens_per_frame == PER_FRAME
    info = sparsevlm("info", work.dir / "ckpt")
    assert info.returncode == 0, info.stderr
    assert "family:      llava_next_video" in info.stdout
    assert "video:       4 visual tokens per frame (4x4 patches, average pooled 2x2" in info.stdout


def test_sampled_frames_are_transformers_rule(work):
    video = load_video(work.dir / "clip.mp4", FRAMES)
    assert video.total_frames == CLIP_FRAMES
    assert (
        list(video.indices) == sample_indices(CLIP_FRAMES, FRAMES) == [0, 2, 5, 7, 10, 12, 15, 17]
    )


def test_the_answer_depends_on_the_video(work):
    """Not blind: other frames give transformers other greedy tokens (so the parity below
    checks the visual path, not only the text)."""
    reversed_dir = work.dir / "reversed"
    assert hf_greedy(work, video=work.dir / "frames") != hf_greedy(work, video=reversed_dir)


@pytest.mark.parametrize("source", ["clip.mp4", "frames", "reversed"])
def test_video_gives_transformers_greedy_tokens(work, source):
    path = work.dir / source
    tokens = ours(work, "--video", path, "--frames", FRAMES, "--prompt", QUESTION)
    assert tokens == hf_greedy(work, video=path)


def test_image_and_image_plus_video_give_transformers_greedy_tokens(work):
    img, clip = work.dir / "img.png", work.dir / "clip.mp4"
    assert ours(work, "--image", img, "--prompt", QUESTION) == hf_greedy(work, image=img)
    both = ours(work, "--image", img, "--video", clip, "--frames", FRAMES, "--prompt", QUESTION)
    assert both == hf_greedy(work, video=clip, image=img)


@pytest.fixture(scope="module")
def pipe(work):
    import sparsevlm_jax as sv

    return sv.load(work.dir / "ckpt", template="llava_hf")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_the_reference_on_video(work, pipe, method):
    """A batch of a video prompt (32 visual tokens) and an image prompt (68): each example's
    kept indices, recycled counts and greedy tokens equal the reference's."""

    sparse, params = method_under_test(method)
    clip, img = work.dir / "clip.mp4", work.dir / "img.png"
    items = [load_video(clip, FRAMES), Image.open(img)]
    results = pipe.generate(items, [QUESTION, QUESTION], sparse, max_new_tokens=NEW_TOKENS)
    for r, (video, image) in zip(results, [(clip, None), (None, img)], strict=True):
        inputs = hf_inputs(work, video, image, QUESTION)
        toks, rr = ref.reference_generate(
            work.model, inputs["input_ids"], inputs.get("pixel_values"), params,
            max_new_tokens=NEW_TOKENS, image_sizes=inputs.get("image_sizes"),
            pixel_values_videos=inputs.get("pixel_values_videos"),
        )  # fmt: skip
        assert all(rec.pruned for rec in rr.prunes), method
        if method != "random":  # random draws with JAX's RNG, the reference with numpy's
            kept = [[int(k) for k in layer["kept"]] for layer in r.stats["layers"]]
            assert kept == [list(rec.kept) for rec in rr.prunes]
            assert r.token_ids == (toks[: toks.index(2)] if 2 in toks else toks)
        assert [int(x["recycled"]) for x in r.stats["layers"]] == [
            rec.n_recycled for rec in rr.prunes
        ]
        assert r.stats["visual_tokens"] == (FRAMES * PER_FRAME if video else 68)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "0"], "--frames"),
        (["--video", "{dir}/garbage.mp4"], "garbage.mp4"),
        (["--video", "{dir}/audio.wav"], "no video stream"),
        (["--video", "{dir}/empty"], "no frame images"),
    ],
)
def test_bad_video_input_is_one_line(work, args, message):
    d = work.dir
    (d / "garbage.mp4").write_bytes(os.urandom(2000))
    (d / "empty").mkdir(exist_ok=True)
    if not (d / "audio.wav").exists():
        with av.open(str(d / "audio.wav"), "w") as out:
            stream = out.add_stream("pcm_s16le", rate=8000)
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 800), np.int16), format="s16", layout="mono"
            )
            frame.sample_rate = 8000
            for packet in stream.encode(frame):
                out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    argv = [a.format(dir=d) for a in args]
    if "--video" not in argv:
        argv += ["--video", str(d / "clip.mp4")]
    r = sparsevlm("generate", "--model", d / "ckpt", "--prompt", QUESTION, *argv)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert r.stdout == ""


def test_authors_video_setting_by_name(work):
    r = sparsevlm("generate", "--model", work.dir / "ckpt", "--template", "llava_hf",
                  "--video", work.dir / "clip.mp4", "--prompt", QUESTION, "--sparse", "video",
                  "--max-new-tokens", 2, "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["sparse"]["preset"] == "video" and out["sparse"]["layers"] == [1]
    assert [x["layer"] for x in out["stats"]["layers"]] == [1]
    (per_frame,) = out["stats"]["frames_kept"]  # the one pruning layer's kept, frame by frame
    assert len(per_frame) == FRAMES and all(0 <= n <= PER_FRAME for n in per_frame)
    assert sum(per_frame) == len(out["stats"]["layers"][0]["kept"])
    text = sparsevlm("generate", "--model", work.dir / "ckpt", "--template", "llava_hf",
                     "--video", work.dir / "clip.mp4", "--prompt", QUESTION, "--sparse", "video",
                     "--max-new-tokens", 2, "--stats")  # fmt: skip
    assert "layer 1 kept per video frame: " + " ".join(map(str, per_frame)) in text.stdout
    bad = sparsevlm("generate", "--model", work.dir / "ckpt", "--video", work.dir / "clip.mp4",
                    "--prompt", QUESTION, "--sparse", "video", "--budget", 64)  # fmt: skip
    assert bad.returncode == 2 and "takes no --budget" in bad.stderr


def test_video_on_an_image_model_is_refused(tmp_path):
    """A model without a video token: one line, exit 2."""
    from sparsevlm_jax.shapes_task import demo_model_path

    (tmp_path / "frames").mkdir()
    Image.new("RGB", (224, 224)).save(tmp_path / "frames" / "a.png")
    r = sparsevlm("generate", "--model", demo_model_path(), "--video", tmp_path / "frames",
                  "--prompt", "what is it ?")  # fmt: skip
    assert r.returncode == 2 and "takes no video" in r.stderr, r.stderr


def test_eval_lines_may_carry_a_video(work, tmp_path):
    """An eval line's "video" (file or frame folder under --image-folder, its own "frames" or
    --frames) answers what `generate --video` answers; a bad "frames" is one line, exit 2."""
    lines = [
        {"question_id": 1, "video": "clip.mp4", "text": QUESTION},
        {"question_id": 2, "video": "frames", "frames": 4, "text": QUESTION},
        {"question_id": 3, "image": "img.png", "text": QUESTION},
    ]
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in lines))
    common = ["--model", work.dir / "ckpt", "--template", "llava_hf", "--max-new-tokens",
              NEW_TOKENS]  # fmt: skip
    r = sparsevlm("eval", *common, "--questions", q, "--image-folder", work.dir,
                  "--answers", tmp_path / "a.jsonl", "--batch-size", 2, "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    answers = {a["question_id"]: a["text"] for a in map(json.loads, open(tmp_path / "a.jsonl"))}
    for qid, argv in [(1, ["--video", work.dir / "clip.mp4"]),
                      (2, ["--video", work.dir / "frames", "--frames", 4])]:  # fmt: skip
        g = sparsevlm("generate", *common, "--prompt", QUESTION, "--json", *argv)
        assert g.returncode == 0, g.stderr
        assert answers[qid] == json.loads(g.stdout)["text"]
    q.write_text(json.dumps({"question_id": 1, "video": "clip.mp4", "frames": 0, "text": "x"}))
    bad = sparsevlm("eval", *common, "--questions", q, "--image-folder", work.dir,
                    "--answers", tmp_path / "b.jsonl")  # fmt: skip
    assert bad.returncode == 2 and "'frames'" in bad.stderr and bad.stderr.count("\n") == 1
    assert not (tmp_path / "b.jsonl").exists()


def test_visualize_draws_a_grid_of_frames(work, tmp_path):
    out = tmp_path / "kept.png"
    r = sparsevlm("visualize", "--model", work.dir / "ckpt", "--template", "llava_hf",
                  "--video", work.dir / "clip.mp4", "--frames", FRAMES, "--prompt", QUESTION,
                  "--sparse", "v1_5", "--budget", 64, "--layers", "1,2,3",
                  "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"frames {[0, 2, 5, 7, 10, 12, 15, 17]} of {CLIP_FRAMES}" in r.stdout
    pic = Image.open(out)
    assert pic.width > FRAMES * TILE and pic.height > 4 * TILE  # 8 frames wide, 1 + 3 rows
    two = sparsevlm("visualize", "--model", work.dir / "ckpt", "--video", work.dir / "clip.mp4",
                    "--image", work.dir / "img.png", "--prompt", QUESTION, "--sparse", "v1",
                    "--out", tmp_path / "two.png")  # fmt: skip
    assert two.returncode == 2 and "one --image or --video" in two.stderr
    assert not (tmp_path / "two.png").exists()
