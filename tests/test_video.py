"""The video input layer: frame sampling, video files (PyAV) and frame folders, one-line errors.

Every clip is written here with PyAV itself: 64x48 frames whose two halves are grey levels
encoding the frame's index (robust to lossy codecs), so the frames a load returns tell which
clip frames they are.
"""

from __future__ import annotations

import dataclasses
import os

import av
import numpy as np
import pytest
from PIL import Image

from sparsevlm_jax.errors import InputError
from sparsevlm_jax.video import Video, frame_files, load_video, natural_key, sample_indices

W, H = 64, 48
RATE = 10


def pattern(i: int) -> np.ndarray:
    """Frame i (0 <= i < 30), [H, W, 3] uint8: left half grey 25 + 50 * (i // 6), right half
    grey 25 + 40 * (i % 6)."""
    a = np.empty((H, W, 3), np.uint8)
    a[:, : W // 2] = 25 + 50 * (i // 6)
    a[:, W // 2 :] = 25 + 40 * (i % 6)
    return a


def index_of(img: Image.Image) -> int:
    """The index `pattern` drew into a (possibly lossily re-encoded) frame."""
    a = np.asarray(img, np.float64)
    left = a[8:40, 4:28].mean()
    right = a[8:40, 36:60].mean()
    return round((left - 25) / 50) * 6 + round((right - 25) / 40)


def write_video(path, codec: str, n: int, container_format: str | None = None) -> str:
    """n pattern frames at RATE fps, yuv420p."""
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=RATE)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(pattern(i), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return str(path)


def write_audio(path, codec: str, container_format: str) -> str:
    """A short silent mono audio-only file."""
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=8000)
        stream.layout = "mono"
        fmt, dtype = ("s16", np.int16) if codec == "pcm_s16le" else ("fltp", np.float32)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype), format=fmt, layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return str(path)


def write_frames(folder, names: list[str]) -> str:
    """names[i] gets pattern(i) as an image (format from the suffix)."""
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(pattern(i)).save(folder / name)
    return str(folder)


def check(video: Video, indices: list[int], total: int, source: str, fps: float | None):
    assert video.indices == tuple(indices)
    assert [index_of(f) for f in video.frames] == indices
    assert all(f.mode == "RGB" and f.size == (W, H) for f in video.frames)
    assert video.num_frames == len(indices)
    assert (video.total_frames, video.source, video.fps) == (total, source, fps)


# --- sample_indices ---------------------------------------------------------------------------


def test_sample_indices_rule():
    assert sample_indices(30, 8) == [0, 3, 7, 11, 15, 18, 22, 26]  # k * 30 // 8
    assert sample_indices(10, 4) == [0, 2, 5, 7]
    assert sample_indices(7, 7) == list(range(7))  # N = total: every frame
    assert sample_indices(30, 1) == [0]  # N = 1: the first frame
    assert sample_indices(1, 1) == [0]


def test_sample_indices_repeat_frames_when_the_clip_is_short():
    assert sample_indices(3, 7) == [0, 0, 0, 1, 1, 2, 2]
    assert sample_indices(1, 4) == [0, 0, 0, 0]
    for total in range(1, 12):
        for n in range(total + 1, 30):
            idx = sample_indices(total, n)
            assert len(idx) == n and sorted(idx) == idx and set(idx) == set(range(total))


def test_sample_indices_properties_and_transformers_default():
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    for total in range(1, 70):
        for n in range(1, total + 1):
            idx = sample_indices(total, n)
            assert len(idx) == n and idx[0] == 0 and idx[-1] < total
            assert all(a < b for a, b in zip(idx, idx[1:], strict=False))
            meta = VideoMetadata(total_num_frames=total, fps=RATE)
            assert idx == default_sample_indices_fn(meta, num_frames=n).tolist()


@pytest.mark.parametrize("total,n", [(0, 1), (5, 0), (5, -1)])
def test_sample_indices_refuses(total, n):
    with pytest.raises(InputError):
        sample_indices(total, n)


# --- video files ------------------------------------------------------------------------------


def test_mp4_loads_the_sampled_frames(tmp_path):
    path = write_video(tmp_path / "clip.mp4", "libx264", 30)
    video = load_video(path, 8)
    check(video, [0, 3, 7, 11, 15, 18, 22, 26], 30, path, float(RATE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        video.fps = 1.0  # type: ignore[misc]
    check(load_video(path, 30), list(range(30)), 30, path, float(RATE))
    check(load_video(tmp_path / "clip.mp4", 1), [0], 30, path, float(RATE))  # PathLike


def test_short_clip_repeats_frames(tmp_path):
    path = write_video(tmp_path / "short.mp4", "libx264", 5)
    video = load_video(path, 8)
    check(video, [0, 0, 1, 1, 2, 3, 3, 4], 5, path, float(RATE))
    assert video.frames[0] is video.frames[1]


@pytest.mark.parametrize(
    "name,codec",
    [("clip.webm", "libvpx"), ("clip.mkv", "ffv1"), ("clip.avi", "mpeg4")],
)
def test_other_containers(tmp_path, name, codec):
    """webm / mkv state no frame count (counting pass first); avi does."""
    path = write_video(tmp_path / name, codec, 25)
    with av.open(path) as c:
        stated = c.streams.video[0].frames
    assert stated == (25 if name.endswith(".avi") else 0)
    check(load_video(path, 6), [0, 4, 8, 12, 16, 20], 25, path, float(RATE))


def test_header_that_overcounts(tmp_path, monkeypatch):
    """A container stating more frames than the stream has: recounted, sampled over the truth."""
    import types

    from sparsevlm_jax import video as video_module

    real_open = video_module._open

    class Overcounting:
        def __init__(self, name):
            self._c = real_open(name)
            s = self._c.streams.video[0]
            fake = types.SimpleNamespace(frames=40, average_rate=s.average_rate, guessed_rate=None)
            self.streams = types.SimpleNamespace(video=[fake])

        def decode(self, **kw):
            return self._c.decode(**kw)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._c.close()

    monkeypatch.setattr(video_module, "_open", Overcounting)
    path = write_video(tmp_path / "clip.mp4", "libx264", 20)
    check(load_video(path, 8), [0, 2, 5, 7, 10, 12, 15, 17], 20, path, float(RATE))


# --- frame folders ----------------------------------------------------------------------------


def test_frame_folder_natural_order(tmp_path):
    names = [f"frame_{i + 1}.png" for i in range(30)]  # frame_2 before frame_10
    folder = write_frames(tmp_path / "frames", names)
    (tmp_path / "frames" / "notes.txt").write_text("not a frame")
    (tmp_path / "frames" / "._frame_0.png").write_bytes(b"AppleDouble junk")
    (tmp_path / "frames" / "sub.png").mkdir()
    assert [os.path.basename(f) for f in frame_files(folder)] == names
    check(load_video(folder, 8), [0, 3, 7, 11, 15, 18, 22, 26], 30, folder, None)


def test_frame_folder_mixed_formats_and_short(tmp_path):
    names = ["a.JPG", "b.png", "c.webp", "d.bmp", "e.jpeg"]
    folder = write_frames(tmp_path / "frames", names)
    check(load_video(folder, 7), sample_indices(5, 7), 5, folder, None)


def test_natural_key():
    names = ["f10.png", "f02.png", "F2.png", "f1.png", "g.png", "frame.png"]
    expected = ["f1.png", "F2.png", "f02.png", "f10.png", "frame.png", "g.png"]
    assert sorted(names, key=natural_key) == expected  # F2 / f02: equal keys, name breaks ties


# --- errors -----------------------------------------------------------------------------------


def raises_one_line(path, num_frames: int = 4, *, names=None, match: str = "") -> str:
    with pytest.raises(InputError) as info:
        load_video(path, num_frames)
    message = str(info.value)
    assert "\n" not in message
    assert (names or str(path)) in message
    assert match in message
    return message


def test_num_frames_below_one(tmp_path):
    path = write_video(tmp_path / "clip.mp4", "libx264", 5)
    raises_one_line(path, 0, match="num_frames")
    raises_one_line(path, -3, match="num_frames")


def test_missing_path(tmp_path):
    raises_one_line(tmp_path / "nope.mp4", match="no such")


def test_corrupt_file(tmp_path):
    path = tmp_path / "random.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    raises_one_line(path, match="corrupt")
    empty = tmp_path / "empty.webm"
    empty.write_bytes(b"")
    raises_one_line(empty, match="corrupt")


def test_truncated_file(tmp_path):
    data = open(write_video(tmp_path / "clip.mp4", "libx264", 30), "rb").read()
    half = tmp_path / "half.mp4"
    half.write_bytes(data[: len(data) // 2])
    raises_one_line(half, match="truncated")


def test_truncated_file_index_first(tmp_path):
    """moov (the index) before the data: the file opens and decoding fails instead."""
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(25):  # noise: big frames, so half the file cuts into frame data
            a = rng.integers(0, 256, (H, W, 3), np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        out.mux(stream.encode())
    data = path.read_bytes()
    half = tmp_path / "half.mp4"
    half.write_bytes(data[: len(data) // 2])
    raises_one_line(half, 25, match="truncated")


@pytest.mark.parametrize("name,codec,fmt", [("a.wav", "pcm_s16le", "wav"), ("a.m4a", "aac", "mp4")])
def test_audio_only(tmp_path, name, codec, fmt):
    path = write_audio(tmp_path / name, codec, fmt)
    raises_one_line(path, match="no video stream (only audio)")


def test_image_file_is_not_a_video(tmp_path):
    path = tmp_path / "still.png"
    Image.fromarray(pattern(0)).save(path)
    raises_one_line(path, match="not a video")


def test_folder_without_images(tmp_path):
    raises_one_line(tmp_path, match="no frame images")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "clip.mp4").write_bytes(b"")
    raises_one_line(tmp_path, match="no frame images")


def test_corrupt_image_in_folder(tmp_path):
    folder = write_frames(tmp_path / "frames", [f"{i:03d}.png" for i in range(10)])
    bad = os.path.join(folder, "000.png")  # frame 0: always sampled
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    raises_one_line(folder, 3, names=bad)
    good = open(os.path.join(folder, "005.png"), "rb").read()
    with open(bad, "wb") as f:
        f.write(good[: len(good) // 2])  # truncated
    raises_one_line(folder, 3, names=bad, match="truncated")


def test_frames_of_different_sizes(tmp_path):
    folder = write_frames(tmp_path / "frames", ["1.png", "2.png", "3.png"])
    Image.new("RGB", (32, 32)).save(os.path.join(folder, "3.png"))
    raises_one_line(folder, 3, names=os.path.join(folder, "3.png"), match="same size")
