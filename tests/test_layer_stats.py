"""Layer statistics of a step are the run's: summed over every micro-batch and over the
data x context ranks, with the heat-map row gathered over the context ranks in order."""

from __future__ import annotations

import torch

from testing.local import run_ranks


def worker(rank: int, world: int) -> list[tuple]:
    from megatron.core import parallel_state

    from parallel.dims import ParallelDims
    from pretrain.layer_stats import summarize
    from pretrain.model.layer import LayerStats
    from testing.local import gloo_world

    with gloo_world(rank, world):
        parallel_state.initialize_model_parallel(context_parallel_size=2)  # CP 2 x DP 2
        dims = ParallelDims.from_parallel_state()

        def layer(micro: int) -> LayerStats:
            # This rank's 3 tokens x 2 sequences: rank r activates r + micro of them.
            flags = torch.arange(6).view(3, 2) < rank + micro
            return LayerStats(flags, torch.tensor(10.0 * rank), torch.tensor(rank + 1))

        summaries = summarize({0: [[layer(0)], [layer(1)]]}, dims)
        return [
            (s.activated, s.tokens, s.span_sum, s.span_pairs, s.heat.tolist()) for s in summaries
        ]


def test_summed_over_micro_batches_data_and_context_ranks() -> None:
    results = run_ranks(worker, 4, timeout=120)
    counts = [[layer[:4] for layer in r] for r in results]
    assert all(c == counts[0] for c in counts)  # the run's figures, the same on every rank
    ((activated, tokens, span_sum, span_pairs, heat),) = results[0]
    assert activated == sum(r + m for r in range(4) for m in range(2))  # 16
    assert tokens == 4 * 2 * 6
    assert (span_sum, span_pairs) == (2 * 10.0 * (0 + 1 + 2 + 3), 2 * (1 + 2 + 3 + 4))
    # The heat row: the first micro-batch's first sequence of this data rank, tokens 0-2 from
    # context rank 0 then 3-5 from context rank 1 (rank = context + 2 x data);
    # flags[t, 0] = 2t < rank.
    assert heat == results[1][0][4] == [False, False, False, True, False, False]
    assert results[2][0][4] == results[3][0][4] == [True, False, False, True, True, False]
