"""``predict --workers N``: a pool of processes over the files of a per-file run.

Each worker is a fresh process (``spawn``: no torch threads or state inherited from the parent) that
builds its own :class:`~mtaffect.predict.pipeline.Predictor` with its share of the CPU threads
(:func:`mtaffect.predict.archive.worker_threads`) and runs the files the parent hands it, one at a time,
over a pipe of its own (:func:`mtaffect.predict.archive.run_unit`: claim, table, extras, record). The
parent hands out files in the order it is given (longest first), so the pool stays busy to the end.

Why a pipe per worker rather than a shared queue or ``concurrent.futures``: a worker that dies (killed,
or crashed by a file that kills its decoder) takes down only its own pipe and its current file. The
parent reports that file as failed in this run, starts a replacement, and the other workers go on; the
file's partial rows and its record (whose lock the kernel released) are there for the next run, which
resumes it. (``ProcessPoolExecutor`` would break the whole pool; a shared queue can be left locked by a
killed reader.)

Ctrl-C: workers ignore SIGINT; the parent sets a stop event, each worker stops at its next chunk of
frames (its rows so far committed, see :class:`mtaffect.predict.job.PartialTable`) and exits; the parent
then raises KeyboardInterrupt. A worker still running ``STOP_GRACE_S`` later is terminated (its last
committed rows are kept all the same).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Final

from mtaffect.io import error_message
from mtaffect.predict.archive import Outcome, Unit, UnitOptions, run_unit

STOP_GRACE_S: Final[float] = 30.0
#: Workers that end before they are ready (the model does not load, the memory runs out) are replaced
#: at most this many times in a row; then the files left are reported, not run.
MAX_FAILED_STARTS: Final[int] = 3
PROGRESS_EVERY_S: Final[float] = 0.25


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs (picklable): the Predictor's keyword arguments (``model`` a string or
    None), whether the person allowed an hf: backbone's code, the files and how to write them."""

    predictor: dict
    units: Sequence[Unit]
    options: UnitOptions
    trust_remote_code: bool = False
    threads: int = 1


def build_predictor(kwargs: dict, threads: int | str | None, trust_remote_code: bool = False):
    """A Predictor from plain keyword arguments (what a worker receives), ``threads`` torch threads."""
    from mtaffect.predict.pipeline import Predictor

    kwargs = dict(kwargs)
    if trust_remote_code:  # the person's flag, passed on; never read from a file
        from mtaffect.models.loading import load_face_model

        device = kwargs.get("device", "cpu")
        kwargs["model"] = load_face_model(kwargs["model"], device, trust_remote_code=True)
    return Predictor(**kwargs, num_threads=threads)


def _worker_main(spec: WorkerSpec, conn: Connection, stop) -> None:
    """A worker's life: build the predictor, then run each file index received until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; see the module docstring
    try:
        predictor = build_predictor(spec.predictor, spec.threads, spec.trust_remote_code)
    except Exception as e:  # whatever stops the model loading is reported, not a traceback
        conn.send(("error", error_message(e)))
        return
    conn.send(("ready",))
    while True:
        try:
            index = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if index is None:
            return
        unit = spec.units[index]
        pending, last = 0, time.monotonic()

        def progress(n: int) -> None:
            nonlocal pending, last
            if stop.is_set():
                raise KeyboardInterrupt
            pending += n
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                try:
                    conn.send(("progress", pending))
                except OSError:  # the parent is gone (killed): stop as at Ctrl-C, the rows kept
                    raise KeyboardInterrupt from None
                pending, last = 0, time.monotonic()

        try:
            outcome = run_unit(predictor, unit, spec.options, progress)
        except KeyboardInterrupt:
            with contextlib.suppress(OSError):
                conn.send(("stopped", index))
            return
        except Exception as e:  # a file that breaks the pipeline fails alone
            error = f"{unit.source}: {type(e).__name__}: {e}"
            outcome = Outcome(unit.source, unit.stem, "failed", error=error)
        try:
            if pending:
                conn.send(("progress", pending))
            conn.send(("done", index, outcome))
        except OSError:  # the parent is gone: the record says how the file ended
            return


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this process for the block (main thread only; elsewhere a no-op)."""
    try:
        before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals are not ours to change
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@dataclass
class _Slot:
    process: mp.process.BaseProcess
    conn: Connection
    current: int | None = None
    ready: bool = False


@dataclass
class PoolResult:
    """Each file's outcome by its position in ``spec.units``; files not reached (interrupted) absent."""

    outcomes: dict[int, Outcome] = field(default_factory=dict)
    interrupted: bool = False


def run_pool(
    spec: WorkerSpec,
    order: Sequence[int],
    workers: int,
    on_event: Callable[..., None] | None = None,
) -> PoolResult:
    """Run the files ``order`` (positions in ``spec.units``) on ``workers`` processes.

    ``on_event(kind, *payload)`` is called in this process: ("progress", index, frames),
    ("done", index, Outcome) and ("warning", text). A model that no worker can load is a ValueError
    (the workers' message); workers that keep dying before they are ready stop being replaced, and the
    files left are failed outcomes; Ctrl-C stops the workers and raises KeyboardInterrupt once they are
    gone.
    """
    emit = on_event or (lambda *_a: None)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    todo = deque(order)
    result = PoolResult()
    slots: dict[int, _Slot] = {}
    next_id = 0
    started_any = False
    failed_starts = 0  # in a row, since the last worker that became ready
    load_error: str | None = None
    if not todo:
        return result

    def spawn() -> None:
        nonlocal next_id
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=_worker_main, args=(spec, child_end, stop), name=f"mtaffect-worker-{next_id}")
        p.daemon = True
        with _sigint_ignored():  # inherited: a Ctrl-C while the worker imports is the parent's to handle
            p.start()
        child_end.close()
        slots[next_id] = _Slot(p, parent_end)
        next_id += 1

    def hand_out(slot: _Slot) -> None:
        index = todo.popleft() if todo and not stop.is_set() else None
        try:
            slot.conn.send(index)
        except OSError:  # it died just now: the file goes back, its end is read from the pipe next
            if index is not None:
                todo.appendleft(index)
            index = None
        slot.current = index

    def ended(wid: int) -> None:
        nonlocal failed_starts
        slot = slots.pop(wid)
        slot.process.join(timeout=5)
        code = slot.process.exitcode
        if not slot.ready:
            failed_starts += 1
            if load_error is None and code and not stop.is_set():
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                emit("warning", f"a worker process ended while loading the model ({how})")
        if slot.current is not None and slot.current not in result.outcomes and not stop.is_set():
            unit = spec.units[slot.current]
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            err = (
                f"{unit.source}: the worker running it died ({how}); its rows so far are kept: rerun the "
                "same command to resume it"
            )
            result.outcomes[slot.current] = Outcome(unit.source, unit.stem, "failed", error=err)
            emit("done", slot.current, result.outcomes[slot.current])
        hopeless = load_error is not None and not started_any  # the model does not load: no use again
        if todo and not stop.is_set() and failed_starts < MAX_FAILED_STARTS and not hopeless:
            spawn()  # keep the pool at strength while there is work

    for _ in range(min(workers, len(order))):
        spawn()
    deadline: float | None = None
    while slots:
        try:
            if deadline is not None and time.monotonic() > deadline:
                for s in slots.values():
                    s.process.terminate()
                deadline = None
            conns = {s.conn: wid for wid, s in slots.items()}
            ready = wait(list(conns), timeout=0.5)
            for conn, wid in conns.items():
                if conn not in ready:
                    continue
                slot = slots[wid]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    ended(wid)
                    continue
                kind = msg[0]
                if kind == "ready":
                    started_any = slot.ready = True
                    failed_starts = 0
                    hand_out(slot)
                elif kind == "progress":
                    emit("progress", slot.current, msg[1])
                elif kind == "done":
                    result.outcomes[msg[1]] = msg[2]
                    emit("done", msg[1], msg[2])
                    hand_out(slot)
                elif kind == "stopped":
                    slot.current = None
                elif kind == "error":
                    if started_any and load_error != msg[1]:
                        emit("warning", f"a worker could not load the model: {msg[1]}")
                    load_error = msg[1]
        except KeyboardInterrupt:
            if stop.is_set():  # a second Ctrl-C: stop now
                for s in slots.values():
                    s.process.terminate()
            stop.set()
            result.interrupted = True
            deadline = time.monotonic() + STOP_GRACE_S
            for s in list(slots.values()):  # idle ones (a file just done) are told to stop now
                if s.ready and (s.current is None or s.current in result.outcomes):
                    hand_out(s)
    if result.interrupted:
        raise KeyboardInterrupt
    if not started_any:
        raise ValueError(load_error or "the worker processes ended while loading the model (out of memory?)")
    why = load_error or "the worker processes kept ending while loading the model"
    for index in todo:  # workers stopped being replaced: these files were not run
        unit = spec.units[index]
        error = f"{unit.source}: not run: {why}"
        result.outcomes[index] = Outcome(unit.source, unit.stem, "failed", error=error)
        emit("done", index, result.outcomes[index])
    return result


__all__ = ["PoolResult", "WorkerSpec", "build_predictor", "run_pool"]
