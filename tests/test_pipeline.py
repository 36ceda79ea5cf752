"""Pipeline-parallel SeqBoat equals the single process, in float64.

One spawn of 4 gloo processes runs every case (megatron-core's groups re-initialized per
case: 1F1B and interleaved, even and uneven splits, tied and untied heads, with tensor,
sequence, context and data parallelism; data parallelism takes what the world leaves, and
is averaged together with context parallelism as the Trainer does). Every rank builds
the single-process reference (same seed, whole global batch, one pass), cuts its own stages
out of the reference's state dict (by key, then tensor-parallel sharding), and runs 4
micro-batches per data-parallel rank through megatron-core's schedule. Compared, relative
error < 1e-10 unless said otherwise:

* a float64 surrogate objective sum(logits * R) / rows (runs the whole model, exactly):
  its value and every parameter gradient;
* the language-model loss and gradients (1e-6 under tensor parallelism: megatron-core's
  vocab-parallel cross-entropy computes in float32);
* the forward-only (evaluation) loss.

The tied embedding is also checked before ``sync_tied_grads`` (parallel/grads.py): there its
gradient must be wrong, so the test does fail without the sync.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from parallel.pipeline import PipelinePlace, Stage, chunk_layer_ranges
from testing.local import run_ranks

WORLD = 4
VOCAB = 50
SEQ = 16
BATCH = 16  # global batch; 4 micro-batches per data-parallel rank
MICRO_BATCHES = 4

# (name, pipeline, virtual stages, tensor, sequence parallel, layers, stage_layers, model
# overrides; "_context": context-parallel size)
CASES = [
    ("pp2-dp2", 2, 1, 1, False, 4, (), {}),
    ("pp4", 4, 1, 1, False, 4, (), {}),
    ("pp4-uneven-untied", 4, 1, 1, False, 5, (2, 1, 1, 1), {"tie_embeddings": False}),
    ("pp2-uneven-dp2", 2, 1, 1, False, 4, (3, 1), {"position": "simple"}),
    ("pp2-vp2-dp2", 2, 2, 1, False, 4, (), {}),
    ("pp2-vp2-uneven-untied", 2, 2, 1, False, 5, (1, 2, 1, 1), {"tie_embeddings": False}),
    ("pp2-tp2", 2, 1, 2, False, 2, (), {}),
    ("pp2-tp2-sp-untied", 2, 1, 2, True, 2, (), {"tie_embeddings": False, "ffn_hidden": 16}),
    ("pp2-vp2-tp2-sp", 2, 2, 2, True, 4, (), {}),
    ("pp2-cp2", 2, 1, 1, False, 2, (), {"_context": 2}),
    ("pp1-dp4", 1, 1, 1, False, 2, (), {}),
]


# --------------------------------------------------------------------------- unit tests


def test_even_split() -> None:
    assert chunk_layer_ranges(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert chunk_layer_ranges(3, 1) == [range(0, 3)]


def test_uneven_split() -> None:
    assert chunk_layer_ranges(6, 2, stage_layers=[1, 5]) == [range(0, 1), range(1, 6)]


def test_interleaved_split_and_places() -> None:
    ranges = chunk_layer_ranges(8, 2, 2, [1, 2, 3, 2])
    assert ranges == [range(0, 1), range(1, 3), range(3, 6), range(6, 8)]
    # Megatron's convention: virtual chunk v of pipeline rank r is model chunk v * P + r.
    first = PipelinePlace.build(8, size=2, rank=0, virtual_size=2, stage_layers=[1, 2, 3, 2])
    last = PipelinePlace.build(8, size=2, rank=1, virtual_size=2, stage_layers=[1, 2, 3, 2])
    assert first.stages == (Stage(True, False, range(0, 1)), Stage(False, False, range(3, 6)))
    assert last.stages == (Stage(False, False, range(1, 3)), Stage(False, True, range(6, 8)))
    assert first.is_first and not first.is_last and last.is_last


@pytest.mark.parametrize(
    "args",
    [
        (7, 2, 1, ()),  # uneven without stage_layers
        (6, 2, 2, ()),  # 6 layers, 4 chunks
        (6, 2, 1, (2, 2, 2)),  # wrong number of entries
        (6, 2, 1, (6, 0)),  # empty stage
        (6, 2, 1, (2, 3)),  # wrong sum
        (4, 1, 2, ()),  # virtual stages without a pipeline
        (4, 0, 1, ()),
    ],
)
def test_bad_splits(args: tuple) -> None:
    with pytest.raises(ValueError):
        chunk_layer_ranges(*args)


def small_config(layers: int, overrides: dict):
    from pretrain.config import ModelConfig

    base = ModelConfig(
        layers=layers, width=32, zdim=8, hdim=32, ndim=4, window=4, vocab_multiple=16
    )
    return replace(base, **overrides)


def stage_models(cfg, place: PipelinePlace, full: dict, tp=None, cp=None) -> list:
    from parallel.context import ContextParallel
    from parallel.tensor import TensorParallel, shard_state_dict
    from pretrain.model.lm import LanguageModel

    tp, cp = tp or TensorParallel(), cp or ContextParallel()
    chunks = []
    for stage in place.stages:
        chunk = LanguageModel(cfg, VOCAB, tp=tp, cp=cp, stage=stage).double()
        # Stage keys are the full model's: its part is picked by key, then sharded.
        chunk.load_state_dict(shard_state_dict(full, chunk, tp))
        chunks.append(chunk)
    return chunks


@pytest.mark.parametrize("tied", [True, False])
def test_stages_hold_the_full_models_keys(tied: bool) -> None:
    """Stage state dicts partition the full model's keys (the tied copy excepted) and the
    stages run by hand, one after another, give the full model's loss."""
    from pretrain.model.lm import LanguageModel

    cfg = small_config(5, {"tie_embeddings": tied})
    torch.manual_seed(0)
    full = LanguageModel(cfg, VOCAB).double()
    sd = full.state_dict()
    places = [PipelinePlace.build(5, 2, r, 2, (1, 2, 1, 1)) for r in range(2)]
    chunks = {p.rank * 10 + v: c for p in places for v, c in enumerate(stage_models(cfg, p, sd))}
    keys = [k for c in chunks.values() for k in c.state_dict()]
    assert set(keys) == set(sd)
    shared = {k for k in keys if keys.count(k) > 1}
    assert shared == ({"embedding.weight"} if tied else set())
    assert "layers.4.norm.weight" in chunks[11].state_dict()
    # Model chunks in order: rank 0 v0, rank 1 v0, rank 0 v1, rank 1 v1.
    order = [chunks[0], chunks[10], chunks[1], chunks[11]]
    tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))
    x = None
    for chunk in order[:-1]:
        chunk.set_input_tensor([x])
        x = chunk.pipeline_forward(tokens)[0]
    order[-1].set_input_tensor(x)
    assert torch.equal(order[-1].pipeline_forward(tokens)[0], full.loss(tokens)[0])
    assert [len(c.tied_weights()) for c in order] == [int(tied), 0, 0, int(tied)]
    with pytest.raises(RuntimeError):
        order[1].set_input_tensor(None)
        order[1](tokens)


# --------------------------------------------------------------------------- multi-process


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale)


def gathered_grads(chunks: list, tp) -> dict[str, torch.Tensor]:
    """Every parameter's gradient by full-model name, tensor shards gathered."""
    from parallel.tensor import gather_split, is_split

    out = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            if tp.active and is_split(param):
                grad = gather_split(grad, param.partition_dim, tp)
            out[name] = grad.clone()
        chunk.zero_grad(set_to_none=True)
    return out


def check_case(rank: int, case: tuple) -> dict:
    from megatron.core import parallel_state

    from parallel.dims import ParallelDims
    from parallel.grads import average, average_gradients, sum_partial_grads, sync_tied_grads
    from parallel.pipeline import broadcast_loss, pipeline_step
    from parallel.tensor import gather_split
    from parallel.topology import RANK_ORDER
    from pretrain.model.lm import LanguageModel

    _, pp, vp, tp_size, sp, layers, stage_layers, overrides = case
    overrides = dict(overrides)
    cp_size = overrides.pop("_context", 1)
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=pp,
        context_parallel_size=cp_size, order=RANK_ORDER,
    )  # fmt: skip
    dims = ParallelDims.from_parallel_state(sequence_parallel=sp)
    tp, cp = dims.tensor, dims.context
    place = PipelinePlace.build(layers, dims.pp_size, dims.pp_rank, vp, stage_layers)
    # Context-parallel ranks hold other tokens of the same rows: averaged like data ranks.
    dp_group = dims.dp_group()
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    averaged = dp * cp.size
    span = slice(cp.rank * SEQ // cp.size, (cp.rank + 1) * SEQ // cp.size)

    cfg = small_config(layers, overrides)
    torch.manual_seed(0)
    reference = LanguageModel(cfg, VOCAB).double()
    chunks = stage_models(cfg, place, reference.state_dict(), tp, cp)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(
        SEQ, BATCH, reference.padded_vocab, dtype=torch.float64,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip

    rows = BATCH // dp
    mb = rows // MICRO_BATCHES
    part = reference.padded_vocab // tp.size
    vocab = slice(tp.rank * part, (tp.rank + 1) * part)
    micro_batches = []
    for i in range(MICRO_BATCHES):
        r = slice(dp_rank * rows + i * mb, dp_rank * rows + (i + 1) * mb)
        micro_batches.append((cp.chunk(tokens[r]), weights[span, r, vocab]))

    def surrogate(chunk, batch):
        toks, w = batch
        out = chunk(toks[:, :-1])[0]
        return (out * w).sum() * cp.size / toks.shape[0] if chunk.stage.last else out

    def lm(chunk, batch):
        return chunk.pipeline_forward(batch[0])[0]

    def run(step_fn, forward_only: bool = False):
        return pipeline_step(
            chunks, place, micro_batches, step_fn, seq_length=SEQ, micro_batch_size=mb,
            hidden_size=cfg.width, dtype=torch.float64, sequence_parallel=sp,
            forward_only=forward_only,
        )  # fmt: skip

    def reduce_grads() -> float | None:
        """Sequence-parallel, tied and data-parallel reduction; returns the tied weight's
        error before its sync (None where this rank holds no tied copy)."""
        for chunk in chunks:
            sum_partial_grads(chunk, tp)
            average_gradients(chunk, dp_group, averaged)
        tied = [w for chunk in chunks for w in chunk.tied_weights()]
        before = None
        if tied:
            grad = tied[0].grad.clone()
            if tp.active:
                grad = gather_split(grad, 0, tp)
            before = relative_error(grad, ref_grads["embedding.weight"])
        sync_tied_grads(tied, place.active)
        return before

    def global_value(loss, summed_over_tp: bool) -> torch.Tensor:
        value = broadcast_loss(loss, place, torch.device("cpu"))
        if summed_over_tp and tp.active:
            torch.distributed.all_reduce(value, group=tp.group())
        return average(value, dp_group, averaged)

    # 1) float64 surrogate: exact.
    ref_logits, _ = reference(tokens[:, :-1])
    ref_value = (ref_logits * weights).sum() / BATCH
    ref_value.backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    reference.zero_grad(set_to_none=True)
    loss = run(surrogate)
    tied_before = reduce_grads()
    exact = {"value": relative_error(global_value(loss, True), ref_value.detach())}
    exact.update(
        {n: relative_error(g, ref_grads[n]) for n, g in gathered_grads(chunks, tp).items()}
    )

    # 2) the language-model loss, then 3) the same forward only.
    ref_loss, _ = reference.loss(tokens)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    loss = run(lm)
    reduce_grads()
    lm_errors = {"loss": relative_error(global_value(loss, False), ref_loss.detach())}
    lm_errors.update(
        {n: relative_error(g, ref_grads[n]) for n, g in gathered_grads(chunks, tp).items()}
    )
    eval_loss = global_value(run(lm, forward_only=True), False)
    no_grads = all(p.grad is None for chunk in chunks for p in chunk.parameters())
    torch.distributed.barrier()
    return {
        "exact": exact,
        "lm": lm_errors,
        "eval": relative_error(eval_loss, ref_loss.detach()),
        "eval_left_no_grads": no_grads,
        "tied_before_sync": tied_before,
        "replica": (dp_rank, tp.rank, cp.rank),
        "names": sorted({n for chunk in chunks for n, _ in chunk.named_parameters()}),
        "all_names": sorted(n for n, _ in reference.named_parameters()),
    }


def worker(rank: int, world: int) -> list:
    from testing.local import gloo_world

    with gloo_world(rank, world):
        return [check_case(rank, case) for case in CASES]


@pytest.fixture(scope="module")
def results() -> list:
    return run_ranks(worker, WORLD, timeout=300)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_pipeline_equals_single_process(results: list, index: int) -> None:
    name, pp, _, tp_size, _, _, _, overrides = CASES[index]
    held: dict[tuple, set] = {}
    tied = overrides.get("tie_embeddings", True) and pp > 1
    for rank_results in results:
        case = rank_results[index]
        worst = max(case["exact"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-10, f"{name}: {worst}"
        worst = max(case["lm"].items(), key=lambda kv: kv[1])
        assert worst[1] < (1e-6 if tp_size > 1 else 1e-10), f"{name}: {worst}"
        assert case["eval"] < (1e-6 if tp_size > 1 else 1e-10), name
        assert case["eval_left_no_grads"]
        held.setdefault(case["replica"], set()).update(case["names"])
        if case["tied_before_sync"] is not None:
            # Without the sync each copy holds only its own part of the gradient.
            assert tied and case["tied_before_sync"] > 1e-3, (name, case["tied_before_sync"])
    # With a tied head both end stages of every pipeline hold a copy.
    copies = sum(r[index]["tied_before_sync"] is not None for r in results)
    assert copies == (2 * WORLD // pp if tied else 0), name
    # Every replica's stages together hold every parameter.
    for names in held.values():
        assert names == set(results[0][index]["all_names"]), name
