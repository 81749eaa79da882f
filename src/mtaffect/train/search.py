"""Strategy search (recipe 3, Liu et al.): train every configured variant and rank them by validation P.

The variants come from the config's ``search.grid``: a list of ``model.hparams`` overrides, e.g. for
the progressive recipe every fusion-task subset x temporal module::

    search:
      grid:
        - {fusion_tasks: [au, expr, va], temporal: none}
        - {fusion_tasks: [au, expr, va], temporal: lstm}

``search(...)`` trains each (same seed, same data) into ``out/run<i>/`` and writes ``search.json``
with the ranked table (P, its three terms, train seconds). P is over the tasks the data has.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtaffect.data.annotations import LabelTable
from mtaffect.features.store import FeatureStore
from mtaffect.io import atomic_open, check_writable
from mtaffect.train.config import ConfigError, TrainConfig
from mtaffect.train.fit import env_rank, fit, open_training_data


@dataclass
class SearchRow:
    variant: dict[str, Any]
    P: float
    ccc_va: float
    f1_expr: float
    f1_au: float
    seconds: float
    run: str | None

    def to_dict(self) -> dict:
        return dict(vars(self))


def _label(variant: dict[str, Any]) -> str:
    parts = []
    for k, v in variant.items():
        text = "+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        parts.append(f"{k}={text}")
    return ", ".join(parts) or "(base config)"


def search(
    config: TrainConfig,
    store: FeatureStore | str | os.PathLike,
    train: LabelTable,
    val: LabelTable,
    out: str | os.PathLike | None = None,
    *,
    grid: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
    log=print,
    trust_remote_code: bool = False,
) -> list[SearchRow]:
    """Train each variant of ``grid`` (default: ``config.search.grid``); rows sorted by P, best first."""
    variants = grid if grid is not None else config.search.grid
    if not variants:
        raise ConfigError(
            f"{config.source or 'the config'}: search.grid is empty; list model.hparams variants to compare"
        )
    st = open_training_data(config, store)  # a store, or the dataset root for image configs
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_writable(out_path / "search.json", overwrite)
    rows: list[SearchRow] = []
    for i, variant in enumerate(variants):
        cfg = config.copy()
        cfg.model.hparams = {**cfg.model.hparams, **variant}
        if log and env_rank() == 0:
            log(f"variant {i + 1}/{len(variants)}: {_label(variant)}")
        run = out_path / f"run{i}" if out_path is not None else None
        result = fit(
            cfg, st, train, val, run, overwrite=overwrite, log=log, trust_remote_code=trust_remote_code
        )
        rows.append(
            SearchRow(
                variant=dict(variant),
                **result.terms(),
                seconds=result.seconds,
                run=None if run is None else str(run),
            )
        )
    rows.sort(key=lambda r: -r.P)
    if out_path is not None and env_rank() == 0:
        with atomic_open(out_path / "search.json", "w", overwrite=overwrite, encoding="utf-8") as fh:
            json.dump({"recipe": config.model.recipe, "ranked": [r.to_dict() for r in rows]}, fh, indent=1)
            fh.write("\n")
    return rows


def search_table(rows: list[SearchRow]):  # -> rich.table.Table
    from rich.table import Table

    t = Table(title="strategy search (ranked by validation P)", title_justify="left")
    for col in ("rank", "variant", "P", "CCC_VA", "F1_EXPR", "F1_AU", "seconds"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for i, r in enumerate(rows, 1):
        t.add_row(str(i), _label(r.variant), f"{r.P:.4f}", f"{r.ccc_va:.4f}", f"{r.f1_expr:.4f}",
                  f"{r.f1_au:.4f}", f"{r.seconds:.1f}")  # fmt: skip
    return t
