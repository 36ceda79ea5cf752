"""Shared test settings."""

from __future__ import annotations

import os
from pathlib import Path

# The shared English corpus: beside the repository in CI (../shared/corpus).
CORPUS = Path(
    os.environ.get("SEQBOAT_CORPUS_DIR", Path(__file__).resolve().parents[2] / "shared" / "corpus")
)
