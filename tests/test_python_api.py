"""The Python API as a user meets it: ``dir(mtaffect)``, a light ``import mtaffect``, and the README's
"Python API" section, whose snippets must run as written (on real portraits)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippets(section: str) -> list[str]:
    """The ```python blocks of the README section titled ``section`` (up to the next ``## `` title)."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


def test_dir_lists_every_public_name_and_import_stays_light():
    code = (
        "import sys, mtaffect\n"
        "names = dir(mtaffect)\n"
        "print(all(n in names for n in mtaffect.__all__), 'Predictor' in names, 'summarize' in names)\n"
        "print(sorted(m for m in ('torch', 'pandas', 'mtaffect.predict') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["True True True", "[]"]


def test_the_readme_python_api_snippets_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("skimage")
    from landmark_helpers import photo

    snippets = readme_snippets("Python API")
    assert len(snippets) >= 4
    monkeypatch.chdir(tmp_path)
    Image.fromarray(photo("astronaut")).save("astronaut.jpg", quality=95)
    Image.fromarray(photo("grace_hopper")).save("hopper.jpg", quality=95)
    ns: dict = {}
    for code in snippets:
        exec(compile(code, str(README), "exec"), ns)  # our own README: running it is the point
    assert capsys.readouterr().out.startswith("Predictor(model='mtaffect-default")
    assert ns["df"]["file"].tolist() == ["astronaut.jpg", "hopper.jpg"]  # one face each, one table
    assert ns["faces"]["face_id"].tolist() == [0, 0]
    faces = ["x1", "y1", "x2", "y2", "face_id"]
    assert ns["same"][faces].equals(ns["still"][faces]) and len(ns["still"]) == 1
    assert ns["clip"]["frame"].tolist() == [0, 1, 2, 3] and ns["per_face"]["frames"].tolist() == [4]
    assert ns["table"]["file"].tolist() == ["astronaut.jpg", "hopper.jpg"]
    for written in ("face0.png", "results/images.csv", "results/astronaut_annotated.jpg"):
        assert (tmp_path / written).stat().st_size > 0, written
