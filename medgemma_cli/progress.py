"""How long-running library work reports progress, without depending on a terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from medgemma_cli.estimate import Estimate


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


class AskProgress(Protocol):
    """What `ask` and `chat` report while they read a prompt: the plan (with this machine's estimate, when it has
    measured the model before), then each image as it is encoded."""

    def planned(self, estimate: Estimate | None, images: int) -> None: ...
    def image(self, done: int, total: int) -> None: ...
