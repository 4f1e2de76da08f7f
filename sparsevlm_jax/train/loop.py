"""The training loop: fresh or resumed state, the two phases, validation, orbax checkpoints,
the exported models (`model/`, `best/`) and the JSONL log with its curve."""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from sparsevlm_jax import shapes_task as st
from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.params import Params, init_params
from sparsevlm_jax.processing import Processor
from sparsevlm_jax.train.batches import make_packed, train_batch
from sparsevlm_jax.train.config import TrainConfig, model_config
from sparsevlm_jax.train.curves import draw_curve
from sparsevlm_jax.train.losses import init_aux
from sparsevlm_jax.train.steps import make_optimizer, train_step, vision_step
from sparsevlm_jax.train.validation import patch_accuracy, validate


def save_tokenizer(tokenizer: Any, out: Path) -> dict[str, Path]:
    """Saves the tokenizer under out/tokenizer; {file name: path} for `checkpoint.save`."""
    d = out / "tokenizer"
    tokenizer.save_pretrained(d)
    return {p.name: p for p in sorted(d.iterdir()) if p.is_file()}


def export_model(
    params: Params, cfg: LlavaConfig, tokenizer_files: dict[str, Path], dest: Path
) -> Path:
    """Writes the model in our checkpoint format (float32) with the tokenizer files."""
    from sparsevlm_jax.checkpoint import save

    host = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    return save(dest, host, cfg, extra_files=tokenizer_files, overwrite=True)


def init_from(path: str | Path, cfg: LlavaConfig) -> Params:
    """The float32 params of a model in our checkpoint format, checked against `cfg`."""
    from sparsevlm_jax.checkpoint import load

    params, saved = load(path, dtype="float32")
    if saved.replace(param_dtype=cfg.param_dtype, dtype=cfg.dtype) != cfg:
        raise ValueError(f"{path}: its model config differs from the preset being trained")
    return params


def restore_or_init(
    mgr: Any, cfg: LlavaConfig, tc: TrainConfig, opt: optax.GradientTransformation, resume: bool
) -> tuple[dict[str, Any], int]:
    """(state, first step): the latest checkpoint with `resume`, else a fresh init (whose
    params come from `tc.init_from` when set)."""
    import orbax.checkpoint as ocp

    params = init_from(tc.init_from, cfg) if tc.init_from else init_params(cfg, seed=tc.seed)
    aux = init_aux(cfg, tc.seed)
    state = {"params": params, "aux": aux, "opt_state": opt.init({"params": params, "aux": aux})}
    latest = mgr.latest_step() if resume else None
    if latest is None:
        return state, 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = mgr.restore(latest, args=ocp.args.StandardRestore(abstract))
    return restored, int(latest)


def train(
    out: str | Path,
    tc: TrainConfig,
    resume: bool = False,
    log_dir: str | Path | None = None,
    progress: bool = True,
    max_minutes: float | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged record."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "train_config.json"
    if resume and cfg_path.exists():
        saved = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
        tc = dataclasses.replace(saved, steps=tc.steps)
    cfg_path.write_text(json.dumps(dataclasses.asdict(tc), indent=2) + "\n")
    log_dir = Path(log_dir) if log_dir else out
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{out.name}.jsonl"

    tokenizer = st.build_tokenizer()
    tok_files = save_tokenizer(tokenizer, out)
    cfg = model_config(tc.preset, tokenizer)
    processor = Processor.from_pretrained(out / "tokenizer", cfg)
    opt = make_optimizer(tc)
    opt_vision = make_optimizer(tc, "vision")
    mgr = ocp.CheckpointManager(
        out / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    )
    state, start = restore_or_init(mgr, cfg, tc, opt, resume)
    records = [json.loads(x) for x in log_path.read_text().splitlines()] if resume else []
    records = [r for r in records if r["step"] <= start]
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    val_batches = [
        make_packed(processor, "val", list(range(i, i + 16)), st.CATEGORIES, cfg)
        for i in range(0, tc.val_images, 16)
    ]
    best = max([r["val_overall"] for r in records if "val_overall" in r] + [-1.0])
    t0 = time.time()
    last: dict[str, Any] = {}
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=not progress)
    # Batches are built in a thread while XLA runs the previous step (it releases the GIL).
    pool = ThreadPoolExecutor(max_workers=1)
    ahead = {s: pool.submit(train_batch, processor, cfg, tc, s) for s in range(start, start + 2)}
    for step in bar:
        batch = ahead.pop(step).result().device()
        if step + 2 < tc.steps:
            ahead[step + 2] = pool.submit(train_batch, processor, cfg, tc, step + 2)
        vision = step < tc.vision_steps
        if step == tc.vision_steps and step > 0:  # phase 2 starts with a fresh optimizer
            state["opt_state"] = opt.init({"params": state["params"], "aux": state["aux"]})
        if vision:
            state, metrics = vision_step(state, batch, cfg, opt_vision)
        else:
            state, metrics = train_step(state, batch, cfg, opt, tc.aux_weight, tc.attn_weight)
        done = step + 1
        rec: dict[str, Any] = {"step": done, **{k: float(v) for k, v in metrics.items()}}
        rec["seconds"] = time.time() - t0
        bar.set_postfix({k: f"{v:.3f}" for k, v in rec.items() if k.endswith("loss")})
        stop = max_minutes is not None and rec["seconds"] > max_minutes * 60
        if done % tc.eval_every == 0 or done == tc.steps or stop:
            acc = np.mean(
                [
                    np.asarray(patch_accuracy(state["aux"], state["params"], cfg, vb.device()))
                    for vb in val_batches
                ],
                axis=0,
            )
            rec["val_patch_color"], rec["val_patch_shape"] = float(acc[0]), float(acc[1])
            if not vision:
                rec.update(validate(state["params"], cfg, val_batches))
            bar.write(json.dumps({k: round(v, 4) for k, v in rec.items()}))
            if rec.get("val_overall", -1.0) > best:
                best = rec["val_overall"]
                export_model(state["params"], cfg, tok_files, out / "best")
        records.append(rec)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if done % tc.save_every == 0 or done == tc.steps or stop:
            mgr.save(done, args=ocp.args.StandardSave(state))
            mgr.wait_until_finished()
            export_model(state["params"], cfg, tok_files, out / "model")
            draw_curve(records, log_dir / f"{out.name}.png")
        last = rec
        if stop:
            break
    pool.shutdown(cancel_futures=True)
    mgr.close()
    return last
