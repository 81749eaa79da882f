"""Backbone registry: ``create_backbone(name, **kw)``, ``register_backbone``, ``list_backbones``.

Plain names (``fer-minixception``, ``dinov2-small``) map to a factory; prefixed names
(``emotiefflib:<model>``, ``hf:<hub-id-or-folder>``) pass the part after the colon to the factory.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Final

from mtaffect.features.base import Backbone
from mtaffect.registry import Registry

#: Backbone options that make a library run Python code shipped with the weights (transformers'
#: ``trust_remote_code``). They are never read from a file (checkpoint, store, config): only the
#: person running a command switches them on (CLI ``--trust-remote-code``, or a Python call).
CODE_EXECUTING_OPTIONS: Final[frozenset[str]] = frozenset({"trust_remote_code"})

BACKBONES: Registry[Backbone] = Registry(
    "backbone",
    (
        "mtaffect.features.fer_minixception",
        "mtaffect.features.dinov2",
        "mtaffect.features.emotiefflib",
        "mtaffect.features.hf",
    ),
)


def register_backbone(name: str, *, prefix: bool = False) -> Callable:
    """Decorator: register a backbone factory under ``name``.

    Args:
        name: the backbone's name (``fer-minixception``), or a family's prefix (``hf``).
        prefix: register the family ``name:<anything>``; the factory receives the part after the colon
            as its first argument.

    Returns:
        The decorator; it returns the factory unchanged. The factory's keyword arguments are the
        backbone's options.

    Raises:
        ValueError: ``name`` is registered already.
    """
    return BACKBONES.register(name, prefix=prefix)


def list_backbones() -> list[str]:
    """The registered backbone names, families as ``prefix:<...>`` (built-ins imported first).

    Returns:
        The names, sorted.
    """
    return BACKBONES.names()


def create_backbone(name: str, **kwargs) -> Backbone:
    """Build a backbone by registry name, e.g. ``create_backbone("dinov2-small", weights="path")``.

    Options its factory does not take are a ValueError naming them and the ones it takes; an option
    of the wrong type (the factory's TypeError) is a ValueError too: options come from people.

    Args:
        name: a registered backbone or family member (:func:`list_backbones`), e.g. ``hf:<hub-id>``.
        **kwargs: the backbone's options (``weights``, ``image_size``, ...).

    Returns:
        The backbone, with its ``spec`` (input, normalisation, outputs, fingerprint).

    Raises:
        KeyError: an unknown name.
        ValueError: an option the backbone does not take, or one of the wrong type.
    """
    options = _options(name)
    unknown = [] if options is None else sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(
            f"backbone {name!r} does not take the option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)}; its options: {', '.join(options or []) or 'none'}"
        )
    try:
        return BACKBONES.create(name, **kwargs)
    except TypeError as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items())) or "no options"
        raise ValueError(f"backbone {name!r} cannot be built with {given}: {exc}") from exc


def options_from_file(options: object, where: str) -> dict[str, Any]:
    """Backbone options recorded in a file, checked: a mapping of plain values, none that runs code.

    ``where`` names the file and key for messages (e.g. ``ckpt/config.json: backbone.kwargs``).
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise ValueError(f"{where} must be a mapping of option names to values, got {options!r}")
    code = sorted(CODE_EXECUTING_OPTIONS & set(options))
    if code:
        raise ValueError(
            f"{where} sets {code[0]!r}, an option that runs code shipped with the model: options that run "
            "code are never read from a file. Remove it from the file; if you trust the model's source, "
            "pass --trust-remote-code on the command line (Python: trust_remote_code=True) instead"
        )
    return dict(options)


def _options(name: str) -> list[str] | None:
    """The keyword options the factory of backbone ``name`` takes (None: any, it has ``**kwargs``).

    A prefixed family's first parameter is the part after the colon, not an option. KeyError for an
    unknown name.
    """
    params = list(inspect.signature(BACKBONES.factory(name)).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    if name not in BACKBONES.names():  # hf:<model>: the factory's first parameter receives <model>
        params = params[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def accepts_option(name: str, option: str) -> bool:
    """Whether the factory of backbone ``name`` takes the keyword ``option`` (False for unknown names)."""
    try:
        options = _options(name)
    except KeyError:
        return False
    return options is None or option in options


def with_trust(name: str, options: Mapping[str, Any], trust_remote_code: bool) -> dict[str, Any]:
    """``options`` plus the person's ``trust_remote_code`` decision (only ever from a CLI flag or code).

    Without trust the options are returned as they are; with it, backbones that cannot run remote code
    are an error rather than a flag silently ignored.
    """
    out = dict(options)
    if trust_remote_code:
        if not accepts_option(name, "trust_remote_code"):
            raise ValueError(
                f"--trust-remote-code applies to hub backbones (hf:<model>); backbone {name!r} runs no "
                "code from its weights"
            )
        out["trust_remote_code"] = True
    return out
