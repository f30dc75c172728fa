"""Tests for distill.sampling.LengthGroupedBatchSampler and the example-length helpers."""

from __future__ import annotations

import numpy as np
import pytest

from distill.errors import DataError
from distill.sampling import LengthGroupedBatchSampler, phase1_lengths, phase2_lengths


def mixed_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Token counts spread like real text: lognormal, clipped to 10..500."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=4.0, sigma=1.0, size=n), 10, 500).astype(np.int64)


def samplers(lengths: np.ndarray, batch_size: int, world_size: int, seed: int = 0, pool_batches: int = 64):
    return [
        LengthGroupedBatchSampler(lengths, batch_size, r, world_size, seed, pool_batches) for r in range(world_size)
    ]


def padding_efficiency(batches: list[list[int]], lengths: np.ndarray) -> float:
    """sum of real tokens / sum of padded tokens (batch max * batch size)."""
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return real / padded


def test_two_ranks_equal_counts_disjoint_and_full_batches_with_uneven_input() -> None:
    lengths = mixed_lengths(1003)
    rank0, rank1 = samplers(lengths, batch_size=8, world_size=2)
    assert len(rank0) == len(rank1) == 1003 // 16 == 62
    b0, b1 = rank0.batches(0), rank1.batches(0)
    assert len(b0) == len(b1) == 62
    assert all(len(b) == 8 for b in b0 + b1)
    flat0 = [i for b in b0 for i in b]
    flat1 = [i for b in b1 for i in b]
    assert len(set(flat0)) == len(flat0) and len(set(flat1)) == len(flat1)
    assert not set(flat0) & set(flat1)
    assert len(set(flat0) | set(flat1)) == 992 and max(flat0 + flat1) < 1003 and min(flat0 + flat1) >= 0
    # the step-k batches of both ranks are the two halves of one length-sorted global batch
    for x, y in zip(b0, b1):
        assert lengths[x].max() <= lengths[y].min()


def test_deterministic_per_seed_and_epoch() -> None:
    lengths = mixed_lengths(500)
    a = LengthGroupedBatchSampler(lengths, 10, 1, 2, seed=3)
    b = LengthGroupedBatchSampler(lengths.copy(), 10, 1, 2, seed=3)
    c = LengthGroupedBatchSampler(lengths, 10, 1, 2, seed=4)
    assert a.batches(0) == b.batches(0) and a.batches(5) == b.batches(5)
    assert a.batches(0) != c.batches(0)
    assert a.batches(0) == a.batches(0)


def test_epochs_reshuffle_and_drop_different_remainders() -> None:
    lengths = mixed_lengths(1000)
    ranks = samplers(lengths, batch_size=7, world_size=2, seed=1)
    used = []
    for epoch in range(3):
        per_rank = [s.batches(epoch) for s in ranks]
        used.append({i for batches in per_rank for b in batches for i in b})
    assert all(len(u) == 1000 // 14 * 14 for u in used)
    assert used[0] != used[1] and used[1] != used[2]  # different examples are dropped each epoch
    assert ranks[0].batches(0) != ranks[0].batches(1)
    first = [sorted(b) for b in ranks[0].batches(0)]
    second = [sorted(b) for b in ranks[0].batches(1)]
    assert first != second and sorted(map(tuple, first)) != sorted(map(tuple, second))


def test_padding_efficiency_on_mixed_lengths() -> None:
    lengths = mixed_lengths(20_000, seed=7)
    batch_size, world = 32, 2
    naive = [list(range(i, i + batch_size)) for i in range(0, 20_000 - batch_size + 1, batch_size)]
    assert padding_efficiency(naive, lengths) < 0.5  # random batching wastes most tokens on this mix
    for sampler in samplers(lengths, batch_size, world, seed=0, pool_batches=64):
        for epoch in (0, 1):
            assert padding_efficiency(sampler.batches(epoch), lengths) >= 0.9


def test_too_few_examples_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"^only 15 training examples, but one global batch needs 16 "
                                        r"\(batch_size 8 x 2 ranks\)$"):
        LengthGroupedBatchSampler(np.ones(15, dtype=np.int64), 8, 0, 2, seed=0)
    exact = LengthGroupedBatchSampler(np.arange(16), 8, 1, 2, seed=0)
    assert len(exact) == 1 and exact.batches(0) == [list(range(8, 16))]  # sorted by length: rank 1 the longer half
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        LengthGroupedBatchSampler(np.arange(16), 8, 2, 2, seed=0)


def test_length_helpers() -> None:
    query_lengths = np.array([5, 7])
    document_lengths = np.array([10, 20, 30, 40])
    phase1 = np.array([[0, 1], [1, 3], [1, 0], [0, 0]])
    assert phase1_lengths(phase1, query_lengths, document_lengths).tolist() == [7, 40, 10, 5]
    phase2 = np.array([[0, 0, 3, 1], [1, 2, 0, 1]])
    assert phase2_lengths(phase2, query_lengths, document_lengths).tolist() == [5 + 40, 7 + 30]
