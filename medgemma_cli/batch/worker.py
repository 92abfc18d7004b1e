"""The model side of a local batch, in a process of its own: a crash in llama.cpp costs one unit, not the run.

The batch process reads and renders units, writes records and scores MedSigLIP; the worker holds the model
and answers. They talk over two pipes (pickled messages). If the worker dies by a signal, the unit it was
answering gets error records naming the crash, and a fresh worker (model reloaded) takes the next unit.
A unit is tried at most twice in one run; after that its records say it crashed, and a resumed run leaves
it alone until `--retry-failed`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from medgemma_cli import containment
from medgemma_cli.errors import MedgemmaError
from medgemma_cli.inputs.collect import Collected, PromptImage
from medgemma_cli.llama.grammar import Constraint
from medgemma_cli.llama.model_files import ModelFiles

if TYPE_CHECKING:
    from medgemma_cli.answering import AskOptions

PIPE_SIZE_TEST_ENV = "MEDGEMMA_TEST_PIPE_SIZE"  # tests only: small pipes, so that a protocol deadlock shows


@dataclass
class EngineConfig:
    files: ModelFiles
    n_ctx: int
    threads: int | None = None
    gpu_layers: int | None = None
    vision_backend: str = "auto"
    verbose: bool = False
    kv_type: str = "f16"
    cache_gb: float | None = None  # the image-embedding cache's bound; None: no cache (prompt states are not
    # kept in a batch: each unit's would be hundreds of MB, and the embeddings are what a re-run needs most)
    swa_full: bool = True  # a full-size cache in the sliding-window layers: needed only where a unit's prefix
    # answers several questions; with one question per unit they keep only their window (the same answers)


@dataclass
class Job:
    """One unit: only what the prompt needs (the rendered images and their labels, notes, safe metadata)."""
    images: list[tuple[Any, str | None, str | None]]  # (RGB array at the model's size, slice label, heading)
    notes: list[tuple[str, str]]
    metadata: list[dict[str, str]]
    questions: list[str]
    system: str | None = None
    with_metadata: bool = False
    max_tokens: int = 512
    temperature: float = 0.0
    seed: int = 0
    crash_for_test: bool = False
    constraint: Constraint | None = None  # --schema: the grammar every answer follows


@dataclass
class Answered:
    question: str
    answer: str
    first_token_s: float
    total_s: float
    prompt_tokens: int
    completion_tokens: int
    model_s: float  # this question's time inside the model (the shared prefill counted with the first)


@dataclass
class UnitError:
    message: str


@dataclass
class UnitDone:
    """The end of one job's results, with what the worker spent on it beside the model (unpickling, sending)."""
    handling_s: float
    idle_s: float  # waiting for this job after the previous one was done


class WorkerCrashed(MedgemmaError):
    """The worker died by a signal (or vanished) while answering."""


def job_for(inputs: Collected, questions: list[str], opts: AskOptions, crash_for_test: bool = False) -> Job:
    return Job([(img.rgb, img.label, img.heading) for img in inputs.images], list(inputs.notes),
               list(inputs.metadata), list(questions), opts.system_text(), opts.with_metadata, opts.budget(True),
               opts.temperature, opts.seed, crash_for_test, opts.answer_constraint(True))


@dataclass
class ModelWorker:
    """A child process holding one loaded model. Jobs are answered in the order submitted; the batch keeps the
    next one queued (`submit`) while it reads the current one's results (`receive`), so the model never waits
    for a round trip between the processes."""

    config: EngineConfig
    load_seconds: float = 0.0
    speeds_key: str = ""  # where this machine's speeds for the loaded model are remembered (estimate.py)
    start_overhead_s: float = 0.0  # waiting for the process and its imports (not the model load) to be ready
    submit_s: float = 0.0  # handing jobs to the writer thread (which pickles and writes them)
    _proc: subprocess.Popen | None = None
    _send: Connection | None = None
    _recv: Connection | None = None
    _stage_path: str = ""
    _ready: bool = False
    _outbox: queue.Queue | None = None

    def start(self) -> None:
        """Start the process and have it load the model; returns at once (`wait_ready` waits)."""
        self._stage_path = containment.new_stage_file()
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        if os.environ.get(PIPE_SIZE_TEST_ENV) and hasattr(fcntl, "F_SETPIPE_SZ"):  # tests: pipes that fill at once
            for fd in (to_child_w, from_child_w):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, int(os.environ[PIPE_SIZE_TEST_ENV]))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "medgemma_cli.batch.worker", str(to_child_r), str(from_child_w),
                 self._stage_path, str(os.getpid())], pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=None if self.config.verbose else subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if k != containment.STAGE_FILE_ENV})
        except BaseException:
            for fd in (to_child_w, from_child_r):
                os.close(fd)
            raise
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._send = Connection(to_child_w, readable=False)
        self._recv = Connection(from_child_r, writable=False)
        # Jobs go out through a thread: the next unit (pixels, often more than a pipe holds) is queued while this
        # one's answers come back, and the batch must keep reading those answers meanwhile, or both would wait.
        self._outbox = queue.Queue()
        threading.Thread(target=_write_jobs, args=(self._send, self._outbox), name="medgemma-batch-jobs",
                         daemon=True).start()
        self._outbox.put(self.config)
        self._ready = False

    def wait_ready(self) -> None:
        """Until the model is loaded (starting a fresh process after a crash). Only the wait beyond the load
        itself counts as the worker's cost: the load was paid in-process too, and the first process starts while
        the batch walks the folder."""
        if self._proc is None:  # after a crash
            self.start()
        if self._ready:
            return
        t0 = time.perf_counter()
        kind, *rest = self._receive("loading the model")
        if kind == "load_error":
            self.close()
            raise MedgemmaError(rest[0])
        self.load_seconds, self.speeds_key = rest[0], rest[1]
        self.start_overhead_s += max(0.0, time.perf_counter() - t0 - self.load_seconds)
        self._ready = True

    def submit(self, job: Job) -> None:
        """Queue a job; if the worker has died, the next `receive` says how."""
        self.wait_ready()
        assert self._outbox is not None
        t0 = time.perf_counter()
        self._outbox.put(job)  # pickled and written by the writer thread
        self.submit_s += time.perf_counter() - t0

    def receive(self) -> Answered | UnitError | UnitDone:
        """The next result of the oldest job submitted; raises WorkerCrashed if the worker died."""
        kind, *rest = self._receive("answering")
        if kind == "answer":
            return Answered(*rest)
        if kind == "error":
            return UnitError(rest[0])
        return UnitDone(*rest)

    def _receive(self, doing: str) -> tuple[Any, ...]:
        assert self._recv is not None and self._proc is not None
        try:
            return tuple(self._recv.recv())
        except (EOFError, OSError):
            rc = self._proc.wait()
            last = containment.read_stage(self._stage_path)
            self._cleanup()
            if rc < 0:
                raise WorkerCrashed(containment.describe_death(-rc, last)) from None
            raise WorkerCrashed(f"the model worker stopped (exit {rc}) while {doing}") from None

    def close(self, kill: bool = False) -> None:
        if self._proc is None:
            return
        try:
            if kill:
                self._proc.kill()
            elif self._outbox is not None:
                self._outbox.put(None)  # after the jobs already queued: a tidy goodbye
        except (OSError, ValueError):
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._outbox is not None:
            self._outbox.put(_STOP)
            self._outbox = None
        for conn in (self._send, self._recv):
            if conn is not None:
                conn.close()
        self._send = self._recv = self._proc = None
        containment.remove_stage_file(self._stage_path)
        self._stage_path = ""


_STOP = object()


def _write_jobs(conn: Connection, outbox: queue.Queue) -> None:
    """Send what is queued, in order, until told to stop or the worker is gone (its crash is read elsewhere)."""
    while (item := outbox.get()) is not _STOP:
        try:
            conn.send(item)
        except (OSError, ValueError):  # broken pipe, or the connection closed after a crash
            return
        if item is None:
            return


# --- the worker process --------------------------------------------------------------------------------------

def _serve(recv: Connection, send: Connection) -> None:
    from pathlib import Path

    from medgemma_cli.estimate import remember, speeds_key
    from medgemma_cli.llama.caches import open_cache
    from medgemma_cli.llama.engine import Engine
    from medgemma_cli.llama.session import PrefixSession

    config: EngineConfig = recv.recv()
    t0 = time.perf_counter()
    try:
        cache = open_cache(config.cache_gb) if config.cache_gb is not None else None
        engine = Engine(config.files, n_ctx=config.n_ctx, threads=config.threads, gpu_layers=config.gpu_layers,
                        verbose=config.verbose, vision_backend=config.vision_backend, kv_type=config.kv_type,
                        swa_full=config.swa_full, cache=cache)
    except MedgemmaError as e:
        send.send(("load_error", str(e)))
        return
    except Exception as e:  # noqa: BLE001 - reported by the batch as one line
        send.send(("load_error", f"the model could not be loaded: {type(e).__name__}: {e}"))
        return
    speeds_at = speeds_key(config.files.text, engine.vision_file, engine.vision_backend, engine.threads)
    send.send(("ready", time.perf_counter() - t0, speeds_at))
    try:
        while True:
            t_wait = time.perf_counter()
            if (job := recv.recv()) is None:
                break
            t_job = time.perf_counter()
            inside = 0.0
            if job.crash_for_test:
                with containment.stage("llama.cpp", "reading the prompt"):
                    containment.crash()
            inputs = Collected(images=[PromptImage(rgb, label, Path(""), heading=heading)
                                       for rgb, label, heading in job.images],
                               notes=job.notes, metadata=job.metadata)
            try:
                t1 = time.perf_counter()
                session = PrefixSession(engine, inputs, job.system, job.with_metadata)
                encoded = engine.images_encoded
                session.start()
                prefill = time.perf_counter() - t1
                pt = session.prefill_timings  # this machine's speeds, for the estimates of later runs
                remember(speeds_at, engine.images_encoded - encoded, pt.image_encode_s, session.prefix_tokens,
                         pt.prefill_s - pt.image_encode_s)
                for q in job.questions:
                    t1 = time.perf_counter()
                    turn = session.ask(q, job.max_tokens, job.temperature, job.seed, constraint=job.constraint)
                    spent = time.perf_counter() - t1 + prefill
                    prefill = 0.0
                    inside += spent
                    send.send(("answer", q, turn.answer, round(turn.timings.first_token_s, 3),
                               round(turn.timings.decode_s + turn.timings.prefill_s, 3), turn.prompt_tokens,
                               turn.completion_tokens, spent))
            except MedgemmaError as e:
                send.send(("error", str(e)))
            except Exception as e:  # noqa: BLE001 - one unit's error record, never the end of the batch
                send.send(("error", f"unexpected {type(e).__name__}: {e}"))
            send.send(("done", time.perf_counter() - t_job - inside, t_job - t_wait))
    except (EOFError, OSError):
        pass  # the batch process went away
    finally:
        engine.close()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the batch process's to handle; it stops us
    recv = Connection(int(argv[0]), writable=False)
    send = Connection(int(argv[1]), readable=False)
    from medgemma_cli.offline import forbid_sockets

    forbid_sockets("batch")  # the local model's process never needs the network
    if argv[2]:
        with contextlib.suppress(OSError):
            containment.use_stage_file(argv[2])
    containment.die_with_parent(int(argv[3]))
    _serve(recv, send)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
