"""Import Lightning without the optional integrations of torchmetrics that a training never uses.

``import lightning`` imports torchmetrics, whose ``__init__`` imports every optional package it finds
installed: ``transformers`` (for BERTScore), ``matplotlib`` (plots) and ``scipy.signal``: about 2
CPU-seconds and 100 MB per process before the first step, paid again by every DDP rank. While
Lightning is being imported, torchmetrics is told those packages are absent (through the availability
checks it uses, ``lightning_utilities``' ``RequirementCache`` and ``package_available``), so it takes
its own "not installed" branches; nothing of Lightning or torchmetrics that training uses depends on
them. A package already imported by this process is never hidden, our own code imports them normally
afterwards, and ``MTAFFECT_LEAN_IMPORTS=0`` turns this off.

:func:`install` (called by ``mtaffect.train``) only places a hook: the work happens on the first
``import lightning`` of the process. If the lean import fails in any way, Lightning is imported again
the ordinary way.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Iterator
from typing import Any

#: Packages torchmetrics imports at import time when installed, none of which training needs.
OPTIONAL: tuple[str, ...] = ("transformers", "matplotlib", "scipy", "scienceplots", "nltk")
ENV = "MTAFFECT_LEAN_IMPORTS"


def _name(requirement: str) -> str:
    for sep in "<>=!~[; ":
        requirement = requirement.split(sep, 1)[0]
    return requirement.strip().replace("-", "_").lower()


@contextlib.contextmanager
def hidden_from_torchmetrics(packages: tuple[str, ...]) -> Iterator[None]:
    """While active, ``lightning_utilities``' availability checks report ``packages`` as not installed."""
    import lightning_utilities.core.imports as lui

    hidden = {p.lower() for p in packages}
    real_available, real_check = lui.package_available, lui.RequirementCache._check_available
    active = True

    def package_available(name: str) -> bool:
        if active and name.split(".")[0].lower() in hidden:
            return False
        return real_available(name)

    def check_available(self: Any) -> None:
        if active and not hasattr(self, "available"):
            name = _name(self.requirement) if self.requirement else str(self.module or "").split(".")[0]
            if name.lower() in hidden:
                self.available = False
                self.message = f"{name} hidden while importing Lightning (mtaffect lean imports)"
                return
        real_check(self)

    lui.package_available = package_available  # type: ignore[assignment]
    lui.RequirementCache._check_available = check_available  # type: ignore[method-assign]
    try:
        yield
    finally:
        active = False  # references kept by torchmetrics now answer truthfully
        lui.package_available = real_available  # type: ignore[assignment]
        lui.RequirementCache._check_available = real_check  # type: ignore[method-assign]


class _LeanLightning(importlib.abc.MetaPathFinder):
    """Finds ``lightning`` the ordinary way and runs its import with the optional packages hidden."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "lightning":
            return None
        uninstall()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _Loader(spec.loader)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: Any) -> Any:
        return self.inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        hide = tuple(p for p in OPTIONAL if p not in sys.modules)
        before = set(sys.modules)
        try:
            with hidden_from_torchmetrics(hide):
                self.inner.exec_module(module)
        except Exception:  # a Lightning/torchmetrics version this was not made for: import it plainly
            for name in set(sys.modules) - before:
                if name.split(".")[0] in ("lightning", "torchmetrics", "pytorch_lightning"):
                    del sys.modules[name]
            self.inner.exec_module(module)


_FINDER = _LeanLightning()


def install() -> None:
    """Make the process's first ``import lightning`` lean (no-op if already imported or turned off)."""
    if "lightning" in sys.modules or os.environ.get(ENV, "1") == "0" or _FINDER in sys.meta_path:
        return
    sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(_FINDER)


__all__ = ["ENV", "OPTIONAL", "hidden_from_torchmetrics", "install", "uninstall"]
