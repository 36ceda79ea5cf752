"""lm-evaluation-harness on a SeqBoat checkpoint: an ``LM`` registered as ``seqboat``.

The project's single-process model scores the requests directly (no export needed):

* ``loglikelihood``: the context and the continuation are encoded separately (an empty
  context becomes the end-of-document token) and joined; the score is the sum of the
  continuation tokens' log-probabilities, and whether each was the argmax. Requests are
  sorted by length and run ``batch_size`` at a time, right-padded: the model is causal, so
  the padding after a sequence changes nothing before it.
* ``loglikelihood_rolling``: the harness's rolling windows of ``max_length`` tokens
  (``lm_eval.utils.get_rolling_token_windows``), scored as above, summed per document.
* ``generate_until``: greedy or sampled decoding with the O(1) decoding state
  (``pretrain/model/decode.py``), one request at a time (rows of a batch would sit at
  different positions, which the decoding state does not hold), stopped at the first
  ``until`` string or ``max_gen_toks`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pretrain.hf.export import Trained, load_checkpoint
from pretrain.model.decode import generate


@register_model("seqboat")
class SeqBoatLM(LM):
    """``run_dir`` (and ``step``, default the newest) names the checkpoint; or pass a loaded
    ``trained`` (in-loop evaluation). ``max_length``: the longest scored window (default
    the run's ``train.seq_length``)."""

    def __init__(
        self,
        run_dir: str | None = None,
        step: int | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        device: str | None = None,
        trained: Trained | None = None,
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if trained is None:
            if run_dir is None:
                raise ValueError("the seqboat model needs run_dir=<a run directory>")
            trained = load_checkpoint(Path(run_dir), None if step is None else int(step))
        self.trained = trained
        self.model = trained.model
        self.tokenizer = trained.tokenizer
        self._device = torch.device(device or "cpu")
        self.model.to(self._device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length or trained.cfg.train.seq_length)
        self.vocab_size = self.tokenizer.vocab_size

    # --------------------------------------------------------------- log-likelihoods

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            ctx = self.tokenizer.encode(context) if context else [self.tokenizer.eos_id]
            pairs.append((ctx, self.tokenizer.encode(continuation)))
        return self.score(pairs)

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(
                self.tokenizer.encode(text), self.tokenizer.eos_id, self.max_length, 1
            ):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.score(windows), strict=True):
            totals[i] += logprob
        return totals

    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context, continuation) token pairs -> (sum of the continuation's log-probs, all
        greedy), in order; the input is cut on the left to ``max_length`` tokens."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        rows = []
        for i, (ctx, cont) in enumerate(pairs):
            tokens = (ctx + cont)[-(self.max_length + 1) :]
            rows.append((i, tokens[:-1], tokens[-len(cont) :] if cont else []))
        rows.sort(key=lambda r: -len(r[1]))  # similar lengths together: little padding
        for batch in _chunks(rows, self.batch_size):
            results_of_batch = self._score_batch([(inp, cont) for _, inp, cont in batch])
            for (i, _, _), result in zip(batch, results_of_batch, strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        length = max(len(inp) for inp, _ in rows)
        pad = self.tokenizer.eos_id
        tokens = torch.tensor([inp + [pad] * (length - len(inp)) for inp, _ in rows])
        self.model.eval()
        logits, _ = self.model(tokens.to(self._device))  # [L, B, padded vocab]
        logprobs = F.log_softmax(logits[..., : self.vocab_size].double(), -1)
        out = []
        for b, (inp, cont) in enumerate(rows):
            if not cont:
                out.append((0.0, True))
                continue
            # The continuation's n tokens are predicted at the last n input positions.
            span = logprobs[len(inp) - len(cont) : len(inp), b]
            target = torch.tensor(cont, device=span.device)
            picked = span.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            out.append((float(picked.sum()), bool((span.argmax(-1) == target).all())))
        return out

    # --------------------------------------------------------------- generation

    def generate_until(self, requests: list) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            sample = bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if sample else 0.0
            prompt = self.tokenizer.encode(context) or [self.tokenizer.eos_id]
            prompt = prompt[-self.max_length :]
            ids = generate(
                self.model, prompt, max_new, temperature=temperature,
                top_k=int(gen_kwargs.pop("top_k", 0)), eos_id=self.tokenizer.eos_id,
                generator=torch.Generator().manual_seed(int(gen_kwargs.pop("seed", 0))),
            )  # fmt: skip
            text = self.tokenizer.decode(ids)
            cuts = [text.find(stop) for stop in until if stop and stop in text]
            out.append(text[: min(cuts)] if cuts else text)
        return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), max(size, 1)):
        yield items[start : start + size]


def evaluate_tasks(
    lm: SeqBoatLM,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-evaluation-harness's ``simple_evaluate`` of ``tasks`` on ``lm`` (tasks from the
    harness or from YAML files under ``include_path``); its full results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    return simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
        num_fewshot=num_fewshot, log_samples=log_samples, bootstrap_iters=0,
    )  # fmt: skip


def task_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` of the numeric metrics (filters dropped from names
    when there is only the default ``none``), for logs."""
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)) or "_stderr" in key:
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            flat[f"{task}/{name}"] = float(value)
    return flat
