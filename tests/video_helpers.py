"""Helpers shared by the video families' end-to-end tests (LLaVA-NeXT-Video, Video-LLaVA):
the installed command, a clip written with PyAV, transformers' video inputs built by hand
(its video processors need torchvision) and its greedy tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sparsevlm_jax.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from sparsevlm_jax.video import load_video

SCRIPT = str(Path(sys.executable).with_name("sparsevlm"))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
QUESTION = "What happens in the video?"
EOS = 2


def sparsevlm(*argv: str | Path) -> subprocess.CompletedProcess:
    """The installed `sparsevlm` command, CPU, captured."""
    return subprocess.run(
        [SCRIPT, *map(str, argv)], env=ENV, capture_output=True, text=True, timeout=300
    )


def write_mp4(path: Path, frames: np.ndarray, fps: int = 10) -> None:
    """frames [T, H, W, 3] uint8 -> an mp4 at `fps` (h264 when available, else mpeg4)."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def video_pixels(path: Path, frames: int):
    """[1, frames, 3, S, S] torch: our decoded frames (at the tower's size), normalised as
    the families' video processors do."""
    import torch

    clip = np.stack([np.asarray(f, np.float32) / 255.0 for f in load_video(path, frames).frames])
    x = (clip - np.asarray(OPENAI_CLIP_MEAN)) / np.asarray(OPENAI_CLIP_STD)
    return torch.tensor(x.astype(np.float32)).permute(0, 3, 1, 2)[None]


def until_eos(ids: list[int]) -> list[int]:
    """What `Result.token_ids` holds: the tokens before the first EOS."""
    return ids[: ids.index(EOS)] if EOS in ids else ids


def hf_greedy_tokens(model, inputs: dict, new_tokens: int) -> list[int]:
    """transformers' greedy tokens for prepared inputs (exactly `new_tokens`, cut at EOS)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    return until_eos(out[0, inputs["input_ids"].shape[1] :].tolist())


def ours(model_dir: Path, new_tokens: int, *args: str | Path) -> list[int]:
    """`sparsevlm generate --json`'s token ids (llava_hf template)."""
    r = sparsevlm("generate", "--model", model_dir, "--template", "llava_hf",
                  "--max-new-tokens", new_tokens, "--json", *args)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["token_ids"]


METHODS = ["v1", "v1_5", "v2_0", "fastv", "random", "video"]  # video: the authors' setting


def method_under_test(method: str):
    """(SparseConfig, the reference's RefSparseParams) of a method as the video tests run it:
    exact capacity, pruning at layers 1-3 (FastV and the authors' video setting: layer 1),
    fixed schedules written for 576 tokens scaled per example (SPEC §9.3)."""
    from sparsevlm_jax import reference as ref
    from sparsevlm_jax.sparse.config import SparseConfig, authors_video_config

    layers = (1, 2, 3) if method not in ("fastv", "video") else (1,)
    kw = dict(method=method, layers=layers)
    if method in ("v1_5", "v2_0", "random"):
        kw.update(schedule=(200, 100, 50), schedule_tokens=576)
    if method == "v1":
        kw.update(scale=2.0)
    if method == "video":  # SPEC §9.6: layer 1, k = min(rank, V - 1), recycling
        kw.update(method="v1", scale=1.0, bias=0.0)
        sparse = authors_video_config(capacity="exact")
        assert sparse == SparseConfig(capacity="exact", **kw).replace(preset="video")
        assert sparse.name == "video"
    else:
        sparse = SparseConfig(capacity="exact", **kw)
    return sparse, ref.RefSparseParams(**kw)
