"""docs/api.md is generated from the code (scripts/gen_api_docs.py) and cannot drift from it."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "scripts" / "gen_api_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_reference_is_up_to_date(gen):
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert page == gen.render(), "docs/api.md is stale: run python scripts/gen_api_docs.py"


def test_every_public_top_level_name_and_entry_point_is_documented(gen):
    import mtaffect

    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for name in mtaffect.__all__:
        if name != "__version__":
            assert f"### `mtaffect.{name}`" in page
    for _, module, names in gen.ENTRY_POINTS:
        for name in names:
            assert f"### `{module}.{name}`" in page


def test_the_library_layers_entry_points_say_their_arguments_and_results(gen):
    """The functions of the data, metric and registry layers carry Args:/Returns: sections, which the
    page renders as lists."""
    import importlib

    for _, module_name, names in gen.ENTRY_POINTS:
        module = importlib.import_module(module_name)
        for name in names:
            obj = getattr(module, name)
            if inspect.isfunction(obj) and inspect.signature(obj).parameters:
                doc = inspect.getdoc(obj) or ""
                assert "Args:" in doc and ("Returns:" in doc or "Yields:" in doc), f"{module_name}.{name}"


def test_google_sections_become_lists_and_signatures_keep_source_annotations(gen):
    def f(path: str, *, flag: bool = False, **kw) -> int:
        """Do it.

        Args:
            path: where
                it is.
            flag: whether.

        Returns:
            A count.

        Raises:
            ValueError: never.
        """
        return 0

    assert gen.signature(f, "f") == "f(path: 'str', *, flag: 'bool' = False, **kw) -> 'int'".replace("'", "")
    assert gen.docstring(f) == (
        "Do it.\n\n**Args:**\n\n- `path`: where it is.\n- `flag`: whether.\n\n"
        "**Returns:** A count.\n\n**Raises:**\n\n- `ValueError`: never."
    )
