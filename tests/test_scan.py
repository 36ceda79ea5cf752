"""Context-parallel EMA (state passing between sequence chunks) equals the single process.

One spawn of 4 gloo processes runs every case; each case re-initializes megatron-core's
model-parallel groups with ``context_parallel_size=cp`` (the rest of the world is data
parallel). Every rank computes the single-process reference itself (one FFT over the whole
sequence, the whole global batch) and then ``context_parallel_ema`` on its chunk of the
sequence and its data-parallel rows. Outputs, input gradients and parameter gradients
(summed over the context group, then over the data group) must match to a relative error
< 1e-10 in float64. The collectives are counted: their payload must not depend on L.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
from collections.abc import Iterator

import pytest
import torch

from testing.local import run_ranks

WORLD = 4
CHANNELS = 6
NDIM = 4
BATCH = 4  # global batch: 2 rows per data-parallel replica when DP = 2

# (name, cp, chunk length Lc per rank, the EMA's intra-rank FFT chunk, dtype)
CASES = [
    ("cp4-L1", 4, 1, 0, torch.float64),
    ("cp4-L7", 4, 7, 3, torch.float64),
    ("cp4-L16", 4, 16, 5, torch.float64),
    ("cp4-L64", 4, 64, 16, torch.float64),  # 4x cp4-L16: same bytes
    ("cp4-L100", 4, 100, 16, torch.float64),  # last intra-rank chunk padded
    ("cp2-dp2-L7", 2, 7, 0, torch.float64),
    ("cp2-dp2-L64", 2, 64, 24, torch.float64),
    ("cp1-dp4-L16", 1, 16, 5, torch.float64),  # no context parallelism: no collective
    ("cp4-L64-fp32", 4, 64, 16, torch.float32),
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}

# torch.distributed collectives, and the bindings megatron-core's mappings made at import.
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "broadcast", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "batch_isend_irecv",
)  # fmt: skip
MEGATRON_BINDINGS = {
    "dist_all_gather_func": "all_gather_into_tensor",
    "dist_reduce_scatter_func": "reduce_scatter_tensor",
}


def make_ema(chunk: int, dtype: torch.dtype):
    """A DampedEMA with spread-out decays: q from ~0.05 (forgets within a few tokens) to
    ~0.9998 (remembers across every rank boundary of the longest case)."""
    from pretrain.model.ema import DampedEMA

    ema = DampedEMA(CHANNELS, NDIM, chunk=chunk)
    gen = torch.Generator().manual_seed(0)
    shape = (CHANNELS, NDIM)
    with torch.no_grad():
        ema.delta.copy_(torch.linspace(-8.0, 3.0, CHANNELS * NDIM).view(shape))
        ema.alpha.copy_(torch.linspace(-1.0, 3.0, CHANNELS * NDIM).flip(0).view(shape))
        sign = torch.tensor([1.0, -1.0]).repeat(NDIM // 2)
        # Input weights ~ 1/sqrt(p): long-memory channels carry states of the same order as
        # the outputs, so a wrong carry cannot hide behind omega's skip.
        p = torch.sigmoid(ema.delta)
        ema.beta.copy_(sign * (0.5 + torch.rand(shape, generator=gen)) / p.sqrt())
        ema.eta.copy_(torch.randn(shape, generator=gen))
        ema.omega.copy_(torch.randn(CHANNELS, generator=gen))
    return ema.to(dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale)


@contextlib.contextmanager
def counting_collectives(counted: collections.Counter) -> Iterator[None]:
    """Adds each collective's payload on this rank (bytes) to ``counted``, by kind: the
    gathered output of an all-gather, the input of a reduce-scatter, the tensor otherwise."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    def payload(kind: str, args: tuple, kwargs: dict) -> int:
        tensor = args[1] if kind == "reduce_scatter_tensor" else args[0] if args else None
        tensors = tensor if isinstance(tensor, list | tuple) else [tensor]
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    def wrap(fn, kind: str):
        def call(*args, **kwargs):
            counted[kind] += payload(kind, args, kwargs)
            return fn(*args, **kwargs)

        return call

    targets = [(dist, name, name) for name in COLLECTIVES] + [
        (mappings, binding, kind) for binding, kind in MEGATRON_BINDINGS.items()
    ]
    originals = [(module, name, getattr(module, name)) for module, name, _ in targets]
    for module, name, kind in targets:
        setattr(module, name, wrap(getattr(module, name), kind))
    try:
        yield
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def check_case(rank: int, case: tuple) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from parallel.scan import context_parallel_ema

    _, cp, length, chunk, dtype = case
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    group = parallel_state.get_context_parallel_group()
    cp_rank = parallel_state.get_context_parallel_rank()
    dp_group = parallel_state.get_data_parallel_group()
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    assert dist.get_world_size(group) == cp and dist.get_rank(group) == cp_rank
    rows = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
    tokens = slice(cp_rank * length, (cp_rank + 1) * length)

    gen = torch.Generator().manual_seed(1)
    x_full = torch.randn(cp * length, BATCH, CHANNELS, generator=gen, dtype=dtype)
    weights = torch.randn(cp * length, BATCH, CHANNELS, generator=gen, dtype=dtype)

    # Single process: the whole sequence in one FFT, the whole batch, sum(y * R).
    reference = make_ema(0, dtype)
    xr = x_full.clone().requires_grad_(True)
    ref_y = reference(xr)
    (ref_y * weights).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    # ... and this data-parallel replica's rows only (what its context group must sum to).
    reference.zero_grad(set_to_none=True)
    (reference(x_full[:, rows]) * weights[:, rows]).sum().backward()
    replica_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}

    ema = make_ema(chunk, dtype)
    x = x_full[tokens, rows].clone().requires_grad_(True)
    forward_bytes: collections.Counter = collections.Counter()
    backward_bytes: collections.Counter = collections.Counter()
    with counting_collectives(forward_bytes):
        y = context_parallel_ema(ema, x, group)
    loss = (y * weights[tokens, rows]).sum()
    with counting_collectives(backward_bytes):
        loss.backward()

    errors = {
        "y": relative_error(y.detach(), ref_y.detach()[tokens, rows]),
        "x.grad": relative_error(x.grad, xr.grad[tokens, rows]),
    }
    for n, p in ema.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)
        errors[f"{n}.grad (cp sum)"] = relative_error(grad, replica_grads[n])
        dist.all_reduce(grad, group=dp_group)
        errors[f"{n}.grad (cp+dp sum)"] = relative_error(grad, ref_grads[n])
    with torch.no_grad():  # how much the carried state changed this rank's outputs
        carried = float((y - ema(x)).abs().max() / y.abs().max())
    dist.barrier()
    return {
        "errors": errors,
        "carried": carried,
        "forward_bytes": dict(forward_bytes),
        "backward_bytes": dict(backward_bytes),
        "cp_rank": cp_rank,
        "dp_rank": dp_rank,
        "rows": (rows.start, rows.stop),
        "tokens": (tokens.start, tokens.stop),
        "cp_group": dist.get_process_group_ranks(group),
        "dp_group": dist.get_process_group_ranks(dp_group),
    }


def worker(rank: int, world: int) -> list:
    import warnings

    from testing.local import gloo_world

    warnings.simplefilter("ignore")  # megatron-core's notes about Apex / TE / CUDA on CPU
    with gloo_world(rank, world):
        return [check_case(rank, case) for case in CASES]


@pytest.fixture(scope="module")
def results() -> list:
    return run_ranks(worker, WORLD, timeout=300)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_context_parallel_ema_equals_single_process(results: list, index: int) -> None:
    name, _, _, _, dtype = CASES[index]
    for rank, rank_results in enumerate(results):
        case = rank_results[index]
        worst = max(case["errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOLERANCE[dtype], f"{name} rank {rank}: {worst}"
        # Not vacuous: past the first chunk, the carried state moves the outputs visibly.
        if case["cp_rank"] > 0:
            assert case["carried"] > 1e-2, f"{name} rank {rank}: carry {case['carried']}"


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_scan_moves_one_gather_of_states(results: list, index: int) -> None:
    """Forward: one all-gather of the [B, C, N] states; backward: its reduce-scatter.
    Nothing else, and nothing that scales with the sequence length."""
    _, cp, _, _, dtype = CASES[index]
    batch = BATCH // (WORLD // cp)
    payload = cp * batch * CHANNELS * NDIM * torch.empty((), dtype=dtype).element_size()
    for rank_results in results:
        case = rank_results[index]
        if cp == 1:
            assert case["forward_bytes"] == {} and case["backward_bytes"] == {}
        else:
            assert case["forward_bytes"] == {"all_gather_into_tensor": payload}
            assert case["backward_bytes"] == {"reduce_scatter_tensor": payload}


def test_bytes_do_not_depend_on_length(results: list) -> None:
    names = [c[0] for c in CASES]
    short, long = names.index("cp4-L16"), names.index("cp4-L64")
    assert CASES[long][2] == 4 * CASES[short][2]
    for rank_results in results:
        for key in ("forward_bytes", "backward_bytes"):
            assert rank_results[short][key] == rank_results[long][key]
            assert rank_results[short][key]  # something was counted


@pytest.mark.parametrize(
    "index", [i for i, c in enumerate(CASES) if 1 < c[1] < WORLD], ids=lambda i: CASES[i][0]
)
def test_context_and_data_groups_compose(results: list, index: int) -> None:
    """CP x DP: each context group holds consecutive chunks of the same rows (in group-rank
    order); the data-parallel replicas hold different rows, together the whole batch."""
    _, cp, length, _, _ = CASES[index]
    cases = [rank_results[index] for rank_results in results]
    cp_groups = {tuple(c["cp_group"]) for c in cases}
    assert sorted(r for g in cp_groups for r in g) == list(range(WORLD))
    for members in cp_groups:
        assert len(members) == cp
        assert [cases[r]["cp_rank"] for r in members] == list(range(cp))
        assert [cases[r]["tokens"] for r in members] == [
            (i * length, (i + 1) * length) for i in range(cp)
        ]
        assert len({cases[r]["rows"] for r in members}) == 1
        assert len({cases[r]["dp_rank"] for r in members}) == 1
    for c in cases:
        replicas = c["dp_group"]
        assert len(replicas) == WORLD // cp
        assert len({cases[r]["cp_rank"] for r in replicas}) == 1
        rows = sorted(cases[r]["rows"] for r in replicas)
        assert rows[0][0] == 0 and rows[-1][1] == BATCH
        assert all(a[1] == b[0] for a, b in itertools.pairwise(rows))
