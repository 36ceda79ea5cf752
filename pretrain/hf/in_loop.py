"""``eval.tasks``: lm-evaluation-harness tasks during training, on the logging rank.

The Trainer's ``evaluate`` adds ``harness_metrics`` to the validation figures, so the task
metrics are logged (W&B, metrics.jsonl) at the same steps as the validation loss, as
``val/tasks/<task>/<metric>``. A split model (tensor, pipeline, context parallel, ZeRO-3)
is gathered whole (collective) and scored on rank 0 by the single-process model. The
harness reseeds Python's, NumPy's and torch's generators; their states are put back
afterwards, so a run with tasks trains exactly like one without.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch

from pretrain.hf.export import Trained


def harness_metrics(trainer: Any) -> dict[str, float]:
    """``{"tasks/<task>/<metric>": value}`` on the main rank, {} elsewhere (and when
    ``eval.tasks`` is empty)."""
    cfg = trainer.cfg
    e = cfg.eval
    if not e.tasks:
        return {}
    model = _whole_model(trainer)
    if model is None:
        return {}
    from pretrain.hf.lm_eval_adapter import SeqBoatLM, evaluate_tasks, task_metrics

    was_training = model.training
    trained = Trained(cfg, trainer.tokenizer, model, trainer.state.step, trainer.run_dir)
    try:
        with _kept_random_states():
            lm = SeqBoatLM(
                trained=trained, batch_size=e.batch_size, device=str(trainer.dims.device)
            )
            results = evaluate_tasks(lm, e.tasks, e.include_path, e.limit or None, e.num_fewshot)
    finally:
        model.train(was_training)
    return {f"tasks/{k}": v for k, v in task_metrics(results).items()}


def _whole_model(trainer: Any) -> torch.nn.Module | None:
    """The model whole on the main rank (None on the others); gathered when split."""
    from parallel.pipeline import merge_over_stages
    from parallel.tensor import full_state_dict
    from pretrain.build import model_for

    d = trainer.dims
    zero3 = trainer.zero is not None and trainer.zero.stage == 3
    if d.tp_size == 1 and d.cp_size == 1 and d.pp_size == 1 and not zero3:
        return trainer.model if d.is_main else None
    with trainer.zero.gathered() if zero3 else contextlib.nullcontext():
        full = merge_over_stages(full_state_dict(trainer.model, d.tensor), d)
    if not d.is_main:
        return None
    model = model_for(trainer.cfg, trainer.tokenizer.vocab_size, d.device)
    model.load_state_dict(full)
    return model


@contextlib.contextmanager
def _kept_random_states():
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)
