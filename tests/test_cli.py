"""Command-line parsing: overrides and options in any order, strays rejected."""

from __future__ import annotations

import pytest

from pretrain.cli import parse_args


def test_options_may_sit_between_overrides() -> None:
    args = parse_args(["train", "a.b=1", "--no-progress", "c=2", "--config", "x.yaml", "d=3"])
    assert args.no_progress and args.config == "x.yaml"
    assert args.overrides == ["a.b=1", "c=2", "d=3"]


@pytest.mark.parametrize(
    "argv",
    [["train", "a=1", "--bogus"], ["eval", "--run-dir", "x", "--nope"], ["plot", "run", "a=1"]],
)
def test_stray_arguments_are_rejected(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
