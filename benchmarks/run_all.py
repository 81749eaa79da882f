"""Run every benchmark (``benchmarks/bench_*.py``) and write their results to ``bench_out/results.json``.

Benchmarks are measurements, not tests: they print numbers to report in docs/benchmarks.md. Each module
exposes ``main(argv=None) -> dict``. ``python benchmarks/run_all.py metric synth`` runs a subset.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see docs/benchmarks.md)
import torch

HERE = Path(__file__).resolve().parent


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="run only the benchmarks whose file name contains one of these")
    wanted = ap.parse_args(argv).names
    paths = sorted(HERE.glob("bench_*.py"))
    if wanted:
        paths = [p for p in paths if any(w in p.stem for w in wanted)]
    if not paths:  # nothing to run: results.json is left as it is
        ap.error(f"no benchmark name contains any of {wanted}")
    results = []
    for path in paths:
        print(f"== {path.stem}", flush=True)
        t0 = time.perf_counter()
        result = _load(path).main([])
        result["wall_seconds"] = round(time.perf_counter() - t0, 2)
        results.append(result)
    out = HERE.parent / "bench_out" / "results.json"
    out.parent.mkdir(exist_ok=True)
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    out.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
