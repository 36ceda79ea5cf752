"""Sharded initialization: each rank materializes only its shards, and they are exactly the
single-process model's (parallel/materialize.py, ``LanguageModel``, ``model_chunks_for``).

* Shards: on 4 gloo processes (megatron-core's groups, so megatron-core's parallel layers),
  TP2, TP4, PP2, TP2 x PP2 (interleaved) and TP2 x PP2 with an untied head build their chunks
  through ``model_chunks_for``; every tensor must equal, bit for bit, its slice of the
  single-process model built in this process from the same seed.
* Memory: a model of 246 MiB is built on TP2 x PP2; each rank's peak resident growth during
  the build must stay under full / (TP x PP) + its largest parameter + a margin, a limit
  the whole model exceeds (building the whole model on every rank and cutting it, as the
  build did before, fails it).
"""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch

from testing.local import run_ranks

WORLD = 4
VOCAB = 50  # padded to 64 (vocab_multiple 16): 16 embedding rows per rank at TP4
SEED = 1234

# (name, tensor, pipeline, virtual stages, model overrides)
CASES = [
    ("tp2", 2, 1, 1, {}),
    ("tp4", 4, 1, 1, {"tie_embeddings": False, "ffn_hidden": 16, "position": "simple"}),
    ("pp2", 1, 2, 1, {"position": "local", "norm": "scalenorm"}),
    ("tp2-pp2-interleaved", 2, 2, 2, {"ffn_hidden": 16, "norm": "rmsnorm"}),
    ("tp2-pp2-untied", 2, 2, 1, {"tie_embeddings": False, "routing": "always"}),
]


def model_config(**overrides):
    from pretrain.config import ModelConfig

    base = ModelConfig(layers=4, width=32, zdim=8, hdim=32, ndim=4, window=4, vocab_multiple=16)
    return replace(base, **overrides)


def run_config(model, tensor: int = 1, pipeline: int = 1, virtual: int = 1):
    from pretrain.config import Config, ParallelConfig

    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline, virtual_stages=virtual)
    return Config(model=model, parallel=parallel)


def single_process_state(cfg) -> dict[str, torch.Tensor]:
    from pretrain.build import model_for
    from pretrain.rng import seed_everything

    seed_everything(SEED)
    return model_for(cfg, VOCAB, torch.device("cpu")).state_dict()


def rank_chunks(cfg, dims):
    """This rank's chunks, built as the Trainer builds them (same seeding)."""
    from parallel.pipeline import PipelinePlace
    from pretrain.build import model_chunks_for
    from pretrain.rng import seed_everything

    p = cfg.parallel
    virtual = p.virtual_stages if dims.pp_size > 1 else 1
    place = PipelinePlace.build(cfg.model.layers, dims.pp_size, dims.pp_rank, virtual)
    seed_everything(SEED)
    return model_chunks_for(cfg, VOCAB, torch.device("cpu"), dims, place)


def describe(chunks, dims) -> bytes:
    """Every chunk's tensors with the dimension each is split along (None: whole)."""
    from parallel.layout import is_split

    out = []
    for chunk in chunks:
        params = dict(chunk.named_parameters())
        out.append(
            {
                name: (t, params[name].partition_dim if is_split(params[name]) else None)
                for name, t in chunk.state_dict().items()
                if not name.endswith("_extra_state")
            }
        )
    buf = io.BytesIO()
    torch.save({"tp": (dims.tp_size, dims.tp_rank), "pp": dims.pp_rank, "chunks": out}, buf)
    return buf.getvalue()


def shard_worker(rank: int, world: int) -> list[bytes]:
    from megatron.core import parallel_state

    from parallel.dims import ParallelDims
    from testing.local import gloo_world

    results = []
    with gloo_world(rank, world):
        for _, tensor, pipeline, virtual, overrides in CASES:
            parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline
            )
            dims = ParallelDims.from_parallel_state()
            cfg = run_config(model_config(**overrides), tensor, pipeline, virtual)
            results.append(describe(rank_chunks(cfg, dims), dims))
    return results


@pytest.fixture(scope="module")
def shards() -> list[list[dict]]:
    """shards[case][rank]: what every rank built, for every case (one spawn)."""
    per_rank = run_ranks(shard_worker, WORLD)
    return [
        [torch.load(io.BytesIO(per_rank[r][c]), weights_only=False) for r in range(WORLD)]
        for c in range(len(CASES))
    ]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_shards_are_slices_of_the_single_process_model(shards, case: int) -> None:
    name, tensor, pipeline, virtual, overrides = CASES[case]
    cfg = run_config(model_config(**overrides), tensor, pipeline, virtual)
    full = single_process_state(cfg)
    full = {k: v for k, v in full.items() if not k.endswith("_extra_state")}
    seen = set()
    for built in shards[case]:
        tp_size, tp_rank = built["tp"]
        assert tp_size == tensor
        for chunk in built["chunks"]:
            for key, (value, dim) in chunk.items():
                expected = full[key] if dim is None else full[key].chunk(tp_size, dim)[tp_rank]
                assert value.dtype == expected.dtype and value.shape == expected.shape, key
                assert torch.equal(value, expected), f"{name}: {key} differs on {built['tp']}"
                seen.add(key)
    assert seen == set(full), f"{name}: keys no rank holds: {set(full) - seen}"
    if pipeline > 1 and cfg.model.tie_embeddings:  # the last stage's copy of the embedding
        last = [b for b in shards[case] if b["pp"] == pipeline - 1]
        assert all("embedding.weight" in b["chunks"][-1] for b in last)
        assert "head.weight" not in full


def test_weights_depend_on_the_seed_and_the_name_only() -> None:
    """A parameter's stream is keyed by (seed, global name): a deeper model shares the
    shallower one's layers; the same seed is the same model; another seed another."""
    from pretrain.model.lm import LanguageModel

    two = LanguageModel(model_config(layers=2), VOCAB, seed=7).state_dict()
    four = LanguageModel(model_config(layers=4), VOCAB, seed=7).state_dict()
    other = LanguageModel(model_config(layers=2), VOCAB, seed=8).state_dict()
    assert all(torch.equal(v, four[k]) for k, v in two.items())
    assert not torch.equal(two["layers.1.ema.delta"], other["layers.1.ema.delta"])
    assert not torch.equal(two["layers.0.ema.delta"], two["layers.1.ema.delta"])  # own streams
    torch.manual_seed(3)
    a = LanguageModel(model_config(), VOCAB).state_dict()
    torch.manual_seed(3)
    b = LanguageModel(model_config(), VOCAB).state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())


@pytest.mark.parametrize("arch", ["seqboat", "transformer"])
def test_pipeline_stages_without_a_process_group(arch: str) -> None:
    """PP2 with virtual stages through ``model_chunks_for`` (no tensor split, so no group
    is needed): both architectures, every stage's tensors equal the single-process ones."""
    from parallel.dims import ParallelDims
    from parallel.pipeline import PipelinePlace
    from pretrain.build import model_chunks_for
    from pretrain.rng import seed_everything

    overrides = {"transformer_heads": 2, "transformer_ffn": 64} if arch == "transformer" else {}
    cfg = run_config(model_config(arch=arch, **overrides))
    full = single_process_state(cfg)
    seen = set()
    for rank in range(2):
        place = PipelinePlace.build(4, 2, rank, 2)
        seed_everything(SEED)
        for chunk in model_chunks_for(cfg, VOCAB, torch.device("cpu"), ParallelDims(), place):
            for key, value in chunk.state_dict().items():
                assert torch.equal(value, full[key]), key
                seen.add(key)
    assert seen == set(full)


def test_a_meta_build_stays_on_meta_and_draws_nothing() -> None:
    from pretrain.model.lm import LanguageModel

    state = torch.get_rng_state()
    with torch.device("meta"):
        model = LanguageModel(model_config(), VOCAB)
    assert all(p.is_meta for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), state)


def test_a_parameter_without_an_initializer_is_named() -> None:
    from parallel.materialize import materialize_

    with torch.device("meta"):
        module = torch.nn.Module()
        module.inner = torch.nn.Module()
        module.inner.weight = torch.nn.Parameter(torch.empty(3))
    with pytest.raises(ValueError, match=r"inner\.weight has no initializer"):
        materialize_(module, seed=0)


def test_the_1_3b_config_is_a_1_3b_model() -> None:
    """configs/1.3b.yaml (bench/init_memory.py's shape) validates, and has the parameter
    count its header states (counted on the meta device, as bench/gpu_check.py counts)."""
    from pathlib import Path

    from pretrain.config import load_config
    from pretrain.model.lm import LanguageModel

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "1.3b.yaml")
    assert cfg.model.window <= cfg.train.seq_length
    with torch.device("meta"):
        model = LanguageModel(cfg.model, cfg.data.tokenizer.vocab_size)
    assert sum(p.numel() for p in model.parameters()) == 1_316_149_630


# --------------------------------------------------------------------------- memory

MEMORY_TP, MEMORY_PP = 2, 2
# Allocator slack and module objects (the development machine measured 15-40 MiB above what
# a rank holds, the largest full parameter included).
MARGIN = 64 * 2**20


def memory_config():
    model = model_config(layers=8, width=1024, zdim=128, hdim=2048, ndim=16, window=16)
    return run_config(replace(model, vocab_multiple=64), MEMORY_TP, MEMORY_PP)


MEMORY_VOCAB = 4096


def memory_worker(rank: int, world: int) -> dict:
    from megatron.core import parallel_state

    from parallel.dims import ParallelDims
    from parallel.pipeline import PipelinePlace
    from pretrain.build import model_chunks_for
    from pretrain.rng import seed_everything
    from testing.local import gloo_world
    from testing.peak_memory import peak_growth

    with gloo_world(rank, world):
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=MEMORY_TP, pipeline_model_parallel_size=MEMORY_PP
        )
        dims = ParallelDims.from_parallel_state()
        cfg = memory_config()
        place = PipelinePlace.build(cfg.model.layers, dims.pp_size, dims.pp_rank)
        # A small build first: lazy imports and first-call allocations are not the model's.
        small = PipelinePlace.build(4, dims.pp_size, dims.pp_rank)
        model_chunks_for(run_config(model_config()), VOCAB, torch.device("cpu"), dims, small)
        seed_everything(SEED)
        with peak_growth() as peak:
            chunks = model_chunks_for(cfg, MEMORY_VOCAB, torch.device("cpu"), dims, place)
        params = [p for c in chunks for p in c.parameters()]
        held = sum(p.numel() * p.element_size() for p in params)
        return {"rank": rank, "peak": peak.bytes, "held": held, "reset": peak.reset}


@pytest.mark.slow
def test_each_rank_builds_in_its_share_of_memory() -> None:
    from pretrain.model.lm import LanguageModel

    cfg = memory_config()
    with torch.device("meta"):
        sizes = [p.numel() * 4 for p in LanguageModel(cfg.model, MEMORY_VOCAB).parameters()]
    full, largest = sum(sizes), max(sizes)
    limit = full // (MEMORY_TP * MEMORY_PP) + largest + MARGIN
    assert full > limit  # the whole model does not fit the limit
    results = run_ranks(memory_worker, MEMORY_TP * MEMORY_PP)
    mib = 2**20
    print(f"\nfull model {full / mib:.1f} MiB, limit per rank {limit / mib:.1f} MiB")
    for r in results:
        peak, held = r["peak"] / mib, r["held"] / mib
        print(f"rank {r['rank']}: peak growth {peak:.1f} MiB, holds {held:.1f} MiB")
    for r in results:
        assert r["peak"] < limit, f"rank {r['rank']} peaked at {r['peak'] / mib:.1f} MiB"
