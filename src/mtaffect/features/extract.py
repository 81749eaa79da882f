"""Extraction: run a frozen backbone once over every face crop into a :class:`FeatureStore`.

Design (crash safety, resume, sharding):

- The image list is cut into fixed chunks of ``chunk_size`` rows, independent of batch size, number
  of decoding workers and number of ranks; batches never straddle chunks, so a chunk's bytes depend
  only on the chunk (and the batch size), never on who computed it or when.
- Work happens in ``<out>.partial/``: rank 0 preallocates the final ``.npy`` files there (sparse
  zeros) with ``images.txt`` and ``plan.json`` (backbone fingerprint, image-list hash, shapes,
  chunk size), building it in a temporary folder renamed into place.
- Every rank writes its rows straight into those shared files with positional writes (see
  :class:`~mtaffect.features.store.RowWriter`); when a chunk is complete its rows are fsynced and only
  then recorded, with its failed images, in that rank's own ``progress/rank-NNNNN.json`` (atomic
  replace). A SIGKILL at any moment therefore loses at most the chunks in flight; an unrecorded chunk
  is simply recomputed, overwriting its rows with the same bytes. Nothing is merged or copied at the
  end, which matters for token stores of tens of GB.
- Ranks take chunks ``c % world_size == rank`` among those not done, where "done" is the union of
  all progress files as read by rank 0 before work starts (broadcast to all ranks), so a run may be
  resumed with a different number of ranks.
- Rank 0 finalises once every rank reported: it checks every chunk is recorded and that the
  ``valid`` rows agree, writes ``failed.csv`` and then ``meta.json`` (the marker of a finished store),
  removes the bookkeeping and renames ``<out>.partial`` to ``<out>`` (replacing an older store only
  with ``overwrite=True``, and only after the new one is complete). Rerunning after a crash during
  finalisation completes it.
- With ``world_size > 1`` ranks coordinate through ``torch.distributed`` (an initialised process
  group, or a gloo group initialised here from torchrun's environment): one broadcast after rank 0
  prepares and one gather before finalising, both carrying errors so no rank waits on a failed one.
- A lock on ``progress/rank-NNNNN.lock`` (:class:`mtaffect.persist.Lock`, the file holding the owner's
  pid) stops two live runs from writing the same shard. Forked DataLoader workers drop their copy, so
  a killed parent's lock is free at once, whatever its workers still do.
- Nothing is deleted that this code did not create: the preparation folder has a unique name, and
  every folder extraction may later remove (``<out>.partial``, the preparation folder, the old store
  being swapped out by ``overwrite``) carries the marker file ``.mtaffect-extract`` naming the process
  that made it. A folder of ours left by a dead process is removed on the next run; anything else is
  left alone and named in the message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch.utils.data import DataLoader

from mtaffect import persist
from mtaffect.data.units import unsafe_name_reason
from mtaffect.features.base import Backbone
from mtaffect.features.decode import BatchDecodeDataset, preprocessing_description
from mtaffect.features.store import (
    ARRAY_FILES,
    FAILED,
    IMAGES,
    META,
    RowWriter,
    StoreError,
    allocate_arrays,
    array_dtype,
    array_shapes,
    check_names,
    images_digest,
    partial_path,
    read_json,
    write_failed,
    write_images,
)
from mtaffect.io import OutputExistsError
from mtaffect.persist import FEATURE_STORE, Lock, LockBusy, NotOursError, check_replaceable, write_json
from mtaffect.schema import CROPPED_DIR, SPLIT_FILES, TEST_LIST_NAMES

PLAN: Final[str] = "plan.json"
PROGRESS: Final[str] = "progress"
#: Marker file of a folder this module created (and so may remove): JSON {pid, host, created}.
OWNER_MARKER: Final[str] = ".mtaffect-extract"
#: Test hook: SIGKILL this process after it has recorded this many chunks (proves crash safety).
KILL_AFTER_ENV: Final[str] = "MTAFFECT_TEST_KILL_AFTER_CHUNKS"
#: Keys of the plan that a resumed run must match exactly.
_RESUME_KEYS: Final[tuple[str, ...]] = (
    "format_version",
    "fingerprint",
    "images_sha256",
    "arrays",
    "chunk_size",
    "preprocessing_core",
    "dtype",
)
DIST_TIMEOUT: Final = dt.timedelta(hours=12)


@dataclass
class ExtractResult:
    """What one ``extract`` call did (identical on every rank)."""

    store: Path
    images: int  # rows in the store
    extracted: int  # images computed by this call (all ranks)
    failed: int  # rows marked invalid (missing/unreadable), listed in failed_report
    resumed_from: int  # images already done by an earlier, interrupted run
    seconds: float  # wall time of the call
    images_per_s: float  # extraction throughput of this call (decode + inference + writes)
    failed_report: Path

    def summary(self) -> str:
        failed = f"{self.failed} failed (see {self.failed_report})" if self.failed else "0 failed"
        resumed = f", resumed after {self.resumed_from}" if self.resumed_from else ""
        return (
            f"{self.store}: {self.images} images, {self.extracted} extracted in {self.seconds:.1f}s "
            f"({self.images_per_s:.0f} images/s){resumed}; {failed}"
        )


# ---- what to extract --------------------------------------------------------------------------------


def collect_images(root: str | os.PathLike, splits: Sequence[str] = ("train", "val", "test")) -> list[str]:
    """Unique image names of ``splits`` under a dataset root, sorted (a deterministic row order).

    train/val come from the annotation files, test from the challenge test list (``MTL.txt``, or the
    ABAW4 name) at the root.
    """
    from mtaffect.data.annotations import load_split
    from mtaffect.data.submission import find_test_list, read_test_list

    if isinstance(splits, str):
        splits = (splits,)
    if not splits:
        raise ValueError("no splits given; choose from train, val, test")
    names: set[str] = set()
    for split in splits:
        if split in SPLIT_FILES:
            names.update(str(n) for n in load_split(root, split).images)
        elif split == "test":
            test_list = find_test_list(root)
            if test_list is None:
                raise FileNotFoundError(
                    f"no test list in {root} (looked for {', '.join(TEST_LIST_NAMES)}); "
                    "extract without the test split (CLI: --split train,val)"
                )
            names.update(read_test_list(test_list))
        else:
            raise ValueError(f"unknown split {split!r}; choose from {', '.join([*SPLIT_FILES, 'test'])}")
    return sorted(names)


def _resolve_backbone(
    backbone: str | Backbone, kwargs: Mapping[str, Any] | None = None, trust_remote_code: bool = False
) -> Backbone:
    """A registry name built with ``kwargs`` (plus the person's ``trust_remote_code``, which is never
    recorded), or a Backbone as it is."""
    if isinstance(backbone, str):
        from mtaffect.features.registry import create_backbone, with_trust

        backbone = create_backbone(backbone, **with_trust(backbone, kwargs or {}, trust_remote_code))
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone must be a registry name or a Backbone, got {type(backbone).__name__}")
    return backbone


def _make_plan(
    bb: Backbone, images: Sequence[str], tokens: bool, chunk_size: int, kwargs: Mapping[str, Any] | None
) -> dict:
    spec = bb.spec
    if tokens and spec.token_shape is None:
        raise ValueError(f"backbone {spec.name!r} has no tokens; extract without tokens (drop --tokens)")
    shapes = array_shapes(
        len(images), spec.feature_dim, spec.num_logits, spec.token_shape if tokens else None
    )
    prep = preprocessing_description(spec.input_size, spec.colour)
    return {
        **persist.header(FEATURE_STORE),
        "backbone": spec.name,
        # create_backbone(backbone, **backbone_kwargs) rebuilds it (checkpoints trained here carry them)
        "backbone_kwargs": json.loads(json.dumps(dict(kwargs or {}), default=str)),
        "spec": json.loads(json.dumps(asdict(spec), default=str)),
        "fingerprint": spec.fingerprint(),
        "preprocessing": prep,
        "preprocessing_core": {k: v for k, v in prep.items() if k != "pillow"},
        "dtype": "float16",
        "arrays": {k: list(v) for k, v in shapes.items()},
        "images_sha256": images_digest(images),
        "chunk_size": int(chunk_size),
    }


def _mismatch(state: dict, plan: dict) -> str | None:
    """Why an existing partial/finished state is not the same job as ``plan`` (None: same job)."""
    for key in _RESUME_KEYS:
        if state.get(key) != plan.get(key):
            if key == "fingerprint":
                return (
                    f"it was started with backbone {state.get('backbone')!r} (fingerprint {state.get(key)}), "
                    f"this run uses {plan['backbone']!r} (fingerprint {plan[key]})"
                )
            if key == "images_sha256":
                return "its image list differs from this run's (other splits, data or images)"
            return f"its {key} is {state.get(key)!r}, this run's is {plan.get(key)!r}"
    return None


# ---- ranks ------------------------------------------------------------------------------------------


@dataclass
class _Ranks:
    rank: int
    world: int
    dist: bool  # collectives needed
    owned: bool  # we initialised the process group and must destroy it

    def on_rank0(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and give its result (or its error) to every rank."""
        if not self.dist:
            return fn()
        import torch.distributed as tdist

        payload: list[Any] = [None]
        error: BaseException | None = None
        if self.rank == 0:
            try:
                payload = [("ok", fn())]
            except Exception as exc:
                error = exc
                payload = [("error", f"{type(exc).__name__}: {exc}")]
        tdist.broadcast_object_list(payload, src=0)
        if error is not None:
            raise error
        status, value = payload[0]
        if status == "error":
            raise StoreError(f"rank 0 failed: {value}")
        return value

    def gather(self, obj: Any) -> list[Any]:
        if not self.dist:
            return [obj]
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owned:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _resolve_ranks(rank: int | None, world_size: int | None) -> _Ranks:
    """An initialised process group (explicit arguments must agree), else the arguments, else
    torchrun's RANK/WORLD_SIZE; a gloo group is initialised here when several ranks need one."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        r, w = tdist.get_rank(), tdist.get_world_size()
        if (rank is not None and rank != r) or (world_size is not None and world_size != w):
            raise ValueError(
                f"rank={rank}, world_size={world_size} disagree with the initialised process group "
                f"(rank {r} of {w}); leave them unset"
            )
        return _Ranks(r, w, dist=w > 1, owned=False)
    r = rank if rank is not None else int(os.environ.get("RANK", "0"))
    w = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"invalid rank {r} of world_size {w}: need 0 <= rank < world_size")
    if w == 1:
        return _Ranks(0, 1, dist=False, owned=False)
    if not tdist.is_available() or "MASTER_ADDR" not in os.environ:
        raise ValueError(
            f"sharded extraction (world_size={w}) needs torch.distributed: launch with torchrun (it sets "
            "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or initialise a process group before extract()"
        )
    tdist.init_process_group("gloo", rank=r, world_size=w, timeout=DIST_TIMEOUT)
    return _Ranks(r, w, dist=True, owned=True)


def _resolve_device(device: str | torch.device, ranks: _Ranks) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and ranks.world > 1 and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", ranks.rank % max(torch.cuda.device_count(), 1)))
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL collectives use the current device
    return dev


# ---- preparing, progress, finalising (files) --------------------------------------------------------


def _is_store(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file()


def _mark_owned(folder: Path) -> None:
    """Write the marker that proves ``folder`` was made (or taken over) by extraction in this process."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "created": dt.datetime.now().isoformat()}
    (folder / OWNER_MARKER).write_text(json.dumps(info) + "\n", encoding="utf-8")


def _owner(folder: Path) -> dict | None:
    """The marker's content, or None when ``folder`` is not one extraction created."""
    try:
        info = json.loads((folder / OWNER_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _owner_alive(info: dict) -> bool:
    """Whether the process that wrote a marker may still run (another host's: assume it does)."""
    if info.get("host") != socket.gethostname():
        return True
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(out: Path, partial: Path) -> None:
    """Remove preparation and swap folders of extraction runs that died; name, but keep, foreign ones."""
    parent = out.parent
    if not parent.is_dir():
        return
    patterns = (glob.escape(f".{partial.name}.") + "*.tmp", glob.escape(f".{out.name}.") + "*.replaced")
    for pattern in patterns:
        for folder in sorted(parent.glob(pattern)):
            info = _owner(folder)
            if info is None:
                warnings.warn(
                    f"{folder} looks like an extraction's temporary folder but has no {OWNER_MARKER} "
                    "marker, so it was not created by mtaffect extract: left alone",
                    stacklevel=2,
                )
            elif not _owner_alive(info) and (pattern.endswith(".tmp") or out.exists()):
                # an old store swapped out is removed only once its successor is in place
                shutil.rmtree(folder)


def _state_of(partial: Path) -> dict:
    """The job description of an unfinished store: meta.json once finalised, else plan.json."""
    for name in (META, PLAN):
        if (partial / name).is_file():
            return read_json(partial / name, "extraction plan")
    raise StoreError(f"{partial} holds no {PLAN}")


def _read_progress(partial: Path) -> dict[int, list]:
    """Union of every rank's recorded chunks: chunk -> [[row, reason], ...] of its failed images."""
    done: dict[int, list] = {}
    folder = partial / PROGRESS
    if folder.is_dir():
        for file in sorted(folder.glob("rank-*.json")):
            chunks = read_json(file, "progress file").get("chunks", {})
            ok = isinstance(chunks, dict) and all(
                isinstance(k, str)
                and k.isdigit()
                and isinstance(v, list)
                and all(isinstance(f, list) and len(f) == 2 and isinstance(f[0], int) for f in v)
                for k, v in chunks.items()
            )
            if not ok:
                raise StoreError(
                    f"{file}: chunks must map chunk numbers to lists of [row, reason]; the unfinished "
                    "store is damaged: rerun with overwrite=True (CLI: --overwrite)"
                )
            for key, failures in chunks.items():
                done[int(key)] = failures
    return done


def _check_target(out: Path, overwrite: bool) -> None:
    """Only a finished store of ours may be replaced, and only with ``overwrite`` (the one ownership
    rule, :func:`mtaffect.persist.check_replaceable`); a store of ours without ``overwrite`` is named by
    its backbone and size."""
    try:
        check_replaceable(out, FEATURE_STORE, overwrite)
    except NotOursError:
        raise
    except OutputExistsError as exc:
        meta = read_json(out / META, "store metadata")
        raise OutputExistsError(
            f"{out} is already a finished feature store (backbone {meta.get('backbone')!r}, "
            f"{meta.get('counts', {}).get('images')} images); pass overwrite=True (CLI: --overwrite) "
            "to extract it again"
        ) from exc


def _prepare(out: Path, partial: Path, plan: dict, images: Sequence[str], overwrite: bool) -> dict:
    """Rank 0: check the target, create or validate ``<out>.partial``; return what is already done."""
    _check_target(out, overwrite)
    _clean_leftovers(out, partial)
    if partial.exists() or partial.is_symlink():
        owned = partial.is_dir() and not partial.is_symlink() and _owner(partial) is not None
        try:
            why = _mismatch(_state_of(partial), plan)
        except StoreError as exc:
            why = str(exc)
        if why is None:  # the same job: resuming deletes nothing
            if partial.is_dir() and not partial.is_symlink():
                _mark_owned(partial)  # this run carries it on (and may remove it when discarding it later)
            if (partial / META).is_file():
                return {"done": [], "finalised": True}
            return {"done": sorted(_read_progress(partial)), "finalised": False}
        if not owned:
            raise StoreError(
                f"{partial} exists but was not created by mtaffect extract (it has no {OWNER_MARKER} "
                f"marker; {why}): it is left alone, even with --overwrite. Move it away or choose "
                "another output"
            )
        if not overwrite:
            raise StoreError(
                f"{partial} holds an unfinished extraction of another job: {why}. Rerun that command to "
                "finish it, or pass overwrite=True (CLI: --overwrite) to discard it"
            )
        info = _owner(partial) or {}
        if _owner_alive(info) and info.get("pid") != os.getpid():
            raise StoreError(
                f"{partial} belongs to a running extraction (pid {info.get('pid')} on {info.get('host')}); "
                "wait for it to end"
            )
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{partial.name}.", suffix=".tmp", dir=partial.parent))
    _mark_owned(tmp)
    write_images(tmp / IMAGES, images)
    allocate_arrays(tmp, {k: tuple(v) for k, v in plan["arrays"].items()})
    (tmp / PROGRESS).mkdir()
    write_json(tmp / PLAN, plan)
    os.rename(tmp, partial)
    return {"done": [], "finalised": False}


def _finalise(out: Path, partial: Path, plan: dict, images: Sequence[str], extra: dict) -> dict:
    """Rank 0, after every rank reported: check, write failed.csv then meta.json, rename into place."""
    if not (partial / META).is_file():
        n, cs = len(images), plan["chunk_size"]
        done = _read_progress(partial)
        missing = sorted(set(range(-(-n // cs))) - set(done))
        if missing:
            raise StoreError(
                f"{partial}: {len(missing)} chunks were never recorded (e.g. {missing[:5]}); rerun the same "
                "extract command to finish them"
            )
        failures = sorted((int(row), str(reason)) for chunk in done.values() for row, reason in chunk)
        if len(failures) == n:  # zero usable rows is an error, never a store
            raise StoreError(
                f"every one of the {n} images failed (e.g. {images[failures[0][0]]}: {failures[0][1]}); "
                "nothing to store: check --data and the images"
            )
        valid = np.load(partial / ARRAY_FILES["valid"], mmap_mode="r")
        n_valid = int(np.count_nonzero(valid))
        del valid
        if n_valid != n - len(failures):
            raise StoreError(
                f"{partial}: {n_valid} valid rows but {n - len(failures)} expected; the unfinished store is "
                "damaged: rerun with overwrite=True (CLI: --overwrite)"
            )
        write_failed(partial / FAILED, [(images[row], reason) for row, reason in failures])
        meta = {
            **plan,  # including preprocessing_core: a crash after this line still resumes
            "counts": {"images": n, "valid": n_valid, "failed": len(failures)},
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        write_json(partial / META, meta)
    meta = read_json(partial / META, "store metadata")
    for leftover in (PLAN, PROGRESS):
        path = partial / leftover
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if out.exists():  # _prepare allowed this only with overwrite=True, and only for a finished store
        replaced = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.replaced")
        _mark_owned(out)  # the old store is ours to remove from here on, even after a crash
        os.rename(out, replaced)
        os.rename(partial, out)
        shutil.rmtree(replaced)
    else:
        os.rename(partial, out)
    with contextlib.suppress(FileNotFoundError):
        (out / OWNER_MARKER).unlink()  # a finished store holds exactly the documented files
    return meta["counts"]


@contextlib.contextmanager
def _shard_lock(partial: Path, rank: int) -> Iterator[None]:
    """Exclusive lock on this rank's shard: two live runs must not interleave progress records.

    The one lock of :mod:`mtaffect.persist`: it belongs to this process, so forked DataLoader workers
    still winding down after a SIGKILL do not keep it. The file holds the owner's pid, for the message
    another run gets.
    """
    path = partial / PROGRESS / f"rank-{rank:05d}.lock"
    try:
        lock = Lock.acquire(path)
    except LockBusy as exc:
        holder = path.read_text(encoding="ascii", errors="replace").strip() or "unknown"
        raise StoreError(
            f"{partial}: another extraction (pid {holder}) is writing this store (rank {rank}); "
            "wait for it to end"
        ) from exc
    with lock:
        if lock.fd is not None:
            os.ftruncate(lock.fd, 0)
            os.pwrite(lock.fd, f"{os.getpid()}\n".encode(), 0)
        yield


# ---- the work ---------------------------------------------------------------------------------------


class _Preprocess:
    """Greyscale batches go to the backbone as (N, H, W) when it accepts them, else as 3 equal channels."""

    def __init__(self, bb: Backbone) -> None:
        self.bb = bb
        self.grey_direct: bool | None = None

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        if pixels.ndim == 4:
            return self.bb.preprocess(pixels)
        if self.grey_direct is not False:
            try:
                x = self.bb.preprocess(pixels)
                self.grey_direct = True
                return x
            except ValueError:
                if self.grey_direct:
                    raise
                self.grey_direct = False
        return self.bb.preprocess(np.broadcast_to(pixels[..., None], (*pixels.shape, 3)))


def _infer(
    bb: Backbone,
    pre: _Preprocess,
    pixels: np.ndarray,
    ok: np.ndarray,
    device: torch.device,
    shapes: dict[str, tuple[int, ...]],
    names: np.ndarray,
) -> dict[str, np.ndarray]:
    """float16 outputs of one batch (rows of failed images zeroed) plus ``valid``."""
    n = len(pixels)
    outs = {k: np.zeros((n, *shape[1:]), dtype=array_dtype(k)) for k, shape in shapes.items()}
    outs["valid"][:] = ok
    if ok.any():
        with torch.inference_mode():
            res = bb(pre(pixels).to(device), tokens="tokens" in shapes)
        for key, tensor in (("features", res.features), ("logits", res.logits), ("tokens", res.tokens)):
            if key not in shapes:
                continue
            if tensor is None or tuple(tensor.shape) != (n, *shapes[key][1:]):
                got = None if tensor is None else tuple(tensor.shape)
                raise StoreError(
                    f"backbone {bb.spec.name!r} returned {key} of shape {got}; "
                    f"its spec says {(n, *shapes[key][1:])}"
                )
            arr = tensor.detach().to(torch.float16).cpu().numpy()
            arr[~ok] = 0
            finite = np.isfinite(arr.reshape(n, -1)).all(axis=1)
            if not finite.all():
                bad = names[int(np.flatnonzero(~finite)[0])]
                raise StoreError(
                    f"backbone {bb.spec.name!r} gave non-finite {key} for {bad} in float16 (NaN, or beyond "
                    "+-65504); the backbone or its weights are broken"
                )
            outs[key] = arr
    return outs


def _batches(
    todo: Sequence[int], n: int, chunk_size: int, batch_size: int
) -> tuple[list[np.ndarray], list[int]]:
    """Row batches of the chunks ``todo`` (never straddling a chunk) and the chunk of each batch."""
    batches, chunk_of = [], []
    for c in todo:
        stop = min(n, (c + 1) * chunk_size)
        for start in range(c * chunk_size, stop, batch_size):
            batches.append(np.arange(start, min(start + batch_size, stop), dtype=np.int64))
            chunk_of.append(c)
    return batches, chunk_of


def _progress_bar(enabled: bool, total: int, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
    task = bar.add_task(description, total=total, rate="")
    return bar, task


def _run_chunks(
    bb: Backbone,
    partial: Path,
    plan: dict,
    folder: Path,
    names: np.ndarray,
    todo: list[int],
    *,
    rank: int,
    batch_size: int,
    device: torch.device,
    workers: int,
    progress: bool,
) -> int:
    """Extract the chunks ``todo`` of this rank into the partial store; return the images done."""
    n, cs = len(names), plan["chunk_size"]
    shapes = {k: tuple(v) for k, v in plan["arrays"].items()}
    batches, chunk_of = _batches(todo, n, cs, batch_size)
    if not batches:
        return 0
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    record_file = partial / PROGRESS / f"rank-{rank:05d}.json"
    record = read_json(record_file, "progress file") if record_file.exists() else {"chunks": {}}
    spec = bb.spec
    dataset = BatchDecodeDataset(folder, names, batches, spec.input_size, spec.colour)
    # BatchDecodeDataset is map-style without torch's Dataset base class (decode.py imports no torch)
    loader: DataLoader[dict] = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )
    writers = {k: RowWriter(partial / ARRAY_FILES[k], shapes[k], array_dtype(k)) for k in shapes}
    pre = _Preprocess(bb)
    total = sum(len(b) for b in batches)
    bar, task = _progress_bar(progress, total, f"extract {spec.name}" + (f" [rank {rank}]" if rank else ""))
    done_images, chunks_recorded, failures = 0, 0, []
    t0 = time.perf_counter()
    try:
        with bar:
            for i, item in enumerate(loader):
                rows, ok = item["rows"].numpy(), item["ok"].numpy()
                outs = _infer(bb, pre, item["pixels"].numpy(), ok, device, shapes, names[rows])
                for key, writer in writers.items():
                    writer.write(int(rows[0]), outs[key])
                failures += [
                    [int(r), reason]
                    for r, good, reason in zip(rows, ok, item["reasons"], strict=True)
                    if not good
                ]
                done_images += len(rows)
                rate = done_images / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=len(rows), rate=f"{rate:,.0f} img/s")
                chunk = chunk_of[i]
                if i + 1 == len(batches) or chunk_of[i + 1] != chunk:  # chunk complete: make it durable
                    for writer in writers.values():
                        writer.sync()
                    record["chunks"][str(chunk)] = failures
                    write_json(record_file, record)
                    failures = []
                    chunks_recorded += 1
                    if kill_after and chunks_recorded >= kill_after:
                        os.kill(os.getpid(), signal.SIGKILL)
    finally:
        for writer in writers.values():
            writer.close()
    return done_images


@contextlib.contextmanager
def _torch_threads(threads: int | None, device: torch.device, workers: int) -> Iterator[None]:
    """Inference threads for the call: on CPU by default this rank's share of the cores (torchrun's
    LOCAL_WORLD_SIZE ranks share a machine) minus its decoding workers; oversubscribing is far slower."""
    before = torch.get_num_threads()
    if threads is None and device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local_ranks = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
        threads = max(1, cores // local_ranks - workers)
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def extract(
    root: str | os.PathLike,
    backbone: str | Backbone,
    out: str | os.PathLike,
    *,
    splits: Sequence[str] = ("train", "val", "test"),
    images: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    workers: int = 1,
    tokens: bool = False,
    chunk_size: int = 4096,
    overwrite: bool = False,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    threads: int | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> ExtractResult:
    """Extract ``backbone`` features of the images of ``splits`` under ``root`` into the store ``out``.

    ``images`` (names relative to ``<root>/cropped_aligned``) replaces the split lists; duplicates are
    dropped, the order is kept. Rerunning the same call after an interruption resumes it; the finished
    store is byte-identical (arrays, images.txt, failed.csv) to an uninterrupted run with the same
    ``batch_size`` on the same device, whatever the number of workers or ranks (on CPU, oneDNN
    kernels may in principle round differently with another ``threads`` count).

    ``workers`` decoding processes (0: decode in this process); ``threads`` inference threads
    (default on CPU: the cores the workers leave). Under torchrun (or an initialised process group)
    each rank extracts its share of the chunks and rank 0 finalises; every rank returns the same
    result. A Backbone instance is moved to ``device``. See the module docstring for the design.
    ``backbone_kwargs`` (plain data, e.g. ``{"image_size": 238}``) build a named backbone and are
    recorded in the store, so a model trained on it rebuilds the same backbone for prediction.
    ``trust_remote_code`` (a person's decision, CLI ``--trust-remote-code``) lets a named hub backbone
    run the code it ships; it is never recorded in the store. A Backbone instance is used as built.
    """
    t_start = time.perf_counter()
    if batch_size < 1 or chunk_size < 1 or workers < 0:
        raise ValueError(
            f"need batch_size >= 1, chunk_size >= 1, workers >= 0; got {batch_size}, {chunk_size}, {workers}"
        )
    given = Path(out)
    out = persist.resolve_output(given)  # a link to a store: the store it names is extracted
    partial = partial_path(out)
    names_list = (
        collect_images(root, splits) if images is None else list(dict.fromkeys(str(n) for n in images))
    )
    if not names_list:
        raise ValueError("no images to extract: the splits / image list are empty")
    check_names(names_list)
    for name in names_list:
        reason = unsafe_name_reason(name)
        if reason is not None:
            raise ValueError(
                f"image name {name!r} {reason}; names are relative to {Path(root) / CROPPED_DIR} and may "
                "not leave it"
            )
    names = np.array(names_list, dtype=object)
    folder = Path(root) / CROPPED_DIR  # as mtaffect.data.annotations.image_path
    if not folder.is_dir():  # every row would fail: a wrong --data, not damaged images
        raise FileNotFoundError(
            f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}; the face crops of a "
            f"dataset live in <root>/{CROPPED_DIR}/<video>/<frame>.jpg"
        )

    _check_target(out, overwrite)  # early, before loading a backbone; rank 0 checks again when preparing
    ranks = _resolve_ranks(rank, world_size)
    try:
        dev = _resolve_device(device, ranks)
        bb = _resolve_backbone(backbone, backbone_kwargs, trust_remote_code).to(dev).eval()
        plan = _make_plan(bb, names_list, tokens, chunk_size, backbone_kwargs)
        state = ranks.on_rank0(lambda: _prepare(out, partial, plan, names_list, overwrite))
        done = set(state["done"])
        n, cs = len(names_list), chunk_size
        n_chunks = -(-n // cs)
        resumed = n if state["finalised"] else sum(min(cs, n - c * cs) for c in done)
        error: str | None = None
        own_exc: Exception | None = None
        extracted, loop_s = 0, 0.0
        if not state["finalised"]:
            try:
                if ranks.rank != 0:  # rank 0 validated the plan; the others check they run the same job
                    why = _mismatch(_state_of(partial), plan)
                    if why:
                        raise StoreError(f"rank {ranks.rank}: {partial} is not this rank's job: {why}")
                todo = [c for c in range(n_chunks) if c % ranks.world == ranks.rank and c not in done]
                t0 = time.perf_counter()
                with _shard_lock(partial, ranks.rank), _torch_threads(threads, dev, workers):
                    extracted = _run_chunks(
                        bb,
                        partial,
                        plan,
                        folder,
                        names,
                        todo,
                        rank=ranks.rank,
                        batch_size=batch_size,
                        device=dev,
                        workers=workers,
                        progress=progress and ranks.rank == 0,
                    )
                loop_s = time.perf_counter() - t0
            except Exception as exc:
                if not ranks.dist:
                    raise
                own_exc, error = exc, f"rank {ranks.rank}: {type(exc).__name__}: {exc}"
        reports = ranks.gather((error, extracted, loop_s))  # every rank reports, so none waits forever
        errors = [r[0] for r in reports if r[0]]
        if errors:
            raise StoreError("; ".join(errors)) from own_exc
        extra = {
            "batch_size": batch_size,
            "device": dev.type,
            "world_size": ranks.world,
            "torch_version": torch.__version__,
        }
        counts = ranks.on_rank0(lambda: _finalise(out, partial, plan, names_list, extra))
    finally:
        ranks.close()
    extracted = sum(r[1] for r in reports)
    loop_s = max(r[2] for r in reports)
    return ExtractResult(
        store=given,
        images=n,
        extracted=extracted,
        failed=int(counts["failed"]),
        resumed_from=resumed,
        seconds=time.perf_counter() - t_start,
        images_per_s=extracted / loop_s if loop_s > 0 else 0.0,
        failed_report=given / FAILED,
    )
