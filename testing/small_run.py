"""Overrides shared by the multi-process end-to-end tests and the benches that launch runs."""

# A small run of 30 steps for the multi-process end-to-end tests (torchrun, Slurm).
SMALL_RUN = [
    "wandb.mode=disabled",
    "data.tokenizer.kind=byte",
    "model.layers=2",
    "model.width=64",
    "model.zdim=16",
    "model.hdim=128",
    "model.window=16",
    "train.seq_length=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.max_steps=30",
    "train.log_interval=1",
    "train.eval_interval=15",
    "train.eval_samples=8",
]
