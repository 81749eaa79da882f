"""How many torch threads prediction uses, set only for the duration of the predictor's own calls.

Why this exists: a video run overlaps two kinds of work, FFmpeg decoding in a background thread and
torch inference in the caller's thread. With torch's default (one thread per core) the two fight for
the cores, and OpenMP's idle threads spin between operations, taking CPU the decoder needs: on 2 cores
the Python API ran 6-7 frames/s where the CLI ran ~50 (issue 13). Leaving one core to decoding fixes
it, and with one torch thread on 2 cores there is no idle OpenMP thread left to spin.

What :class:`~mtaffect.predict.pipeline.Predictor` does (``num_threads="auto"``, the default): while
one of its calls runs, ``torch.set_num_threads(every core but one)``; when the call returns (or
raises), the caller's value is put back. Nothing else: it does not touch ``torch.set_num_interop_threads``
(which can only be set once per process) nor environment variables. ``OMP_WAIT_POLICY`` in particular
is read by the OpenMP runtime once, when torch is first imported, so a library cannot change it
afterwards without surprising the process; the CLI sets it to ``PASSIVE`` before importing torch, and a
Python user on a busy or small machine may do the same (``OMP_WAIT_POLICY=PASSIVE python app.py``).
``num_threads=N`` uses N threads the same way; ``num_threads=None`` leaves torch's setting alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def streaming_threads() -> int:
    """Torch threads for a whole-machine streaming run: every core but one, which decodes video.

    Measured on 2 cores: 1 torch thread + the decode thread runs 55 frames/s where torch's default of
    2 threads (competing with decoding) runs 50 (docs/benchmarks.md).
    """
    return max(1, (os.cpu_count() or 1) - 1)


#: The face landmarker's LiteRT threads are capped here: its 256x256 model gains little from more.
MAX_LANDMARKER_THREADS = 2


def landmarker_threads(torch_threads_: int | None) -> int:
    """LiteRT threads for the face landmarker of a predictor using ``torch_threads_`` torch threads.

    The landmark model runs between torch's calls, never at the same time, so it may also take the core
    torch leaves to decoding: torch's count + 1, at most :data:`MAX_LANDMARKER_THREADS` (measured on 2
    cores: 9.6 ms per face on 1 thread, 7.5 ms on 2, and predict's frames/s with the landmarker from 21
    to 25). ``None`` (torch's setting left alone): 1.
    """
    if torch_threads_ is None:
        return 1
    return max(1, min(MAX_LANDMARKER_THREADS, torch_threads_ + 1))


def resolve_threads(num_threads: int | str | None) -> int | None:
    """ "auto" -> :func:`streaming_threads`; an int >= 1 as is; None: do not change torch's setting."""
    if num_threads is None:
        return None
    if num_threads == "auto":
        return streaming_threads()
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be 'auto', an integer >= 1 or None, got {num_threads!r}")
    return num_threads


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block, the previous value restored after (n=None: no-op)."""
    if n is None:
        yield
        return
    import torch  # here, not at import: the onnxruntime engine uses this module without torch

    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


__all__ = ["resolve_threads", "streaming_threads", "torch_threads"]
