"""The benchmark scripts keep the contract ``benchmarks/run_all.py`` relies on: ``main(argv=None) -> dict``
(``run_all`` calls ``main([])`` and adds its wall time to the dict). Nothing here measures anything."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _main(path: Path) -> ast.FunctionDef:
    (main,) = (n for n in ast.parse(path.read_text()).body if getattr(n, "name", "") == "main")
    return main


def _calls(node: ast.AST, name: str) -> list[ast.Call]:
    return [c for c in ast.walk(node) if isinstance(c, ast.Call) and getattr(c.func, "attr", "") == name]


@pytest.mark.parametrize("path", sorted(BENCH.glob("bench_*.py")), ids=lambda p: p.stem)
def test_every_benchmark_main_takes_argv_and_returns_a_value(path):
    main = _main(path)
    args = main.args
    assert [a.arg for a in args.args] == ["argv"] and isinstance(args.defaults[0], ast.Constant)
    assert args.defaults[0].value is None
    parses = _calls(main, "parse_args")  # the options given, not this process's command line
    assert parses and all([ast.unparse(a) for a in c.args] == ["argv"] for c in parses)
    returns = [r for r in ast.walk(main) if isinstance(r, ast.Return)]
    assert returns and all(r.value is not None for r in returns)


def test_predict_job_benchmark_returns_its_rows(monkeypatch, tmp_path):
    """``run_all`` calls ``main([])``: it used to take no argument (and return None)."""
    monkeypatch.syspath_prepend(str(BENCH))  # it imports bench_predict, its neighbour
    spec = importlib.util.spec_from_file_location("bench_predict_job", BENCH / "bench_predict_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    video = tmp_path / "v.mp4"
    monkeypatch.setattr(module, "long_video", lambda path, seconds: video)  # nothing is measured
    monkeypatch.setattr(module, "bench_job", lambda v, repeats, settings: [{"job": v, "repeats": repeats}])
    monkeypatch.setattr(module, "bench_resume", lambda v: {"resume": v})
    monkeypatch.setattr(module, "bench_temporal", lambda v, settings: [{"temporal": v}])
    result = module.main(["--repeats", "1", "--cache", str(tmp_path)])
    assert result["job"] == [{"job": video, "repeats": 1}] and result["resume"] == {"resume": video}
    assert result["temporal"] == [{"temporal": video}] and result["video"] == str(video)
    assert module.main(["--what", "resume"]).keys() & {"job", "resume", "temporal"} == {"resume"}
