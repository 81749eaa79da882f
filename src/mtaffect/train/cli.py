"""CLI commands ``train``, ``cv``, ``search`` and ``infer``; ``register(app)`` adds them to a typer app."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mtaffect.clikit import Overwrite, TrustRemoteCode, console, user_errors

if TYPE_CHECKING:
    from mtaffect.data.annotations import LabelTable

Config = Annotated[Path, typer.Option(help="Recipe YAML (configs/*.yaml).")]
Features = Annotated[
    list[str] | None,
    typer.Option(
        help="Feature store (from `mtaffect extract`); omit for configs that train from images. Repeat as "
        "NAME=STORE for named stores a recipe fuses (features@NAME, e.g. au=runs/pub/stores/au).",
    ),
]
Data = Annotated[
    Path, typer.Option(help="Dataset root: the official annotation files (and cropped_aligned/ images).")
]
Override = Annotated[
    list[str] | None,
    typer.Option("--override", "-o", help="section.key=value, e.g. trainer.epochs=5 (repeatable)."),
]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")]
AllowMissing = Annotated[
    bool,
    typer.Option(
        "--allow-missing",
        help="Predict images whose extraction failed too, with a `valid` column = 0 (default: an error).",
    ),
]


Folds = Annotated[int, typer.Option(help="Number of folds (split by source video).")]
SplitSeed = Annotated[
    int | None,
    typer.Option(help="Seed of the fold assignment (default: trainer.seed); `cv` and `train --fold` agree."),
]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue an interrupted run from its last finished epoch.")
]


def _config(path: Path, overrides: list[str] | None, progress: bool):
    from mtaffect.train.config import load_config
    from mtaffect.train.pipeline_steps import check_pipeline

    cfg = check_pipeline(load_config(path, overrides or []))
    if not progress:
        cfg.trainer.progress = False
    return cfg


def resolved_config_text(cfg) -> str:
    """The config a run would train with, as YAML; for a pipeline, then each step's settings that differ
    from it (what ``--dry-run`` prints: the published variants' differences from the defaults in one
    place)."""
    import yaml

    from mtaffect.train.pipeline_steps import pipeline_configs

    base = cfg.to_dict()
    text = f"# resolved config ({cfg.source})\n" + yaml.safe_dump(base, sort_keys=False)
    if cfg.pipeline.enabled:
        for name, step in pipeline_configs(cfg).items():
            changed = _changed(base, step.to_dict()) or {}
            text += f"# step {name}: differs from the above in\n" + yaml.safe_dump(changed, sort_keys=False)
    return text


def _changed(base: dict, other: dict) -> dict:
    """The entries of ``other`` whose values differ from ``base`` (nested mappings compared key by key)."""
    out = {}
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            sub = _changed(base[key], value)
            if sub:
                out[key] = sub
        elif base.get(key) != value:
            out[key] = value
    return out


def _log(msg: str) -> None:
    console.print(msg, highlight=False)


def split_features(items: list[str] | None) -> tuple[Path | None, dict[str, Path]]:
    """``--features`` values: one plain STORE (the main store) and any NAME=STORE (named stores)."""
    main: Path | None = None
    named: dict[str, Path] = {}
    for item in items or []:
        key, sep, path = item.partition("=")
        if sep and key.isidentifier() and path:
            if key in named:
                raise ValueError(f"--features {key}=... is given twice")
            named[key] = Path(path)
        elif main is not None:
            raise ValueError(f"--features names two main stores ({main}, {item}); name the others NAME=STORE")
        else:
            main = Path(item)
    return main, named


def _training_data(cfg, features: Path | None, data: Path) -> Path:
    """What the config trains on: the store for store configs, the dataset root for image configs."""
    name = cfg.source or "the config"
    if cfg.from_images:
        if features is not None:
            raise ValueError(
                f"{name} trains from images (backbone {cfg.backbone.name!r} in the loop): pass --data only, "
                "not --features (to train on a feature store use a config without a backbone section, "
                "e.g. configs/queries_gcn_cached.yaml for recipe 1)"
            )
        return data
    if features is None:
        raise ValueError(
            f"{name} trains on a feature store: pass --features STORE (made by `mtaffect extract`), or use a "
            "config with a backbone section to train from the images under --data"
        )
    return features


def train(
    config: Config,
    data: Data,
    out: Annotated[Path, typer.Option(help="Run folder: best/, metrics.json, val_predictions.parquet.")],
    features: Features = None,
    override: Override = None,
    resume: Resume = False,
    trainval: Annotated[
        bool,
        typer.Option(
            "--trainval",
            help="Refit on train + val for the configured epochs, without validation or selection "
            "(how final test models are made).",
        ),
    ] = False,
    no_validation: Annotated[
        bool,
        typer.Option(
            "--no-validation",
            help="Train on the train split without validation or selection (the last epoch's model); "
            "without it, a validation file with no row to score is an error.",
        ),
    ] = False,
    step: Annotated[
        list[str] | None,
        typer.Option(
            "--step",
            help="Pipeline configs (pipeline: section): run only this step (repeatable), e.g. task_au, "
            "export_au, enhanced_va, combine; the steps it needs must have finished.",
        ),
    ] = None,
    fold: Annotated[
        int | None,
        typer.Option(
            help="Train on fold K's training videos of train + val, validate on fold K (0 to --folds - 1): "
            "the split `mtaffect cv` uses for its foldK/.",
        ),
    ] = None,
    folds: Folds = 5,
    split_seed: SplitSeed = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print the resolved config (the recipe's defaults, the file, the overrides; for a pipeline "
            "every step's own settings) and exit without training or writing anything.",
        ),
    ] = False,
    overwrite: Overwrite = False,
    progress: Progress = True,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Train a recipe on a feature store, or from images (configs with a backbone); keep the best val P.

    A config with a pipeline: section (configs/progressive_published.yaml) runs all its steps (task models,
    their export, the enhanced models, the combined model), or those given with --step; finished steps are
    kept, an interrupted one continues with --resume. --fold K trains on one fold of cv's split instead of
    the official train/val split.
    """
    from mtaffect.train.fit import fit, fit_from_root

    cfg = _config(config, override, progress)
    if dry_run:
        console.print(resolved_config_text(cfg), highlight=False, markup=False, soft_wrap=True)
        return
    main, named = split_features(features)
    split = _fold_split(cfg, data, fold, folds, split_seed, trainval, no_validation)
    if cfg.pipeline.enabled:
        if no_validation:
            raise ValueError(
                f"--no-validation applies to single runs; {cfg.source} is a pipeline (its combined model is "
                "selected on validation): use --trainval to train it without validation"
            )
        _train_pipeline(
            cfg, main, named, data, out, step, resume, trainval, overwrite, trust_remote_code, split
        )
        return
    if step:
        raise ValueError(f"--step applies to pipeline configs; {cfg.source} has no pipeline section")
    source = _training_data(cfg, main, data)
    if split is not None:
        result = fit(
            cfg,
            source,
            *split,
            out,
            overwrite=overwrite,
            resume=resume,
            log=_log,
            trust_remote_code=trust_remote_code,
            stores=named or None,
        )
    else:
        result = fit_from_root(
            cfg,
            source,
            data,
            out,
            trainval=trainval,
            validation=not no_validation,
            overwrite=overwrite,
            resume=resume,
            log=_log,
            trust_remote_code=trust_remote_code,
            stores=named or None,
        )
    if result.rank != 0:  # under DDP only rank 0 reports (and writes)
        return
    console.print(f"[bold]{result.summary()}[/bold]", highlight=False)
    written = ["best", "metrics.json"] + (
        [] if result.val_predictions is None else ["val_predictions.parquet"]
    )
    console.print("wrote " + ", ".join(f"{out}/{w}" for w in written), highlight=False)


def _fold_split(
    cfg, data: Path, fold: int | None, folds: int, seed: int | None, trainval: bool, no_validation: bool
) -> tuple[LabelTable, LabelTable] | None:
    """``train --fold K``: (training, validation) rows of cv's fold K over train + val (None without)."""
    from mtaffect.data.annotations import LabelTable, load_split
    from mtaffect.train.cv import fold_split

    if fold is None:
        if folds != 5 or seed is not None:
            raise ValueError("--folds and --split-seed choose the split of --fold K: give --fold too")
        return None
    if trainval or no_validation:
        raise ValueError(
            "--fold K validates on fold K of train + val; drop --trainval / --no-validation (or --fold)"
        )
    labels = LabelTable.concat([load_split(data, "train"), load_split(data, "val")])
    return fold_split(labels, folds, fold, cfg.trainer.seed if seed is None else seed)


def _train_pipeline(
    cfg, main, named, data, out, step, resume, trainval, overwrite, trust_remote_code, split=None
) -> None:
    from mtaffect.train.pipeline import check_no_features, run_pipeline

    check_no_features(cfg, main is not None or bool(named))
    train, val = split if split is not None else (None, None)
    res = run_pipeline(
        cfg,
        data,
        out,
        steps=step,
        resume=resume,
        overwrite=overwrite,
        trainval=trainval,
        log=_log,
        trust_remote_code=trust_remote_code,
        train=train,
        val=val,
    )
    if res.rank != 0:
        return
    console.print(f"[bold]{res.summary()}[/bold]", highlight=False)
    if res.checkpoint is not None:
        console.print(
            f"wrote {out}/best (the combined model: one model per task), {out}/pipeline.json"
            + (", metrics.json, val_predictions.parquet" if res.metrics else ""),
            highlight=False,
        )


def cv(
    config: Config,
    data: Data,
    out: Annotated[Path, typer.Option(help="Folder: fold<k>/ runs, cv.json, test_predictions.parquet.")],
    features: Features = None,
    folds: Folds = 5,
    split_seed: SplitSeed = None,
    test_list: Annotated[
        Path | None, typer.Option(help="Test list for the fold ensemble (default: the one in --data).")
    ] = None,
    override: Override = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
    resume: Annotated[
        bool, typer.Option("--resume", help="Pipeline configs: continue an interrupted step of a fold.")
    ] = False,
    allow_missing: AllowMissing = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """K-fold cross-validation over train + val by video: mean ± std of P and its terms.

    A config with a pipeline: section runs its whole pipeline in each fold (task models on the fold's
    training videos, their stores, enhanced and combined models) into OUT/fold<k>/; rerunning keeps
    finished folds and steps, --resume continues an interrupted step. `train --fold K` trains one fold.
    """
    from mtaffect.data.annotations import LabelTable, load_split
    from mtaffect.data.submission import find_test_list, read_test_list
    from mtaffect.train.cv import cross_validate
    from mtaffect.train.fit import env_rank
    from mtaffect.train.pipeline import check_no_features

    cfg = _config(config, override, progress)
    main, named = split_features(features)
    if cfg.pipeline.enabled:
        check_no_features(cfg, main is not None or bool(named))
        source = data
    else:
        source = _training_data(cfg, main, data)
    labels = LabelTable.concat([load_split(data, "train"), load_split(data, "val")])
    tl = test_list or find_test_list(data)
    test_images = list(dict.fromkeys(read_test_list(tl))) if tl is not None else None
    res = cross_validate(
        cfg,
        source,
        labels,
        folds,
        out,
        test_images=test_images,
        seed=split_seed,
        overwrite=overwrite,
        resume=resume,
        allow_missing=allow_missing,
        log=_log,
        trust_remote_code=trust_remote_code,
        stores=named or None,
    )
    if env_rank() != 0:
        return
    console.print(res.table())
    console.print(f"wrote {out}/cv.json" + (f" and {out}/test_predictions.parquet" if test_images else ""))


def search(
    config: Config,
    data: Data,
    out: Annotated[Path, typer.Option(help="Folder: run<i>/ per variant and search.json.")],
    features: Features = None,
    override: Override = None,
    overwrite: Overwrite = False,
    progress: Progress = True,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Strategy search: train every variant of the config's search.grid and rank them by validation P."""
    from mtaffect.data.annotations import load_split
    from mtaffect.train.pipeline import check_no_features
    from mtaffect.train.search import search as run_search
    from mtaffect.train.search import search_table

    cfg = _config(config, override, progress)
    main, named = split_features(features)
    if cfg.pipeline.enabled:
        check_no_features(cfg, main is not None or bool(named))
        source = data
    else:
        source = _training_data(cfg, main, data)
    rows = run_search(
        cfg,
        source,
        load_split(data, "train"),
        load_split(data, "val"),
        out,
        overwrite=overwrite,
        log=_log,
        trust_remote_code=trust_remote_code,
        stores=named or None,
    )
    from mtaffect.train.fit import env_rank

    if env_rank() == 0:
        console.print(search_table(rows))


def infer(
    model: Annotated[Path, typer.Option(help="Checkpoint folder (e.g. RUN_DIR/best).")],
    images: Annotated[Path, typer.Option(help="Annotation file or test list naming the images.")],
    out: Annotated[Path, typer.Option(help="PredictionTable to write (.parquet or .csv).")],
    features: Annotated[
        list[str] | None,
        typer.Option(
            help="Feature store holding the images' features (or use --data); repeat as NAME=STORE for the "
            "named stores a model fuses (features@NAME).",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Dataset root: run the checkpoint's backbone on its cropped_aligned/ images."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per backbone batch (with --data).")] = 256,
    workers: Annotated[int, typer.Option(help="JPEG-decoding processes (with --data).")] = 1,
    overwrite: Overwrite = False,
    allow_missing: AllowMissing = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Predict the listed images with a trained checkpoint, from a feature store or from the images."""
    from mtaffect.data.submission import read_image_names
    from mtaffect.io import check_writable
    from mtaffect.models.loading import load_model
    from mtaffect.schema import CROPPED_DIR

    main, named = split_features(features)
    if (main is None) == (data is None):
        raise ValueError("give exactly one of --features STORE (cached features) or --data ROOT (images)")
    check_writable(out, overwrite)
    names = list(dict.fromkeys(read_image_names(images)))  # a test list repeats names: predict each once
    m = load_model(model, trust_remote_code=trust_remote_code)
    if data is not None:
        table = m.predict_images(
            data / CROPPED_DIR,
            names,
            batch_size=batch_size,
            workers=workers,
            allow_missing=allow_missing,
            stores=named or None,
        )
    else:
        assert main is not None  # exactly one of --features and --data (checked above)
        table = m.predict_store(main, names, allow_missing=allow_missing, stores=named or None)
    table.write(out, overwrite=overwrite)
    bad = int((table.frame["valid"] == 0).sum()) if allow_missing else 0
    what = "could not be read" if data is not None else "failed extraction"
    note = f"; {bad} image(s) {what}: valid = 0" if bad else ""
    console.print(f"wrote {out} ({len(table)} rows{note})")


def register(app: typer.Typer) -> None:
    """Add ``train``, ``cv``, ``search`` and ``infer`` to ``app``."""
    for fn in (train, cv, search, infer):
        app.command(name=fn.__name__)(user_errors(fn))
