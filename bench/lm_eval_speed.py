"""lm-evaluation-harness wall time of the ``seqboat`` model on a local multiple-choice task,
batched vs one request at a time.

The task (``--items`` questions of a few words, 4 answers each) is written to a temporary
folder as JSONL plus a task YAML (``dataset_path: json``): nothing is downloaded. The model
is the tiny default shape with random weights (the time does not depend on them); the
accuracy printed is a check that both runs scored the same.

    python bench/lm_eval_speed.py [--items 1000] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from data.tokenizer import ByteTokenizer
from pretrain.build import model_for
from pretrain.config import load_config
from pretrain.hf.export import Trained
from pretrain.hf.lm_eval_adapter import SeqBoatLM, evaluate_tasks, task_metrics

WORDS = [
    "the", "statement", "class", "import", "module", "function", "return", "value", "object",
    "list", "dict", "string", "number", "loop", "while", "for", "try", "except", "finally",
    "raise", "yield", "lambda", "with", "as", "from", "global",
]  # fmt: skip


def write_task(folder: Path, items: int) -> str:
    rng = random.Random(0)
    data = folder / "items.jsonl"
    with data.open("w") as f:
        for _ in range(items):
            question = " ".join(rng.choices(WORDS, k=rng.randint(4, 12)))
            choices = [" " + " ".join(rng.choices(WORDS, k=rng.randint(1, 4))) for _ in range(4)]
            f.write(json.dumps({"q": question, "choices": choices, "label": rng.randrange(4)}))
            f.write("\n")
    (folder / "bench_mc.yaml").write_text(
        "task: bench_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n'
    )
    return "bench_mc"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    cfg = load_config(None, ["data.tokenizer.kind=byte"])
    torch.manual_seed(0)
    model = model_for(cfg, ByteTokenizer.vocab_size, torch.device("cpu")).eval()
    params = sum(p.numel() for p in model.parameters())
    trained = Trained(cfg, ByteTokenizer(), model, 0, Path("."))
    with tempfile.TemporaryDirectory() as tmp:
        task = write_task(Path(tmp), args.items)
        print(f"{args.items} items x 4 choices, tiny model ({params:,} parameters), CPU")
        # CPU time beside wall time: on a machine shared with other jobs it is the steadier.
        print(f"{'batch size':>10}{'wall s':>9}{'CPU s':>9}{'requests/s (wall)':>19}{'acc':>8}")
        wall, cpu = {}, {}
        for batch in (args.batch_size, 1):
            lm = SeqBoatLM(trained=trained, batch_size=batch)
            start, start_cpu = time.perf_counter(), time.process_time()
            results = evaluate_tasks(lm, [task], tmp)
            wall[batch] = time.perf_counter() - start
            cpu[batch] = time.process_time() - start_cpu
            acc = task_metrics(results)[f"{task}/acc"]
            rate = 4 * args.items / wall[batch]
            print(f"{batch:>10}{wall[batch]:>9.1f}{cpu[batch]:>9.1f}{rate:>19.1f}{acc:>8.3f}")
        b = args.batch_size
        print(f"batched / unbatched: {wall[1] / wall[b]:.1f}x wall, {cpu[1] / cpu[b]:.1f}x CPU")


if __name__ == "__main__":
    main()
