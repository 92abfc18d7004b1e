"""How long-running library work reports progress, without depending on a terminal."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def begin(self, label: str, total_bytes: int, total_tensors: int) -> None: ...
    def advance(self, nbytes: int, tensors: int = 0) -> None: ...
    def status(self, message: str) -> None: ...
    def end(self) -> None: ...


class NullProgress:
    """The default: library calls stay silent unless the caller asks for progress."""

    def begin(self, label: str, total_bytes: int, total_tensors: int) -> None:
        pass

    def advance(self, nbytes: int, tensors: int = 0) -> None:
        pass

    def status(self, message: str) -> None:
        pass

    def end(self) -> None:
        pass
