"""Strategy search (recipe 3, Liu et al.): train every configured variant and rank them by validation P.

The variants come from the config's ``search.grid``: a list of ``model.hparams`` overrides, e.g. for
the progressive recipe every fusion-task subset x temporal module::

    search:
      grid:
        - {fusion_tasks: [au, expr, va], temporal: none}
        - {fusion_tasks: [au, expr, va], temporal: lstm}

``search(...)`` trains each (same seed, same data) into ``out/run<i>/`` and writes ``search.json``
with the ranked table (P, its three terms, train seconds). P is over the tasks the data has.

For a pipeline config (recipe 3 as published, :mod:`mtaffect.train.pipeline`) each variant changes the
enhanced models only: the task models are trained and exported once into ``out/`` and shared by every
variant (``out/enhanced_v<i>_<name>/`` per variant and enhanced model). Variants are ranked by the
combined P and per task (each task's term from the model that answers it), the best variant of each
task is chosen, and the choice is written as a runnable pipeline config ``out/chosen.yaml`` (``mtaffect
train --config out/chosen.yaml --data D --out out`` keeps every finished step) with its combined model
in ``out/best/``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtaffect.data.annotations import LabelTable
from mtaffect.features.store import FeatureStore
from mtaffect.io import atomic_open, check_writable
from mtaffect.metrics import TERM_COLUMNS, terms_row
from mtaffect.models.base import TASKS
from mtaffect.persist import write_json
from mtaffect.train.build import named_stores, open_training_data, pipeline_root
from mtaffect.train.config import ConfigError, TrainConfig
from mtaffect.train.fit import env_rank, fit
from mtaffect.train.pipeline_steps import combine_map, merge_config


@dataclass
class SearchRow:
    variant: dict[str, Any]
    P: float
    ccc_va: float
    f1_expr: float
    f1_au: float
    seconds: float
    run: str | None
    chosen_for: list[str] | None = None  # pipeline searches: the tasks this variant answers in the choice

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}

    @classmethod
    def scored(
        cls, variant: dict[str, Any], terms: Mapping[str, float], seconds: float, run: str | None
    ) -> SearchRow:
        """A row from ``terms_row``'s terms (P, ccc_va, f1_expr, f1_au)."""
        return cls(
            variant=variant,
            P=terms["P"],
            ccc_va=terms["ccc_va"],
            f1_expr=terms["f1_expr"],
            f1_au=terms["f1_au"],
            seconds=seconds,
            run=run,
        )


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
    stores=None,
) -> list[SearchRow]:
    """Train each variant of ``grid`` (default: ``config.search.grid``); rows sorted by P, best first.

    ``stores``: named stores the recipe fuses (see :func:`~mtaffect.train.fit.fit`). A pipeline config
    searches its enhanced models (see the module docstring); ``store`` is then the dataset root.
    """
    variants = grid if grid is not None else config.search.grid
    if not variants:
        raise ConfigError(
            f"{config.source or 'the config'}: search.grid is empty; list model.hparams variants to compare"
        )
    if config.pipeline.enabled:
        return search_pipeline(
            config,
            pipeline_root(store),
            train,
            val,
            out,
            variants,
            overwrite=overwrite,
            log=log,
            trust_remote_code=trust_remote_code,
        )
    named = named_stores(stores)
    st = open_training_data(config, store, named)  # a store, or the dataset root for image configs
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        check_writable(out_path / "search.json", overwrite)
    say = log if log and env_rank() == 0 else (lambda _msg: None)
    reuse = _train_task_models_once(
        config,
        st,
        train,
        val,
        out_path,
        variants,
        overwrite=overwrite,
        log=log,
        trust_remote_code=trust_remote_code,
    )
    rows: list[SearchRow] = []
    for i, variant in enumerate(variants):
        cfg = config.copy()
        cfg.model.hparams = {**cfg.model.hparams, **variant}
        say(f"variant {i + 1}/{len(variants)}: {_label(variant)}")
        run = out_path / f"run{i}" if out_path is not None else None
        tasks = cfg.model.hparams.get("fusion_tasks", TASKS)
        result = fit(
            cfg,
            st,
            train,
            val,
            run,
            overwrite=overwrite,
            log=log,
            trust_remote_code=trust_remote_code,
            stores=named if config.from_images else None,
            reuse={f"task_{t}": reuse[t] for t in ([tasks] if isinstance(tasks, str) else tasks)}
            if reuse
            else None,
        )
        rows.append(
            SearchRow.scored(
                dict(variant), result.terms(), seconds=result.seconds, run=None if run is None else str(run)
            )
        )
    per_task = _choose(rows)
    ranked = sorted(rows, key=lambda r: -r.P)
    if out_path is not None and env_rank() == 0:
        from mtaffect.models.ensemble import save_ensemble

        best = config.copy()  # the best variant by P, as a config that trains it again
        best.model.hparams = {**best.model.hparams, **ranked[0].variant}
        best.search.grid = []
        with atomic_open(out_path / "chosen.yaml", "w", overwrite=True, encoding="utf-8") as fh:
            fh.write("# written by mtaffect search: the variant with the best validation P\n")
            yaml.safe_dump(best.to_dict(), fh, sort_keys=False)
        members = {f"run{k}": Path(str(rows[k].run)) / "best" for k in per_task.values()}
        save_ensemble(out_path / "best", members, {t: f"run{k}" for t, k in per_task.items()}, overwrite=True)
        best_of = [f"{t} best in run{k} ({_label(rows[k].variant)})" for t, k in per_task.items()]
        say(f"per task: {', '.join(best_of)}; {out_path / 'best'} combines them (one model per task)")
        write_json(
            out_path / "search.json",
            {
                "recipe": config.model.recipe,
                "ranked": [r.to_dict() for r in ranked],
                "per_task": _per_task_report(rows),
                "chosen_config": str(out_path / "chosen.yaml"),
                "task_models_reused": bool(reuse),
            },
            overwrite=overwrite,
        )
    return ranked


#: hparams of recipe 3's frozen variant that change only its joint stage (the task models stay the same).
_JOINT_HPARAMS = {"fusion_tasks", "temporal", "temporal_kwargs", "dim", "dropout"}


def _train_task_models_once(
    config: TrainConfig,
    st: Any,
    train: LabelTable,
    val: LabelTable,
    out: Path | None,
    variants: list[dict[str, Any]],
    **kw: Any,
) -> dict[str, Path] | None:
    """Recipe 3's frozen variant: when the variants differ only in the joint stage, train every task
    model once (``out/task_models/``, on single frames) and return ``{task: its stage checkpoint}`` for
    the variants to reuse; None when that does not apply (each variant then trains its own)."""
    hp = config.model.hparams
    frozen = config.model.recipe == "progressive" and hp.get("variant", "frozen") == "frozen"
    if out is None or not frozen or not hp.get("progressive", True):
        return None
    if not all(set(v) <= _JOINT_HPARAMS for v in variants):
        return None
    wanted: set[str] = set()
    for v in variants:
        tasks = {**hp, **v}.get("fusion_tasks", TASKS)
        wanted |= {tasks} if isinstance(tasks, str) else set(tasks)
    tasks = [t for t in TASKS if t in wanted]
    if not tasks:
        return None
    shared = config.copy()
    shared.model.hparams = {**hp, "fusion_tasks": tasks, "temporal": "none"}
    folder = out / "task_models"
    if kw.get("log") and env_rank() == 0:
        kw["log"](f"task models {', '.join(tasks)}: trained once in {folder}, reused by every variant")
    fit(shared, st, train, val, folder, only_stages=[f"task_{t}" for t in tasks], **kw)
    found = {t: sorted((folder / "stages").glob(f"*-task_{t}")) for t in tasks}
    return {t: paths[0] for t, paths in found.items() if paths}


def _choose(rows: list[SearchRow]) -> dict[str, int]:
    """The row (variant) chosen for each task: the best on that task's term; marks ``chosen_for``."""
    chosen = {}
    for task in TASKS:
        k = max(range(len(rows)), key=lambda i: (getattr(rows[i], TERM_COLUMNS[task]), -i))
        chosen[task] = k
        rows[k].chosen_for = [*(rows[k].chosen_for or []), task]
    return chosen


def _per_task_report(rows: list[SearchRow]) -> dict[str, list[dict]]:
    """Each task's ranking of the variants on its own term."""
    out = {}
    for task in TASKS:
        term = TERM_COLUMNS[task]
        order = sorted(range(len(rows)), key=lambda i: -getattr(rows[i], term))
        out[task] = [
            {"variant": rows[i].variant, term: getattr(rows[i], term), "run": rows[i].run} for i in order
        ]
    return out


# ---- recipe 3 as published: the task models once, the enhanced models per variant --------------------


def _variant_pipeline(config: TrainConfig, variants: list[dict[str, Any]]) -> TrainConfig:
    """One pipeline holding the task models once and every enhanced model under every variant
    (``v<i>_<name>``: the variant's hparams merged over that enhanced model's)."""
    cfg = config.copy()
    cfg.pipeline.enhanced = {
        f"v{i}_{name}": merge_config(o or {}, {"model": {"hparams": dict(v)}})
        for i, v in enumerate(variants)
        for name, o in config.pipeline.enhanced.items()
    }
    cfg.pipeline.combine = {t: f"v0_{n}" for t, n in combine_map(config).items()}  # a placeholder
    return cfg


def search_pipeline(
    config: TrainConfig,
    root: str | os.PathLike,
    train: LabelTable,
    val: LabelTable,
    out: str | os.PathLike | None,
    variants: list[dict[str, Any]],
    *,
    overwrite: bool = False,
    log=print,
    trust_remote_code: bool = False,
) -> list[SearchRow]:
    """The strategy search of a pipeline config (see the module docstring); rows sorted by combined P."""
    from mtaffect.train.pipeline import Pipeline, combine_predictions

    if out is None:
        raise ValueError("a pipeline search keeps its trained models in a folder: give --out")
    out_path = Path(out)
    base = combine_map(config)
    big = _variant_pipeline(config, variants)
    say = log if log and env_rank() == 0 else (lambda _msg: None)
    say(
        f"strategy search: {len(variants)} variants x {len(config.pipeline.enhanced)} enhanced models; the "
        f"{len(config.pipeline.task_models)} task models are trained and exported once"
    )
    pipe = Pipeline(
        big,
        root,
        out_path,
        resume=True,
        overwrite=overwrite,
        log=log,
        trust_remote_code=trust_remote_code,
        train=train,
        val=val,
    )
    pipe.run([s.name for s in pipe.steps if s.kind != "combine"])
    rows: list[SearchRow] = []
    for i, variant in enumerate(variants):
        runs = {task: out_path / f"enhanced_v{i}_{name}" for task, name in base.items()}
        _, metrics = combine_predictions(runs, val)
        seconds = sum(
            pipe.record.get(f"enhanced_v{i}_{n}", {}).get("train_seconds") or 0.0
            for n in config.pipeline.enhanced
        )
        rows.append(
            SearchRow.scored(
                dict(variant),
                terms_row(metrics, tuple(base)),
                seconds=seconds,
                run=f"{out_path}/enhanced_v{i}_*",
            )
        )
    chosen = _choose(rows)
    pick = config.copy()
    pick.search.grid = []
    pick.pipeline.enhanced = {
        f"v{i}_{name}": big.pipeline.enhanced[f"v{i}_{name}"]
        for i, name in dict.fromkeys((chosen[t], base[t]) for t in base)
    }
    pick.pipeline.combine = {task: f"v{chosen[task]}_{base[task]}" for task in base}
    if env_rank() == 0:
        with atomic_open(out_path / "chosen.yaml", "w", overwrite=True, encoding="utf-8") as fh:
            fh.write("# written by mtaffect search: each task from the variant that scored best on it\n")
            yaml.safe_dump(pick.to_dict(), fh, sort_keys=False)
    result = Pipeline(
        pick, root, out_path, resume=True, log=log, trust_remote_code=trust_remote_code, train=train, val=val
    ).run()
    say(
        "chosen: "
        + ", ".join(f"{t} from v{chosen[t]} ({_label(variants[chosen[t]])})" for t in base)
        + f"; combined P {result.P:.4f}; runnable config {out_path / 'chosen.yaml'}"
    )
    ranked = sorted(rows, key=lambda r: -r.P)
    if env_rank() == 0:
        write_json(
            out_path / "search.json",
            {
                "recipe": config.model.recipe,
                "pipeline": True,
                "ranked": [r.to_dict() for r in ranked],
                "per_task": _per_task_report(rows),
                "chosen": {
                    task: {"variant": rows[chosen[task]].variant, "model": pick.pipeline.combine[task]}
                    for task in base
                },
                "chosen_P": result.P,
                "chosen_config": str(out_path / "chosen.yaml"),
                "trained": pipe.trained,
            },
        )
    return ranked


def search_table(rows: list[SearchRow]):  # -> rich.table.Table
    from rich.table import Table

    t = Table(title="strategy search (ranked by validation P)", title_justify="left")
    chosen = any(r.chosen_for is not None for r in rows)
    columns: tuple[str, ...] = ("rank", "variant", "P", "CCC_VA", "F1_EXPR", "F1_AU", "seconds")
    columns += ("chosen for",) if chosen else ()
    for col in columns:
        t.add_column(col, justify="left" if col in ("variant", "chosen for") else "right")
    best = {k: max(getattr(r, k) for r in rows) for k in ("ccc_va", "f1_expr", "f1_au")} if rows else {}

    def cell(r: SearchRow, k: str) -> str:  # each task's best term in bold: what the per-task choice reads
        text = f"{getattr(r, k):.4f}"
        return f"[bold]{text}[/bold]" if chosen and getattr(r, k) == best[k] else text

    for i, r in enumerate(rows, 1):
        t.add_row(
            str(i),
            _label(r.variant),
            f"{r.P:.4f}",
            cell(r, "ccc_va"),
            cell(r, "f1_expr"),
            cell(r, "f1_au"),
            f"{r.seconds:.1f}",
            *([", ".join(r.chosen_for or [])] if chosen else []),
        )
    return t
