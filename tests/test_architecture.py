"""The layering the architecture page promises: imports run one way, between modules and between rooms.

Every ``import`` counts, those inside functions included (a lazy import hides a circle, it does not
remove it). A room is a subpackage of ``mtaffect`` (``predict``, ``models``, ...) or a top-level module.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mtaffect"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its body (a name from a package counts as the
    submodule it names when there is one)."""

    def known(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names)
    resolved = {known(t) for t in targets if t.split(".")[0] == "mtaffect"}
    return {t for t in resolved if t and t != name}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mtaffect"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_two_modules_import_each_other_even_lazily(graph):
    sorter = graphlib.TopologicalSorter(graph)
    try:
        sorter.prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import circle between modules: {' -> '.join(e.args[1])}")


def test_rooms_import_one_way(graph):
    rooms: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module == "mtaffect":  # the package's lazy front door names every room by design
            continue
        rooms.setdefault(_room(module), set()).update(_room(t) for t in targets if _room(t) != _room(module))
    rooms.pop("cli", None)  # the command-line app sits above every room
    for targets in rooms.values():
        targets.discard("cli")
    try:
        graphlib.TopologicalSorter(rooms).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import circle between rooms: {' -> '.join(e.args[1])}")


def test_lower_rooms_never_import_the_application_or_training(graph):
    """The layers the engines rely on: what runs without torch (runtime, faces, geometry) and the model
    layer never reach up into prediction, export or training."""
    lower = (
        "schema",
        "io",
        "persist",
        "textfiles",
        "data",
        "faces",
        "geometry",
        "features",
        "models",
        "runtime",
        "metrics",
        "post",
    )
    upper = {"predict", "export", "train", "cli"}
    bad = sorted(
        f"{m} -> {t}" for m, ts in graph.items() for t in ts if _room(m) in lower and _room(t) in upper
    )
    assert not bad, bad


def test_the_checker_sees_lazy_imports(tmp_path):
    """A circle through an import inside a function is still found (the rule the tests above rely on)."""
    pkg = tmp_path / "mtaffect"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "one.py").write_text("from mtaffect.a import two\n")
    (pkg / "a" / "two.py").write_text("def f():\n    from mtaffect.a.one import x\n")
    modules = {
        "mtaffect.a.one": pkg / "a" / "one.py",
        "mtaffect.a.two": pkg / "a" / "two.py",
        "mtaffect.a": pkg / "a" / "__init__.py",
        "mtaffect": pkg / "__init__.py",
    }
    g = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "mtaffect.a.two" in g["mtaffect.a.one"] and g["mtaffect.a.two"] == {"mtaffect.a.one"}
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(g).prepare()
