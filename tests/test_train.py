"""The training script on a tiny config: packed forward == prefill, steps, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from sparsevlm_jax import shapes_task as st
from sparsevlm_jax import train as tr
from sparsevlm_jax.batch import make_batch
from sparsevlm_jax.checkpoint import load
from sparsevlm_jax.model.llava import prefill
from sparsevlm_jax.params import init_params
from sparsevlm_jax.processing import Processor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("tok")
    tok = st.build_tokenizer()
    tok.save_pretrained(d)
    cfg = tr.model_config("tiny", tok)
    return cfg, Processor.from_pretrained(d, cfg)


def test_packed_blocks_equal_lone_prompts(tiny) -> None:
    """Every question block of a packed sequence computes what `prefill` does on its prompt."""
    cfg, proc = tiny
    tc = tr.TrainConfig(preset="tiny", images_per_batch=2, questions_per_image=4)
    pb = tr.train_batch(proc, cfg, tc, step=0)
    params = init_params(cfg, seed=1, std=0.2)
    logits, _ = tr.packed_forward(params, cfg, pb.device())
    for r in range(2):
        for j in (0, 3):
            ids = pb.block_ids[r, j][pb.block_valid[r, j]]
            text = [int(i) for i in ids[:-2]]  # drop the answer and EOS
            batch, _ = make_batch([list(pb.prefix_ids)], [text], pb.pixel_values[r : r + 1])
            want, _ = prefill(params, cfg, batch, 1)
            got = logits[r, j, len(text) - 1]
            np.testing.assert_allclose(np.asarray(got), np.asarray(want[0]), atol=1e-4)


def test_packed_batch_targets(tiny) -> None:
    cfg, proc = tiny
    tc = tr.TrainConfig(preset="tiny", images_per_batch=2, questions_per_image=4)
    pb = tr.train_batch(proc, cfg, tc, step=5)
    assert (pb.targets >= 0).sum(axis=-1).tolist() == [[2] * 4] * 2  # answer word + EOS
    eos = proc.tokenizer.eos_token_id
    assert (pb.targets == eos).sum() == 8
    assert pb.patch_labels.shape == (2, cfg.vision.num_patches, 4)
    # Deterministic per step.
    again = tr.train_batch(proc, cfg, tc, step=5)
    np.testing.assert_array_equal(pb.block_ids, again.block_ids)
    np.testing.assert_array_equal(pb.pixel_values, again.pixel_values)


def test_two_steps_checkpoint_and_resume(tmp_path: Path) -> None:
    tc = tr.TrainConfig(
        preset="tiny",
        steps=2,
        images_per_batch=2,
        questions_per_image=4,
        save_every=2,
        eval_every=2,
        val_images=4,
    )
    out = tmp_path / "run"
    last = tr.train(out, tc, log_dir=tmp_path / "logs", progress=False)
    assert last["step"] == 2
    assert math.isfinite(last["loss"]) and math.isfinite(last["aux_loss"])
    assert 0.0 <= last["val_overall"] <= 1.0
    assert (tmp_path / "logs" / "run.png").is_file()
    # The exported model restores with the trained weights.
    params, cfg = load(out / "model")
    assert cfg.text.num_hidden_layers == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert (out / "model" / "tokenizer.json").is_file()
    # Resume continues the step count from the checkpoint.
    more = dataclasses.replace(tc, steps=3)
    last = tr.train(out, more, resume=True, log_dir=tmp_path / "logs", progress=False)
    assert last["step"] == 3
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "logs" / "run.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3]
