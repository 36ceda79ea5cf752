"""The repository stands on its own: no file names a path outside it or a document that only
exists on the development machines. `.ci/run` also runs the whole suite from a copy of the
checkout that has nothing beside it, which is what proves the tests do not read such paths."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Written in pieces so that this file does not match itself.
OUTSIDE = re.compile(
    "|".join(
        [
            r"\.\./" + "shared",
            "/work" + "/",
            "SEQBOAT" + r"\.md",
            "DESIGN" + r"\.md",
            "SLURM-" + "NOTES",
            "SEQBOAT_" + "CORPUS_DIR",
        ]
    )
)


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    files = [ROOT / name.decode() for name in listed if name]
    return [f for f in files if f.is_file() and not f.is_relative_to(ROOT / "tests" / "data")]


def test_no_file_names_a_path_outside_the_repository() -> None:
    hits = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_the_shipped_corpus_is_there() -> None:
    corpus = ROOT / "tests" / "data" / "corpus"
    texts = sorted(p.name for p in corpus.glob("*.txt"))
    assert texts == ["brown.txt", "moby_dick.txt", "shakespeare.txt", "sotu.txt"]
    assert (corpus / "README.md").is_file()
