"""Qwen2-VL and Qwen2.5-VL video end to end.

Tiny random transformers checkpoints (`tiny_qwen`, v/o redrawn so the greedy tokens depend on
the frames), converted with the installed `sparsevlm convert`, give transformers' greedy tokens
through `sparsevlm generate --video`: an mp4 written here with PyAV (12 frames at 4 fps, 8
sampled), the same frames as a folder of images, an image and a video in one prompt, and an
odd `--frames 7`. transformers' video processor needs torchvision, which is not installable
here, so `pixel_values_videos` / `video_grid_thw` are built by hand as it computes them
(`tiny_qwen.video_inputs`) from the frames we decode, at a size its `smart_resize` keeps
(112x168, inside the checkpoints' `video_preprocessor_config.json` budget): only the
normalisation and the patch order are shared, and the token count comes from the video
budget the converted checkpoint carries.

Qwen2.5-VL spaces video time positions by `tokens_per_second * second_per_grid_ts`; our
`seconds_per_grid` is temporal_patch * duration / frames (duration = total_frames / fps), what
`Qwen2_5_VLProcessor` computes from `VideoMetadata.sampled_fps` (the test hands transformers
that value). At 4 fps, 12 frames, 8 sampled, a grid step is 0.75 s: time positions
0, 1, 3, 4 (tokens_per_second 2) where Qwen2-VL's rule gives 0, 1, 2, 3.

Odd frame counts: `--frames 7` takes 7 frames and, like transformers' `patchify` given 7
frames, repeats the last to fill the final temporal pair (grid t = 4). (transformers' own
sampler, asked for 7 frames, would round the count to 8 and sample 8 frames instead.)

Every pruning method's decisions on a video prompt equal the PyTorch reference's, which runs
transformers' own tower and `get_rope_index` on `pixel_values_videos`, `video_grid_thw` and
`second_per_grid_ts`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import av  # a dependency (video decoding): never skipped
import numpy as np
import pytest
from PIL import Image
from tiny_qwen import (
    IM_END,
    VIDEO_PAD,
    assert_reference_decisions,
    hf_greedy,
    hf_inputs,
    qwen_tokenizer_dir,
    save_tiny_qwen,
    tiny_qwen,
)
from video_helpers import ENV, SCRIPT, write_mp4

from sparsevlm_jax.qwen_processor import DEFAULT_FPS
from sparsevlm_jax.video import load_video

torch = pytest.importorskip("torch")  # optional extra: the transformers side and the reference

KINDS = ("qwen2_vl", "qwen2_5_vl")
FRAMES, CLIP_FRAMES, FPS = 8, 12, 4
HEIGHT, WIDTH = 112, 168  # multiples of 28 in the video budget: 4x6 tokens per frame pair
PER_PAIR = (HEIGHT // 28) * (WIDTH // 28)
NEW_TOKENS = 6
QUESTION = "What happens in the video?"
BOTH = "Does the picture appear in the video?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The clip (mp4, 12 smooth frames at 4 fps), its frames as a folder of images (and
    reversed), an image, and a persistent compile cache shared by this module's commands."""
    d = tmp_path_factory.mktemp("qwen-video-media")
    rng = np.random.default_rng(0)
    # A coarse random pattern upsampled: frames that survive lossy coding as distinct frames.
    coarse = rng.integers(0, 255, (CLIP_FRAMES, HEIGHT // 14, WIDTH // 14, 3), dtype=np.uint8)
    frames = coarse.repeat(14, axis=1).repeat(14, axis=2)
    write_mp4(d / "clip.mp4", frames, fps=FPS)
    for name, order in (("frames", frames), ("reversed", frames[::-1])):
        (d / name).mkdir()
        for i, f in enumerate(order):
            Image.fromarray(f).save(d / name / f"frame_{i}.png")
    Image.fromarray(rng.integers(0, 256, (84, 140, 3), dtype=np.uint8)).save(d / "img.png")
    (d / "cache").mkdir()
    return SimpleNamespace(dir=d, clip=d / "clip.mp4", frames=d / "frames", image=d / "img.png")


class Work:
    def __init__(self, root: Path, kind: str, media: SimpleNamespace):
        from transformers import AutoTokenizer

        self.kind, self.dir, self.media = kind, root, media
        self.model = tiny_qwen(kind, vo_std=0.1)
        save_tiny_qwen(self.model, root / "hf")
        r = self.command("convert", root / "hf", root / "ckpt", "--dtype", "float32")
        assert r.returncode == 0, r.stderr
        self.tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir())

    def command(self, *argv: str | Path) -> subprocess.CompletedProcess:
        """The installed command, CPU, with this module's compile cache (its calls share
        shapes: a clip and its folder, 8 and 7 frames)."""
        env = {**ENV, "SPARSEVLM_COMPILE_CACHE": str(self.media.dir / "cache")}
        return subprocess.run([SCRIPT, *map(str, argv)], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    def ours(self, *args: str | Path) -> list[int]:
        r = self.command("generate", "--model", self.dir / "ckpt", "--max-new-tokens", NEW_TOKENS,
                         "--json", *args)  # fmt: skip
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["token_ids"]

    def inputs(self, video: Path | None, frames: int = FRAMES, image: Path | None = None,
               question: str = QUESTION, fps: float | None = None) -> dict:  # fmt: skip
        """transformers' inputs for our decoded frames (and the image first, as the command
        orders them); Qwen2.5: `second_per_grid_ts` from the clip's metadata (`fps` overrides
        the sampled frame rate)."""
        pil = [Image.open(image).convert("RGB")] if image else []
        clips, rates = [], []
        if video is not None:
            v = load_video(video, frames)
            clips.append(v.frames)
            rates.append(fps or sampled_fps(video, v.indices))
        timed = self.kind == "qwen2_5_vl" and video is not None
        return hf_inputs(self.tokenizer, pil, question, videos=clips,
                         video_fps=rates if timed else None)  # fmt: skip

    def hf_tokens(self, *args, **kw) -> list[int]:
        return hf_greedy(self.model, self.inputs(*args, **kw), NEW_TOKENS)


def sampled_fps(video: Path, indices) -> float:
    """transformers' `VideoMetadata.sampled_fps` of the sampled frames: for a file, the
    stream's frame count and average rate as transformers' PyAV reader takes them. A folder
    of frames has no rate: ours takes the sampled frames as DEFAULT_FPS apart
    (`seconds_per_grid`), which the test hands transformers (given frames without metadata,
    transformers would assume 24 fps)."""
    from transformers.video_utils import VideoMetadata

    if video.is_dir():
        return VideoMetadata(total_num_frames=len(indices), fps=DEFAULT_FPS,
                             frames_indices=list(range(len(indices)))).sampled_fps  # fmt: skip
    with av.open(str(video)) as c:
        s = c.streams.video[0]
        total, rate = s.frames, float(s.average_rate)
    return VideoMetadata(total_num_frames=total, fps=rate, frames_indices=list(indices)).sampled_fps


@pytest.fixture(scope="module")
def works(media, tmp_path_factory):
    """kind -> its Work, each made once for the module."""
    made: dict[str, Work] = {}

    def get(kind: str) -> Work:
        if kind not in made:
            made[kind] = Work(tmp_path_factory.mktemp(kind), kind, media)
        return made[kind]

    return get


@pytest.fixture(params=KINDS)
def work(request, works):
    return works(request.param)


def test_clip_sampling_and_video_budget_come_through_conversion(work, media):
    import sparsevlm_jax
    from sparsevlm_jax.qwen_processor import seconds_per_grid

    v = load_video(media.clip, FRAMES)
    assert (v.total_frames, v.fps, list(v.indices)) == (CLIP_FRAMES, FPS, [0, 1, 3, 4, 6, 7, 9, 10])
    assert seconds_per_grid(v, 2) == pytest.approx(0.75)
    # the converted checkpoint keeps the video processor's pixel budget (56² .. 256 · 28²)
    cfg = json.loads((work.dir / "ckpt" / "video_preprocessor_config.json").read_text())
    assert cfg["size"] == {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 256}
    settings = sparsevlm_jax.load(work.dir / "ckpt").processor.settings
    assert (settings.video_min_pixels, settings.video_max_pixels) == (56 * 56, 28 * 28 * 256)


def test_the_answer_depends_on_the_frames(work, media):
    """Not blind: the reversed frames give transformers other greedy tokens."""
    assert work.hf_tokens(media.frames) != work.hf_tokens(media.dir / "reversed")


@pytest.mark.parametrize("source", ["clip", "frames"])
def test_video_gives_transformers_greedy_tokens(work, media, source):
    path = getattr(media, source)
    want = work.hf_tokens(path)
    assert work.inputs(path)["video_grid_thw"].tolist() == [[FRAMES // 2, 8, 12]]
    assert work.ours("--video", path, "--frames", FRAMES, "--prompt", QUESTION) == want


def test_image_and_video_in_one_prompt(work, media):
    want = work.hf_tokens(media.clip, image=media.image, question=BOTH)
    got = work.ours("--image", media.image, "--video", media.clip, "--frames", FRAMES,
                    "--prompt", BOTH)  # fmt: skip
    assert got == want


def test_odd_frame_count_repeats_the_last_frame(work, media):
    """--frames 7: 7 frames, the last repeated to fill the fourth temporal pair, as
    transformers' patchify does (grid t = 4, the same token count as 8 frames)."""
    inputs = work.inputs(media.clip, frames=7)
    assert inputs["video_grid_thw"].tolist() == [[4, 8, 12]]
    if work.kind == "qwen2_5_vl":  # 7 frames span the same 3 s: 0.857 s per pair
        assert float(inputs["second_per_grid_ts"][0]) == pytest.approx(2 * CLIP_FRAMES / FPS / 7)
    want = hf_greedy(work.model, inputs, NEW_TOKENS)
    assert work.ours("--video", media.clip, "--frames", 7, "--prompt", QUESTION) == want


def test_video_time_positions(work, media):
    """Our (t, h, w) positions equal transformers' get_rope_index given our
    `second_per_grid_ts`; on Qwen2.5 they differ from Qwen2-VL's time rule (step 1), and so do
    transformers' greedy tokens."""
    import sparsevlm_jax

    pipe = sparsevlm_jax.load(work.dir / "ckpt")
    batch, _ = pipe.processor([load_video(media.clip, FRAMES)], [QUESTION])
    valid = np.concatenate([np.asarray(batch.prefix_mask[0]), np.asarray(batch.region_valid()[0]),
                            np.asarray(batch.text_mask[0])])  # fmt: skip
    ours = np.asarray(batch.positions[0])[valid]
    inputs = work.inputs(media.clip)
    rope = {k: inputs.get(k) for k in ("video_grid_thw", "second_per_grid_ts")}
    theirs, _ = work.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                **rope)  # fmt: skip
    assert ours.tolist() == theirs[:, 0].T.tolist()
    video = (inputs["input_ids"][0] == VIDEO_PAD).numpy()
    start = int(ours[np.argmax(video)][1])  # the first video token's row position
    times = sorted({int(t) - start for t in ours[video, 0]})
    if work.kind == "qwen2_vl":
        assert times == [0, 1, 2, 3]
        return
    assert times == [0, 1, 3, 4]  # 2 tokens/s * 0.75 s per pair = 1.5 per step, floored
    step_one = work.inputs(media.clip, fps=4.0)  # 2 frames / 4 fps = 0.5 s per pair: step 1
    rope["second_per_grid_ts"] = step_one["second_per_grid_ts"]
    qwen2_rule, _ = work.model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], **rope
    )
    step_one_times = {int(t) - start for t in qwen2_rule[0, 0, torch.from_numpy(video)]}
    assert sorted(step_one_times) == [0, 1, 2, 3]
    assert hf_greedy(work.model, step_one, NEW_TOKENS) != work.hf_tokens(media.clip)


def test_corrupt_video_is_one_line(works, media):
    """A corrupt mp4 on a Qwen model: one line, exit 2 (`--frames 0` is refused the same way,
    before the model is read; tests/test_llava_next_video.py checks it)."""
    work = works("qwen2_5_vl")
    (media.dir / "garbage.mp4").write_bytes(os.urandom(2000))
    r = work.command("generate", "--model", work.dir / "ckpt", "--prompt", QUESTION,
                     "--video", media.dir / "garbage.mp4")  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "garbage.mp4" in r.stderr, r.stderr
    assert r.stdout == ""


# --- pruning: every method's decisions equal the reference's ---------------------------------

METHODS = {  # name -> (layers, shared kwargs of SparseConfig and RefSparseParams)
    "v1": ((1, 2), {"method": "v1", "scale": 2.0}),
    "v1_5": ((1, 2), {"method": "v1_5", "schedule": (300, 120), "schedule_tokens": 576}),
    "v2_0": ((1, 2), {"method": "v2_0", "schedule": (300, 120), "schedule_tokens": 576}),
    "fastv": ((1,), {"method": "fastv", "fastv_ratio": 0.5}),
    "random": ((1, 2), {"method": "random", "schedule": (300, 120), "schedule_tokens": 576}),
}
EXAMPLES = ((None, QUESTION), ("image", BOTH))  # a video prompt; an image and a video


@pytest.fixture(scope="module")
def pipe(works):
    import sparsevlm_jax

    return sparsevlm_jax.load(works("qwen2_5_vl").dir / "ckpt")


@pytest.mark.parametrize("method", list(METHODS))
def test_methods_match_reference_on_video(works, media, pipe, method):
    """On Qwen2.5-VL (its video time positions scaled; Qwen2-VL's pruning runs the same code
    on step-1 positions): a batch of a video prompt (96 visual tokens) and an image and a
    video (111)."""
    from sparsevlm_jax import reference as ref
    from sparsevlm_jax.sparse.config import SparseConfig

    work = works("qwen2_5_vl")

    layers, kw = METHODS[method]
    sparse = SparseConfig(layers=layers, capacity="exact", **kw)
    video = load_video(media.clip, FRAMES)
    items = [[video], [Image.open(media.image).convert("RGB"), video]]
    out = pipe.generate(items, [q for _, q in EXAMPLES], sparse=sparse,
                        max_new_tokens=NEW_TOKENS, batch_size=2)  # fmt: skip
    for o, (image, q) in zip(out, EXAMPLES, strict=True):
        inputs = work.inputs(media.clip, image=media.image if image else None, question=q)
        toks, r = ref.reference_generate(
            work.model, inputs["input_ids"], inputs.get("pixel_values"),
            ref.RefSparseParams(layers=layers, **kw), max_new_tokens=NEW_TOKENS,
            image_grid_thw=inputs.get("image_grid_thw"),
            pixel_values_videos=inputs["pixel_values_videos"],
            video_grid_thw=inputs["video_grid_thw"],
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
        )  # fmt: skip
        visual = FRAMES // 2 * PER_PAIR + (15 if image else 0)  # the 84x140 image: 3x5
        assert o.stats["visual_tokens"] == visual
        assert assert_reference_decisions(o.stats, r, method) == len(r.prunes), method
        if method != "random":
            assert o.token_ids == (toks[: toks.index(IM_END)] if IM_END in toks else toks)


def test_frames_kept_counts_a_token_for_each_frame_of_its_pair(works, media, pipe):
    """generate's per-frame statistics on Qwen-VL: a token stands for a pair of frames (with
    7 frames the last pair holds frame 6 only) and counts for each of them."""
    from sparsevlm_jax.cli.generate import frame_map
    from sparsevlm_jax.eval.stats import frames_kept
    from sparsevlm_jax.sparse.config import SparseConfig

    layers, kw = METHODS["v1_5"]
    video = load_video(media.clip, 7)
    items = [[video], [Image.open(media.image).convert("RGB"), video]]
    out = pipe.generate(items, [q for _, q in EXAMPLES], max_new_tokens=NEW_TOKENS, batch_size=2,
                        sparse=SparseConfig(layers=layers, capacity="exact", **kw))  # fmt: skip
    owner = frame_map(pipe, items[1])
    pairs = [(0, 1), (2, 3), (4, 5), (6,)]
    assert owner == [None] * 15 + [f for f in pairs for _ in range(PER_PAIR)]
    per_frame = frames_kept(out[1].stats["layers"], owner, 7)
    kept = [k - 15 for k in out[1].stats["layers"][0]["kept"] if k >= 15]
    by_pair = [sum(k // PER_PAIR == g for k in kept) for g in range(4)]
    assert per_frame[0] == [by_pair[g // 2] for g in range(7)] and sum(by_pair) > 0
