"""DeepSpeed ZeRO (parallel/zero.py) equals plain single-process AdamW.

Two spawns. Every rank computes the single-process reference itself (the same seed, the
whole global batch, torch AdamW + our clipping and warmup schedule) and compares each step's
parameters (tensor-parallel shards gathered) to it, float32, relative error < 1e-5.

* 2 ranks (DP=2): ZeRO-1/2/3 trajectories; gradients produced outside DeepSpeed (the path
  megatron-core's pipeline schedules take); optimizer-state bytes per rank; checkpoints of
  ZeRO-1/2 saved at step 2 (with the uninterrupted step 3 recorded).
* 4 ranks: ZeRO-1/2 under TP=2 x DP=2 (and the same with the partial-gradient hooks removed,
  which must break it); the DP=2 checkpoints loaded at DP=4 and at DP=1 (each rank alone in
  its own group), whose state and next step must equal the uninterrupted run's.
"""

from __future__ import annotations

import faulthandler
import io
import math
from dataclasses import replace

import pytest
import torch

from testing.local import run_ranks
from testing.zero_state import full_optimizer_state, optimizer_state_bytes

VOCAB = 50
SEQ = 16
GLOBAL = 8  # sequences per optimizer step
MICRO = 2  # sequences per micro-batch
STEPS = 3
TOL = 1e-5


def model_config():
    from pretrain.config import ModelConfig

    return ModelConfig(layers=2, width=32, zdim=8, hdim=32, ndim=4, window=4, vocab_multiple=16)


def optim_config(clip: float):
    from pretrain.config import OptimizerConfig

    # Warmup, then decay: the schedule matters at every step. eps 1e-6: Adam's first steps
    # divide each gradient entry by its own size, which for entries near eps amplifies the
    # float32 summation-order noise of a different reduction order (not a ZeRO error).
    return replace(
        OptimizerConfig(), lr=1e-2, min_lr=1e-3, warmup_steps=2, clip_grad=clip, eps=1e-6
    )


def batch(step: int) -> torch.Tensor:
    return torch.randint(
        0, VOCAB, (GLOBAL, SEQ + 1), generator=torch.Generator().manual_seed(100 + step)
    )


def reference(clip: float, steps: int = STEPS + 1) -> tuple[list[dict], list[float]]:
    """Parameters after each step and the norms, of one process with torch AdamW."""
    from parallel.grads import clip_gradients
    from parallel.tensor import TensorParallel
    from pretrain.build import optimizer_for, scheduler_for
    from pretrain.model.lm import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(model_config(), VOCAB)
    opt = optimizer_for(model, optim_config(clip))
    sched = scheduler_for(opt, optim_config(clip), 10)
    states, norms = [], []
    for step in range(steps):
        micro = batch(step).split(MICRO)
        for m in micro:
            (model.loss(m)[0] / len(micro)).backward()
        norms.append(clip_gradients(list(model.parameters()), clip, TensorParallel()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        states.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return states, norms


def pack(obj) -> bytes:
    """Tensors by value: torch's queue would share their storage with a process that is
    about to exit."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def relative_error(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in b)


# --------------------------------------------------------------------------- helpers in ranks


def init_megatron(tp: int = 1) -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def build(stage: int, clip: float, groups=None, tp_size: int = 1):
    """A ZeRO engine over the reference's initial weights (this rank's tensor shard)."""
    from parallel.dims import ParallelDims
    from parallel.tensor import TensorParallel, shard_state_dict
    from parallel.zero import ZeroEngine, ZeroOptions
    from parallel.zero_config import MegatronGroups
    from pretrain.build import optimizer_for, scheduler_for
    from pretrain.model.lm import LanguageModel

    groups = groups or MegatronGroups()
    tp = ParallelDims.from_parallel_state().tensor if tp_size > 1 else TensorParallel()
    torch.manual_seed(0)
    model = LanguageModel(model_config(), VOCAB)
    if tp.active:
        full = model.state_dict()
        model = LanguageModel(model_config(), VOCAB, tp)
        model.load_state_dict(shard_state_dict(full, model, tp))
    opt = optimizer_for(model, optim_config(clip))
    sched = scheduler_for(opt, optim_config(clip), 10)
    dp = groups.get_data_parallel_world_size()
    external = [(model, model.embedding.weight)] if model.head is None else []
    options = ZeroOptions(
        stage=stage, micro_batch_size=MICRO, grad_accum_steps=GLOBAL // (MICRO * dp),
        clip_grad=clip, persistence_threshold=0,  # ZeRO-3: partition everything
    )  # fmt: skip
    zero = ZeroEngine.build(model, opt, sched, options, groups=groups, external_params=external)
    return zero, tp


def train_step(zero, step: int, external: bool = False):
    """One optimizer step on this rank's rows of the global batch."""
    dp, rank = zero.dp_size, zero.dp_rank
    rows = batch(step)[rank * GLOBAL // dp : (rank + 1) * GLOBAL // dp]
    micro = rows.split(MICRO)
    for m in micro:
        loss = zero.module.loss(m)[0]
        if external:  # as a pipeline schedule does: torch's backward, scaled by the caller
            torch.autograd.backward(loss / len(micro))
        else:
            zero.backward(loss)
    return zero.step()


def full_params(zero, tp) -> dict:
    """The single-process parameters (ZeRO-3 partitions and tensor shards gathered)."""
    from parallel.tensor import gather_split, is_split

    deepspeed = __import__("deepspeed")
    params = dict(zero.module.named_parameters())
    out = {}
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=zero.stage == 3):
        for name, p in params.items():
            t = p.detach().clone()
            if tp.active and is_split(p):
                t = gather_split(t, p.partition_dim, tp)
            out[name] = t
    return out


def trajectory(zero, tp, steps: int = STEPS, external: bool = False):
    traj, norms = [], []
    for step in range(steps):
        result = train_step(zero, step, external)
        assert result.applied
        norms.append(result.grad_norm)
        traj.append(full_params(zero, tp))
    return traj, norms


def compare(name: str, traj, norms, ref, ref_norms) -> dict:
    errors = [relative_error(t, r) for t, r in zip(traj, ref, strict=False)]
    norm_errors = [abs(a - b) / b for a, b in zip(norms, ref_norms, strict=False)]
    return {"case": name, "param_errors": errors, "norm_errors": norm_errors}


def skipped_steps(zero, tp) -> list[dict]:
    """A NaN loss, then a finite step skipped on request, then a normal step: the first two
    leave the parameters alone and still advance the schedule."""
    out = []
    for step, (poison, skip) in enumerate([(True, False), (False, True), (False, False)]):
        before = full_params(zero, tp)
        dp, rank = zero.dp_size, zero.dp_rank
        rows = batch(step)[rank * GLOBAL // dp : (rank + 1) * GLOBAL // dp]
        for m in rows.split(MICRO):
            loss = zero.module.loss(m)[0]
            zero.backward(loss * float("nan") if poison else loss)
        result = zero.step(skip=skip)
        after = full_params(zero, tp)
        out.append({
            "applied": result.applied,
            "norm": result.grad_norm,
            "changed": any(not torch.equal(before[k], after[k]) for k in before),
            "lr": zero.scheduler.get_last_lr()[0],
        })  # fmt: skip
    return out


# --------------------------------------------------------------------------- spawn 1: DP = 2


HANG_S = 200  # a rank still running then prints its stack and exits (no silent hang)


def dp2_worker(rank: int, world: int, clip: float, ckpt_dir: str) -> bytes:
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    from testing.local import gloo_world

    with gloo_world(rank, world):
        init_megatron()
        ref, ref_norms = reference(clip)
        out: dict = {"cases": [], "bytes": {}, "init_s": []}
        for stage in (1, 2, 3):
            zero, tp = build(stage, clip)
            out["init_s"].append(zero.init_seconds)
            traj, norms = trajectory(zero, tp)
            out["cases"].append(compare(f"zero{stage}-dp2", traj, norms, ref, ref_norms))
            out["bytes"][stage] = optimizer_state_bytes(zero)
        for stage in (1, 2, 3):
            out[f"skips{stage}"] = skipped_steps(*build(stage, clip))
        zero, tp = build(1, clip)
        traj, norms = trajectory(zero, tp, external=True)
        out["cases"].append(compare("zero1-dp2-external-backward", traj, norms, ref, ref_norms))
        # Checkpoints at step 2; the step after it, uninterrupted; loaded at the same size.
        for stage in (1, 2, 3):
            zero, tp = build(stage, clip)
            trajectory(zero, tp, steps=2)
            zero.save(ckpt_dir, f"zero{stage}")
            saved = {"params": full_params(zero, tp), "optim": full_optimizer_state(zero)}
            train_step(zero, 2)
            saved["next"] = full_params(zero, tp)
            out[f"saved{stage}"] = saved
            zero, tp = build(stage, clip)
            zero.load(ckpt_dir, f"zero{stage}")
            loaded = {"params": full_params(zero, tp), "optim": full_optimizer_state(zero)}
            train_step(zero, 2)
            loaded["next"] = full_params(zero, tp)
            out[f"loaded{stage}-dp2"] = loaded
        out["numel"] = sum(t.numel() for t in out["saved1"]["params"].values())
        return pack(out)


# --------------------------------------------------------------------------- spawn 2: 4 ranks


def world4_worker(rank: int, world: int, clip: float, ckpt_dir: str) -> bytes:
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    import torch.distributed as dist

    import parallel.zero
    from parallel.zero_config import MegatronGroups
    from testing.local import gloo_world

    with gloo_world(rank, world):
        ref, ref_norms = reference(clip)
        out: dict = {"cases": []}
        init_megatron(tp=2)
        for stage in (1, 2):
            zero, tp = build(stage, clip, tp_size=2)
            traj, norms = trajectory(zero, tp)
            out["cases"].append(compare(f"zero{stage}-tp2-dp2", traj, norms, ref, ref_norms))
        # Without the partial-gradient hooks the replicated GAU weights get wrong gradients.
        original = parallel.zero.install_partial_grad_hooks
        parallel.zero.install_partial_grad_hooks = lambda *a, **k: []
        zero, tp = build(2, clip, tp_size=2)
        traj, norms = trajectory(zero, tp, steps=1)
        parallel.zero.install_partial_grad_hooks = original
        out["no_hooks"] = compare("zero2-tp2-dp2-no-hooks", traj, norms, ref, ref_norms)

        # Resharded loads of the DP=2 checkpoints: DP=4, then DP=1 (one group per rank).
        init_megatron(tp=1)
        alone = [dist.new_group([r]) for r in range(world)][rank]
        for stage in (1, 2):
            for dp, groups in ((4, None), (1, MegatronGroups(alone, alone, alone))):
                zero, tp = build(stage, clip, groups=groups)
                zero.load(ckpt_dir, f"zero{stage}")
                loaded = {"params": full_params(zero, tp), "optim": full_optimizer_state(zero)}
                loaded["lr"] = zero.scheduler.get_last_lr()
                train_step(zero, 2)
                loaded["next"] = full_params(zero, tp)
                out[f"loaded{stage}-dp{dp}"] = loaded
        return pack(out)


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    clip = 0.05  # below every step's norm: clipping acts on each step
    ckpt = str(tmp_path_factory.mktemp("zero"))
    dp2 = [unpack(r) for r in run_ranks(dp2_worker, 2, clip, ckpt, timeout=600)]
    world4 = [unpack(r) for r in run_ranks(world4_worker, 4, clip, ckpt, timeout=600)]
    return {"clip": clip, "dp2": dp2, "world4": world4, "ref_norms": reference(clip)[1]}


def test_clipping_acts(runs):
    assert all(n > runs["clip"] * 2 for n in runs["ref_norms"]), runs["ref_norms"]


def test_trajectories_equal_adamw(runs):
    cases = runs["dp2"][0]["cases"] + runs["world4"][0]["cases"]
    print()
    for case in cases:
        print(
            f"{case['case']:30s} params {max(case['param_errors']):.2e} "
            f"norm {max(case['norm_errors']):.2e}"
        )
    for case in cases:
        assert len(case["param_errors"]) == STEPS
        assert max(case["param_errors"]) < TOL, case
        assert max(case["norm_errors"]) < TOL, case
    print("deepspeed.initialize seconds:", [f"{s:.2f}" for s in runs["dp2"][0]["init_s"]])


def test_partial_grad_hooks_matter(runs):
    case = runs["world4"][0]["no_hooks"]
    assert max(case["param_errors"]) > 1e-3, case


def test_optimizer_state_sharded(runs):
    out = runs["dp2"][0]
    numel, dp, groups = out["numel"], 2, 2
    # fp32: DeepSpeed's own fp32 master copy + Adam's two moments = 12 bytes per parameter.
    # Each of the 2 parameter groups (decay / no decay) is padded to a multiple of 2 x DP
    # elements, so a rank holds at most 12 x groups x 2 x DP / DP bytes more than its share.
    unsharded = 12 * numel
    slack = 12 * groups * 2 * dp / dp
    print()
    for stage, got in out["bytes"].items():
        share = unsharded / dp
        print(f"ZeRO-{stage} DP=2: {got} bytes/rank; unsharded {unsharded}; 1/DP {share:.0f}")
        assert share <= got <= share + slack, (stage, got, unsharded)
    per_rank = [r["bytes"][1] for r in runs["dp2"]]
    assert unsharded <= sum(per_rank) <= unsharded + slack * dp


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_nonfinite_and_requested_skips(runs, stage):
    nan_loss, requested, normal = runs["dp2"][0][f"skips{stage}"]
    lr = [s["lr"] for s in (nan_loss, requested, normal)]
    assert not nan_loss["applied"] and not math.isfinite(nan_loss["norm"])
    assert not nan_loss["changed"]
    assert not requested["applied"] and not requested["changed"]
    assert normal["applied"] and normal["changed"] and math.isfinite(normal["norm"])
    from pretrain.build import lr_at

    # The schedule advanced at every step, skipped or not.
    expected = [lr_at(step, optim_config(runs["clip"]), 10) for step in (1, 2, 3)]
    assert lr == pytest.approx(expected, rel=1e-12), (lr, expected)


@pytest.mark.parametrize(("stage", "dp"), [(1, 2), (2, 2), (3, 2), (1, 4), (2, 4), (1, 1), (2, 1)])
def test_checkpoint_load(runs, stage, dp):
    """Saved at DP=2; loaded at DP=2 (ZeRO-1/2/3) and resharded to DP=4 and DP=1 (1/2)."""
    saved = runs["dp2"][0][f"saved{stage}"]
    loads = runs["dp2"] if dp == 2 else runs["world4"]
    for loaded in (r[f"loaded{stage}-dp{dp}"] for r in loads):
        for name, value in saved["params"].items():
            assert torch.equal(loaded["params"][name], value), name
        for name, tensors in saved["optim"].items():
            for key, value in tensors.items():
                assert torch.equal(loaded["optim"][name][key], value), (name, key)
        assert relative_error(loaded["next"], saved["next"]) < TOL
