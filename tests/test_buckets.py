"""Bucket ladders: an exact bucket for the template's prefix, text buckets by 16 up to 128."""

from __future__ import annotations

import numpy as np
import pytest

from sparsevlm_jax.batch import TEXT_BUCKETS, BucketError, Buckets, make_batch


def test_exact_prefix_bucket_has_no_padding():
    buckets = Buckets().with_prefix(35)
    assert 35 in buckets.prefix and list(buckets.prefix) == sorted(buckets.prefix)
    pix = np.zeros((2, 8, 8, 3), np.float32)
    prefix = [1, *range(3, 37)]  # 35 tokens: the vicuna_v1 template's prefix
    batch, n = make_batch([prefix, prefix], [[5] * 60, [6] * 20], pix, buckets)
    assert n == 2 and batch.shape_key == (2, 35, 64)
    assert np.asarray(batch.prefix_mask).all()
    # shorter prefixes still share a bucket of the ladder (no program per length)
    short, _ = make_batch([[1, 3, 4]], [[5]], pix[:1], buckets)
    assert short.shape_key == (1, 8, 16)


def test_text_buckets_step_by_16_up_to_128():
    assert TEXT_BUCKETS[:8] == (16, 32, 48, 64, 80, 96, 112, 128)
    assert [Buckets.pick(TEXT_BUCKETS, n, "text") for n in (1, 17, 60, 100, 129, 300)] == [
        16,
        32,
        64,
        112,
        192,
        384,
    ]
    with pytest.raises(BucketError):
        Buckets.pick(TEXT_BUCKETS, 1025, "text")


def test_buckets_validated_and_sorted():
    assert Buckets(prefix=(64, 8, 8)).prefix == (8, 64)
    with pytest.raises(ValueError):
        Buckets(text=())
    with pytest.raises(ValueError):
        Buckets(batch=(0, 1))
