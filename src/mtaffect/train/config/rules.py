"""Field rules of the training-config schema: what a field accepts, its error message and its docs.

A :class:`Rule` sits in a field's annotation (``Annotated[int, integer(1)]``): pydantic runs its check,
the messages say what is accepted in the schema's own words, and :func:`mtaffect.train.config.docs.
schema_table` prints the same words, so the three cannot drift apart.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic_core import core_schema

from mtaffect.features.registry import CODE_EXECUTING_OPTIONS


class FieldError(ValueError):
    """A value refused by a :class:`Rule`; ``key`` names an entry inside the field (a mapping's key)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def did_you_mean(unknown: Sequence[str], valid: Sequence[str]) -> str:
    """``; did you mean 'x' -> 'y'?`` for the unknown keys close to a valid one (else "")."""
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.6)
        if close:
            hints.append(f"{key!r} -> {close[0]!r}")
    return f"; did you mean {', '.join(hints)}?" if hints else ""


# ---- rules: one field's accepted values, its error messages and its docs, from one declaration ------
@dataclass(frozen=True)
class Rule:
    """What a field accepts. Used as ``Annotated[T, Rule(...)]``: pydantic runs ``check`` (which returns
    the value, possibly converted, or raises :class:`FieldError`), and the docs table shows ``kind`` and
    ``allowed``."""

    kind: str
    allowed: str
    check: Callable[[Any], Any]

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(self.check)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _range_text(lo: Any, hi: Any, lo_open: bool = False, hi_open: bool = False, ints: bool = False) -> str:
    if lo is not None and hi is not None:
        if ints:
            return f"in {lo}..{hi}"
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


def _in_range(v: float, lo: Any, hi: Any, lo_open: bool, hi_open: bool) -> bool:
    low_ok = lo is None or (v > lo if lo_open else v >= lo)
    high_ok = hi is None or (v < hi if hi_open else v <= hi)
    return low_ok and high_ok


def integer(lo: int | None = None, hi: int | None = None, hint: str = "") -> Rule:
    """An integer (never a boolean) within ``lo..hi``.

    Args:
        lo: the smallest value accepted (None: no bound).
        hi: the largest value accepted (None: no bound).
        hint: explains a special value in messages and docs (``" (0: off)"``).

    Returns:
        The rule.
    """
    allowed = _range_text(lo, hi, ints=True)

    def check(v: Any) -> int:
        if not _is_int(v):
            raise FieldError(f"must be an integer, got {v!r}")
        if not _in_range(v, lo, hi, False, False):
            raise FieldError(f"must be {allowed}{hint}, got {v!r}")
        return v

    return Rule("integer", allowed + hint, check)


def _to_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise FieldError(f"must be a number, got {v!r}")
    try:
        out = float(v)  # a string: YAML 1.1 reads "1e-3" as one
    except ValueError:
        raise FieldError(f"must be a number, got {v!r}") from None
    if not math.isfinite(out):
        raise FieldError(f"must be a finite number, got {v!r}")
    return out


def number(
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    hint: str = "",
) -> Rule:
    """A finite number (an integer, or a string YAML 1.1 left unparsed, is taken as a float).

    Args:
        lo: the lower bound (None: none).
        hi: the upper bound (None: none).
        lo_open: the lower bound itself is refused.
        hi_open: the upper bound itself is refused.
        hint: explains a special value in messages and docs.

    Returns:
        The rule.
    """
    allowed = _range_text(lo, hi, lo_open, hi_open)

    def check(v: Any) -> float:
        out = _to_number(v)
        if not _in_range(out, lo, hi, lo_open, hi_open):
            raise FieldError(f"must be {allowed}{hint}, got {v!r}")
        return out

    return Rule("number", allowed + hint, check)


def _yaml_text(v: Any) -> str:
    """A value as YAML writes it (``true``, ``null``, ``auto``)."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    return str(v)


def choice(*values: Any) -> Rule:
    """One of ``values`` (compared with their type: YAML ``1`` is not ``true``).

    Args:
        *values: the values accepted, in the order messages and docs list them.

    Returns:
        The rule.
    """
    allowed = " | ".join(_yaml_text(x) for x in values)

    def check(v: Any) -> Any:
        if not any(type(v) is type(x) and v == x for x in values):
            raise FieldError(f"must be one of {', '.join(_yaml_text(x) for x in values)}, got {v!r}")
        return v

    return Rule("choice", allowed, check)


def flag() -> Rule:
    """``true`` or ``false``.

    Returns:
        The rule.
    """

    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            raise FieldError(f"must be true or false, got {v!r}")
        return v

    return Rule("boolean", "true | false", check)


def text() -> Rule:
    """Any string.

    Returns:
        The rule.
    """

    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise FieldError(f"must be a string, got {v!r}")
        return v

    return Rule("string", "", check)


def optional(rule: Rule, meaning: str) -> Rule:
    """``null`` or a value ``rule`` accepts.

    Args:
        rule: the rule of a set value.
        meaning: what ``null`` stands for (``"optim.lr"``), for the docs.

    Returns:
        The rule.
    """
    return Rule(
        f"{rule.kind} or null",
        f"{rule.allowed}; null: {meaning}".lstrip("; "),
        lambda v: None if v is None else rule.check(v),
    )


def auto_or(rule: Rule) -> Rule:
    """``auto`` or a value ``rule`` accepts.

    Args:
        rule: the rule of a set value.

    Returns:
        The rule.
    """

    def check(v: Any) -> Any:
        if v == "auto":
            return v
        try:
            return rule.check(v)
        except FieldError as exc:
            raise FieldError(f"must be auto or an {rule.kind} {rule.allowed}, got {v!r}") from exc

    return Rule(f"auto or {rule.kind}", rule.allowed, check)


def listing(item: Rule, *, distinct: bool = False, non_empty: bool = False, what: str = "values") -> Rule:
    """A list of values ``item`` accepts.

    Args:
        item: each entry's rule.
        distinct: no entry twice.
        non_empty: at least one entry.
        what: the entries' name in messages (``"tasks"``).

    Returns:
        The rule.
    """
    among = f" among {item.allowed.replace(' | ', ', ')}" if item.kind == "choice" else ""
    message = f"must list {'distinct ' if distinct else ''}{what}{among}"

    def check(v: Any) -> list:
        if not isinstance(v, list):
            raise FieldError(f"{message}, got {v!r}")
        try:
            out = [item.check(x) for x in v]
        except FieldError:
            raise FieldError(f"{message}, got {v!r}") from None
        if distinct and len(set(map(str, out))) != len(out):
            raise FieldError(f"{message}, got {v!r}")
        if non_empty and not out:
            raise FieldError(f"is empty: list the {what}{among}")
        return out

    return Rule(f"list of {what}", f"{'distinct; ' if distinct else ''}{item.allowed}".strip("; "), check)


def mapping(
    values: Rule | None = None,
    keys: Sequence[str] | None = None,
    defaults: Mapping | None = None,
    what: str = "",
) -> Rule:
    """A mapping.

    Args:
        values: each value's rule (None: any value).
        keys: the keys allowed (None: any key).
        defaults: entries merged under the given ones (a YAML names only the keys it changes).
        what: added to the kind in messages and docs.

    Returns:
        The rule.
    """

    def check(v: Any) -> dict:
        if not isinstance(v, dict):
            raise FieldError(f"must be a mapping{what}, got {v!r}")
        unknown = sorted(set(v) - set(keys)) if keys is not None else []
        if unknown and keys is not None:
            hint = did_you_mean(unknown, keys)
            raise FieldError(f"has unknown key(s) {unknown}; valid keys: {', '.join(keys)}{hint}")
        out = {**(defaults or {}), **v}
        if values is not None:
            for key, value in out.items():
                try:
                    out[key] = values.check(value)
                except FieldError as exc:
                    raise FieldError(str(exc), key=str(key)) from None
        return out

    allowed = [f"keys {', '.join(keys)}"] if keys else []
    allowed += [f"values: {values.allowed or values.kind}"] if values else []
    return Rule(f"mapping{what}", "; ".join(allowed), check)


def hparams_check(v: Any) -> dict:
    """``model.hparams``: what no recipe accepts (non-finite numbers, negative sizes or counts, dropout
    outside [0, 1)); the recipe checks the rest when built, but these would fail deep inside torch
    without naming the key.

    Args:
        v: the YAML value.

    Returns:
        A copy of the mapping.
    """
    if not isinstance(v, dict):
        raise FieldError(f"must be a mapping of the recipe's settings, got {v!r}")
    for key, value in v.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        try:
            if isinstance(value, float) and not math.isfinite(value):
                raise FieldError(f"must be a finite number, got {value!r}")
            if "dropout" in str(key) and not 0 <= value < 1:
                raise FieldError(f"is a dropout rate and must be in [0, 1), got {value!r}")
            if isinstance(value, int) and value < 0:
                raise FieldError(f"must be >= 0 (a size or a count), got {value!r}")
        except FieldError as exc:
            raise FieldError(str(exc), key=str(key)) from None
    return dict(v)


def options_check(v: Any) -> dict:
    """``backbone.options``: data only; the options that run code are refused (a person's flag sets them).

    Args:
        v: the YAML value.

    Returns:
        The value as stored.
    """
    if not isinstance(v, dict):
        raise FieldError(f"must be a mapping of create_backbone options, got {v!r}")
    code = sorted(CODE_EXECUTING_OPTIONS & set(v))
    if code:
        raise FieldError(
            f"may not set {code}: a config never switches on running code from a model repository (pass "
            "--trust-remote-code on the command line if you trust it)"
        )
    return dict(v)


def devices_check(v: Any) -> Any:
    """``trainer.devices``: a count, -1 (all), ``auto`` or device indices (``"0,1"``).

    Args:
        v: the YAML value.

    Returns:
        The value as stored.
    """
    ok = False
    if _is_int(v):
        ok = v >= 1 or v == -1
    elif isinstance(v, str):
        s = v.strip()
        parts = [p.strip() for p in s.split(",") if p.strip()]
        indices = bool(parts) and all(p.isdigit() for p in parts) and (len(parts) > 1 or s.endswith(","))
        ok = s in ("auto", "-1") or indices
    if not ok:
        raise FieldError(
            f"must be a count >= 1, -1 (all), 'auto' or a list of device indices like '0,1', got {v!r}"
        )
    return v


def groups_check(v: Any) -> dict:
    """``optim.groups``: ``{submodule: {lr, weight_decay}}``, numbers as floats.

    Args:
        v: the YAML value.

    Returns:
        The value as stored.
    """
    if not isinstance(v, dict):
        raise FieldError(f"must be a mapping {{submodule: {{lr, weight_decay}}}}, got {v!r}")
    out = {}
    for name, group in v.items():
        if not isinstance(group, dict) or not group or set(group) - {"lr", "weight_decay"}:
            raise FieldError(f"must be a mapping with lr and/or weight_decay, got {group!r}", key=str(name))
        try:
            out[name] = {k: _to_number(x) for k, x in group.items()}
        except FieldError as exc:
            raise FieldError(str(exc), key=str(name)) from None
    return out


def grid_check(v: Any) -> list:
    """``search.grid``: a list of ``{hparam: value}`` mappings.

    Args:
        v: the YAML value.

    Returns:
        The value as stored.
    """
    if not isinstance(v, list) or not all(isinstance(g, dict) for g in v):
        raise FieldError(f"must be a list of mappings {{hparam: value}}, got {v!r}")
    return v


def partial_configs(v: Any) -> dict:
    """Named partial configs (``pipeline.task_models``, ``pipeline.enhanced``); ``null`` is ``{}``.

    Args:
        v: the YAML value.

    Returns:
        The value as stored.
    """
    if not isinstance(v, dict) or not all(isinstance(x, dict) or x is None for x in v.values()):
        raise FieldError(f"must map names to partial configs (mappings of sections), got {v!r}")
    return {k: x or {} for k, x in v.items()}


def partial_config(v: Any) -> dict:
    """One partial config (a mapping of sections, checked when merged into a step).

    Args:
        v: the YAML value.

    Returns:
        The value as stored.
    """
    if not isinstance(v, dict):
        raise FieldError(f"must be a partial config (a mapping of sections), got {v!r}")
    return v
