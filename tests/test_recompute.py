"""Activation recompute (``train.recompute``) changes memory, never results.

For ``gau`` (selective) and ``layer`` (full) recompute, the loss and every gradient equal
those of ``none`` on the same weights, batch and RNG state, with every dropout on: float64,
relative error < 1e-10, on one process and (one spawn of 4 gloo ranks) under TP2+SP x DP2,
CP2 with dispatch x DP2, PP2 x TP2+SP (megatron-core's 1F1B schedule) and ZeRO-2 over TP2 x
DP2 (DeepSpeed in float64 too: compared through one SGD step, i.e. the reduced gradients). The
layer statistics are those of ``none`` (recorded once, not twice).

Negative controls (they show these tests can fail): with megatron-core's RNG replay
disabled (one process), or only its tracker part (TP2+SP, where the split regions' dropout
draws from the tracker), the recomputed masks differ from the forward's and the gradients
(or the routing, which the recompute checks) differ; the bytes saved for backward shrink
with each mode, so a recompute that silently kept everything would fail too.
"""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch

from testing.local import run_ranks

VOCAB = 50
SEQ = 16
BATCH = 8
MODES = ("none", "gau", "layer")
DROPOUT = {"dropout": 0.1, "attention_dropout": 0.1, "hidden_dropout": 0.1}


def model_config(**overrides):
    from pretrain.config import ModelConfig

    base = ModelConfig(
        layers=2, width=32, zdim=8, hdim=32, ndim=4, window=4, vocab_multiple=16,
        ffn_hidden=16, **DROPOUT,
    )  # fmt: skip
    return replace(base, **overrides)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def worst(grads: dict, reference: dict) -> float:
    assert grads.keys() == reference.keys()
    return max(relative_error(grads[n], reference[n]) for n in reference)


def stats_summary(stats) -> list[tuple]:
    return [(s.activated.clone(), float(s.span_sum), int(s.span_pairs)) for s in stats or []]


def same_stats(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and x[1:] == y[1:] for x, y in zip(a, b, strict=True)
    )


# --------------------------------------------------------------------------- one process


def single_process_run(model, mode: str, tokens: torch.Tensor, seed: int = 7):
    from pretrain.model.recompute import set_recompute

    set_recompute(model, mode)
    torch.manual_seed(seed)  # the same dropout masks in every mode's forward
    loss, stats = model.loss(tokens, collect_stats=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, stats_summary(stats)


@pytest.fixture(scope="module")
def single():
    from pretrain.model.lm import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(model_config(), VOCAB).double()
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return model, tokens


@pytest.mark.parametrize("overrides", [{}, {"prenorm": False, "position": "simple"},
                                       {"routing": "always"}, {**dict.fromkeys(DROPOUT, 0.0)}],
                         ids=["dropout", "postnorm-simple", "always", "no-dropout"])  # fmt: skip
@pytest.mark.parametrize("mode", ["gau", "layer"])
def test_single_process_equals_none(mode: str, overrides: dict) -> None:
    from pretrain.model.lm import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(model_config(**overrides), VOCAB).double()
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    loss0, grads0, stats0 = single_process_run(model, "none", tokens)
    loss, grads, stats = single_process_run(model, mode, tokens)
    assert relative_error(loss, loss0) < 1e-10
    assert worst(grads, grads0) < 1e-10
    assert same_stats(stats, stats0)  # recorded once, in the forward
    if overrides.get("routing", "sparse") == "sparse":
        ratio = float(torch.cat([s[0].flatten() for s in stats]).double().mean())
        assert 0.05 < ratio < 0.95  # a real routing decision, replayed


def test_dropout_matters_and_is_replayed_by_megatron(single, monkeypatch) -> None:
    """Without megatron-core's RNG restore the recompute draws new masks: wrong gradients
    (gau) or a different routing, which the layer recompute refuses (layer)."""
    import megatron.core.tensor_parallel.random as mrandom

    model, tokens = single
    _, grads0, _ = single_process_run(model, "none", tokens)
    _, other_seed, _ = single_process_run(model, "none", tokens, seed=8)
    assert worst(other_seed, grads0) > 1e-3  # the masks change the gradients
    monkeypatch.setattr(mrandom, "_set_all_rng_states", lambda *states: None)
    _, grads, _ = single_process_run(model, "gau", tokens)
    assert worst(grads, grads0) > 1e-3
    with pytest.raises(RuntimeError, match=r"routed .* differently"):
        single_process_run(model, "layer", tokens)


def bf16_gradients(model, mode: str, tokens: torch.Tensor) -> dict:
    from pretrain.model.recompute import set_recompute

    set_recompute(model, mode)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(tokens)
    loss.backward()  # outside autocast, as the Trainer does
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def test_bf16_autocast_is_replayed(single, monkeypatch) -> None:
    """The recompute runs under the forward's autocast (backward runs outside it): float32
    gradients agree to summation order; recomputing in float32 instead would not."""
    from pretrain.model import recompute
    from pretrain.model.lm import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(model_config(), VOCAB)
    tokens = single[1]
    reference = bf16_gradients(model, "none", tokens)
    for mode in ("gau", "layer"):
        assert worst(bf16_gradients(model, mode, tokens), reference) < 1e-5, mode
    monkeypatch.setattr(recompute, "autocast_state", lambda device: (False, torch.bfloat16))
    assert worst(bf16_gradients(model, "gau", tokens), reference) > 1e-3


def saved_bytes(model, mode: str, tokens: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward."""
    from pretrain.model.recompute import set_recompute

    set_recompute(model, mode)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model.loss(tokens)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def test_recompute_keeps_less() -> None:
    from pretrain.model.lm import LanguageModel

    torch.manual_seed(0)
    cfg = model_config(layers=4, width=64, hdim=128, window=16, **dict.fromkeys(DROPOUT, 0.0))
    model = LanguageModel(cfg, VOCAB)
    tokens = torch.randint(0, VOCAB, (2, 513), generator=torch.Generator().manual_seed(1))
    kept = {mode: saved_bytes(model, mode, tokens) for mode in MODES}
    layer_inputs = cfg.layers * 512 * 2 * cfg.width * 4
    assert kept["layer"] < kept["gau"] < kept["none"], kept
    assert kept["layer"] < layer_inputs + kept["none"] / 4, kept


def test_set_recompute_and_config() -> None:
    from pretrain.config import ConfigError, load_config
    from pretrain.model.lm import LanguageModel
    from pretrain.model.recompute import set_recompute

    model = LanguageModel(model_config(), VOCAB)
    assert set_recompute(model, "layer") == 2
    with pytest.raises(ValueError, match="not one of"):
        set_recompute(model, "full")
    assert load_config(None, ["train.recompute=gau"]).train.recompute == "gau"
    for bad, message in [
        (["train.recompute=full"], "train.recompute"),
        (["train.recompute=layer", "model.arch=transformer"], "seqboat only"),
        (["train.recompute=layer", "train.compile=true"], "train.compile"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, bad)


# --------------------------------------------------------------------------- 4 gloo ranks


def pack(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def init_groups(tp: int = 1, cp: int = 1, pp: int = 1, sp: bool = False, dispatch: str = "off"):
    from megatron.core import parallel_state

    from parallel.dims import ParallelDims
    from parallel.topology import RANK_ORDER

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, context_parallel_size=cp,
        pipeline_model_parallel_size=pp, order=RANK_ORDER,
    )  # fmt: skip
    return ParallelDims.from_parallel_state(sequence_parallel=sp, dispatch=dispatch)


def seed_streams(dims) -> None:
    """This rank's dropout streams as the Trainer seeds them, the same before every mode."""
    from pretrain.rng import seed_dropout_streams

    seed_dropout_streams(11, dims)


def parallel_model(cfg, dims, stage=None, dtype=torch.float64):
    from parallel.tensor import shard_state_dict
    from pretrain.model.lm import LanguageModel

    torch.manual_seed(0)
    full = LanguageModel(cfg, VOCAB).state_dict()
    model = LanguageModel(cfg, VOCAB, dims.tensor, dims.context, stage).to(dtype)
    model.load_state_dict(shard_state_dict(full, model, dims.tensor))
    return model


def batch_rows(dims) -> torch.Tensor:
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    rows = BATCH // dims.dp_size
    return dims.context.chunk(tokens[dims.dp_rank * rows : (dims.dp_rank + 1) * rows])


def loop_case(dims, cfg) -> dict:
    """Plain forward and backward (TP, SP, CP, dispatch): loss, local gradients, stats."""
    from pretrain.model.recompute import set_recompute

    model = parallel_model(cfg, dims)
    tokens = batch_rows(dims)
    out = {}
    for mode in MODES:
        set_recompute(model, mode)
        seed_streams(dims)
        try:
            loss, stats = model.loss(tokens, collect_stats=True)
            loss.backward()
        except RuntimeError as e:  # the routing check of a broken replay
            if "differently" not in str(e):
                raise
            out[mode] = "routing changed"
            continue
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        out[mode] = (loss.detach(), grads, stats_summary(stats))
    return out


def pipeline_case(dims, cfg) -> dict:
    """Megatron-core's 1F1B schedule over 4 micro-batches; recompute on both stages."""
    from parallel.pipeline import PipelinePlace, pipeline_step
    from pretrain.model.recompute import set_recompute

    place = PipelinePlace.build(cfg.layers, dims.pp_size, dims.pp_rank)
    chunks = [parallel_model(cfg, dims, stage) for stage in place.stages]
    tokens = batch_rows(dims)
    micro = list(tokens.split(tokens.shape[0] // 4))
    out = {}
    for mode in MODES:
        for chunk in chunks:
            set_recompute(chunk, mode)
        seed_streams(dims)
        loss = pipeline_step(
            chunks, place, micro, lambda chunk, mb: chunk.pipeline_forward(mb)[0],
            seq_length=SEQ, micro_batch_size=micro[0].shape[0], hidden_size=cfg.width,
            dtype=torch.float64, sequence_parallel=dims.sequence_parallel,
        )  # fmt: skip
        grads = {
            n: p.grad.clone() for c in chunks for n, p in c.named_parameters() if p.grad is not None
        }
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        out[mode] = (torch.zeros(()) if loss is None else loss, grads, [])
    return out


def zero_case(dims, cfg) -> dict:
    """DeepSpeed ZeRO-2 (float64) with SGD at lr 1 and no clipping: the update of each
    parameter is minus its reduced gradient."""
    from parallel.zero import ZeroEngine, ZeroOptions
    from pretrain.model.recompute import set_recompute

    tokens = batch_rows(dims)
    out = {}
    for mode in MODES:
        model = parallel_model(cfg, dims, dtype=torch.float64)
        set_recompute(model, mode)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        options = ZeroOptions(stage=2, micro_batch_size=tokens.shape[0], grad_accum_steps=1,
                              clip_grad=0.0)  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        external = [(model, model.embedding.weight)]
        zero = ZeroEngine.build(model, opt, None, options, dims, external_params=external)
        seed_streams(dims)
        loss, _ = zero.module.loss(tokens)
        zero.backward(loss)
        zero.step()
        update = {n: before[n] - p.detach() for n, p in zero.module.named_parameters()}
        out[mode] = (loss.detach(), update, [])
    return out


def worker(rank: int, world: int) -> bytes:
    import megatron.core.tensor_parallel.random as mrandom

    from testing.local import gloo_world

    results = {}
    with gloo_world(rank, world):
        dims = init_groups(tp=2, sp=True)
        results["tp2-sp-dp2"] = loop_case(dims, model_config())
        dims = init_groups(cp=2, dispatch="context")
        results["cp2-dispatch-dp2"] = loop_case(dims, model_config(position="simple"))
        dims = init_groups(tp=2, pp=2, sp=True)
        results["pp2-tp2-sp"] = pipeline_case(dims, model_config(layers=4))
        dims = init_groups(tp=2)
        results["zero2-tp2-dp2"] = zero_case(dims, model_config())
        # Negative control: the tracker's (split regions') streams not restored.
        dims = init_groups(tp=2, sp=True)
        original = mrandom._set_all_rng_states

        def without_tracker(cpu_state, cuda_state, tracker_states) -> None:
            torch.set_rng_state(cpu_state)
            mrandom._set_cuda_rng_state(cuda_state)

        mrandom._set_all_rng_states = without_tracker
        try:
            results["tp2-sp-dp2-no-tracker"] = loop_case(dims, model_config())
        finally:
            mrandom._set_all_rng_states = original
    return pack(results)


@pytest.fixture(scope="module")
def parallel_results() -> list[dict]:
    raw = run_ranks(worker, 4, timeout=600)
    return [torch.load(io.BytesIO(r), weights_only=False) for r in raw]


PARALLEL_CASES = ["tp2-sp-dp2", "cp2-dispatch-dp2", "pp2-tp2-sp", "zero2-tp2-dp2"]


@pytest.mark.parametrize("mode", ["gau", "layer"])
@pytest.mark.parametrize("case", PARALLEL_CASES)
def test_parallel_equals_none(parallel_results: list[dict], case: str, mode: str) -> None:
    for rank_results in parallel_results:
        loss0, grads0, stats0 = rank_results[case]["none"]
        loss, grads, stats = rank_results[case][mode]
        assert relative_error(loss, loss0) < 1e-10 or float(loss0) == float(loss) == 0.0
        assert grads, case
        assert worst(grads, grads0) < 1e-10, (case, mode)
        assert same_stats(stats, stats0), case
        if case.startswith("tp2-sp") or case.startswith("cp2"):
            assert len(stats) == 2  # every layer, once


def test_parallel_dropout_needs_the_tracker(parallel_results: list[dict]) -> None:
    """Restoring only the default generator, the split regions' masks (drawn from
    megatron-core's tracker) are not replayed: the gradients differ, or the layer
    recompute's routing does and it stops."""
    for rank_results in parallel_results:
        case = rank_results["tp2-sp-dp2-no-tracker"]
        _, grads0, _ = case["none"]
        assert worst(case["gau"][1], grads0) > 1e-3
        layer = case["layer"]
        assert layer == "routing changed" or worst(layer[1], grads0) > 1e-3
