"""Tensor, sequence, context and data parallel SeqBoat equals the single process, in float64.

One spawn of 4 gloo processes runs every case; each case re-initializes megatron-core's
model-parallel groups. Every rank also computes the single-process reference itself (same
seed, same weights, the whole global batch), then the parallel model (the reference's
state dict cut by ``shard_state_dict``) on its data-parallel rows and context-parallel chunk
of each sequence; the logits and every gathered gradient must match to a relative error
< 1e-10.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from testing.local import run_ranks

WORLD = 4
VOCAB = 50
SEQ = 16
BATCH = 4  # global batch: 2 rows per data-parallel rank when DP = 2

# (name, tensor size, sequence parallel, context size, activation pattern, model overrides)
CASES = [
    ("tp2-dp2", 2, False, 1, "random", {}),
    ("tp4", 4, False, 1, "random", {"position": "simple", "tie_embeddings": False}),
    ("tp2-sp-dp2", 2, True, 1, "random", {"ffn_hidden": 16, "prenorm": False}),
    ("tp4-sp", 4, True, 1, "random", {"position": "local"}),
    ("tp2-none", 2, True, 1, "none", {}),
    ("tp2-all", 2, False, 1, "all", {"attention_fn": "relu2"}),
    ("tp2-always", 2, True, 1, "random", {"routing": "always"}),
    ("tp2-never", 2, False, 1, "random", {"routing": "never"}),
    ("dp4", 1, False, 1, "random", {}),
    ("cp2-dp2", 1, False, 2, "random", {"ema_chunk": 3}),
    ("cp4", 1, False, 4, "random", {"position": "simple", "attention_block": 3}),
    ("cp2-tp2", 2, False, 2, "random", {"position": "local", "window": 3, "attention_block": 2}),
    ("cp2-tp2-sp", 2, True, 2, "random", {"ffn_hidden": 16}),
    ("cp4-none", 1, False, 4, "none", {}),
    ("cp4-all", 1, False, 4, "all", {"attention_fn": "relu2", "window": 3}),
    ("cp4-first-chunk", 1, False, 4, "first", {"position": "simple"}),
    ("cp4-spans-3-ranks", 1, False, 4, "sparse", {"position": "local"}),
    ("cp2-dp2-sparse", 1, False, 2, "sparse", {"window": 3}),
    # Load-balanced dispatch of the attention windows ("_dispatch": over which ranks).
    ("cp4-dispatch", 1, False, 4, "random", {"_dispatch": "context", "attention_block": 3}),
    ("cp4-first-chunk-dispatch", 1, False, 4, "first", {"_dispatch": "context", "window": 1}),
    ("cp4-sparse-dispatch", 1, False, 4, "sparse", {"_dispatch": "context", "window": 3}),
    ("cp2-dp2-dispatch-data", 1, False, 2, "first", {"_dispatch": "data", "window": 2}),
    ("cp2-tp2-sp-dispatch", 2, True, 2, "random", {"_dispatch": "context", "position": "simple"}),
    ("dp4-dispatch-data", 1, False, 1, "random", {"_dispatch": "data", "attention_block": 2}),
]


def model_config(overrides: dict):
    from pretrain.config import ModelConfig

    base = ModelConfig(layers=2, width=32, zdim=8, hdim=32, ndim=4, window=4, vocab_multiple=16)
    return replace(base, **overrides)


def set_pattern(model, pattern: str) -> None:
    bias = {"random": 0.0, "none": 1e4, "all": -1e4}.get(pattern, 0.0)
    for layer in model.layers:
        if getattr(layer, "router", None) is not None:
            layer.router.act_bias = bias


def forced_activation(pattern: str, positions: torch.Tensor, batch: int) -> torch.Tensor:
    """[L, B] decisions as a function of the original position (so that every rank of a
    context-parallel group agrees with the single process): "first": only tokens of the
    first quarter of the sequence; "sparse": one token in every SEQ/4 (with window 3 or 4 the
    window reaches across three ranks). Odd and even columns differ by a shift (with two rows
    per data-parallel rank, local and global parities agree)."""
    shift = torch.arange(batch, device=positions.device) % 2
    pos = positions.unsqueeze(1) + shift
    if pattern == "first":
        return (positions.unsqueeze(1) < SEQ // 4) & (pos % 3 != 1)
    return pos % (SEQ // 4) == 1


def force_routing(pattern: str):
    """Replaces SeqBoatLayer.route for patterns the activation bias cannot make; the gate
    is still the router's probability of "activate" (its gradient path is unchanged)."""
    from pretrain.model.layer import SeqBoatLayer

    original = SeqBoatLayer.route

    def route(self, proj: torch.Tensor):
        hx, _, _ = original(self, proj)
        u = proj[..., :2]
        prob = torch.sigmoid(
            (u[..., 1] - u[..., 0] - self.router.act_bias) / self.router.log_temp.exp()
        )
        act = forced_activation(pattern, self.cp.positions(u.shape[0], u.device), u.shape[1])
        return hx, act, torch.where(act, prob, torch.zeros_like(prob))

    return original, route


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale)


def gradients(model, tp) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, tensor-parallel shards gathered to the full shape."""
    from parallel.tensor import gather_split, is_split

    out = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if tp.active and is_split(param):
            grad = gather_split(grad, param.partition_dim, tp)
        out[name] = grad.clone()
    model.zero_grad(set_to_none=True)
    return out


def check_case(rank: int, case: tuple) -> dict:
    """Two objectives on the same weights and batch:

    * a float64 surrogate, sum(logits * R) for a fixed random R, that runs the whole model
      forward and backward (logits and every gradient must match to 1e-10);
    * the language-model loss, whose megatron-core vocab-parallel cross-entropy computes in
      float32 by design (loss and gradients to 1e-6).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from parallel.dims import ParallelDims
    from parallel.grads import average, average_gradients
    from parallel.grads import sum_partial_grads as sync_sp
    from parallel.tensor import TensorParallel, gather_split, shard_state_dict
    from pretrain.model.layer import SeqBoatLayer
    from pretrain.model.lm import LanguageModel

    name, tp_size, sp, cp_size, pattern, overrides = case
    overrides = dict(overrides)
    dispatch = overrides.pop("_dispatch", "off")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp_size, context_parallel_size=cp_size
    )
    dims = ParallelDims.from_parallel_state(sequence_parallel=sp, dispatch=dispatch)
    tp, cp = dims.tensor, dims.context
    # Gradients and losses average over every rank that sees different tokens.
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dp_size = parallel_state.get_data_parallel_world_size()
    averaged = dp_size * cp.size
    rows = slice(parallel_state.get_data_parallel_rank() * BATCH // dp_size, None)
    rows = slice(rows.start, rows.start + BATCH // dp_size)
    part = SEQ // cp.size
    span = slice(cp.rank * part, (cp.rank + 1) * part)  # this rank's positions
    original_route = SeqBoatLayer.route
    if pattern in ("first", "sparse"):
        SeqBoatLayer.route = force_routing(pattern)[1]

    cfg = model_config(overrides)
    torch.manual_seed(0)
    reference = LanguageModel(cfg, VOCAB).double()
    set_pattern(reference, pattern)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(
        SEQ, BATCH, reference.padded_vocab, dtype=torch.float64,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip

    model = LanguageModel(cfg, VOCAB, tp=tp, cp=cp).double()
    set_pattern(model, pattern)
    model.load_state_dict(shard_state_dict(reference.state_dict(), model, tp))

    # 1) float64 surrogate: the model itself, exactly.
    ref_logits, ref_stats = reference(tokens[:, :-1], collect_stats=True)
    ((ref_logits * weights).sum() / BATCH).backward()
    ref_grads = gradients(reference, TensorParallel())
    logits, stats = model(cp.chunk(tokens[rows])[:, :-1], collect_stats=True)
    vocab = slice(tp.rank * logits.shape[-1], (tp.rank + 1) * logits.shape[-1])
    # Scaled so that the average over data x context ranks is the reference's objective.
    ((logits * weights[span, rows, vocab]).sum() * cp.size / (BATCH // dp_size)).backward()
    sync_sp(model, tp)
    average_gradients(model, dp_group, averaged)
    errors = {
        "logits": relative_error(
            gather_split(logits.detach(), 2, tp) if tp.active else logits.detach(),
            ref_logits.detach()[span, rows],
        )
    }
    errors.update({n: relative_error(g, ref_grads[n]) for n, g in gradients(model, tp).items()})

    # 2) the loss, through megatron-core's float32 vocab-parallel cross-entropy.
    ref_loss, _ = reference.loss(tokens)
    ref_loss.backward()
    ref_grads = gradients(reference, TensorParallel())
    loss, _ = model.loss(cp.chunk(tokens[rows]))
    loss.backward()
    sync_sp(model, tp)
    average_gradients(model, dp_group, averaged)
    loss_errors = {"loss": relative_error(average(loss.detach(), dp_group, averaged), ref_loss)}
    loss_errors.update(
        {n: relative_error(g, ref_grads[n]) for n, g in gradients(model, tp).items()}
    )

    SeqBoatLayer.route = original_route
    # Every tensor-parallel rank took the same routing decision, the reference's.
    for i, (mine, ref) in enumerate(zip(stats or [], ref_stats or [], strict=True)):
        expected = ref.activated[span, rows]
        assert torch.equal(mine.activated, expected), f"{name}: layer {i} routing"
        if tp.active:
            everyone = gather_split(mine.activated.to(torch.uint8), 0, tp)
            assert (everyone.view(tp.size, -1) == everyone.view(tp.size, -1)[0]).all()
    ratios = [float(s.activated.double().mean()) for s in ref_stats or []]
    imbalance = [s.imbalance for s in stats or []]
    dist.barrier()
    return {"exact": errors, "loss": loss_errors, "ratios": ratios, "imbalance": imbalance}


def check_near_ties(rank: int) -> dict:
    """Routing is identical on all tensor-parallel ranks even where a logit margin sits on
    the decision threshold, and ``broadcast_decision`` overrides ranks that disagree."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from parallel.dims import ParallelDims
    from parallel.tensor import broadcast_decision, gather_split, shard_state_dict
    from pretrain.model.lm import LanguageModel

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tp = ParallelDims.from_parallel_state().tensor
    cfg = model_config({"layers": 1})
    torch.manual_seed(0)
    reference = LanguageModel(cfg, VOCAB).double()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    captured = {}
    layer = reference.layers[0]
    hook = layer.hx_proj.register_forward_hook(lambda m, i, o: captured.update(u=o[..., :2]))
    reference(tokens)
    hook.remove()
    margin = (captured["u"][..., 1] - captured["u"][..., 0]).flatten().sort().values
    model = LanguageModel(cfg, VOCAB, tp=tp).double()
    model.load_state_dict(shard_state_dict(reference.state_dict(), model, tp))
    # The threshold exactly at the median margin: that token is a tie in the reference.
    model.layers[0].router.act_bias = float(margin[margin.numel() // 2])
    _, stats = model(tokens, collect_stats=True)
    everyone = gather_split(stats[0].activated.to(torch.uint8), 0, tp).view(tp.size, -1)
    # Deliberately different decisions per rank come out as the first rank's.
    forced = broadcast_decision(torch.full((SEQ, 2), bool(tp.rank % 2)), tp)
    dist.barrier()
    return {
        "tie_ranks_agree": bool((everyone == everyone[0]).all()),
        "broadcast_takes_rank0": bool((~forced).all()),
    }


def worker(rank: int, world: int) -> list:
    from testing.local import gloo_world

    with gloo_world(rank, world):
        return [check_case(rank, case) for case in CASES] + [check_near_ties(rank)]


@pytest.fixture(scope="module")
def results() -> list:
    return run_ranks(worker, WORLD, timeout=600)


def test_routing_agrees_across_tensor_ranks_at_ties(results: list) -> None:
    for rank_results in results:
        assert rank_results[-1] == {"tie_ranks_agree": True, "broadcast_takes_rank0": True}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_parallel_equals_single_process(results: list, index: int) -> None:
    name, _, _, _, pattern, overrides = CASES[index]
    for rank_results in results:
        case = rank_results[index]
        worst = max(case["exact"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-10, f"{name}: {worst}"
        worst = max(case["loss"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-6, f"{name}: {worst}"
        ratios = case["ratios"]
        if overrides.get("routing", "sparse") != "sparse":
            continue
        if pattern == "none":
            assert all(r == 0 for r in ratios)
        elif pattern == "all":
            assert all(r == 1 for r in ratios)
        elif pattern == "random":
            assert all(0.05 < r < 0.95 for r in ratios), ratios
        else:  # forced: the reference routed exactly as the pattern says
            assert all(0 < r < 0.3 for r in ratios), ratios
        if "_dispatch" not in overrides:
            assert all(i is None for i in case["imbalance"])
            continue
        for before, after in case["imbalance"]:
            assert after <= before
            if pattern == "first":  # all the work on the first rank, then spread out
                assert before >= 2 and after < before, (before, after)
