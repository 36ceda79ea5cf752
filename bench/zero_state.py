"""Optimizer-state bytes per rank under DeepSpeed ZeRO 0/1/2/3, measured against theory.

    python -m bench.zero_state [--config configs/tiny.yaml] [--dp 2 4] [--precision fp32 bf16]

ZeRO-0 is our own data parallelism: torch AdamW, every rank holds all of its state. ZeRO-k is
parallel/zero.py's engine (gloo processes on this machine, one spawn per data-parallel size).

Theory, bytes per parameter (N parameters, DP ranks):
  optimizer state  torch AdamW (ZeRO-0): exp_avg + exp_avg_sq = 8 (fp32)
                   DeepSpeed ZeRO-1/2/3: fp32 master copy + exp_avg + exp_avg_sq = 12, / DP
                   (DeepSpeed keeps the master copy even when the weights are fp32; bf16 mode
                   has bf16 weights and the same 12 bytes of fp32 optimizer state)
  model states     ZeRO-0: P + G + O;  ZeRO-1: P + G + O/DP;  ZeRO-2: P + (G + O)/DP;
                   ZeRO-3: (P + G + O)/DP, with P = 4 (fp32) or 2 (bf16), G = 4 (fp32 gradient
                   accumulation in both), O as above.
Padding: ZeRO-1/2 pad each parameter group to a multiple of 2 x DP elements.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# testing/ (helpers shared with the tests) is not installed: imported from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from testing.local import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def theory(stage: int, numel: int, dp: int, precision: str) -> dict[str, float]:
    """Bytes per rank: the optimizer state and all model states (params, grads, state)."""
    p = 4 if precision == "fp32" else 2
    g = 4
    o = 8 if stage == 0 else 12
    per_param = {
        0: p + g + o,
        1: p + g + o / dp,
        2: p + (g + o) / dp,
        3: (p + g + o) / dp,
    }[stage]
    return {"optimizer": numel * (o if stage == 0 else o / dp), "model_states": numel * per_param}


def build_model(config: str):
    from pretrain.config import config_from_dict, parse_yaml
    from pretrain.model.lm import LanguageModel

    cfg = config_from_dict(parse_yaml((ROOT / config).read_text()))
    torch.manual_seed(0)
    return cfg, LanguageModel(cfg.model, cfg.data.tokenizer.vocab_size)


def measure(rank: int, world: int, config: str, precisions: list[str]) -> list[dict]:
    """One row per (stage, precision) on this rank: measured optimizer-state bytes."""
    from parallel.zero import ZeroEngine, ZeroOptions
    from pretrain.build import optimizer_for
    from testing.local import gloo_world
    from testing.zero_state import optimizer_state_bytes

    rows = []
    with gloo_world(rank, world):
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel()
        for precision in precisions:
            for stage in (0, 1, 2, 3):
                cfg, model = build_model(config)
                numel = sum(p.numel() for p in model.parameters())
                opt = optimizer_for(model, cfg.optimizer)
                if stage == 0:
                    if precision != "fp32":
                        continue
                    _fill_adam_state(model, opt)
                    got = sum(
                        t.numel() * t.element_size()
                        for s in opt.state.values()
                        for k, t in s.items()
                        if torch.is_tensor(t) and k != "step"
                    )
                else:
                    options = ZeroOptions(stage, 1, 1, clip_grad=1.0, precision=precision)
                    zero = ZeroEngine.build(
                        model, opt, None, options, external_params=[(model, model.embedding.weight)]
                    )
                    # Adam allocates its moments at the first step: one tiny step.
                    zero.backward(zero.module.loss(torch.zeros(1, 9, dtype=torch.long))[0])
                    zero.step()
                    got = optimizer_state_bytes(zero)
                rows.append({"stage": stage, "precision": precision, "numel": numel, "bytes": got})
    return rows


def _fill_adam_state(model, opt) -> None:
    """Torch Adam allocates its moments at the first step: one step on zero gradients."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    print(f"config {args.config}; optimizer-state bytes per rank (max over ranks)")
    header = (
        f"{'DP':>3} {'ZeRO':>4} {'prec':>5} {'params':>9} {'measured':>11} {'theory':>11} "
        f"{'meas/theory':>11} {'B/param':>8} {'model states (theory)':>22}"
    )
    print(header)
    print("-" * len(header))
    for dp in args.dp:
        per_rank = run_ranks(measure, dp, args.config, args.precision, timeout=900)
        for i, row in enumerate(per_rank[0]):
            got = max(rank_rows[i]["bytes"] for rank_rows in per_rank)
            want = theory(row["stage"], row["numel"], dp, row["precision"])
            print(
                f"{dp:>3} {row['stage']:>4} {row['precision']:>5} {row['numel']:>9,} "
                f"{got:>11,} {int(want['optimizer']):>11,} {got / want['optimizer']:>11.4f} "
                f"{got / row['numel']:>8.3f} {int(want['model_states']):>22,}"
            )


if __name__ == "__main__":
    main()
