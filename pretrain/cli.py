"""The ``seqboat`` command line (also ``python -m pretrain``).

    seqboat train [--config FILE] [key.sub=value ...]
    seqboat prepare tokenizer [--config FILE] [key.sub=value ...]
    seqboat prepare data [--config FILE] --out DIR [--workers N] [--parts P] [...]
    seqboat prepare enwik8 --zip enwik8.zip [--out data/enwik8]
    seqboat eval [--config FILE | --run-dir DIR] [key.sub=value ...]
    seqboat generate [--config FILE | --run-dir DIR] [--prompt TEXT] [...]
    seqboat plot RUN_DIR
    seqboat export --run-dir DIR [--step N] --out FOLDER [--force]
    seqboat lm-eval --run-dir DIR --tasks T1,T2 [--include-path DIR] [--batch-size B] [...]
    seqboat slurm submit [--config FILE] [--nodes N --gpus-per-node G ... --dry-run] [k=v ...]
    seqboat slurm status RUN_DIR
    seqboat plan [--config FILE] --nodes N --gpus-per-node G --gpu-memory 80GiB [k=v ...]

Bad input ends with one ``seqboat: error: ...`` line and exit status 2; nothing is lost.
"""

from __future__ import annotations

import argparse
import socket
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
    _add_prepare_data_args(what.add_parser("data", help="tokenize the sources into shards"))
    enwik8 = what.add_parser("enwik8", help="split enwik8 into the paper's 90M/5M/5M bytes")
    enwik8.add_argument("--zip", required=True, help="enwik8.zip, or the unzipped enwik8 file")
    enwik8.add_argument("--out", default="data/enwik8", help="default: data/enwik8")
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
    _add_plan_args(sub.add_parser("plan", help="per-rank memory and the layouts that fit"))
    export = sub.add_parser("export", help="a checkpoint as a Hugging Face model folder")
    export.add_argument("--run-dir", required=True)
    export.add_argument("--step", type=int, help="default: the newest checkpoint")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--force", action="store_true", help="replace a non-empty --out")
    export.add_argument("--max-shard-size", default="5GB", help="safetensors shard size")
    lm_eval = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on a checkpoint")
    lm_eval.add_argument("--run-dir", required=True)
    lm_eval.add_argument("--step", type=int, help="default: the newest checkpoint")
    lm_eval.add_argument("--tasks", required=True, help="comma-separated task names")
    lm_eval.add_argument("--include-path", help="a folder of your own task YAML files")
    lm_eval.add_argument("--batch-size", type=int, default=8)
    lm_eval.add_argument("--max-length", type=int, help="default: the run's seq_length")
    lm_eval.add_argument("--limit", type=float, help="items per task (a fraction if < 1)")
    lm_eval.add_argument("--num-fewshot", type=int)
    lm_eval.add_argument("--device", default="cpu")
    lm_eval.add_argument("--output", help="write the harness's results JSON here")
    return ap


def _add_prepare_data_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output folder (a subfolder per source if many)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes")
    p.add_argument(
        "--parts", type=int, default=16,
        help="units of parallel work, shared by workers and Slurm array tasks (default 16)",
    )  # fmt: skip
    p.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard file")
    p.add_argument("--block-documents", type=int, default=1000, help="documents per block")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory", required=True, help="per GPU, e.g. 80GiB, 80GB, 81920MiB")
    p.add_argument(
        "--activation-ratio", type=float, default=1.0,
        help="fraction of tokens the GAU runs on (default 1.0: every token, the upper bound)",
    )  # fmt: skip
    p.add_argument("--layout", help="the layout to break down, e.g. tp=2,pp=4,zero=1,"
                   "recompute=layer (default: the config's)")  # fmt: skip
    p.add_argument("--show", type=int, default=15, help="layouts to list (fitting; not)")
    p.add_argument("--all", action="store_true", help="list every layout that does not fit")


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
    except Exception as e:
        from parallel.timeouts import EXIT_COLLECTIVE_TIMEOUT, collective_timeout
        from parallel.world import detect_world

        timeout = collective_timeout(e)
        if timeout is None:
            raise
        rank = detect_world().rank
        print(f"seqboat: error: {timeout.message(rank, socket.gethostname())}", file=sys.stderr)
        return EXIT_COLLECTIVE_TIMEOUT


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

    if args.what == "enwik8":
        from data.prepare import split_enwik8

        for path in split_enwik8(args.zip, args.out):
            print(f"wrote {path}")
        return 0
    cfg = _config(args)
    if args.what == "data":
        from data.prepare import PrepareOptions, prepare_sources

        options = PrepareOptions(args.shard_tokens, args.block_documents, args.parts)
        prepare_sources(cfg.data, args.out, options, args.workers)  # its share, at least
        return 0
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


def cmd_export(args: argparse.Namespace) -> int:
    from pretrain.hf.export import export

    trained = export(Path(args.run_dir), Path(args.out), args.step, args.force, args.max_shard_size)
    print(f"exported step {trained.step} of {args.run_dir} to {args.out}")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    import json

    from pretrain.hf import require

    require("lm_eval", what="seqboat lm-eval")
    from pretrain.hf.lm_eval_adapter import SeqBoatLM, evaluate_tasks, task_metrics

    tasks = [t for t in args.tasks.split(",") if t]
    lm = SeqBoatLM(args.run_dir, args.step, args.batch_size, args.max_length, args.device)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = evaluate_tasks(lm, tasks, args.include_path, limit, args.num_fewshot)
    for name, value in task_metrics(results).items():
        print(f"{name}: {value:.6g}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pretrain import plan
    from pretrain.config import ConfigError

    cfg = _config(args)
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    world = args.nodes * args.gpus_per_node
    memory = plan.parse_memory(args.gpu_memory)
    given = plan.parse_layout(args.layout, cfg, world) if args.layout else None
    result = plan.plan(cfg, world, memory, args.activation_ratio, given, args.gpus_per_node)
    print(plan.format_plan(result, memory, args.activation_ratio, args.show, args.all))
    return 0


COMMANDS = {
    "train": cmd_train,
    "prepare": cmd_prepare,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "plot": cmd_plot,
    "slurm": cmd_slurm,
    "plan": cmd_plan,
    "export": cmd_export,
    "lm-eval": cmd_lm_eval,
}
