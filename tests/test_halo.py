"""The activated-token halo across context-parallel ranks (parallel/halo.py).

One spawn of 4 gloo processes runs every case; megatron-core's groups are initialized once
per context-parallel size (CP = 4, 2, and 1: with CP = 2 the two groups run side by side).
Every rank builds the whole activation mask and the whole float64 inputs from fixed seeds,
so it can compute the single-process reference itself and compare its own chunk:

* ``gather_halo`` against a brute-force halo taken from the full sequence (exact);
* causal local attention over [halo ; local] against ``GatedAttentionUnit.local_attention``
  on the fully compressed sequence: outputs and gradients (w.r.t. q, k, v and the positional
  bias) to a relative error < 1e-10, which checks the reduce-scatter backward;
* the bytes every collective moves do not depend on the sequence length.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch

from testing.local import run_ranks

WORLD = 4

# (name, cp, sequence length, batch, window, activation pattern)
HALO_CASES = [
    ("cp2-random", 2, 24, 3, 4, "random"),
    ("cp4-random-ragged-chunk", 4, 40, 3, 4, "random"),
    ("cp4-none", 4, 16, 2, 3, "none"),
    ("cp4-all", 4, 16, 2, 3, "all"),
    ("cp2-all-window-gt-chunk", 2, 12, 2, 8, "all"),
    ("cp4-first-chunk-only", 4, 32, 3, 5, "first"),
    ("cp4-one-per-rank-w3", 4, 32, 3, 3, "one-per-rank"),
    ("cp4-window-gt-everything", 4, 40, 3, 16, "sparse"),
    ("cp2-mixed-columns", 2, 24, 4, 4, "mixed"),
    ("cp4-mixed-columns", 4, 36, 4, 3, "mixed"),
    ("cp1", 1, 16, 2, 4, "random"),
]

# (name, cp, sequence length, batch, window, query block, pattern, position kind, attention
# function); blocks smaller than the window, dividing it and not, shift the block boundaries
# against the halo.
ATTENTION_CASES = [
    ("cp4-random-simple-softmax", 4, 40, 2, 4, 4, "random", "simple", "softmax"),
    ("cp4-one-per-rank-local-relu2", 4, 44, 3, 3, 3, "one-per-rank", "local", "relu2"),
    ("cp2-random-local-softmax", 2, 30, 2, 4, 3, "random", "local", "softmax"),
    ("cp4-mixed-simple-relu2", 4, 36, 4, 5, 2, "mixed", "simple", "relu2"),
    ("cp4-first-none-softmax", 4, 32, 2, 4, 4, "first", "none", "softmax"),
    ("cp2-all-simple-softmax", 2, 20, 2, 4, 1, "all", "simple", "softmax"),
    ("cp4-sparse-wide-local-softmax", 4, 40, 3, 8, 3, "sparse", "local", "softmax"),
    ("cp4-none-simple-relu2", 4, 16, 2, 3, 3, "none", "simple", "relu2"),
]

BYTES_LENGTHS = (16, 256)


def make_mask(pattern: str, length: int, batch: int, cp: int, seed: int) -> torch.Tensor:
    """[L, B] bool activation mask, identical on every rank."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(length, batch, generator=gen)
    chunk = length // cp
    if pattern == "random":
        return u < 0.4
    if pattern == "sparse":
        return u < 0.08
    if pattern == "none":
        return torch.zeros(length, batch, dtype=torch.bool)
    if pattern == "all":
        return torch.ones(length, batch, dtype=torch.bool)
    if pattern == "first":  # every activated token in the first rank's chunk
        mask = u < 0.5
        mask[chunk:] = False
        return mask
    if pattern == "one-per-rank":  # a window of 3 on CP = 4 spans three ranks
        mask = torch.zeros(length, batch, dtype=torch.bool)
        pick = torch.randint(0, chunk, (cp, batch), generator=gen)
        for r in range(cp):
            mask[r * chunk + pick[r], torch.arange(batch)] = True
        return mask
    if pattern == "mixed":  # very different counts per column: dense, sparse, none, all
        density = torch.tensor([0.8, 0.15, 0.0, 1.01])[:batch]
        return u < density
    raise ValueError(pattern)


def relative_error(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return float((a - b).abs().max() / scale.abs().max().clamp_min(1e-300))


def init_context_parallel(cp: int):
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    return parallel_state.get_context_parallel_group(), parallel_state.get_context_parallel_rank()


def reference_halo(mask: torch.Tensor, rank: int, chunk: int, window: int):
    """Original positions [w, B] of the last ``window`` activated tokens before ``rank``'s
    chunk, right-aligned (-1 where empty), straight from the full mask."""
    batch = mask.shape[1]
    positions = torch.full((window, batch), -1, dtype=torch.long)
    for b in range(batch):
        before = torch.nonzero(mask[: rank * chunk, b]).flatten()[-window:]
        if before.numel():
            positions[window - before.numel() :, b] = before
    return positions


def check_halo_case(case: tuple, group, rank: int) -> dict:
    from parallel.halo import gather_halo
    from pretrain.model.router import compress, plan_compression

    name, cp, length, batch, window, pattern = case
    chunk = length // cp
    mask = make_mask(pattern, length, batch, cp, seed=len(name))
    gen = torch.Generator().manual_seed(7)
    t = torch.arange(length).unsqueeze(1).expand(length, batch)
    full = {  # payloads of several dtypes and trailing shapes, known for every token
        "k": torch.randn(length, batch, 3, dtype=torch.float64, generator=gen),
        "v": torch.randn(length, batch, 2, 2, dtype=torch.float64, generator=gen),
        "x": torch.randn(length, batch, generator=gen),  # float32, no trailing dim
        "pos": t.clone(),
        "tag": (t * 7 + torch.arange(batch)).to(torch.int32),
        "flag": (t % 3 == 0),
    }
    plan = plan_compression(mask[rank * chunk : (rank + 1) * chunk])
    local = [compress(x[rank * chunk : (rank + 1) * chunk], plan) for x in full.values()]
    halos, valid = gather_halo(local, plan.counts, window, group)

    ref_pos = reference_halo(mask, rank, chunk, window)
    ref_valid = ref_pos >= 0
    errors = []
    if not torch.equal(valid, ref_valid):
        errors.append("valid")
    b_index = torch.arange(batch).expand(window, batch)
    for (key, x), halo in zip(full.items(), halos, strict=True):
        expected = x[ref_pos.clamp_min(0), b_index]
        mask_view = ref_valid.view(window, batch, *([1] * (x.dim() - 2)))
        expected = torch.where(mask_view, expected, torch.zeros((), dtype=x.dtype))
        if halo.shape != (window, *x.shape[1:]) or halo.dtype != x.dtype:
            errors.append(f"{key}: shape/dtype {tuple(halo.shape)} {halo.dtype}")
        elif not torch.equal(halo, expected):
            errors.append(key)
    return {
        "errors": errors,
        "cp_rank": rank,
        "valid_slots": int(valid.sum()),
        "m_local": plan.length,
        "max_sources": int(_source_ranks(ref_pos, chunk).max()),
    }


def _source_ranks(positions: torch.Tensor, chunk: int) -> torch.Tensor:
    """How many distinct ranks each column's halo comes from."""
    owners = torch.where(positions >= 0, positions // chunk, torch.full_like(positions, -1))
    return torch.tensor([len(set(owners[:, b].tolist()) - {-1}) for b in range(owners.shape[1])])


def check_attention_case(case: tuple, group, rank: int) -> dict:
    import torch.distributed as dist

    from parallel.halo import gather_halo, with_halo
    from pretrain.model.gau import GatedAttentionUnit
    from pretrain.model.router import compress, extract, plan_compression

    name, cp, length, batch, window, block, pattern, position, fn = case
    zdim, hdim, chunk = 4, 3, length // cp
    mask = make_mask(pattern, length, batch, cp, seed=100 + len(name))
    torch.manual_seed(0)
    gau = GatedAttentionUnit(
        8, zdim, hdim, window, attention_fn=fn, position=position, max_positions=length + 1,
        block=block,
    ).double()  # fmt: skip
    if gau.rel_bias is not None:
        with torch.no_grad():  # large enough to matter against the scores
            gau.rel_bias.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(3)
    q_full, k_full = (
        torch.randn(length, batch, zdim, dtype=torch.float64, generator=gen) for _ in "qk"
    )
    v_full = torch.randn(length, batch, hdim, dtype=torch.float64, generator=gen)
    weights = torch.randn(length, batch, hdim, dtype=torch.float64, generator=gen)
    positions = torch.arange(length).unsqueeze(1).expand(length, batch)
    params = [gau.rel_bias] if gau.rel_bias is not None else []

    # Single process: the whole sequence compressed, local attention, loss = sum(out * R).
    leaves = [x.clone().requires_grad_() for x in (q_full, k_full, v_full)]
    plan = plan_compression(mask)
    q, k, v = (compress(x, plan) for x in leaves)
    out, _ = gau.local_attention(q, k, v, compress(positions, plan), plan.valid)
    ref_out = extract(out, plan)
    ref_grads = torch.autograd.grad((ref_out * weights).sum(), leaves + params)

    # This rank: its chunk compressed, the halo of k, v and positions prepended.
    part = slice(rank * chunk, (rank + 1) * chunk)
    leaves = [x[part].clone().requires_grad_() for x in (q_full, k_full, v_full)]
    plan = plan_compression(mask[part])
    q, k, v = (compress(x, plan) for x in leaves)
    pos = compress(positions[part], plan)
    (halo_k, halo_v, halo_pos), halo_valid = gather_halo([k, v, pos], plan.counts, window, group)
    out, _ = gau.local_attention(
        with_halo(q, torch.zeros_like(halo_k)),  # halo queries: padding, outputs dropped
        with_halo(k, halo_k),
        with_halo(v, halo_v),
        with_halo(pos, halo_pos),
        with_halo(plan.valid, halo_valid),
    )
    local_out = extract(out[window:], plan)
    grads = list(torch.autograd.grad((local_out * weights[part]).sum(), leaves + params))
    if params:  # the replicated bias: per-rank partial gradients, summed over the group
        dist.all_reduce(grads[-1], group=group)

    errors = {"out": relative_error(local_out, ref_out[part], ref_out)}
    for key, mine, ref in zip(("q", "k", "v", "bias"), grads, ref_grads, strict=False):
        ref_part = ref if key == "bias" else ref[part]
        errors[f"grad_{key}"] = relative_error(mine, ref_part, ref)
    return {
        "errors": errors,
        "activated": int(plan.counts.sum()),
        "halo_valid": int(halo_valid.sum()),
        "out_scale": float(ref_out.abs().max()),
    }


@contextlib.contextmanager
def count_collectives(counted: collections.Counter):
    """Counts payload bytes and calls of every collective, including the all-gather and
    reduce-scatter megatron-core bound at import in mappings.py (see bench/tp_comm.py)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    targets = [
        (dist, "all_gather_into_tensor", "all_gather_into_tensor"),
        (dist, "reduce_scatter_tensor", "reduce_scatter_tensor"),
        (dist, "all_gather", "all_gather"),
        (dist, "all_reduce", "all_reduce"),
        (dist, "broadcast", "broadcast"),
        (mappings, "dist_all_gather_func", "megatron_all_gather"),
        (mappings, "dist_reduce_scatter_func", "megatron_reduce_scatter"),
    ]
    originals = [(module, attr, getattr(module, attr)) for module, attr, _ in targets]

    def counting(fn, kind: str):
        def call(*a, **kw):
            # all-gather: its output (a[0]); reduce-scatter: its input (a[1]); others: a[0].
            tensor = a[1] if "reduce_scatter" in kind else a[0]
            if isinstance(tensor, list):
                tensor = tensor[0]
            counted[kind] += tensor.numel() * tensor.element_size()
            counted[f"{kind} calls"] += 1
            return fn(*a, **kw)

        return call

    for (module, attr, fn), (_, _, kind) in zip(originals, targets, strict=True):
        setattr(module, attr, counting(fn, kind))
    try:
        yield counted
    finally:
        for module, attr, fn in originals:
            setattr(module, attr, fn)


def check_bytes(group, rank: int, cp: int) -> dict:
    """Forward + backward of one halo exchange for two sequence lengths."""
    from parallel.halo import gather_halo
    from pretrain.model.router import compress, plan_compression

    batch, window = 2, 4
    out = {}
    for length in BYTES_LENGTHS:
        chunk = length // cp
        mask = make_mask("random", length, batch, cp, seed=length)
        plan = plan_compression(mask[rank * chunk : (rank + 1) * chunk])
        gen = torch.Generator().manual_seed(length)
        k = torch.randn(chunk, batch, 3, dtype=torch.float64, generator=gen).requires_grad_()
        v = torch.randn(chunk, batch, 2, dtype=torch.float64, generator=gen).requires_grad_()
        pos = torch.arange(rank * chunk, (rank + 1) * chunk).unsqueeze(1).expand(chunk, batch)
        counted: collections.Counter = collections.Counter()
        with count_collectives(counted):
            (hk, hv, _), _ = gather_halo(
                [compress(k, plan), compress(v, plan), compress(pos, plan)],
                plan.counts, window, group,
            )  # fmt: skip
            (hk.sum() + hv.square().sum()).backward()
        out[length] = {"bytes": dict(counted), "m_local": plan.length}
    return out


def worker(rank: int, world: int) -> dict:
    import warnings

    from testing.local import gloo_world

    warnings.simplefilter("ignore")  # megatron-core's notes about Apex / TE on CPU
    results: dict = {"halo": {}, "attention": {}, "bytes": None}
    with gloo_world(rank, world):
        for cp in (4, 2, 1):
            group, cp_rank = init_context_parallel(cp)
            for case in HALO_CASES:
                if case[1] == cp:
                    results["halo"][case[0]] = check_halo_case(case, group, cp_rank)
            for case in ATTENTION_CASES:
                if case[1] == cp:
                    results["attention"][case[0]] = check_attention_case(case, group, cp_rank)
            if cp == 4:
                results["bytes"] = check_bytes(group, cp_rank, cp)
    return results


@pytest.fixture(scope="module")
def results() -> list:
    return run_ranks(worker, WORLD, timeout=300)


@pytest.mark.parametrize("case", HALO_CASES, ids=[c[0] for c in HALO_CASES])
def test_halo_matches_brute_force(results: list, case: tuple) -> None:
    name, cp, _, _, window, pattern = case
    per_rank = [r["halo"][name] for r in results]
    for rank, got in enumerate(per_rank):
        assert got["errors"] == [], f"{name} rank {rank}: {got['errors']}"
        if got["cp_rank"] == 0 or pattern == "none":
            assert got["valid_slots"] == 0
    # The cases cover what they claim to.
    if pattern == "one-per-rank" and window == 3:
        assert max(r["max_sources"] for r in per_rank) == 3
    if pattern == "all" and cp > 1:
        assert all(r["valid_slots"] > 0 for r in per_rank if r["cp_rank"] > 0)


def test_halo_cases_have_ragged_local_lengths(results: list) -> None:
    lengths = {r["halo"]["cp4-random-ragged-chunk"]["m_local"] for r in results}
    assert len(lengths) > 1, lengths


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_local_attention_across_ranks_is_exact(results: list, case: tuple) -> None:
    name, pattern = case[0], case[6]
    for rank, rank_results in enumerate(results):
        got = rank_results["attention"][name]
        worst = max(got["errors"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-10, f"{name} rank {rank}: {worst}"
        if pattern != "none":
            assert got["out_scale"] > 0.1  # the comparison is not against zeros
    if pattern != "none":
        assert any(r["attention"][name]["halo_valid"] > 0 for r in results)


def test_bytes_do_not_depend_on_sequence_length(results: list) -> None:
    cp, batch, window = 4, 2, 4
    for rank_results in results:
        short, long = (rank_results["bytes"][length] for length in BYTES_LENGTHS)
        assert long["m_local"] > short["m_local"]  # the compressed length did grow
        assert short["bytes"] == long["bytes"]
        # counts + the integer tails (int64); the float64 tails (3 + 2 channels) gathered
        # forward and reduce-scattered backward; nothing else.
        floats = cp * window * batch * 5 * 8
        assert short["bytes"] == {
            "all_gather_into_tensor": cp * (batch + window * batch) * 8,
            "all_gather_into_tensor calls": 1,
            "megatron_all_gather": floats,
            "megatron_all_gather calls": 1,
            "megatron_reduce_scatter": floats,
            "megatron_reduce_scatter calls": 1,
        }
