"""Training configuration: one YAML per recipe (``configs/*.yaml``) read into pydantic models.

The schema is declared once, in :mod:`~mtaffect.train.config.schema`: each field's type, default,
accepted values (a :class:`~mtaffect.train.config.rules.Rule`) and meaning sit together, and the error
messages and the schema table of docs/formats.md (:mod:`~mtaffect.train.config.docs`,
``scripts/gen_config_docs.py``) are generated from them. This module reads files and overrides into
that schema and words its errors as ``FILE: section.key must ...``; unknown keys list the valid ones,
with a did-you-mean (or the new name of a renamed key).

``--override section.key=value`` (value parsed as YAML) changes one field (:func:`apply_overrides`).
Nothing here can switch on code execution: ``trust_remote_code`` is refused in ``backbone.options``
(only a person's ``--trust-remote-code`` flag sets it). A ``pipeline:`` section is expanded into one
config per step by :mod:`mtaffect.train.pipeline_steps`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mtaffect.textfiles import read_yaml
from mtaffect.train.config.docs import schema_table
from mtaffect.train.config.rules import FieldError, did_you_mean
from mtaffect.train.config.schema import (
    ACCELERATORS,
    FREE_KEYS,
    MAX_EPOCHS,
    PRECISIONS,
    RENAMED,
    SCHEDULES,
    SECTIONS,
    SELECT_TERMS,
    STRATEGIES,
    AugmentSection,
    BackboneSection,
    DataSection,
    LossSection,
    ModelSection,
    OptimSection,
    PipelineSection,
    SearchSection,
    StageSettings,
    TrainConfig,
    TrainerSection,
)
from mtaffect.train.images.augment import AugmentError, resolve_ops

__all__ = [
    "ACCELERATORS",
    "MAX_EPOCHS",
    "PRECISIONS",
    "SCHEDULES",
    "SELECT_TERMS",
    "STRATEGIES",
    "AugmentSection",
    "BackboneSection",
    "ConfigError",
    "DataSection",
    "LossSection",
    "ModelSection",
    "OptimSection",
    "PipelineSection",
    "SearchSection",
    "StageSettings",
    "TrainConfig",
    "TrainerSection",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "schema_table",
    "validate",
]


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the file/key and what is allowed."""


def unknown_keys_message(unknown: Sequence[str], valid: Sequence[str], where: str) -> str:
    """``unknown key(s) [...] in WHERE; valid keys: [...]`` with renamed keys and a did-you-mean.

    Args:
        unknown: the keys not in the schema.
        valid: the keys the schema has there.
        where: ``section 'optim'`` or similar, for the message.

    Returns:
        The message (without the file name).
    """
    section = where.split("'")[1] if "'" in where else ""
    moved = RENAMED.get(section, {})
    renamed = [f"{k!r} was renamed to {moved[k]!r}" for k in unknown if k in moved]
    hint = f"; {'; '.join(renamed)}" if renamed else did_you_mean(unknown, valid)
    return f"unknown key(s) {sorted(map(str, unknown))} in {where}; valid keys: {sorted(valid)}{hint}"


def _message(err: Mapping[str, Any], errors: Sequence[Mapping[str, Any]]) -> str:
    """One pydantic error as ``section.key must ...``."""
    loc = [str(x) for x in err["loc"]]
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        parent = loc[:-1]
        unknown = [
            str(e["loc"][-1])
            for e in errors
            if e["type"] == "extra_forbidden" and [str(x) for x in e["loc"][:-1]] == parent
        ]
        model: Any = TrainConfig
        for part in parent:
            model = SECTIONS.get(part) if model is TrainConfig else StageSettings
        where = f"section {parent[0]!r}" if len(parent) == 1 else ".".join(parent)
        return unknown_keys_message(unknown, list(model.model_fields), where)
    if kind == "value_error":
        exc = err["ctx"]["error"]
        if isinstance(exc, FieldError) and exc.key is not None:
            loc.append(exc.key)
        return f"{'.'.join(loc)} {exc}"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        if len(loc) == 1 and loc[0] != "stages":
            return f"section {loc[0]!r} must be a mapping, got {type(value).__name__}"
        if loc == ["stages"]:
            return f"stages must map stage names to {{epochs, lr, batch_size}}, got {value!r}"
        what = " {epochs, lr, batch_size}" if loc[0] == "stages" else ""
        return f"{'.'.join(loc)} must be a mapping{what}, got {value!r}"
    return f"{'.'.join(loc)}: {err['msg']}, got {value!r}"


def _raise(exc: ValidationError, where: str) -> None:
    errors = exc.errors()
    raise ConfigError(f"{where}: {_message(errors[0], errors)}") from None


# ---- reading -----------------------------------------------------------------------------------------
def config_from_dict(raw: dict, where: str = "<config>") -> TrainConfig:
    """A checked config from a mapping of sections (a YAML's content).

    Args:
        raw: the sections (``None`` for a section: its defaults).
        where: the file (or ``<config>``) that messages name.

    Returns:
        The config; ``source`` is ``where`` unless that is a ``<placeholder>``.

    Raises:
        ConfigError: a key or value is wrong (the message names the file and key).
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a config is a mapping of sections {sorted(SECTIONS)}")
    unknown = sorted(set(map(str, raw)) - set(SECTIONS))
    if unknown:
        msg = unknown_keys_message(unknown, list(SECTIONS), "the config")
        raise ConfigError(f"{where}: {msg.replace('valid keys', 'valid sections')}")
    sections = {k: ({} if v is None else v) for k, v in raw.items()}
    if isinstance(sections.get("stages"), dict):  # `stages: {au: }` names a stage with no settings
        sections["stages"] = {k: ({} if v is None else v) for k, v in sections["stages"].items()}
    try:
        cfg = TrainConfig.model_validate(sections)
    except ValidationError as exc:
        _raise(exc, where)
    cfg.source = None if where.startswith("<") else where
    given = raw.get("backbone")
    if given and not cfg.from_images and given != BackboneSection().model_dump():  # to_dict's: a default one
        raise ConfigError(
            f"{where}: the backbone section needs a name (e.g. fer-minixception, dinov2-giant, "
            "hf:<id or folder>); remove the section to train from a feature store"
        )
    _check_relations(cfg, where)
    return cfg


def _check_relations(cfg: TrainConfig, where: str) -> None:
    """What one field cannot say alone: required keys and settings that go together."""
    checks = [
        (
            bool(cfg.model.recipe),
            "model.recipe is required (e.g. emotinet, au-graph, progressive, queries-gcn)",
        ),
        (
            any(w > 0 for w in cfg.loss.weights.values()),
            "loss.weights are all 0: nothing would be trained; give at least one task a weight > 0",
        ),
        (
            (cfg.backbone.mean is None) == (cfg.backbone.std is None),
            "backbone.mean and backbone.std go together (per channel)",
        ),
        (
            cfg.from_images or cfg.augment == AugmentSection(),
            "augment applies to training from images; add a backbone section (or drop augment)",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{where}: {msg}")
    try:
        resolve_ops(cfg.augment.preset, cfg.augment.ops)
    except AugmentError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def validate(cfg: TrainConfig, where: str = "<config>") -> None:
    """Check a config built or changed in code as a file would be.

    Args:
        cfg: the config.
        where: the file that messages name.

    Raises:
        ConfigError: a value is wrong.
    """
    config_from_dict(cfg.to_dict(), where)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config and apply ``key=value`` overrides.

    Args:
        path: the YAML file.
        overrides: ``section.key=value`` items (:func:`apply_overrides`).

    Returns:
        The checked config.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: the file, a key or a value is wrong.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    raw = read_yaml(p, "recipe config (YAML)", error=ConfigError)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{p}: a recipe config is a mapping of sections {sorted(SECTIONS)}, got a {type(raw).__name__}"
        )
    raw = apply_overrides(raw, overrides, str(p))
    return config_from_dict(raw, str(p))


def apply_overrides(raw: dict, overrides: Sequence[str], where: str = "<config>") -> dict:
    """``section.key=value`` (``model.hparams.name=value``) applied to a raw config dict (a copy).

    Args:
        raw: the config's sections.
        overrides: the items; values are parsed as YAML.
        where: the file that messages name.

    Returns:
        The changed sections (checked later by :func:`config_from_dict`).
    """
    out = copy.deepcopy(raw) if raw else {}
    for item in overrides:
        key, sep, value_text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. trainer.epochs=5)")
        parts = key.split(".")
        if parts[0] not in SECTIONS:
            hint = did_you_mean([parts[0]], list(SECTIONS))
            raise ConfigError(
                f"override {item!r}: unknown section {parts[0]!r}; valid: {sorted(SECTIONS)}{hint}"
            )
        free = len(parts) == 3 and ((parts[0], parts[1]) in FREE_KEYS or parts[0] == "stages")
        free = free or (parts[0] == "pipeline" and len(parts) >= 3)  # partial configs nest deeper
        if (len(parts) != 2 and not free) or (parts[0] == "stages" and len(parts) != 3):
            raise ConfigError(
                f"override {item!r}: use section.key=value, or model.hparams.<name>=value / "
                "loss.weights.<task>=value / stages.<stage>.<epochs|lr|batch_size>=value / "
                "pipeline.enhanced.<name>.<section>.<key>=value"
            )
        section = SECTIONS[parts[0]]
        if len(parts) == 2 and section is not None and parts[1] not in section.model_fields:
            msg = unknown_keys_message([parts[1]], list(section.model_fields), f"section {parts[0]!r}")
            msg = msg.replace("unknown key(s) [", "unknown key ").replace("]", "", 1)
            raise ConfigError(f"override {item!r}: {msg}")
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = out
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                path = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {item!r}: {where}: {path} is {node[part]!r}, not a mapping")
            node = node[part]
        node[parts[-1]] = value
    return out
