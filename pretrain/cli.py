"""The ``seqboat`` command line (also ``python -m pretrain``).

    seqboat train [--config FILE] [key.sub=value ...]
    seqboat prepare tokenizer [--config FILE] [key.sub=value ...]
    seqboat eval [--config FILE | --run-dir DIR] [key.sub=value ...]
    seqboat generate [--config FILE | --run-dir DIR] [--prompt TEXT] [...]
    seqboat plot RUN_DIR
    seqboat slurm submit [--config FILE] [--nodes N --gpus-per-node G ... --dry-run] [k=v ...]
    seqboat slurm status RUN_DIR

Bad input ends with one ``seqboat: error: ...`` line and exit status 2; nothing is lost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILED = 1


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the embedded tiny config)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--run-dir", help="a run directory (its saved config is used)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="seqboat", description="Pretrain SeqBoat language models.")
    sub = ap.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (resumes the run if it has a checkpoint)")
    _add_config_args(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare = sub.add_parser("prepare", help="prepare assets of a run")
    what = prepare.add_subparsers(dest="what", required=True)
    _add_config_args(what.add_parser("tokenizer", help="train the sentencepiece tokenizer"))
    _add_run_args(sub.add_parser("eval", help="validation loss, perplexity, bits per byte"))
    gen = sub.add_parser("generate", help="sample text from a trained run")
    _add_run_args(gen)
    gen.add_argument("--prompt", default="The ")
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=40)
    gen.add_argument("--seed", type=int, default=0)
    plot = sub.add_parser("plot", help="loss curves and activation heat map as PNGs")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="output folder (default: RUN_DIR/plots)")
    _add_slurm_args(sub.add_parser("slurm", help="Slurm batch jobs that requeue themselves"))
    return ap


def _add_slurm_args(slurm: argparse.ArgumentParser) -> None:
    actions = slurm.add_subparsers(dest="slurm_command", required=True)
    s = actions.add_parser("submit", help="render and submit an sbatch script")
    _add_config_args(s)
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=0, help="0: a CPU-only job")
    s.add_argument("--tasks-per-node", type=int)
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--mem")
    s.add_argument("--time", default="01:00:00")
    for name in ("--partition", "--account", "--qos", "--constraint", "--array", "--dependency"):
        s.add_argument(name)
    s.add_argument("--exclusive", action="store_true")
    s.add_argument("--job-name", default="seqboat")
    s.add_argument("--output-dir", default="slurm-logs")
    s.add_argument("--signal-grace", type=int, default=120, help="seconds before the limit")
    s.add_argument("--no-requeue", dest="requeue", action="store_false")
    s.add_argument("--max-failures", type=int, default=3, help="in a row without progress")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--python", default=sys.executable, help="the interpreter on the nodes")
    s.add_argument("--sbatch", default="sbatch")
    s.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    status = actions.add_parser("status", help="step, checkpoint, W&B id and jobs of a run")
    status.add_argument("run_dir")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options may come between overrides (``train a=1 --no-progress b=2``): argparse stops
    a ``nargs="*"`` positional at the first option, so the rest arrive as extras."""
    ap = parser()
    args, extra = ap.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item]
    if stray or (extra and not hasattr(args, "overrides")):
        ap.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "train":  # before the heavy imports below (see pretrain/stop.py)
        from pretrain.stop import record_early_stops

        record_early_stops()
    # Heavy imports after argument parsing: `seqboat --help` stays instant.
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError
    from pretrain.slurm import SlurmError
    from pretrain.train import REQUEUE_EXIT_CODE, NonFiniteLossError, Preempted

    try:
        return COMMANDS[args.command](args)
    except Preempted as e:
        print(f"seqboat: {e}", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"seqboat: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (NonFiniteLossError, SlurmError) as e:
        print(f"seqboat: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("seqboat: interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130


def _config(args: argparse.Namespace):
    from pretrain.config import load_config

    return load_config(args.config, args.overrides)


def _run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else _config(args).run_dir


def cmd_train(args: argparse.Namespace) -> int:
    """One process, or one rank of a torchrun / srun launch (the world comes from the
    launcher's environment)."""
    from parallel.topology import shutdown
    from parallel.world import detect_world
    from pretrain.build import parallel_dims_for
    from pretrain.train import Preempted, Trainer

    cfg = _config(args)
    world = detect_world()
    dims = parallel_dims_for(cfg, world)
    # shutdown() is a no-op without a process group.
    try:
        result = Trainer(cfg, progress=not args.no_progress, dims=dims).train()
    except Preempted:
        shutdown()  # every rank stopped at the same step: the barrier is safe
        raise
    shutdown()  # not on failure: a barrier would wait for the ranks that died
    if world.rank == 0:
        v = result.val
        print(
            f"step {result.step}: val loss {v['loss']:.4f}  ppl {v['ppl']:.2f}  bpb {v['bpb']:.4f}"
        )
        print(f"sample: {result.sample}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from pretrain.build import tokenizer_for

    cfg = _config(args)
    tok = tokenizer_for(cfg)
    print(f"tokenizer: {cfg.data.tokenizer.path} ({tok.vocab_size} tokens)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from data.loader import validation_samples
    from pretrain.checkpointer import load_trained
    from pretrain.evaluate import evaluate

    cfg, tok, model, step = load_trained(_run_dir(args))
    t = cfg.train
    samples = validation_samples(cfg.data, tok, t.seq_length, t.eval_samples)
    v = evaluate(model, samples, tok.token_bytes(), t.micro_batch_size, t.precision)
    print(f"step {step}: val loss {v['loss']:.4f}  ppl {v['ppl']:.2f}  bpb {v['bpb']:.4f}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from pretrain.checkpointer import load_trained
    from pretrain.model.decode import generate

    _, tok, model, _ = load_trained(_run_dir(args))
    prompt = tok.encode(args.prompt)
    out = generate(
        model, prompt, args.max_new_tokens, args.temperature, args.top_k,
        torch.Generator().manual_seed(args.seed), eos_id=tok.eos_id,
    )  # fmt: skip
    print(args.prompt + tok.decode(out))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pretrain.plot import plot_run

    for path in plot_run(Path(args.run_dir), Path(args.out) if args.out else None):
        print(path)
    return 0


def cmd_slurm(args: argparse.Namespace) -> int:
    from pretrain import slurm

    if args.slurm_command == "status":
        print(slurm.status(Path(args.run_dir)))
        return 0
    job = slurm.SlurmJob(
        config=args.config, overrides=args.overrides, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task, mem=args.mem, time=args.time,
        partition=args.partition, account=args.account, qos=args.qos,
        constraint=args.constraint, exclusive=args.exclusive, job_name=args.job_name,
        output_dir=args.output_dir, array=args.array, dependency=args.dependency,
        signal_grace_s=args.signal_grace, requeue=args.requeue,
        max_failures_without_progress=args.max_failures, env=slurm.parse_env(args.env),
        python=args.python,
    )  # fmt: skip
    if args.dry_run:
        print(slurm.render(job), end="")  # also validates the config
        return 0
    print(f"submitted job {slurm.submit(job, sbatch=args.sbatch)}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "prepare": cmd_prepare,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "plot": cmd_plot,
    "slurm": cmd_slurm,
}
