"""Data-parallel gradient averaging overlapped with the last backward of a step
(``parallel.grads.OverlappedGradReduce``) gives the same training as one all-reduce after it.

One spawn of 4 gloo processes; each case builds the same model twice (same seed) and takes
3 steps of 2 micro-batches each on this rank's rows, with and without overlap, buckets small
enough that a step has several. With 2 data-parallel ranks every gradient is the same sum of
two numbers either way: bit for bit. With 4 the collective may add in another order per
bucket: float32 round-off.
"""

from __future__ import annotations

import io

import pytest
import torch

from testing.local import run_ranks

VOCAB = 64
STEPS = 3


def train(cfg, dims, overlap: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    from parallel.sharding import model_tensors
    from pretrain.build import model_chunks_for, optimizer_for, overlapped_reduce_for, scheduler_for
    from pretrain.steps import MicroBatchLoop, OptimizerUpdate, TrainStep

    torch.manual_seed(0)
    (model,) = model_chunks_for(cfg, VOCAB, torch.device("cpu"), dims)
    optimizer = optimizer_for(model, cfg.optimizer)
    scheduler = scheduler_for(optimizer, cfg.optimizer, STEPS)
    reducer = overlapped_reduce_for(cfg, dims, model) if overlap else None
    assert (reducer is not None) == overlap
    if reducer is not None:
        assert len(reducer.buckets) > 2  # the reduction really is split up
    update = OptimizerUpdate([model], optimizer, scheduler, dims, cfg.optimizer.clip_grad, reducer)
    step = TrainStep(MicroBatchLoop(model, dims, "fp32"), update, [model], dims, 2)
    losses = []
    for i in range(STEPS):
        batch = torch.randint(0, VOCAB, (8, 33), generator=torch.Generator().manual_seed(i))
        rows = batch.chunk(dims.dp_size)[dims.dp_rank]  # context ranks cut their own chunk
        result = step(rows, collect_stats=False)
        losses.append(result.loss)
    return losses, {k: v.clone() for k, v in model_tensors(model).items()}


def worker(rank: int, world: int) -> bytes:
    from megatron.core import parallel_state

    from parallel.dims import ParallelDims
    from pretrain.config import load_config
    from testing.local import gloo_world

    out = {}
    cases = {"dp4": (1, 1, False), "tp2-sp-dp2": (2, 1, True), "cp2-dp2": (1, 2, False)}
    with gloo_world(rank, world):
        for name, (tp, cp, sp) in cases.items():
            parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp, context_parallel_size=cp
            )
            dims = ParallelDims.from_parallel_state(sequence_parallel=sp)
            cfg = load_config(
                None,
                [
                    "model.layers=2", "model.width=32", "model.zdim=8", "model.hdim=32",
                    "model.window=8", "model.dropout=0", "model.attention_dropout=0",
                    "model.vocab_multiple=16", "train.seq_length=32",
                    "train.micro_batch_size=2", "train.global_batch_size=8",
                    "parallel.grad_bucket_mb=0.002",  # ~500 floats: several buckets
                    f"parallel.tensor={tp}", f"parallel.context={cp}",
                    f"parallel.sequence_parallel={str(sp).lower()}",
                ],
            )  # fmt: skip
            plain, overlapped = train(cfg, dims, False), train(cfg, dims, True)
            out[name] = {"plain": plain, "overlapped": overlapped, "dp": dims.replicas}
    buffer = io.BytesIO()  # tensors through the result queue would need the worker alive
    torch.save(out, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def results() -> list[dict]:
    packed = run_ranks(worker, 4, timeout=300)
    return [torch.load(io.BytesIO(b), weights_only=True) for b in packed]


@pytest.mark.parametrize("case", ["dp4", "tp2-sp-dp2", "cp2-dp2"])
def test_overlapped_reduction_trains_like_one_all_reduce(results, case: str) -> None:
    for rank_results in results:
        r = rank_results[case]
        (loss_a, state_a), (loss_b, state_b) = r["plain"], r["overlapped"]
        if r["dp"] == 2:
            assert loss_a == loss_b
            assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), case
        else:
            assert loss_a == pytest.approx(loss_b, rel=1e-6)
            for k in state_a:
                torch.testing.assert_close(state_b[k], state_a[k], rtol=1e-5, atol=1e-7)
