"""The sharded prefill and decode on 8 forced CPU host devices, for `test_sharding.py`.

Run as a script in a subprocess (`python tests/sharding_worker.py`): the device count must be
in XLA_FLAGS before jax is imported, and the pytest process has already initialised jax with
one device. Prints one JSON object on its last line of stdout:

    params:   {mesh: [mismatches between the parameters' shardings and the rule table]}
    runs:     {config: {"single": RUN, mesh: RUN}}, RUN = {tokens, stats, logits_diff,
              recompiles, repeat_equal, kv_specs}
    hlo:      {program: [collectives whose result has a split weight's shape]}
    control:  the same check on a program that gathers a weight on purpose (must find it)

The model is tiny (8 decoder layers, 8 query and 8 KV heads so that model=8 splits heads,
CLIP with 8 heads, 64 visual tokens) with q/k projections, token embeddings and projector
weights drawn wide (as in `test_sparse_parity.py`) so that attention is peaked and the
pruning decisions are far from float32 ties.
"""

from __future__ import annotations

import os
import sys

DEVICES = 8
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES} "
    "--xla_backend_optimization_level=0"
).strip()
# jaxlib's CPU SVD (the v1 rank) splits its batch over XLA's intra-op thread pool and blocks a
# pool thread while it waits; with 8 devices calling it at once a pool of 8 threads (what a
# small machine gets) can deadlock. A pool larger than the device count cannot.
os.environ.setdefault("PJRT_NPROC", str(2 * DEVICES))

import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparsevlm_jax import sharding as sh  # noqa: E402
from sparsevlm_jax.batch import make_batch  # noqa: E402
from sparsevlm_jax.config import LlavaConfig, TextConfig, VisionConfig  # noqa: E402
from sparsevlm_jax.generate import compile_counts, decode_jit, prefill, prefill_jit  # noqa: E402
from sparsevlm_jax.params import flatten, init_params  # noqa: E402
from sparsevlm_jax.sparse.config import SparseConfig  # noqa: E402

MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
BATCH = 8
NEW_TOKENS = 4
LAYERS = (2, 5)
CONFIGS = {
    "dense": SparseConfig(),
    "v1_bucketed": SparseConfig(method="v1", layers=LAYERS, scale=2.0, bias=0.0),
    "v1_exact": SparseConfig(method="v1", layers=LAYERS, scale=2.0, bias=0.0, capacity="exact"),
    "v1_5": SparseConfig(
        method="v1_5", layers=LAYERS, schedule=(40, 20), capacity="static", capacities=(40, 20)
    ),
    "v2_0": SparseConfig(
        method="v2_0", layers=LAYERS, schedule=(40, 20), capacity="static", capacities=(40, 20)
    ),
    "fastv": SparseConfig(method="fastv", layers=(1,), capacity="static", capacities=(32,)),
    "random": SparseConfig(
        method="random", layers=LAYERS, schedule=(40, 20), capacity="static", capacities=(40, 20)
    ),
}
# Every config runs on every mesh but these, which run on 2x4 only (to keep the test short):
# the random baseline reads no attention, so the heads' split cannot change what it does.
ONE_MESH = {"random": (2, 4)}


def tiny_config() -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=8,
            image_size=112,
            patch_size=14,
        ),
        text=TextConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            head_dim=8,
        ),
        image_token_index=500,
    )


def tiny_params(cfg: LlavaConfig) -> dict:
    wide = {
        "text/layers/q_proj/kernel": 0.3,
        "text/layers/k_proj/kernel": 0.3,
        "text/embed_tokens": 1.0,
        "projector/linear_1/kernel": 0.5,
        "projector/linear_2/kernel": 0.5,
    }
    return init_params(cfg, seed=0, overrides=wide)


def tiny_batch():
    rng = np.random.default_rng(0)
    prefixes = [[1, *rng.integers(3, 400, int(rng.integers(1, 6))).tolist()] for _ in range(BATCH)]
    texts = [rng.integers(3, 400, int(rng.integers(6, 16))).tolist() for _ in range(BATCH)]
    pixels = rng.normal(size=(BATCH, 112, 112, 3)).astype(np.float32)
    return make_batch(prefixes, texts, pixels)[0]


def spec_tuple(spec, ndim: int) -> list:
    """A PartitionSpec as a list of ndim entries (trailing Nones filled in)."""
    return [None if a is None else str(a) for a in spec] + [None] * (ndim - len(spec))


def run_once(params, batch, cfg, sparse):
    logits, cache, stats, _ = prefill(params, batch, cfg, sparse, NEW_TOKENS)
    arrays = [a for c in cache.kv for a in (c.k, c.v)]  # read before the cache is donated
    kv = [[list(a.shape), list(a.addressable_shards[0].data.shape)] for a in arrays]
    tokens, _, _ = decode_jit(
        params,
        cache,
        logits,
        jax.random.PRNGKey(0),
        jnp.float32(0.0),
        jnp.float32(1.0),
        cfg,
        NEW_TOKENS,
        (),
    )
    out = {
        "logits": np.asarray(logits),
        "tokens": np.asarray(tokens).tolist(),
        "stats": {k: np.asarray(v).tolist() for k, v in sorted(stats.items())},
    }
    out["kv_shards"] = kv
    return out


def param_mismatches(params, cfg, mesh) -> list[str]:
    """Parameters whose sharding differs from the rule table's spec or shard shape."""
    layouts = sh.param_layouts(cfg, sh.mesh_shape(mesh))
    bad = []
    for path, leaf in flatten(params).items():
        want = layouts[path]
        got = spec_tuple(leaf.sharding.spec, leaf.ndim)
        shard = tuple(leaf.addressable_shards[0].data.shape)
        if got != spec_tuple(want.spec, leaf.ndim) or shard != want.shard_shape:
            bad.append(f"{path}: {got} {shard}, rule {want.spec} {want.shard_shape}")
    return bad


COLLECTIVE = re.compile(
    r"= (\w+)\[([\d,]*)\][^=]*? (all-gather|all-reduce|all-to-all|collective-permute|"
    r"reduce-scatter)(-start)?\("
)


def gathered_weights(hlo: str, cfg: LlavaConfig, mesh) -> list[str]:
    """Collectives whose result has the shape of a model-split weight, whole (stacked) or
    one layer of it: a weight brought together on one device."""
    shapes: dict[tuple[int, ...], list[str]] = {}
    for path, lay in sh.param_layouts(cfg, sh.mesh_shape(mesh)).items():
        if sh.MODEL not in tuple(lay.spec):
            continue
        shapes.setdefault(tuple(sorted(lay.shape)), []).append(path)
        if "/layers/" in path:
            shapes.setdefault(tuple(sorted(lay.shape[1:])), []).append(path + " (one layer)")
    found = []
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if not m:
            continue
        dims = tuple(int(d) for d in m.group(2).split(",") if d)
        if tuple(sorted(dims)) in shapes:
            names = " or ".join(shapes[tuple(sorted(dims))])
            found.append(f"{m.group(3)} {m.group(1)}{list(dims)} ~ {names}")
    return found


def hlo_checks(params, batch, cfg, mesh) -> tuple[dict, list]:
    """The compiled programs' collectives, for the fused prefill and the decode loop."""
    out = {}
    for name in ("dense", "v1_exact", "v2_0"):
        sparse = CONFIGS[name]
        # the arguments exactly as `prefill` passes them: the program its run compiled
        lowered = prefill_jit.lower(params, batch, cfg, sparse, NEW_TOKENS, False)
        out[f"prefill {name}"] = gathered_weights(lowered.compile().as_text(), cfg, mesh)
    logits, cache, _ = prefill_jit(params, batch, cfg, CONFIGS["v1_exact"], NEW_TOKENS, False)
    args = (logits, jax.random.PRNGKey(0), jnp.float32(0.0), jnp.float32(1.0))
    lowered = decode_jit.lower(params, cache, *args, cfg, NEW_TOKENS, ())
    out["decode v1_exact"] = gathered_weights(lowered.compile().as_text(), cfg, mesh)

    # Control: a program that needs a whole q_proj on every device must be caught.
    def whole_weight(p, x):
        w = jax.lax.with_sharding_constraint(p["text"]["layers"]["q_proj"]["kernel"], sh.P())
        return jnp.einsum("bd,lde->ble", x, w)

    x = jnp.ones((BATCH, cfg.text.hidden_size))
    control = jax.jit(whole_weight).lower(params, x).compile().as_text()
    return out, gathered_weights(control, cfg, mesh)


def eval_answers(mesh: str | None) -> list[dict]:
    """`sparsevlm eval` of the bundled model on four questions, with `--mesh` or without."""
    import tempfile

    from PIL import Image

    from sparsevlm_jax.cli.app import main as cli

    model = os.path.join(os.path.dirname(os.path.dirname(__file__)), "sparsevlm_jax", "demo_model")
    d = tempfile.mkdtemp(prefix="mesh-eval-")
    rng = np.random.default_rng(1)
    lines = []
    for i in range(4):
        pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(d, f"{i}.png"))
        q = {"question_id": i, "image": f"{i}.png", "text": f"What shape is it? ({i})"}
        lines.append(json.dumps(q))
    with open(os.path.join(d, "q.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    answers = os.path.join(d, "a.jsonl")
    argv = ["eval", "--model", model, "--questions", os.path.join(d, "q.jsonl")]
    argv += ["--image-folder", d, "--answers", answers, "--batch-size", "4", "--quiet"]
    argv += ["--max-new-tokens", "4"]
    argv += ["--mesh", mesh] if mesh else []
    assert cli(argv) == 0
    out = []
    with open(answers) as f:
        for line in f:
            r = json.loads(line)
            meta = {k: v for k, v in r["metadata"].items() if not k.endswith("_seconds")}
            out.append({"question_id": r["question_id"], "text": r["text"], "metadata": meta})
    return out


def log(what: str, since: float) -> float:
    """Progress on stderr (where the time goes); returns now."""
    now = time.perf_counter()
    print(f"{what}: {now - since:.1f} s", file=sys.stderr, flush=True)
    return now


def main() -> None:
    assert jax.device_count() == DEVICES, jax.devices()
    t = time.perf_counter()
    cfg = tiny_config()
    params = tiny_params(cfg)
    batch = tiny_batch()
    result = {"params": {}, "runs": {name: {} for name in CONFIGS}, "hlo": {}, "control": []}

    singles = {}
    for name, sparse in CONFIGS.items():
        singles[name] = run_once(params, batch, cfg, sparse)
        t = log(f"one device, {name}", t)
        r = dict(singles[name])
        r.pop("logits")
        result["runs"][name]["single"] = r

    for shape in MESHES:
        key = f"{shape[0]}x{shape[1]}"
        mesh = sh.make_mesh(sh.MeshShape(*shape))
        sparams = sh.shard_params(params, cfg, mesh)
        sbatch = sh.shard_batch(batch, mesh)
        result["params"][key] = param_mismatches(sparams, cfg, mesh)
        with sh.use_mesh(mesh):
            for name, sparse in CONFIGS.items():
                if ONE_MESH.get(name, shape) != shape:
                    continue
                first = run_once(sparams, sbatch, cfg, sparse)
                before = compile_counts()
                again = run_once(sparams, sbatch, cfg, sparse)
                after = compile_counts()
                diff = np.abs(first.pop("logits") - singles[name]["logits"])
                again.pop("logits")
                first["logits_diff"] = float(diff.max())
                first["recompiles"] = {k: after[k] - before[k] for k in after}
                first["repeat_equal"] = (again["tokens"], again["stats"]) == (
                    first["tokens"],
                    first["stats"],
                )
                result["runs"][name][key] = first
                t = log(f"mesh {key}, {name}", t)
            if shape == (2, 4):
                result["hlo"], result["control"] = hlo_checks(sparams, sbatch, cfg, mesh)
                t = log("compiled programs' collectives", t)
    result["eval"] = {"single": eval_answers(None)}
    t = log("eval, one device", t)
    result["eval"]["2x2"] = eval_answers("data=2,model=2")
    log("eval, data=2,model=2", t)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
