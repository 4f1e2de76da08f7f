"""Video input: N frames sampled uniformly from a video file or a folder of frame images.

`load_video` returns the sampled frames as RGB PIL images (a `Video`), ready for the image
preprocessing of `sparsevlm_jax.images`; which frames are taken is `sample_indices`, the rule of
transformers' video processors. Video files are decoded with PyAV (`av`, imported only when a
video file is read), sequentially from the start, keeping only the sampled frames in memory.
Every bad input raises `InputError` with one line naming the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sparsevlm_jax.errors import InputError
from sparsevlm_jax.images import load_image

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".webm", ".avi", ".mkv")  # tested; FFmpeg reads more
FRAME_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Video:
    """The sampled frames of one clip.

    Attributes:
      frames: num_frames RGB images, all of the clip's size, in clip order. A frame sampled twice
        (clips shorter than num_frames) is the same image object twice.
      indices: num_frames indices into the clip (0-based, non-decreasing): `frames[k]` is the
        clip's frame `indices[k]`.
      total_frames: the number of frames in the clip (decoded frames, or images in the folder).
      source: the path it was read from.
      fps: the video stream's average frame rate; None for a folder of frames or when the
        container does not say.
    """

    frames: tuple[Image.Image, ...]
    indices: tuple[int, ...]
    total_frames: int
    source: str
    fps: float | None

    def __post_init__(self) -> None:
        if len(self.frames) != len(self.indices):
            raise ValueError(f"{len(self.frames)} frames but {len(self.indices)} indices")

    @property
    def num_frames(self) -> int:
        """Number of sampled frames, `len(frames)`."""
        return len(self.frames)


def sample_indices(total: int, num_frames: int) -> list[int]:
    """`num_frames` frame indices spread uniformly over a clip of `total` frames.

    Frame k of the sample is clip frame `k * total // num_frames` (k = 0 .. num_frames - 1): the
    clip is cut into num_frames equal spans and the first frame of each is taken, so frame 0 is
    always in and the last frame only when num_frames == total. This is transformers'
    `video_utils.default_sample_indices_fn` (`np.arange(num_frames) * total_num_frames //
    num_frames`), the rule of `BaseVideoProcessor.sample_frames`, which the LLaVA-NeXT-Video and
    Video-LLaVA video processors inherit. The LLaVA-NeXT-Video / Video-LLaVA model cards write it
    `np.arange(0, total_frames, total_frames / 8).astype(int)`: the same integers, except where
    float rounding bites (e.g. total=17, num_frames=7 gives 8 indices there); the integer form
    here has no rounding.

    A clip shorter than num_frames (num_frames > total) is not refused (transformers raises a
    ValueError there): the same formula then repeats frames, each clip frame appearing
    num_frames // total or that plus one times, in order; the sample keeps its length, and so
    the model's input shapes.

    Returns:
      num_frames ints in [0, total), non-decreasing; strictly increasing when num_frames <= total.
    Raises:
      InputError: total < 1 or num_frames < 1.
    """
    if num_frames < 1:
        raise InputError(f"num_frames must be at least 1, got {num_frames}")
    if total < 1:
        raise InputError(f"cannot sample frames from a clip of {total} frames")
    return [k * total // num_frames for k in range(num_frames)]


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key ordering digit runs by value: frame_2.png before frame_10.png.

    Text between digit runs compares case-insensitively; the name itself breaks ties.
    """
    parts = re.split(r"(\d+)", name)  # text, digits, text, ...: the types line up across names
    return (tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), name)


def frame_files(folder: str | os.PathLike) -> list[str]:
    """The frame images of a folder, in natural order of their file names (`natural_key`).

    Frame images are the files whose suffix (any case) is one of `FRAME_SUFFIXES`; hidden files
    (names starting with ".", e.g. macOS' "._frame.png") and subfolders are skipped.

    Returns:
      paths (folder joined with the file name).
    Raises:
      InputError: the folder cannot be listed or holds no frame image.
    """
    name = os.fspath(folder)
    try:
        with os.scandir(name) as entries:
            files = [
                e.name
                for e in entries
                if not e.name.startswith(".")
                and os.path.splitext(e.name)[1].lower() in FRAME_SUFFIXES
                and e.is_file()
            ]
    except OSError as e:
        raise InputError(f"{name}: cannot list the frame folder ({e.strerror})") from None
    if not files:
        kinds = ", ".join(FRAME_SUFFIXES)
        raise InputError(f"{name}: no frame images in the folder (looked for {kinds})")
    return [os.path.join(name, f) for f in sorted(files, key=natural_key)]


def load_video(path: str | os.PathLike, num_frames: int) -> Video:
    """Reads `num_frames` frames of a video file or a folder of frame images.

    Args:
      path: a video file (mp4, webm, avi, mkv, or anything else FFmpeg decodes that has a video
        stream; its first video stream is read) or a folder of frame images, one frame per file,
        ordered by `frame_files` (natural sort of the names).
      num_frames: how many frames to sample (`sample_indices`).
    Returns:
      a `Video` with num_frames RGB frames.
    Raises:
      InputError: (one line, naming the path) num_frames < 1; missing path; a single image file;
        a file FFmpeg cannot read (corrupt, truncated, not a video); no video stream (e.g.
        audio only); no decodable frame; a folder without frame images; a corrupt frame image;
        frame images of different sizes. Only the sampled frames are decoded as images, so a
        broken frame that is not sampled goes unnoticed in a folder.
    """
    name = os.fspath(path)
    if num_frames < 1:
        raise InputError(f"{name}: num_frames must be at least 1, got {num_frames}")
    if not os.path.exists(name):
        raise InputError(f"{name}: no such video file or frame folder")
    if os.path.isdir(name):
        return _load_frame_folder(name, num_frames)
    if os.path.splitext(name)[1].lower() in FRAME_SUFFIXES:
        raise InputError(f"{name}: is an image, not a video (pass a folder of frame images)")
    return _load_video_file(name, num_frames)


def _load_frame_folder(name: str, num_frames: int) -> Video:
    """A folder of frame images; only the sampled images are opened."""
    files = frame_files(name)
    indices = sample_indices(len(files), num_frames)
    loaded: dict[int, Image.Image] = {}
    for i in indices:
        if i not in loaded:
            loaded[i] = load_image(files[i])  # InputError naming the file when corrupt
    first = loaded[indices[0]]
    for i, img in loaded.items():
        if img.size != first.size:
            raise InputError(
                f"{files[i]}: frame is {img.size[0]}x{img.size[1]}, but "
                f"{os.path.basename(files[indices[0]])} is {first.size[0]}x{first.size[1]} "
                "(all frames of a folder must have the same size)"
            )
    frames = tuple(loaded[i] for i in indices)
    return Video(frames, tuple(indices), len(files), name, None)


def _load_video_file(name: str, num_frames: int) -> Video:
    """A video file: one decoding pass when the container states its frame count.

    That pass decodes from the start and keeps the frames `sample_indices(stated count)` wants,
    stopping after the last of them. When the container states no count (typical of webm /
    mkv), or the stream ends before the stated count (a header that overcounts), the whole
    stream is decoded once to count its frames (each dropped at once) and a second pass keeps
    the sampled frames of the true count. Memory holds the sampled frames only, never the clip.
    """
    with _open(name) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        stated = max(int(stream.frames or 0), 0)
        if stated:
            indices = sample_indices(stated, num_frames)
            kept, total = _decode(name, container, frozenset(indices))
            if len(kept) == len(set(indices)):
                return Video(tuple(kept[i] for i in indices), tuple(indices), stated, name, fps)
        else:
            _, total = _decode(name, container, frozenset())
    if total == 0:
        raise InputError(f"{name}: the video stream has no decodable frame")
    indices = sample_indices(total, num_frames)
    with _open(name) as container:
        kept, _ = _decode(name, container, frozenset(indices))
    if len(kept) != len(set(indices)):  # the file changed between the passes
        raise InputError(f"{name}: the video changed while it was read")
    return Video(tuple(kept[i] for i in indices), tuple(indices), total, name, fps)


def _av() -> Any:
    """The `av` module (PyAV), imported on first use."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is a dependency
        raise ImportError("reading video files needs PyAV: pip install av") from e
    return av


def _ffmpeg_error(name: str, e: Exception) -> InputError:
    """One-line InputError for an FFmpeg / PyAV failure on `name`."""
    detail = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return InputError(
        f"{name}: cannot read the video; corrupt, truncated or not a video file "
        f"({' '.join(str(detail).split())})"
    )


def _open(name: str) -> Any:
    """The opened `av` container (the caller closes it).

    Raises:
      InputError: FFmpeg cannot open the file, or it has no video stream.
    """
    av = _av()
    try:
        container = av.open(name)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise _ffmpeg_error(name, e) from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        container.close()
        has = f"only {', '.join(kinds)}" if kinds else "no streams at all"
        raise InputError(f"{name}: no video stream ({has})")
    return container


def _decode(
    name: str, container: Any, wanted: Collection[int]
) -> tuple[dict[int, Image.Image], int]:
    """Decodes the container's first video stream from its start, converting the frames whose
    index is in `wanted` to RGB images; stops after the largest wanted index (an empty `wanted`
    decodes to the end, counting).

    Returns:
      (wanted index -> RGB image, for those the stream has; number of frames decoded).
    """
    av = _av()
    last = max(wanted, default=None)
    kept: dict[int, Image.Image] = {}
    count = 0
    try:
        for frame in container.decode(video=0):
            if count in wanted:
                kept[count] = frame.to_image()  # RGB
            count += 1
            if last is not None and count > last:
                break
    except (av.FFmpegError, OSError, ValueError) as e:
        raise _ffmpeg_error(name, e) from None
    return kept, count
