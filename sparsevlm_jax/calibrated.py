"""Calibrated capacities: measured on a calibration set, stored beside a checkpoint, and the
default capacity policy they imply.

`calibrate` runs a method in `exact` mode over some inputs, records per pruning layer how many
tokens were kept and recycled, and returns a `static` SparseConfig whose capacities hold a chosen
percentile of what was observed. Inputs whose budget exceeds a capacity later report it as
overflow (kept) or recycled_overflow (recycled) in the prefill statistics. It runs the prefill,
so it lives here, above the pruning (`sparse/`) and the generation (`prefill`) it drives.

`sparse_defaults.json` in a model directory (written by `sparsevlm calibrate`, or by
`shapes_task.write_sparse_defaults` for the bundled model) holds SparseVLM v1's static
capacities per named budget:

    {"method": "v1", "percentile": 100.0, "calibration": "64 questions of q.jsonl",
     "192": {"layers": [2, 6, 15, 19], "capacities": [...], "recycled_capacities": [...]},
     "128": {...}, ...}

The default capacity policy (DESIGN.md, "Capacity policies"; `default_capacity`):
  * fixed-schedule methods (v1.5, v2.0, random) and FastV keep the static capacities of their
    schedule: they never overflow and waste nothing;
  * v1 at a named budget runs `static` with the calibrated capacities when the file has an
    entry for that budget whose pruning layers are the config's;
  * any other v1 runs `bucketed` (stage by stage, each stage compiled for the batch's largest
    budget rounded up to a bucket: exact decisions, compute close to the kept count);
  * `exact` saves nothing and is never a default: parity tests ask for it.
An entry whose layers differ from the config's was calibrated for another pruning schedule, so
it is never applied: by default the run falls back to `bucketed` and a note says why; when
`static` is asked for explicitly (`calibrated_capacity`) it is an error.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sparsevlm_jax.config import LlavaConfig
from sparsevlm_jax.errors import InputError
from sparsevlm_jax.sparse.config import SparseConfig

if TYPE_CHECKING:  # batch.py (like the prefill) imports JAX: only `calibrate` needs it
    from sparsevlm_jax.batch import Batch

SPARSE_DEFAULTS_FILE = "sparse_defaults.json"
CALIBRATED_METHOD = "v1"  # the rank-adaptive method: the only one whose capacities vary


@dataclass(frozen=True)
class Calibrated:
    """One budget's entry: pruning layers and the static capacities measured at them."""

    layers: tuple[int, ...]
    capacities: tuple[int, ...]
    recycled_capacities: tuple[int, ...]

    def apply(self, sparse: SparseConfig) -> SparseConfig:
        """`sparse` with these capacities and the `static` policy."""
        return sparse.replace(
            capacity="static",
            capacities=self.capacities,
            recycled_capacities=self.recycled_capacities,
        )


def calibrate(
    params: dict,
    cfg: LlavaConfig,
    sparse: SparseConfig,
    batches: Iterable[tuple[Batch, int]],
    percentile: float = 100.0,
) -> SparseConfig:
    """A `static` copy of `sparse` with capacities from the observed kept / recycled counts.

    Args:
      batches: (batch, number of real rows) pairs, e.g. from `Processor.__call__`.
      percentile: of the observed counts per layer (100 = never overflow on this set).
    Returns:
      `sparse` with capacity="static", capacities and recycled_capacities set (each >= 1).
    """
    from sparsevlm_jax.prefill import prefill_jit  # JAX: loaded only when calibrating

    exact = sparse.replace(capacity="exact", capacities=(), recycled_capacities=())
    kept, recycled = [], []
    for batch, n in batches:
        _, _, stats = prefill_jit(params, batch, cfg, exact, 1)
        kept.append(np.asarray(stats["num_kept"])[:n])
        recycled.append(np.asarray(stats["recycled"])[:n])
    if not kept:
        raise ValueError("calibration needs at least one batch")

    def cap(counts: list[np.ndarray]) -> tuple[int, ...]:
        values = np.percentile(np.concatenate(counts), percentile, axis=0, method="higher")
        return tuple(max(int(v), 1) for v in values)

    return sparse.replace(
        capacity="static", capacities=cap(kept), recycled_capacities=cap(recycled)
    )


def sparse_defaults_path(model: str | os.PathLike) -> Path:
    """Where the calibrated capacities of the model directory `model` live."""
    return Path(model) / SPARSE_DEFAULTS_FILE


def read_sparse_defaults(model: str | os.PathLike) -> dict[int, Calibrated]:
    """The calibrated v1 entries beside `model`, by named budget; {} when there is no file.

    Raises:
      InputError: the file exists but is not valid JSON of the format above.
    """
    path = sparse_defaults_path(model)
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable calibration file ({e})") from None
    if not isinstance(d, dict):
        raise InputError(f"{path}: expected a JSON object")
    if d.get("method", CALIBRATED_METHOD) != CALIBRATED_METHOD:
        return {}
    return {int(k): _entry(path, k, v) for k, v in d.items() if k.isdigit()}


def _entry(path: Path, budget: str, v: Any) -> Calibrated:
    def ints(key: str, least: int) -> tuple[int, ...]:
        x = v.get(key) if isinstance(v, dict) else None
        if not isinstance(x, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= least for i in x
        ):
            raise InputError(
                f"{path}: budget {budget}: {key!r} must be a list of integers >= {least}"
            )
        return tuple(x)

    entry = Calibrated(ints("layers", 0), ints("capacities", 1), ints("recycled_capacities", 1))
    if not len(entry.layers) == len(entry.capacities) == len(entry.recycled_capacities):
        raise InputError(f"{path}: budget {budget}: one capacity per pruning layer needed")
    return entry


def calibrated_entry(sparse: SparseConfig, model: str | os.PathLike | None) -> Calibrated | None:
    """The file's entry for `sparse`'s method and named budget (layers not yet compared)."""
    if model is None or sparse.method != CALIBRATED_METHOD or sparse.budget_name is None:
        return None
    return read_sparse_defaults(model).get(sparse.budget_name)


def _layers_note(sparse: SparseConfig, entry: Calibrated, model: str | os.PathLike) -> str:
    return (
        f"{sparse_defaults_path(model)}: the {sparse.name} capacities were calibrated for "
        f"pruning layers {','.join(map(str, entry.layers))}, not "
        f"{','.join(map(str, sparse.layers))}"
    )


def default_capacity(
    sparse: SparseConfig, model: str | os.PathLike | None
) -> tuple[SparseConfig, str | None]:
    """`sparse` under the default capacity policy (module docstring), and a note or None.

    `sparse` is a config whose capacity the user did not choose: a fixed-schedule or FastV
    preset is returned unchanged; v1 gets the calibrated capacities stored beside `model`
    when they fit, else `bucketed`. The note (for the user, one line) says why calibrated
    capacities that exist were not used.
    """
    if sparse.method != CALIBRATED_METHOD:
        return sparse, None
    entry = calibrated_entry(sparse, model)
    if entry is not None and entry.layers == sparse.layers:
        return entry.apply(sparse), None
    bucketed = sparse.replace(capacity="bucketed", capacities=(), recycled_capacities=())
    if entry is None:
        return bucketed, None
    return bucketed, _layers_note(sparse, entry, model) + "; running bucketed instead"


def calibrated_capacity(sparse: SparseConfig, model: str | os.PathLike | None) -> SparseConfig:
    """`sparse` with the calibrated static capacities stored beside `model` (asked for
    explicitly: `--capacity static`).

    Raises:
      InputError: no entry for this method and named budget, or one for other layers.
    """
    entry = calibrated_entry(sparse, model)
    if entry is None:
        what = f"budget {sparse.budget_name}" if sparse.budget_name else "an explicit rule"
        where = sparse_defaults_path(model) if model is not None else SPARSE_DEFAULTS_FILE
        raise InputError(
            f"--capacity static: {where} has no calibrated {sparse.method} capacities for "
            f"{what} (write them with `sparsevlm calibrate`, or give one number per pruning "
            "layer, e.g. --capacity 300,200,110,60)"
        )
    if entry.layers != sparse.layers:
        raise InputError(f"--capacity static: {_layers_note(sparse, entry, model)}")
    return entry.apply(sparse)


def write_sparse_defaults(
    model: str | os.PathLike,
    calibrated: Mapping[int, SparseConfig],
    percentile: float,
    calibration: str,
) -> Path:
    """Writes `sparse_defaults.json` into `model` atomically (temporary file + rename).

    calibrated: named budget -> the `static` v1 config `calibrate` returned.
    The file is replaced as a whole: it then holds exactly these budgets.
    """
    path = sparse_defaults_path(model)
    d: dict[str, Any] = {
        "method": CALIBRATED_METHOD,
        "percentile": float(percentile),
        "calibration": calibration,
    }
    for budget, sparse in calibrated.items():
        d[str(budget)] = {
            "layers": list(sparse.layers),
            "capacities": list(sparse.capacities),
            "recycled_capacities": list(sparse.recycled_capacities),
        }
    fd, tmp = tempfile.mkstemp(prefix=f".{SPARSE_DEFAULTS_FILE}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(d, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
