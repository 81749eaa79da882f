"""What a run trained from images was trained on: a digest of the image files, checked on ``--resume``.

A store run is pinned by the store's ``images_sha256``; a run that reads ``<root>/cropped_aligned``
itself had nothing, so a resumed run trained on whatever pixels were there (replaced JPEGs included).
:class:`ImageSet` lists every image the annotations name (train and val, sorted, each once) with its
size, mtime and the sha256 of all its bytes, and digests the list; ``run.json`` records the digest
(``store.images.sha256``) and the run folder the list (``images.sha256``), so a resume on other
images is refused naming the first one that changed.

All bytes, not a sample: on 13,171 small images (25 MB) hashing every byte took 0.25-0.9 s (warm page
cache, 2 busy shared cores; a stat of each file alone 0.06-0.4 s), far less than one training epoch
decodes. Files this small cost their opening, not their bytes, so a sample would save little and miss
a replaced image.
The digest leaves mtimes out (a copied or touched dataset with the same content resumes); they are
recorded to say when a changed image was modified.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mtaffect.data.annotations import LabelTable
from mtaffect.io import atomic_open

#: The list of images in a run folder (beside run.json).
IMAGES_FILE = "images.sha256"
_HEADER = "# mtaffect run images: sha256, size, mtime_ns, name (tab-separated; '-' for a missing file)"
#: Images per hashing task.
_CHUNK = 1024


@dataclass(frozen=True)
class ImageFile:
    """One image as it was when the run started (``size`` -1 and ``sha256`` "-": the file was missing)."""

    name: str
    size: int
    mtime_ns: int
    sha256: str

    def describe(self) -> str:
        if self.size < 0:
            return "missing"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.mtime_ns / 1e9))
        return f"{self.size} bytes, sha256 {self.sha256[:12]}…, modified {when}"


#: Files this process has hashed: path -> (stat key, sha256). A pipeline's steps and a cross-validation's
#: folds read the same images; each is hashed once per process, and again whenever its stat key changed
#: (a rewrite changes ctime, which cannot be set back; only one within the same clock tick as the
#: earlier hash, milliseconds, would go unseen).
_HASHED: dict[str, tuple[tuple[int, ...], str]] = {}


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    """What changes whenever a file's bytes may have: ctime too, which no one can set back."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _hash_file(path: str) -> tuple[int, int, str]:
    """(size, mtime_ns, sha256) of a regular file; (-1, 0, "-") when it is missing or not a regular file.

    Raw ``os.open``/``fstat``/``read``: on small face crops the per-file overhead is the cost (about 2.5x
    less than ``open()`` + ``hashlib.file_digest``). Opened non-blocking, so a FIFO never blocks;
    ``fstat`` of the open file, so size and content are the same file's. A file this process hashed
    before and whose stat is unchanged is not read again.
    """
    seen = _HASHED.get(path)
    if seen is not None:
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode) and _stat_key(st) == seen[0]:
            return st.st_size, st.st_mtime_ns, seen[1]
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return -1, 0, "-"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return -1, 0, "-"
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        _HASHED[path] = (_stat_key(st), h.hexdigest())
        return st.st_size, st.st_mtime_ns, h.hexdigest()
    except OSError:
        return -1, 0, "-"
    finally:
        os.close(fd)


def image_names(tables: Iterable[LabelTable | None]) -> list[str]:
    """Every image the label tables name, each once, sorted."""
    names: set[str] = set()
    for t in tables:
        if t is not None:
            names.update(map(str, t.images))
    return sorted(names)


@dataclass
class ImageSet:
    """The images under ``folder`` a run reads, and their digest."""

    folder: Path
    files: list[ImageFile]

    @classmethod
    def scan(cls, folder: str | os.PathLike, names: Iterable[str], threads: int | None = None) -> ImageSet:
        """Stat and hash every named image (threads: hashlib releases the GIL while hashing)."""
        folder = Path(folder)
        names = list(names)
        base = os.fspath(folder)
        paths = [os.path.join(base, x) for x in names]
        n = threads or min(8, os.cpu_count() or 1)
        if n <= 1 or len(paths) < 2 * _CHUNK:
            stats = [_hash_file(p) for p in paths]
        else:  # a task per chunk: a future per file costs more than hashing a small crop
            chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
            with ThreadPoolExecutor(max_workers=n) as pool:
                stats = [s for part in pool.map(lambda c: [_hash_file(p) for p in c], chunks) for s in part]
        return cls(folder, [ImageFile(x, *s) for x, s in zip(names, stats, strict=True)])

    @property
    def digest(self) -> str:
        """sha256 over (name, size, content sha256) of every image in name order; mtimes left out."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.name}\0{f.size}\0{f.sha256}\n".encode())
        return h.hexdigest()

    def summary(self) -> dict:
        """What run.json records of the images (``store.images``): the digest, counts, the list's file."""
        present = [f for f in self.files if f.size >= 0]
        return {
            "sha256": self.digest,
            "folder": str(self.folder),
            "count": len(self.files),
            "missing": len(self.files) - len(present),
            "bytes": sum(f.size for f in present),
            "list": IMAGES_FILE,
        }

    def write(self, out: Path) -> None:
        """``out/images.sha256``: one line per image (atomic)."""
        with atomic_open(out / IMAGES_FILE, "w", overwrite=True, encoding="utf-8", newline="\n") as fh:
            fh.write(_HEADER + "\n")
            for f in self.files:
                fh.write(f"{f.sha256}\t{f.size}\t{f.mtime_ns}\t{f.name}\n")

    @staticmethod
    def read_list(out: Path) -> dict[str, ImageFile] | None:
        """The list a run folder holds (None when it has none or it cannot be read)."""
        try:
            lines = (out / IMAGES_FILE).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        files: dict[str, ImageFile] = {}
        for line in lines:
            if not line or line.startswith("#"):
                continue
            parts = line.split("\t", 3)
            if len(parts) != 4:
                return None
            try:
                f = ImageFile(parts[3], int(parts[1]), int(parts[2]), parts[0])
            except ValueError:
                return None
            files[f.name] = f
        return files

    def check_resume(self, out: Path, saved_store: dict) -> None:
        """Refuse to continue the run in ``out`` unless it was trained on these very images: the message
        names the first image (in name order) that changed, was added or went missing."""
        from mtaffect.train.state import ResumeError

        hint = "resume on the same images, or start a new run (another --out, or --overwrite)"
        recorded = (saved_store.get("images") or {}).get("sha256")
        if not isinstance(recorded, str):
            raise ResumeError(
                f"{out / 'run.json'} records no digest of the training images (a run started by an older "
                "mtaffect): whether they changed cannot be checked; start over with --overwrite"
            )
        if recorded == self.digest:
            return
        before = self.read_list(out)
        if before is None:
            raise ResumeError(
                f"{out} was trained on other images under {self.folder} (images sha256 {recorded[:16]}…, now "
                f"{self.digest[:16]}…; its {IMAGES_FILE} cannot be read to say which); {hint}"
            )
        now = {f.name: f for f in self.files}
        changed = sorted(
            n
            for n in set(before) | set(now)
            if (a := before.get(n)) is None
            or (b := now.get(n)) is None
            or (a.size, a.sha256) != (b.size, b.sha256)
        )
        if not changed:  # the list and the digest disagree: the list was edited
            raise ResumeError(f"{out / IMAGES_FILE} does not match {out / 'run.json'}; {hint}")
        first = changed[0]
        a, b = before.get(first), now.get(first)
        if a is None:
            what = "is new (the annotations name it now, not when the run started)"
        elif b is None:
            what = "is no longer named by the annotations"
        else:
            what = f"changed: was {a.describe()}, now {b.describe()}"
        raise ResumeError(
            f"{out} was trained on other images: {self.folder / first} {what}; {len(changed)} of "
            f"{len(now)} image(s) differ; {hint}"
        )


__all__ = ["IMAGES_FILE", "ImageFile", "ImageSet", "image_names"]
