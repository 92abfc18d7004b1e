"""A local batch: the model answers in a worker process (`batch.worker`), a unit at a time, the next one queued;
a crash costs one unit, tried once more by a fresh worker."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medgemma_cli.batch.prepare import Prepared, classification, prefetch
from medgemma_cli.batch.records import Recorder
from medgemma_cli.batch.units import Unit
from medgemma_cli.batch.worker import Answered, ModelWorker, UnitError, WorkerCrashed, job_for
from medgemma_cli.containment import test_crash_requested
from medgemma_cli.errors import MedgemmaError

if TYPE_CHECKING:
    from medgemma_cli.answering import AskOptions
    from medgemma_cli.siglip import ZeroShot

CRASH_TRIES = 2  # a unit whose answering crashed the model this often is an error until --retry-failed
CRASHED_UNITS_IN_A_ROW = 3  # then the fault is not in the units: stop rather than reload the model for each


@dataclass
class LocalTimes:
    model: float = 0.0  # inside the model, as the worker measured it
    worker: float = 0.0  # what the worker process added: its start (not the model load), pickling, pipes
    worker_idle: float = 0.0  # the model waiting for the next unit (rendering could not keep up)


@dataclass
class _InFlight:
    prepared: Prepared
    classification: dict[str, Any] | None
    crash_for_test: bool
    attempts: int = 1


def answer_locally(worker: ModelWorker, todo: list[Unit], prepare: Callable[[Unit], Prepared], opts: AskOptions,
                    writer: Recorder, zero_shot: ZeroShot | None, on_progress: Callable[[int, int, str], None] | None
                    ) -> LocalTimes:
    """The model (loaded once, again after a crash) answers in a worker process; each unit is encoded once and
    answers all its questions. The next unit is queued in the worker before the current one is finished.

    If the worker dies, the unit it was answering keeps the answers already written and is tried once more by a
    fresh worker; a second crash makes its remaining questions error records. Units queued behind it are
    simply sent again."""
    times = LocalTimes()
    inflight: deque[_InFlight] = deque()
    units = iter(prefetch(todo, prepare))
    started = 0
    crashed_in_a_row = 0

    def submit(f: _InFlight) -> None:
        inputs = f.prepared.inputs
        assert inputs is not None
        worker.submit(job_for(inputs, writer.pending(f.prepared.unit), opts, f.crash_for_test))

    def refill() -> None:
        nonlocal started
        while len(inflight) < 2:
            p = next(units, None)
            if p is None:
                return
            if on_progress:
                on_progress(started, len(todo), p.unit.id)
            started += 1
            if p.error is not None or p.inputs is None:
                writer.fail_unit(p.unit, p.error or "nothing could be read")
                continue
            n = len(p.inputs.images)
            f = _InFlight(p, classification(zero_shot, p.inputs) if zero_shot and n else None,
                          test_crash_requested("unit", " ".join(x.name for x in p.unit.files)))
            inflight.append(f)
            submit(f)

    try:
        refill()
        while inflight:
            f = inflight[0]
            u, n_images = f.prepared.unit, len(f.prepared.inputs.images) if f.prepared.inputs else 0
            try:
                result = worker.receive()
            except WorkerCrashed as e:  # answers so far are written; the rest go to a fresh worker
                if f.attempts >= CRASH_TRIES:
                    writer.fail_unit(u, f"{e} (tried {CRASH_TRIES} times; --retry-failed tries again)")
                    inflight.popleft()
                    crashed_in_a_row += 1
                    if crashed_in_a_row >= CRASHED_UNITS_IN_A_ROW:
                        raise MedgemmaError(f"{e}, on {crashed_in_a_row} units in a row: stopped (re-running the same "
                                            "command goes on with the units not tried yet)") from None
                else:
                    f.attempts += 1
                for queued in inflight:
                    submit(queued)
                refill()
                continue
            if isinstance(result, Answered):
                times.model += result.model_s
                writer.answer(u, result.question, n_images, result.answer,
                              {"first_token_s": result.first_token_s, "total_s": result.total_s},
                              {"prompt": result.prompt_tokens, "completion": result.completion_tokens},
                              f.classification, f.prepared.inputs)
            elif isinstance(result, UnitError):
                writer.fail_unit(u, result.message)
            else:  # this unit is done
                crashed_in_a_row = 0
                times.worker += result.handling_s
                times.worker_idle += result.idle_s
                inflight.popleft()
                refill()
    finally:
        times.worker += worker.start_overhead_s + worker.submit_s
    return times
