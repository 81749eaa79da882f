"""The benchmark scripts keep the contract ``benchmarks/run_all.py`` relies on: ``main(argv=None) -> dict``
(``run_all`` calls ``main([])`` and adds its wall time to the dict). Nothing here measures anything."""

from __future__ import annotations

import ast
import importlib.util
import os
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


def _load(name: str, monkeypatch):
    """benchmarks/<name>.py imported as when run from there; what it sets in os.environ is undone."""
    monkeypatch.syspath_prepend(str(BENCH))  # they import their neighbours
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predict_job_benchmark_returns_its_rows(monkeypatch, tmp_path):
    """``run_all`` calls ``main([])``: it used to take no argument (and return None)."""
    module = _load("bench_predict_job", monkeypatch)
    video = tmp_path / "v.mp4"
    monkeypatch.setattr(module, "long_video", lambda path, seconds: video)  # nothing is measured
    monkeypatch.setattr(module, "bench_job", lambda v, repeats, settings: [{"job": v, "repeats": repeats}])
    monkeypatch.setattr(module, "bench_resume", lambda v: {"resume": v})
    monkeypatch.setattr(module, "bench_temporal", lambda v, settings: [{"temporal": v}])
    result = module.main(["--repeats", "1", "--cache", str(tmp_path)])
    assert result["job"] == [{"job": video, "repeats": 1}] and result["resume"] == {"resume": video}
    assert result["temporal"] == [{"temporal": video}] and result["video"] == str(video)
    assert module.main(["--what", "resume"]).keys() & {"job", "resume", "temporal"} == {"resume"}


def test_run_all_help_and_unknown_names_run_nothing_and_write_nothing(monkeypatch, tmp_path, capsys):
    """``run_all.py --help`` used to be read as a name filter: nothing ran, and an empty results.json
    replaced the last one."""
    run_all = _load("run_all", monkeypatch)
    monkeypatch.setattr(run_all, "HERE", tmp_path / "benchmarks")
    (tmp_path / "benchmarks").mkdir()
    never = "def main(argv=None):\n    raise AssertionError('ran')\n"
    (tmp_path / "benchmarks" / "bench_never.py").write_text(never)
    with pytest.raises(SystemExit) as info:
        run_all.main(["--help"])
    assert info.value.code == 0 and "names" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        run_all.main(["no_such_benchmark"])
    assert info.value.code == 2 and "no benchmark name contains" in capsys.readouterr().err
    assert not (tmp_path / "bench_out").exists()
