"""``seqboat export``: a run's checkpoint as a Hugging Face model folder.

The folder holds ``model.safetensors`` (sharded with an index above ``max_shard_size``),
``config.json``, ``generation_config.json``, the tokenizer (``tokenizer_config.json`` and,
for sentencepiece, ``tokenizer.model``), the model card ``README.md`` and the Python files
``AutoModelForCausalLM`` / ``AutoTokenizer`` load with ``trust_remote_code=True``
(generated from the project's own model modules, see bundle.py). Any checkpoint layout
exports: the sharded tensors load whole into the single-process model.

Everything is checked before anything is written, and the folder is written beside the
target and renamed into place: a failed export leaves no half folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from pretrain.hf import require
from pretrain.hf.bundle import bundle_files

DEFAULT_SHARD_SIZE = "5GB"


class ExportError(ValueError):
    """Bad input to ``seqboat export`` (one line for the CLI)."""


@dataclass
class Trained:
    """A run's model at one checkpoint, loaded whole on the CPU."""

    cfg: Any  # pretrain.config.Config
    tokenizer: Any  # data.tokenizer.Tokenizer
    model: torch.nn.Module
    step: int
    run_dir: Path


def load_checkpoint(run_dir: Path, step: int | None = None) -> Trained:
    """The run's model at ``step`` (default: its newest complete checkpoint), whatever the
    split that trained it."""
    from pretrain.checkpointer import load_trained

    run_dir = Path(run_dir)
    try:
        cfg, tokenizer, model, saved_step = load_trained(run_dir, torch.device("cpu"), step)
    except ValueError as e:  # a step the run has no checkpoint of
        raise ExportError(str(e)) from None
    return Trained(cfg, tokenizer, model.float().eval(), saved_step, run_dir)


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty (--force replaces it)")


def export(
    run_dir: Path,
    out: Path,
    step: int | None = None,
    force: bool = False,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
) -> Trained:
    """Writes the Hugging Face folder ``out`` of ``run_dir``'s checkpoint ``step``."""
    require("safetensors", "transformers", what="seqboat export")
    if isinstance(max_shard_size, str) and max_shard_size.isdigit():
        max_shard_size = int(max_shard_size)  # bytes
    out = Path(out)
    check_output(out, force)
    trained = load_checkpoint(run_dir, step)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        write_folder(trained, partial, max_shard_size)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return trained


def write_folder(trained: Trained, out: Path, max_shard_size: str | int) -> None:
    import transformers

    cfg, tok = trained.cfg, trained.tokenizer
    _write_weights(trained.model, out, max_shard_size)
    _write_json(out / "config.json", {
        "architectures": ["SeqBoatForCausalLM"],
        "model_type": "seqboat",
        "auto_map": {
            "AutoConfig": "configuration_seqboat.SeqBoatConfig",
            "AutoModelForCausalLM": "modeling_seqboat.SeqBoatForCausalLM",
        },
        "seqboat": asdict(cfg.model),
        "vocab_size": tok.vocab_size,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.eos_id,
        "tie_word_embeddings": False,
        "use_cache": True,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
    })  # fmt: skip
    # `seqboat generate`'s defaults (temperature 0.8, top-k 40).
    _write_json(out / "generation_config.json", {
        "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id, "do_sample": True,
        "temperature": 0.8, "top_k": 40, "transformers_version": transformers.__version__,
    })  # fmt: skip
    _write_tokenizer(cfg, out)
    for name, source in bundle_files().items():
        (out / name).write_text(source)
    (out / "README.md").write_text(model_card(trained))


def _write_weights(model: torch.nn.Module, out: Path, max_shard_size: str | int) -> None:
    """``model.<name>`` tensors (the HF model holds the LanguageModel as ``model``)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    state = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        _write_json(
            out / "model.safetensors.index.json",
            {"metadata": split.metadata, "weight_map": split.tensor_to_filename},
        )


def _write_tokenizer(cfg: Any, out: Path) -> None:
    t = cfg.data.tokenizer
    config: dict[str, Any] = {
        "tokenizer_class": "SeqBoatTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_seqboat.SeqBoatTokenizer", None]},
        "kind": t.kind,
        "model_max_length": cfg.train.seq_length,
    }
    if t.kind == "sentencepiece":
        shutil.copyfile(t.path, out / "tokenizer.model")
    _write_json(out / "tokenizer_config.json", config)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def model_card(trained: Trained) -> str:
    """The config, the training tokens and the last validation figures of the run."""
    cfg, step = trained.cfg, trained.step
    tokens = step * cfg.train.global_batch_size * cfg.train.seq_length
    params = sum(p.numel() for p in trained.model.parameters())
    val = _last_validation(trained.run_dir, step)
    figures = (
        "no validation was logged up to this step"
        if val is None
        else f"step {val['step']}: loss {val['val/loss']:.4f}, perplexity {val['val/ppl']:.2f}, "
        f"bits per byte {val['val/bpb']:.4f}"
    )
    return f"""---
library_name: transformers
tags: [seqboat, custom_code]
---

# {cfg.run.name} (SeqBoat, step {step})

Exported by `seqboat export` from `{trained.run_dir}`, checkpoint of step {step}.

- architecture: `{cfg.model.arch}`, {params:,} parameters
- training tokens: {tokens:,} ({step} steps x {cfg.train.global_batch_size} sequences x
  {cfg.train.seq_length} tokens)
- final validation: {figures}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)
ids = tokenizer("The ", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=40)[0]))
```

No padding: batch prompts of equal length. The model code in this folder is generated from
the seqboat-pretrain model modules; it needs torch, transformers (and sentencepiece for a
sentencepiece tokenizer).

## Model config

```yaml
{yaml.safe_dump(asdict(cfg.model), sort_keys=False).rstrip()}
```
"""


def _last_validation(run_dir: Path, step: int) -> dict[str, Any] | None:
    from pretrain.monitor import read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [r for r in read_metrics(path) if "val/loss" in r and r.get("step", 0) <= step]
    return records[-1] if records else None
