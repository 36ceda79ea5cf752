"""`seqboat lm-eval` / the harness's `seqboat` model: on a local multiple-choice task (a JSONL
file and a task YAML written here; nothing is downloaded) every log-likelihood the harness
gets equals our own sum of token log-probabilities, and its accuracy a hand computation."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.hf.export import load_checkpoint
from pretrain.hf.lm_eval_adapter import SeqBoatLM, evaluate_tasks
from pretrain.model.decode import generate
from pretrain.train import Trainer

TASK = "seqboat_local_mc"
ITEMS = [
    {"question": "The with statement", "choices": [" is used", " zebra", " 123"], "label": 0},
    {"question": "A class definition", "choices": [" defines a class", " ok"], "label": 1},
    {"question": "Numbers:", "choices": [" 1 2 3", " one", " x", " \u00fc"], "label": 2},
    {"question": "", "choices": ["Empty context", "still scored"], "label": 0},
    {"question": "try", "choices": [" statement", " except", " finally"], "label": 1},
    {"question": "The import system", "choices": [" finds modules", " eats"], "label": 0},
]


def write_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n"
    )
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("lm_eval") / "run"
    cfg = load_config(
        None,
        [
            f"run.dir={run_dir}", "wandb.mode=disabled", "data.tokenizer.kind=byte",
            "data.shuffle_buffer=8", "model.layers=2", "model.width=32", "model.zdim=8",
            "model.hdim=32", "model.window=8", "train.seq_length=64",
            "train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=4",
            "train.eval_interval=4", "train.eval_samples=4", "checkpoint.interval=4",
            "optimizer.warmup_steps=2",
        ],
    )  # fmt: skip
    Trainer(cfg, progress=False).train()
    return run_dir


def our_logprob(model, tok, context: str, continuation: str) -> float:
    """The continuation's summed log-probability, one sequence, no batching, in float64."""
    ctx = tok.encode(context) if context else [tok.eos_id]
    cont = tok.encode(continuation)
    tokens = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits, _ = model(tokens[:, :-1])
    logprobs = F.log_softmax(logits[:, 0, : tok.vocab_size].double(), -1)
    targets = tokens[0, 1:]
    return float(logprobs.gather(-1, targets.unsqueeze(-1))[-len(cont) :].sum())


def test_harness_loglikelihoods_and_accuracy(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = write_task(tmp_path / "tasks")
    lm = SeqBoatLM(str(run_dir), batch_size=4)
    results = evaluate_tasks(lm, [TASK], tasks, log_samples=True)
    samples = results["samples"][TASK]
    assert len(samples) == len(ITEMS)
    trained = load_checkpoint(run_dir)
    correct = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        item = ITEMS[sample["doc_id"]]
        ours = [our_logprob(trained.model, trained.tokenizer, item["question"], c)
                for c in item["choices"]]  # fmt: skip
        got = [resp[0][0] for resp in sample["resps"]]
        assert max(abs(a - b) for a, b in zip(got, ours, strict=True)) < 1e-5
        correct += int(max(range(len(ours)), key=ours.__getitem__) == item["label"])
    assert results["results"][TASK]["acc,none"] == pytest.approx(correct / len(ITEMS), abs=1e-12)


def test_batched_scores_equal_one_at_a_time(run_dir: Path) -> None:
    """Right padding in a batch changes nothing (the model is causal); windows of the
    rolling log-likelihood are the harness's."""
    lm1 = SeqBoatLM(str(run_dir), batch_size=1)
    lm4 = SeqBoatLM(str(run_dir), batch_size=4, trained=lm1.trained)
    requests = [SimpleNamespace(args=(i["question"], c)) for i in ITEMS for c in i["choices"]]
    one, four = lm1.loglikelihood(requests), lm4.loglikelihood(requests)
    assert max(abs(a[0] - b[0]) for a, b in zip(one, four, strict=True)) < 1e-5
    assert [a[1] for a in one] == [b[1] for b in four]
    # Rolling: a text longer than max_length (64) is scored in windows.
    text = "The with statement is used to wrap the execution of a block " * 3
    tok = lm1.tokenizer
    assert len(tok.encode(text)) > lm1.max_length
    (rolling,) = lm4.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    ids = tok.encode(text)
    first = lm1.max_length
    expected = our_logprob(lm1.model, tok, "", tok.decode(ids[:first]))
    expected += sum(
        our_logprob(lm1.model, tok, tok.decode(ids[end - first - 1 : end - 1 - (n - 1)]),
                    tok.decode(ids[end - n : end]))
        for end, n in _later_windows(len(ids), first)
    )  # fmt: skip
    assert rolling == pytest.approx(expected, abs=1e-5)
    # A text within one window is the plain sequence log-probability after end-of-document.
    short = "def f(x): return x"
    (score,) = lm1.loglikelihood_rolling([SimpleNamespace(args=(short,))])
    assert score == pytest.approx(our_logprob(lm1.model, tok, "", short), abs=1e-5)


def _later_windows(total: int, max_len: int) -> list[tuple[int, int]]:
    """(end, predicted) of each window after the first (context_len 1)."""
    out, predicted = [], max_len
    while predicted < total:
        n = min(total - predicted, max_len)
        out.append((predicted + n, n))
        predicted += n
    return out


def test_generate_until_is_greedy_decoding_cut_at_the_stop(run_dir: Path) -> None:
    lm = SeqBoatLM(str(run_dir))
    tok = lm.tokenizer
    full = tok.decode(generate(lm.model, tok.encode("The "), 20, temperature=0, eos_id=tok.eos_id))
    stop = full[5:7]
    (got,) = lm.generate_until(
        [SimpleNamespace(args=("The ", {"until": [stop], "max_gen_toks": 20}))]
    )
    assert got == full[: full.find(stop)]


def test_cli_prints_the_task_metrics(run_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = write_task(tmp_path / "tasks")
    out = tmp_path / "results.json"
    argv = ["lm-eval", "--run-dir", str(run_dir), "--tasks", TASK, "--include-path", str(tasks)]
    assert main([*argv, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    acc = json.loads(out.read_text())["results"][TASK]["acc,none"]
    assert f"{TASK}/acc: {acc:.6g}" in printed
    # Bad input: an unknown task, a missing extra: one line each.
    for bad, expected in (
        ([*argv[:3], "--tasks", "no_such_task"], "unknown lm-eval task(s): no_such_task"),
        (argv, "seqboat lm-eval needs lm_eval: pip install"),
    ):
        if "needs" in expected:
            monkeypatch.setitem(sys.modules, "lm_eval", None)
        assert main(bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("seqboat: error: ") and expected in err[0]
