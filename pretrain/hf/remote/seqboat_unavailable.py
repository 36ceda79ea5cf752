"""Stands in an exported model folder for what it does not include: megatron-core and the
project's distributed runtime, imported by the model code only on its tensor, context or
pipeline parallel and activation recompute paths, which a single process never takes."""

from __future__ import annotations


class _Unavailable:
    def _fail(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            "an exported SeqBoat model runs on one process: model parallelism and activation "
            "recompute need the seqboat-pretrain project (megatron-core)"
        )

    __call__ = _fail

    def __getattr__(self, name: str) -> object:
        self._fail()


UNAVAILABLE = _Unavailable()
