"""Errors users are meant to read: one line, naming the file and the problem."""

from __future__ import annotations

from pathlib import Path

from medgemma_cli.printable import printable


class MedgemmaError(Exception):
    """An error the CLI reports as one line and a non-zero exit, without a traceback."""

    exit_code = 1


class InputError(MedgemmaError):
    """Something wrong with a file the user gave us."""

    def __init__(self, path: Path | str | None, problem: str):
        self.path = Path(path) if path is not None else None
        self.problem = problem
        shown = f"{self.path}: {problem}" if self.path is not None else problem
        super().__init__(printable(shown))  # one line, whatever the file's name or the header's bytes


class UnsupportedModelError(InputError):
    """A checkpoint of an architecture we do not convert."""


class OutputError(MedgemmaError):
    """Writing the result failed (full disk, permissions); nothing is left at the final paths."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        super().__init__(printable(f"{self.path}: {problem}"))
