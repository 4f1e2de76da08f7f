"""Our checkpoint format: an orbax tree of the parameter dict plus `config.json`.

    <path>/config.json      LlavaConfig.to_json() (param_dtype = the dtype the arrays are in)
    <path>/metadata.json    optional: how the checkpoint was made (`load_metadata`)
    <path>/params/          orbax StandardCheckpointer save of the nested dict of `params.py`
    <path>/tokenizer.model, preprocessor_config.json, ...   copied by the converter, if any

`save` is atomic: everything is written into a temporary sibling directory that is renamed
into place at the end, so a failed save leaves neither `path` nor the temporary directory.
It first checks that the file system has room for the arrays and files (`check_free_space`),
and reports a full disk, a quota, a read-only file system or no permission met while writing
as a one-line `CheckpointError` (orbax's writer threads stay quiet), not as a bug.
`load` restores into the abstract tree of `params.abstract_params`, so arrays come back as
`jax.Array`s (in the saved dtype unless asked otherwise), placed by the given shardings: each
device's shard is read from the chunks (`CHUNK_BYTES` at most) that it covers.

This module knows only this format; `convert` writes it, and `loading` (above both) opens
whatever directory a user points at, converting source checkpoints in memory.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sparsevlm_jax.config import DTYPES, LlavaConfig
from sparsevlm_jax.params import Params, abstract_params, flatten

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
# Arrays are stored in chunks of at most this many bytes (orbax / tensorstore pick the chunk
# shape, cutting the largest dimensions first), so a restore into shardings reads and decodes
# only the chunks a device's shard covers, never a whole stacked [L, ...] array at once.
CHUNK_BYTES = 16 * 2**20
# Room asked for beyond the arrays and files: orbax's metadata and the file system's blocks.
SPACE_MARGIN_BYTES = 4 * 2**20
SPACE_MARGIN_FRACTION = 0.02
# Failures of the environment while writing (full disk or quota, no permission, read-only).
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


class CheckpointError(ValueError):
    """A directory that is not a usable checkpoint; the message is one line."""


def is_checkpoint(path: str | Path) -> bool:
    """True for a directory written by `save` (our config.json beside an orbax params/)."""
    path = Path(path)
    if not (path / PARAMS_DIR).is_dir() or not (path / CONFIG_FILE).is_file():
        return False
    try:
        d = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and isinstance(d.get("text"), dict) and "vision" in d


def check_destination(path: str | Path, overwrite: bool = False) -> None:
    """Raises `CheckpointError` if `path` exists, is not an empty directory, and not `overwrite`."""
    path = Path(path)
    if not path.exists() or overwrite:
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise CheckpointError(
        f"{path}: already exists and is not empty (pass overwrite=True / --overwrite)"
    )


def save(
    path: str | Path,
    params: Params,
    cfg: LlavaConfig,
    extra_files: dict[str, Path] | None = None,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Writes `params` (nested dict of numpy or jax arrays) and `cfg` to `path`, atomically.

    Args:
        path: the checkpoint directory to create.
        params: the parameter tree of `params.py` (numpy arrays, ml_dtypes bf16 included).
        cfg: its config; `cfg.param_dtype` should name the arrays' dtype.
        extra_files: `{name in the checkpoint: source file}` copied beside the params
            (tokenizer files, preprocessor config).
        overwrite: replace an existing non-empty `path` (only once the new one is complete).
        metadata: JSON-serialisable notes written to `metadata.json` (see `load_metadata`).

    Returns:
        the absolute checkpoint path.
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    check_destination(path, overwrite)
    sizes = [int(a.nbytes) for a in jax.tree.leaves(params)]
    check_free_space(path, projected_bytes(sizes, (extra_files or {}).values()))
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with _write_errors(path), _quiet_orbax():
            with _params_checkpointer() as ckptr:
                save_args = jax.tree.map(
                    lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params
                )
                ckptr.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params, save_args=save_args))
            (tmp / CONFIG_FILE).write_text(cfg.to_json() + "\n")
            if metadata is not None:
                text = json.dumps(metadata, indent=2, sort_keys=True) + "\n"
                (tmp / METADATA_FILE).write_text(text)
            for name, src in (extra_files or {}).items():
                shutil.copyfile(src, tmp / name)
            _chmod_default(tmp)
            _commit(tmp, path, overwrite)
    except BaseException:
        _remove_tree(tmp)
        raise
    return path


def projected_bytes(array_bytes: Iterable[int], files: Iterable[str | Path] = ()) -> int:
    """The room a checkpoint of arrays of these byte sizes, plus copies of `files`, needs on
    disk: their sizes plus `SPACE_MARGIN_FRACTION` and `SPACE_MARGIN_BYTES` (metadata, blocks)."""
    total = sum(array_bytes) + sum(Path(f).stat().st_size for f in files)
    return int(total * (1 + SPACE_MARGIN_FRACTION)) + SPACE_MARGIN_BYTES


def check_free_space(path: str | Path, needed: int) -> None:
    """Raises `CheckpointError` unless the file system that will hold `path` has `needed`
    bytes free (asked of `path`'s nearest existing parent directory).

    Raises:
        CheckpointError: not enough room, with both numbers.
    """
    where = Path(path).absolute().parent
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed:
        raise CheckpointError(
            f"{path}: not enough free space for the checkpoint: it needs {_size(needed)}, "
            f"{where} has {_size(free)} free"
        )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _write_failure(e: BaseException) -> str | None:
    """`file: cause` when `e` (or what caused it) is the environment's failure to write
    (`WRITE_ERRNOS`), else None. orbax / tensorstore report the errno inside their message."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            cause = e.strerror or os.strerror(e.errno)
            return f"{e.filename}: {cause}" if e.filename else cause
        m = _OS_ERROR_CODE.search(str(e))
        if m and int(m.group(1)) in WRITE_ERRNOS:
            return os.strerror(int(m.group(1)))
        e = e.__cause__ or e.__context__
    return None


@contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """The environment's write failures inside become one-line `CheckpointError`s."""
    try:
        yield
    except Exception as e:
        cause = _write_failure(e)
        if cause is None:
            raise
        raise CheckpointError(f"{path}: cannot write the checkpoint: {cause}") from None


@contextmanager
def _quiet_orbax() -> Iterator[None]:
    """orbax logs each writer thread's failure with a traceback (through absl) before the save
    raises it; the raised error says the same once."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl.setLevel(level)


def _remove_tree(path: Path, tries: int = 5) -> None:
    """Removes a temporary directory, again if a writer was still adding files to it."""
    import time

    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.1)


def _params_checkpointer() -> Any:
    """A synchronous orbax checkpointer that writes numpy arrays without copying them first.

    orbax's default numpy handler deep-copies every host array before an (async) save, which
    doubles peak memory (27 GB for a 7B model in bf16); we save synchronously and never
    mutate the arrays, so the copy is not needed. The on-disk format is the standard one.
    """
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, th.ArrayHandler()),
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def _chmod_default(path: Path) -> None:
    """mkdtemp makes a 0700 directory; give the checkpoint the usual umask-derived mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    """Renames the finished `tmp` to `path`, moving an existing `path` aside first."""
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if not path.exists() and not path.is_symlink():
        os.replace(tmp, path)
        return
    check_destination(path, overwrite)  # something appeared while we were writing
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / "previous")
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load(
    path: str | Path, dtype: str | None = None, shardings: Any = None
) -> tuple[Params, LlavaConfig]:
    """Restores a checkpoint written by `save`.

    Args:
        path: the checkpoint directory.
        dtype: restore the weights in this dtype ("float32" | "bfloat16" | "float16");
            None keeps the saved dtype. The returned config's `param_dtype` and `dtype` follow.
        shardings: one `jax.sharding.Sharding` for every array, a tree of them matching the
            params, or None for the first local device.

    Returns:
        `(params, cfg)`: a nested dict of `jax.Array`s and the config.

    Raises:
        CheckpointError: not a checkpoint, or a tensor is missing / has the wrong shape.
    """
    import orbax.checkpoint as ocp

    path = Path(path)
    cfg = load_config(path)
    if dtype is not None:
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype)
    abstract = _with_shardings(abstract_params(cfg), shardings)
    check_arrays(path, cfg)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore((path / PARAMS_DIR).absolute(), abstract)
    return params, cfg


def load_config(path: str | Path) -> LlavaConfig:
    """The `LlavaConfig` of a checkpoint written by `save`."""
    path = Path(path)
    if not is_checkpoint(path):
        raise CheckpointError(
            f"{path}: not a sparsevlm-jax checkpoint (expected {CONFIG_FILE} and {PARAMS_DIR}/ "
            "written by sparsevlm_jax.checkpoint.save; convert transformers/LLaVA weights with "
            "`python -m convert`)"
        )
    try:
        return LlavaConfig.from_json((path / CONFIG_FILE).read_text())
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid config ({e})") from e


def load_metadata(path: str | Path) -> dict[str, Any]:
    """The notes `save` recorded beside the weights; {} when there are none (or unreadable).

    The converter records `{"conversion": {"dtype": stored dtype, "source_dtype": the source's
    float dtype (most elements), "requested_dtype": "bfloat16" | "float32" | "float16" |
    "keep"}}`.
    """
    try:
        d = json.loads((Path(path) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _with_shardings(abstract: Params, shardings: Any) -> Params:
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), abstract
        )
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def saved_arrays(params_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Flat key -> (shape, dtype) of every array in an orbax params directory (metadata only).

    Raises:
        CheckpointError: the directory's metadata is missing or unreadable.
    """
    import logging

    import orbax.checkpoint as ocp

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax logs a warning for a broken store, then returns None
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(params_dir.absolute())
    except Exception as e:  # orbax raises several types for a broken directory
        raise CheckpointError(f"{params_dir}: unreadable orbax checkpoint ({e})") from e
    finally:
        absl.setLevel(level)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict):
        raise CheckpointError(f"{params_dir}: orbax checkpoint without readable array metadata")
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in flatten(tree).items()}


def check_arrays(path: str | Path, cfg: LlavaConfig) -> None:
    """Checks that a checkpoint holds exactly the arrays `cfg` needs (no weights are read).

    Raises:
        CheckpointError: one line naming every missing, unexpected or wrongly shaped array.
    """
    path = Path(path)
    want = {k: tuple(v.shape) for k, v in flatten(abstract_params(cfg)).items()}
    saved = {k: shape for k, (shape, _) in saved_arrays(path / PARAMS_DIR).items()}
    shapes = [f"{k}: {saved[k]} != {want[k]}" for k in want if k in saved and saved[k] != want[k]]
    _raise_problems(path, [k for k in want if k not in saved], set(saved), want, shapes)


def _raise_problems(
    path: Path, missing: list[str], saved: set[str], want: dict, shapes: list[str]
) -> None:
    unexpected = sorted(k for k in saved if k not in want)
    parts = [
        _describe(n, items)
        for n, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
        if items
    ]
    if parts:
        raise CheckpointError(f"checkpoint {path}: " + ", ".join(parts))


def _describe(what: str, items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... and {len(items) - limit} more"
    return f"{len(items)} {what} ({shown})"
