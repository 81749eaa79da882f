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


def _numbers(tree) -> list[float]:
    """Every number in a JSON tree (booleans left out)."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return [tree] if isinstance(tree, int | float) and not isinstance(tree, bool) else []


@pytest.mark.slow
@pytest.mark.usefixtures("torch_one_thread")
def test_gpu_benchmark_smoke_runs_every_section_on_the_cpu(monkeypatch, tmp_path):
    """``bench_gpu.py --smoke``: every section's code path (tiny models, CPU) gives numbers in the JSON."""
    import json

    import numpy as np

    module = _load("bench_gpu", monkeypatch)
    out = tmp_path / "gpu.json"
    module.main(["--smoke", "--out", str(tmp_path), "--json", str(out)])
    data = json.loads(out.read_text())
    sections = data["sections"]
    assert data["smoke"] is True and list(sections) == list(module.SECTIONS)
    for name, section in sections.items():
        assert "error" not in section, f"{name}: {section.get('traceback', section['error'])}"
        assert section["device_name"] and section["torch"] and section["dtype"], name
        assert all(np.isfinite(_numbers(section))), name
    assert not list(tmp_path.glob("bench_gpu_*")), "temporary stores and models are removed"

    dino, vit = sections["dinov2_giant"], sections["vit_b16_finetune"]
    assert dino["batch"] == module.SMOKE.dino_batch and dino["tokens"] == [4, 32]
    assert dino["forward"]["images_per_s"] > 0 and dino["recipe1_train_step"]["images_per_s"] > 0
    assert vit["lr"] > 0 and vit["batch"] == module.SMOKE.vit_batch
    assert vit["no_checkpointing"]["images_per_s"] > 0 and vit["grad_checkpointing"]["images_per_s"] > 0
    recipes = sections["bf16_agreement"]["recipes"]
    assert set(recipes) == {p.stem for p in module.CONFIG_DIR.glob("*.yaml")}  # every config names a recipe
    for name, r in recipes.items():
        assert "error" not in r, f"{name}: {r.get('traceback')}"
        assert 0 <= r["expr_argmax_agreement"] <= 1 and 0 <= r["au_decision_agreement"] <= 1, name
        assert 0 <= r["va_max_abs_diff"] <= 2 and r["batch"] and r["inputs"], name  # VA in [-1, 1]
    reader = sections["token_reader"]
    ways = [k for k in reader if k.startswith(("cold/", "warm/"))]
    assert len(ways) == 4 and all(reader[k]["rows_per_s"] > 0 for k in ways)
    onnx = sections["onnxruntime"]
    assert "skipped" in onnx or all(v > 0 for v in onnx["cpu"]["faces_per_s"].values())
    assert "skipped" in onnx or "skipped" in onnx["cuda"] or onnx["cuda"]["faces_per_s"]


def test_gpu_benchmark_records_a_failing_section_and_runs_the_rest(monkeypatch, tmp_path):
    """One section that raises is an ``error`` in the JSON; the others still run. Without a CUDA device
    and without --smoke nothing runs (``run_all`` calls ``main([])``)."""
    import json

    module = _load("bench_gpu", monkeypatch)

    def boom(sizes, device, work):
        raise RuntimeError("CUDA out of memory (simulated)")

    ran = []

    def fake(name: str):
        return lambda sizes, device, work: ran.append(name) or {"x": 1.0}

    monkeypatch.setattr(module, "BENCHES", {n: fake(n) for n in module.SECTIONS} | {"vit_b16_finetune": boom})
    out = tmp_path / "gpu.json"
    module.main(["--smoke", "--out", str(tmp_path), "--json", str(out)])
    sections = json.loads(out.read_text())["sections"]
    failed = sections["vit_b16_finetune"]
    assert "out of memory" in failed["error"] and "boom" in failed["traceback"]
    assert ran == [n for n in module.SECTIONS if n != "vit_b16_finetune"]
    assert all(sections[n]["x"] == 1.0 and "seconds" in sections[n] for n in ran)
    if not module.torch.cuda.is_available():
        monkeypatch.setattr(module, "REPO", tmp_path / "never")
        assert "skipped" in module.main([]) and not (tmp_path / "never").exists()
