"""The global sample order and rank shares (pure functions, no files)."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.data.order import EpochOrder, after_consumed, split

SHARDS = [1000, 17, 3, 450, 900]  # very uneven on purpose


def _all_rows(order: EpochOrder) -> np.ndarray:
    return order.rows(0, len(order))


@pytest.mark.parametrize("shuffle", [False, True])
def test_order_is_a_permutation_and_deterministic(shuffle):
    order = EpochOrder(SHARDS, epoch=3, seed=7, shuffle=shuffle, block_rows=64, window=256)
    rows = _all_rows(order)
    assert sorted(rows.tolist()) == list(range(sum(SHARDS)))
    again = EpochOrder(SHARDS, epoch=3, seed=7, shuffle=shuffle, block_rows=64, window=256)
    assert np.array_equal(rows, _all_rows(again))
    if not shuffle:
        assert np.array_equal(rows, np.arange(sum(SHARDS)))


def test_shuffle_depends_on_seed_and_epoch_and_slices_agree():
    a = EpochOrder(SHARDS, 0, 1, True, 64, 256)
    assert not np.array_equal(_all_rows(a), _all_rows(EpochOrder(SHARDS, 1, 1, True, 64, 256)))
    assert not np.array_equal(_all_rows(a), _all_rows(EpochOrder(SHARDS, 0, 2, True, 64, 256)))
    full = _all_rows(a)
    pieces = np.concatenate([a.rows(i, min(i + 97, len(a))) for i in range(0, len(a), 97)])
    assert np.array_equal(full, pieces)  # any slicing of positions gives the same sequence


def test_shuffle_window_bounds_how_far_a_sample_moves_within_block_order():
    order = EpochOrder([10_000], 0, 0, True, block_rows=10_000, window=100)
    rows = _all_rows(order)
    # one block: positions only move inside their window of 100
    assert all(set(rows[i:i + 100].tolist()) == set(range(i, i + 100)) for i in range(0, 10_000, 100))


@pytest.mark.parametrize("drop", [True, False])
def test_shares_are_equal_contiguous_and_concatenate_to_the_global_order(drop):
    total = sum(SHARDS)
    for world in (1, 2, 3, 4, 7):
        shares = [split([(0, total)], world, r, drop) for r in range(world)]
        sizes = {s.num_samples for s in shares}
        assert len(sizes) == 1  # every rank the same number of samples
        positions = [p for s in shares for a, b in s.segments for p in range(a, b)]
        per_rank = sizes.pop()
        if drop:
            assert positions == list(range(per_rank * world))
        else:
            assert positions[:total] == list(range(total)) and len(positions) == per_rank * world


def test_resume_into_another_world_size_covers_the_rest_exactly_once():
    total = 1000
    consumed = 96  # each of 4 ranks took 96 samples
    left = after_consumed([(0, total)], 4, consumed, True)
    assert sum(b - a for a, b in left) == total - 4 * consumed
    taken = {p for r in range(4) for a, b in split([(0, total)], 4, r, True).segments for p in range(a, a + consumed)}
    rest = {p for a, b in left for p in range(a, b)}
    assert not taken & rest and len(taken | rest) == total
    shares = [split(left, 3, r, True) for r in range(3)]
    assert len({s.num_samples for s in shares}) == 1


def test_what_is_left_after_a_split_keeps_its_remainder_and_no_padding_twice():
    # 1000 over 7 ranks: 142 each and 6 in no share (dropped at 7, not at another size)
    left = after_consumed([(0, 1000)], 7, 100, True)
    taken = {p for r in range(7) for a, _ in split([(0, 1000)], 7, r, True).segments for p in range(a, a + 100)}
    rest = [p for a, b in left for p in range(a, b)]
    assert sorted(rest) == sorted(set(range(1000)) - taken) and len(rest) == 300
    assert rest[-6:] == list(range(994, 1000))  # the remainder stays at the end of the order
    # padded: 1000 over 7 is 143 each, the last share wraps around to positions 0..0
    padded = after_consumed([(0, 1000)], 7, 1, False)
    rest = [p for a, b in padded for p in range(a, b)]
    assert len(rest) == len(set(rest)) == 1000 - 7  # position 0 (taken by rank 0 and the pad) once
    # a left-over list re-split and consumed again stays exact
    again = after_consumed(left, 3, 50, True)
    assert sum(b - a for a, b in again) == 300 - 150
