"""The dispatch plan: item counts, the balanced assignment and the imbalance measure."""

from __future__ import annotations

import random

import pytest
import torch

from parallel.dispatch import balance, count_items, imbalance


def test_count_items_is_blocks_with_a_query_per_sequence() -> None:
    assert count_items(torch.tensor([0, 1, 4, 5, 9]), window=4) == 0 + 1 + 1 + 2 + 3


@pytest.mark.parametrize("items", [[12, 10], [40, 0, 0, 0], [0, 0, 7, 0], [3, 3, 3, 3], [0, 0]])
def test_balance_moves_items_into_equal_contiguous_shares(items: list[int]) -> None:
    send = balance(items)
    ranks, total = len(items), sum(items)
    assert [sum(row) for row in send] == items  # every item goes somewhere, once
    received = [sum(row[j] for row in send) for j in range(ranks)]
    assert max(received) - min(received) <= 1 and sum(received) == total
    # Global order kept: what rank j receives from i comes after what it got from i - 1,
    # i.e. each source's items go to a contiguous, non-decreasing run of ranks.
    for row in send:
        used = [j for j, n in enumerate(row) if n]
        assert used == list(range(used[0], used[-1] + 1)) if used else True
    if max(items) - min(items) <= 1:  # already balanced: nothing moves
        assert all(send[i][j] == 0 for i in range(ranks) for j in range(ranks) if i != j)


def test_balance_random_and_imbalance() -> None:
    rng = random.Random(0)
    for _ in range(200):
        items = [rng.randrange(0, 50) for _ in range(rng.randrange(1, 9))]
        received = [sum(row[j] for row in balance(items)) for j in range(len(items))]
        assert max(received) - min(received) <= 1
    assert imbalance([4, 0, 0, 0]) == 4.0 and imbalance([2, 2]) == 1.0 and imbalance([0, 0]) == 1.0
