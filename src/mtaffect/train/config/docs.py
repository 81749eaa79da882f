"""The schema table of docs/formats.md, generated from the config models (``scripts/gen_config_docs.py``)."""

from __future__ import annotations

from typing import Any

import yaml

from mtaffect.train.config.rules import Rule
from mtaffect.train.config.schema import SECTIONS, StageSettings


def _default_text(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    if value == "":
        return ""
    text = yaml.safe_dump(value, default_flow_style=True, width=1000, sort_keys=False)
    return text.strip().removesuffix("\n...")


def schema_table() -> str:
    """The schema as the Markdown table docs/formats.md shows (``scripts/gen_config_docs.py``).

    Returns:
        One row per key: key, type, default, accepted values, meaning.
    """
    rows = ["| key | type | default | accepted | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, section in SECTIONS.items():
        if section is None:  # stages: a mapping of stage names to StageSettings
            section, prefix = StageSettings, "stages.<stage>"
        else:
            prefix = name
        for key, field in section.model_fields.items():
            rule = next((m for m in field.metadata if isinstance(m, Rule)), None)
            kind, allowed = (rule.kind, rule.allowed) if rule else ("", "")
            default = _default_text(field)
            default = f"`{default}`" if default else ""
            cells = [f"`{prefix}.{key}`", kind, default, allowed, field.description or ""]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
