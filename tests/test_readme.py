"""README's commands work as written: each parses, and each file it names is in the repo."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

from edgefed.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("creds/", "ckpt/", "runs/", "state/")
"""Folders an earlier README command (or the run itself) makes; not in the repository."""
FILE_OPTIONS = ("--config", "--fleet")


def _commands() -> list[list[str]]:
    """Every ``edgefed`` command of README's shell blocks, as argv after ``edgefed``."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.DOTALL):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]  # VAR=value before the command
            if words and words[0] == "edgefed":
                commands.append(words[1:])
    return commands


def test_readme_shows_commands() -> None:
    assert len(_commands()) >= 30


@pytest.mark.parametrize("argv", _commands(), ids=" ".join)
def test_a_readme_command_parses_and_names_files_that_exist(argv: list[str]) -> None:
    build_parser().parse_args(argv)  # exits (SystemExit) on an unknown flag or a bad value
    for option, value in itertools.pairwise(argv):
        if option in FILE_OPTIONS and not value.startswith(GENERATED):
            assert (ROOT / value).is_file(), f"{option} {value}: not in the repository"
