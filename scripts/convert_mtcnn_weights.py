"""Convert facenet-pytorch's MTCNN weights (P/R/O-Net ``.pt`` state dicts) to one safetensors file.

One-off, run by a maintainer; the package only ever reads the result (with safetensors, never pickle).

    pip download --no-deps -d /tmp/fpt facenet-pytorch==2.6.0
    python scripts/convert_mtcnn_weights.py /tmp/fpt/facenet_pytorch-2.6.0-py3-none-any.whl \
        src/mtaffect/weights/mtcnn.safetensors

``SOURCE`` is the wheel or a folder holding ``pnet.pt``, ``rnet.pt`` and ``onet.pt`` (e.g. the wheel's
``facenet_pytorch/data``). Keys are prefixed ``pnet.``, ``rnet.``, ``onet.``; the metadata records the
source, its version and the sha256 of each original file so the vendored file can be re-derived.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import sys
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from mtaffect.io import OutputExistsError, atomic_path

NETS = ("pnet", "rnet", "onet")
WHEEL_DATA = "facenet_pytorch/data"


def _read_originals(source: Path) -> dict[str, bytes]:
    """Raw bytes of ``{net}.pt`` from a wheel (zip) or a folder."""
    if not source.exists():
        raise SystemExit(f"{source}: not found; get it with: pip download --no-deps facenet-pytorch==2.6.0")
    if source.is_dir():
        files = {n: source / f"{n}.pt" for n in NETS}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise SystemExit(
                f"{source}: missing {', '.join(missing)}; pass the wheel or its facenet_pytorch/data"
            )
        return {n: p.read_bytes() for n, p in files.items()}
    if not zipfile.is_zipfile(source):
        raise SystemExit(f"{source}: neither a folder nor a wheel (zip); pass facenet_pytorch-2.6.0-*.whl")
    with zipfile.ZipFile(source) as zf:
        names = set(zf.namelist())
        out = {}
        for n in NETS:
            member = f"{WHEEL_DATA}/{n}.pt"
            if member not in names:
                raise SystemExit(f"{source}: the wheel has no {member}; is it facenet-pytorch?")
            out[n] = zf.read(member)
        return out


def _version(source: Path) -> str:
    m = re.search(r"facenet[_-]pytorch-([0-9][^-]*)", source.name)
    return m.group(1) if m else "unknown"


def convert(source: Path, out: Path, overwrite: bool = False) -> dict[str, str]:
    """Write the merged safetensors file and return its metadata."""
    raw = _read_originals(source)
    tensors: dict[str, torch.Tensor] = {}
    meta = {
        "format": "pt",
        "source": source.name,
        "source_version": _version(source),
        "origin": "MTCNN (Zhang et al. 2016, kpzhang93) weights as converted by facenet-pytorch (MIT)",
        "license": "MIT (facenet-pytorch); see LICENSE-facenet-pytorch.txt",
    }
    for net, blob in raw.items():
        meta[f"sha256_{net}.pt"] = hashlib.sha256(blob).hexdigest()
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        for key, value in state.items():
            tensors[f"{net}.{key}"] = value.detach().to(torch.float32).contiguous()
    with atomic_path(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.chmod(0o644)  # mkstemp creates 0600; a vendored package file must be world-readable
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "source", type=Path, help="facenet-pytorch wheel, or a folder with pnet.pt/rnet.pt/onet.pt"
    )
    ap.add_argument("out", type=Path, help="output .safetensors")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = ap.parse_args(argv)
    try:
        meta = convert(args.source, args.out, overwrite=args.overwrite)
    except OutputExistsError as exc:
        raise SystemExit(str(exc)) from None
    for k, v in meta.items():
        print(f"{k}: {v}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
