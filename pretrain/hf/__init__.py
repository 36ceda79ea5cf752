"""Trained models out: a Hugging Face folder (``seqboat export``), lm-evaluation-harness
(``seqboat lm-eval``) and harness tasks during training (``eval.tasks``).

Everything here needs the ``[hf]`` extra (transformers, safetensors, lm-eval);
``require`` turns its absence into one line saying what to install.
"""

from __future__ import annotations

import importlib

INSTALL_HINT = "pip install -c constraints.txt -e '.[hf]'"


class MissingExtra(ValueError):
    """An optional dependency of the [hf] extra is not installed (one line for the CLI)."""


def require(*modules: str, what: str) -> None:
    """Raises ``MissingExtra`` naming those of ``modules`` that cannot be imported."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtra(f"{what} needs {', '.join(missing)}: {INSTALL_HINT}")
