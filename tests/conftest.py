"""Shared test settings."""

from __future__ import annotations

from pathlib import Path

from testing.small_run import SMALL_RUN  # noqa: F401 - the tests import it from here

# English prose shipped with the repository (tests/data/corpus/README.md says what and whence).
CORPUS = Path(__file__).resolve().parent / "data" / "corpus"
