"""Hugging Face tokenizer of an exported SeqBoat model: the run's own tokenizer classes
(``data/tokenizer.py``, copied into this folder) behind ``PreTrainedTokenizer``, so that
text encodes to exactly the ids the model was trained on and decodes back losslessly.

``kind`` is ``sentencepiece`` (``tokenizer.model``, needs the sentencepiece package) or
``byte`` (ids 0..255 are UTF-8 bytes, 256 ends a document). No special token is added
and none is parsed out of text: ``</s>`` in text is text, as in training.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizer

from .data_tokenizer import ByteTokenizer, SentencePieceTokenizer

EOS = "</s>"


class SeqBoatTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}  # noqa: RUF012 - HF's class attribute
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012

    def __init__(
        self, vocab_file: str | None = None, kind: str = "sentencepiece", **kwargs: Any
    ) -> None:
        if kind == "sentencepiece":
            if vocab_file is None:
                raise ValueError("a sentencepiece SeqBoat tokenizer needs tokenizer.model")
            self._tok = SentencePieceTokenizer(vocab_file)
        elif kind == "byte":
            self._tok = ByteTokenizer()
        else:
            raise ValueError(f"unknown SeqBoat tokenizer kind {kind!r}")
        self.kind = kind
        self.vocab_file = vocab_file
        kwargs.setdefault("eos_token", self._convert_id_to_token(self._tok.eos_id))
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("special_tokens_pattern", "none")
        super().__init__(kind=kind, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return {self._convert_id_to_token(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return [self._convert_id_to_token(i) for i in self._tok.encode(text)]

    def _convert_token_to_id(self, token: str) -> int:
        if self.kind == "sentencepiece":
            return self._tok._sp.piece_to_id(token)
        return self._tok.eos_id if token == EOS else int(token[3:5], 16)

    def _convert_id_to_token(self, index: int) -> str:
        if self.kind == "sentencepiece":
            return self._tok._sp.id_to_piece(index)
        return EOS if index == self._tok.eos_id else f"<0x{index:02X}>"

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._tok.decode([self._convert_token_to_id(t) for t in tokens])

    def _decode(
        self, token_ids: int | list[int], skip_special_tokens: bool = False, **kwargs: Any
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if skip_special_tokens:
            ids = [i for i in ids if i != self._tok.eos_id]
        return self._tok.decode(ids)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple:
        if self.vocab_file is None:
            return ()
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        out = Path(save_directory) / f"{prefix}tokenizer.model"
        if Path(self.vocab_file).resolve() != out.resolve():
            shutil.copyfile(self.vocab_file, out)
        return (str(out),)
