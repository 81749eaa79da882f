"""Write docs/api.md, the API reference, from the code: signatures and docstrings by ``inspect``.

``python scripts/gen_api_docs.py`` rewrites the page; ``--check`` only reports (exit 1) when it differs,
which is what ``tests/test_api_docs.py`` asserts, so the reference cannot drift from the code.

What is documented: every name of ``mtaffect.__all__`` (the top level), then the entry points of the
library's layers listed in :data:`ENTRY_POINTS`. A class shows its constructor and the public methods
and properties it defines. Google-style ``Args:``/``Returns:``/``Raises:`` sections become lists.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"

#: (section title, module, names): the main entry points beyond the top level, by layer.
ENTRY_POINTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Metric", "mtaffect.metrics", ("score", "MTLMetric", "MetricResult")),
    (
        "Annotations",
        "mtaffect.data.annotations",
        ("LabelTable", "read_annotations", "load_split", "write_annotations"),
    ),
    ("Predictions", "mtaffect.data.predictions", ("PredictionTable",)),
    (
        "Submissions",
        "mtaffect.data.submission",
        ("read_test_list", "write_submission", "validate_submission"),
    ),
    ("Backbones", "mtaffect.features.registry", ("create_backbone", "register_backbone", "list_backbones")),
    ("Recipes", "mtaffect.models.registry", ("create_model", "register_model", "list_models")),
)

#: Docstring sections rendered as lists of ``name: text`` items, and as plain text.
_ITEM_SECTIONS = ("Args", "Arguments", "Raises", "Attributes")
_TEXT_SECTIONS = ("Returns", "Yields", "Example", "Examples", "Note", "Notes")
_SECTION = re.compile(rf"^({'|'.join(_ITEM_SECTIONS + _TEXT_SECTIONS)}):\s*$")
_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # Sphinx roles (:func:`x`) as plain code
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def _annotation(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return ""
    return value if isinstance(value, str) else inspect.formatannotation(value)


def _default(value: Any) -> str:
    text = repr(value)
    return _ADDRESS.sub("", text)  # no memory address: the page must not change between runs


def signature(obj: Callable[..., Any], name: str) -> str:
    """``name(params) -> return`` with annotations as written in the source (no quotes, no addresses).

    Args:
        obj: a function, method or class (a class shows its constructor's parameters, ``self`` left out).
        name: the name to show.

    Returns:
        One line of Python-like text.
    """
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature
        return f"{name}(...)"
    parts: list[str] = []
    star_done = False
    params = list(sig.parameters.values())
    for i, p in enumerate(params):
        last_positional_only = p.kind is p.POSITIONAL_ONLY and (
            i + 1 == len(params) or params[i + 1].kind is not p.POSITIONAL_ONLY
        )
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        ann = _annotation(p.annotation)
        if ann:
            text += f": {ann}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}" if ann else f"={_default(p.default)}"
        parts.append(text)
        if last_positional_only:
            parts.append("/")
    ret = _annotation(sig.return_annotation)
    shown = "" if inspect.isclass(obj) or not ret else f" -> {ret}"
    return f"{name}({', '.join(parts)}){shown}"


def _sections(doc: str) -> Iterator[tuple[str, list[str]]]:
    """(section name or "", its lines without the section's indentation) in order."""
    name, lines = "", []
    for line in doc.splitlines():
        m = _SECTION.match(line)
        if m:
            yield name, lines
            name, lines = m.group(1), []
            continue
        if name and line and not line.startswith(" "):  # text after a section, back at the margin
            yield name, lines
            name, lines = "", []
        lines.append(line[4:] if name and line.startswith("    ") else line)
    yield name, lines


def _items(lines: list[str]) -> list[str]:
    """``name: text`` entries (continuation lines indented further) as Markdown list items."""
    out: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        if line.startswith(" ") and out:
            out[-1] += " " + line.strip()
            continue
        head, sep, text = line.strip().partition(":")
        out.append(f"- `{head.strip()}`: {text.strip()}" if sep else f"- {line.strip()}")
    return out


def docstring(obj: Any) -> str:
    """The object's docstring as Markdown: prose as written, Google sections as lists.

    Args:
        obj: anything with a docstring.

    Returns:
        Markdown text ("" when there is no docstring).
    """
    doc = inspect.getdoc(obj) or ""
    blocks: list[str] = []
    for name, lines in _sections(_ROLE.sub(r"`\1`", doc)):
        if name in _ITEM_SECTIONS:
            blocks.append(f"**{name}:**\n\n" + "\n".join(_items(lines)))
        elif name:
            text = " ".join(line.strip() for line in lines if line.strip())
            blocks.append(f"**{name}:** {text}")
        else:
            text = "\n".join(lines).strip()
            if text:
                blocks.append(text)
    return "\n\n".join(blocks)


def _entry(qualname: str, obj: Any, level: int = 3) -> list[str]:
    """The Markdown of one function or class (with its public members)."""
    out = [f"{'#' * level} `{qualname}`", ""]
    if inspect.isclass(obj) or callable(obj):
        out += ["```python", signature(obj, qualname.rsplit(".", 1)[-1]), "```", ""]
    else:
        out += ["```python", f"{qualname.rsplit('.', 1)[-1]} = {_default(obj)}", "```", ""]
        return out
    text = docstring(obj)
    if text:
        out += [text, ""]
    if inspect.isclass(obj):
        for name, member in vars(obj).items():
            if name.startswith("_"):
                continue
            if isinstance(member, property):
                out += [f"{'#' * (level + 1)} `{qualname}.{name}` (property)", ""]
                text = docstring(member)
                out += [text, ""] if text else []
            elif isinstance(member, classmethod | staticmethod) or inspect.isfunction(member):
                func = getattr(obj, name)
                out += [
                    f"{'#' * (level + 1)} `{qualname}.{name}`",
                    "",
                    "```python",
                    signature(func, name),
                    "```",
                    "",
                ]
                text = docstring(func)
                out += [text, ""] if text else []
    return out


def render() -> str:
    """The whole page.

    Returns:
        docs/api.md's text.
    """
    import mtaffect

    out = [
        "# API reference",
        "",
        "<!-- generated by scripts/gen_api_docs.py from the code; do not edit (tests/test_api_docs.py) -->",
        "",
        "The names of `mtaffect`'s top level, then the main entry points of each layer. The command line",
        "is described in the [README](../README.md); the files these functions read and write in",
        "[formats.md](formats.md).",
        "",
        "## `mtaffect`",
        "",
    ]
    top: dict[int, str] = {}  # id of a top-level function or class -> its name there
    for name in mtaffect.__all__:
        if name == "__version__":  # changes with every release; `mtaffect.__version__` is the package's
            continue
        obj = getattr(mtaffect, name)
        if callable(obj):
            top[id(obj)] = f"mtaffect.{name}"
        out += _entry(f"mtaffect.{name}", obj)
    for title, module_name, names in ENTRY_POINTS:
        module = importlib.import_module(module_name)
        out += [f"## {title} (`{module_name}`)", ""]
        for name in names:
            obj = getattr(module, name)
            if id(obj) in top:  # documented once, at the top level
                out += [f"### `{module_name}.{name}`", "", f"The same as `{top[id(obj)]}` above.", ""]
            else:
                out += _entry(f"{module_name}.{name}", obj)
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md differs; write nothing")
    args = parser.parse_args()
    new = render()
    old = DOCS.read_text(encoding="utf-8") if DOCS.exists() else ""
    if args.check:
        if new != old:
            print(f"{DOCS}: stale: run python scripts/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        DOCS.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
