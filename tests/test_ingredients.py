"""SparseVLM+'s four ingredients as switches (`SparseConfig.top_heads`, `gravity`,
`original_positions`, `recycling`): every ablation variant equals the PyTorch reference, each
switch changes what it names and nothing before it, and the command takes them as flags.

The models and examples are test_sparse_parity's (24 layers, 4 heads of which SparseVLM+
averages 2, 64 visual tokens, q/k drawn wide so decisions are clear of float32 noise).
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from test_sparse_parity import (
    EXAMPLES,
    FIXED_LAYERS,
    NEW_TOKENS,
    SCHEDULE,
    assert_clear_decisions,
    assert_same_decisions,
    model_and_params,
    pixels,
    run_jax,
    run_jax_positions,
)
from tiny_models import IMAGE_TOKEN

from sparsevlm_jax import reference as ref
from sparsevlm_jax.config import ConfigError
from sparsevlm_jax.sparse.config import INGREDIENTS, SparseConfig, named_sparse_config

torch = pytest.importorskip("torch")

ROWS = [0, 2]  # example 1 has a top-k boundary within 1e-4 under v2.0+recycling
# The ablation: each of the four differences undone on SparseVLM+ (v2.0 recycles) and done on
# v1.5 (v1.5 stops recycling): every ingredient toggled away from the method's own choice.
VARIANTS = [(m, k, m not in on_in) for m in ("v2_0", "v1_5") for k, on_in in INGREDIENTS.items()]


def variant(method: str, **switches: bool) -> SparseConfig:
    sparse = SparseConfig(method=method, layers=FIXED_LAYERS, schedule=SCHEDULE, **switches)
    return sparse.with_static_shape(SCHEDULE, 64)


def reference(method: str, i: int, **switches: bool):
    model, _, cfg = model_and_params(0)
    prefix, text = EXAMPLES[i]
    ids = torch.tensor([prefix + [IMAGE_TOKEN] * cfg.num_image_tokens + text])
    pix = torch.tensor(pixels()[i : i + 1]).permute(0, 3, 1, 2)
    params = ref.RefSparseParams(method=method, layers=FIXED_LAYERS, schedule=SCHEDULE, **switches)
    return ref.reference_generate(model, ids, pix, params, max_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize(("method", "ingredient", "on"), VARIANTS)
def test_ablation_variants_match_reference(method, ingredient, on):
    """Kept indices, recycled counts, logits, greedy tokens and decode positions equal the
    reference's for each of the eight variants, batched."""
    _, params, cfg = model_and_params(0)
    sparse = variant(method, **{ingredient: on})
    assert sparse.uses(ingredient) is on and sparse.switched == {ingredient: on}
    logits, tokens, stats = run_jax(params, cfg, sparse, ROWS)
    _, after_prefill, _, _ = run_jax_positions(params, cfg, sparse, ROWS)
    starts = [0, *(layer + 1 for layer in sparse.layers)]
    for j, i in enumerate(ROWS):
        toks, r = reference(method, i, **{ingredient: on})
        assert_clear_decisions(r)
        assert_same_decisions(stats, j, r)
        np.testing.assert_allclose(logits[j], r.logits.numpy(), atol=1e-4, rtol=0)
        assert tokens[j].tolist() == toks
        assert after_prefill[:, j].tolist() == [r.decode_positions[0][s] for s in starts]


def first_layer(stats: dict) -> list[list[int]]:
    return [[int(x) for x in row if x >= 0] for row in stats["kept"][:, 0]]


def test_each_switch_changes_what_it_names():
    """Positions and recycling act after the first pruning layer's decision, so switching
    them keeps its kept indices; they change positions (contiguous vs original) and recycled
    counts. Gravity and the head choice change the scores, hence the kept indices."""
    _, params, cfg = model_and_params(0)
    base = {m: run_jax(params, cfg, variant(m), ROWS)[2] for m in ("v1_5", "v2_0")}
    for method, ingredient, on in VARIANTS:
        stats = run_jax(params, cfg, variant(method, **{ingredient: on}), ROWS)[2]
        after = run_jax_positions(params, cfg, variant(method, **{ingredient: on}), ROWS)[1]
        same_first = first_layer(stats) == first_layer(base[method])
        if ingredient in ("original_positions", "recycling"):
            assert same_first, (method, ingredient)
        else:
            assert not same_first, (method, ingredient)
        if ingredient == "recycling":
            assert bool((stats["recycled"] > 0).all()) is on
            assert bool((stats["recycled"] == 0).all()) is not on
        else:
            np.testing.assert_array_equal(
                stats["recycled"] > 0, base[method]["recycled"] > 0, err_msg=ingredient
            )
        # The next token's position after each pruned stage: the original prompt length N
        # with original positions, that stage's own (shorter) cache length when renumbered.
        keeps = variant(method, **{ingredient: on}).keeps_positions
        n = np.asarray([len(EXAMPLES[i][0]) + 64 + len(EXAMPLES[i][1]) for i in ROWS])
        assert (after[1:] == n[None]).all() == keeps, (method, ingredient)
        assert (after[1:] < n[None]).all() == (not keeps), (method, ingredient)


def test_switches_are_named_recorded_and_refused_where_meaningless():
    v2 = named_sparse_config("v2_0", 64, 8, 256)
    assert v2.ingredients == {
        "top_heads": True,
        "gravity": True,
        "original_positions": True,
        "recycling": False,
    }
    assert v2.name == "v2_0@64" and v2.switched == {}
    # Switching an ingredient to the method's own value is no switch.
    assert named_sparse_config("v2_0", 64, 8, 256, gravity=True).name == "v2_0@64"
    on = named_sparse_config("v1_5", 64, 8, 256, top_heads=True, gravity=True)
    assert on.name == "v1_5@64+top_heads+gravity"
    # v2.0 with recycling gets recycled slots; v1.5 without gets none.
    assert named_sparse_config("v2_0", 64, 8, 256, recycling=True).recycled_capacities[0] > 1
    assert named_sparse_config("v1_5", 64, 8, 256, recycling=False).recycled_capacities == (
        1,
        1,
        1,
    )
    with pytest.raises(ConfigError, match="gravity"):
        SparseConfig(method="fastv", layers=(1,), gravity=True)
    with pytest.raises(ConfigError, match="recycling"):
        SparseConfig(recycling=True)


def test_command_takes_the_switches(tmp_path):
    """`sparsevlm generate` on the bundled model: the switch reaches the statistics, and a
    switch on a method without it is one line, exit 2."""
    from PIL import Image

    from sparsevlm_jax import shapes_task as st

    pixels_, _ = st.render(st.make_scene(st.rng_for("test", 0)), st.rng_for("test", 0))
    image = str(tmp_path / "scene.png")
    Image.fromarray(pixels_).save(image)
    cmd = ["sparsevlm", "generate", "--image", image, "--prompt", "what color is the circle?"]
    out = subprocess.run(
        [*cmd, "--sparse", "v2_0", "--budget", "64", "--no-gravity", "--json"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["stats"]["ingredients"] == {
        "top_heads": True,
        "gravity": False,
        "original_positions": True,
        "recycling": False,
    }
    assert result["sparse"]["gravity"] is False
    bad = subprocess.run([*cmd, "--sparse", "fastv", "--recycling"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "--recycling" in bad.stderr, bad.stderr
