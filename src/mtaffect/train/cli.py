"""CLI commands ``train``, ``cv``, ``search`` and ``infer``; ``register(app)`` adds them to a typer app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtaffect.clikit import Overwrite, console, user_errors

Config = Annotated[Path, typer.Option(help="Recipe YAML (configs/*.yaml).")]
Features = Annotated[
    Path | None,
    typer.Option(help="Feature store (from `mtaffect extract`); omit for configs that train from images."),
]
Data = Annotated[
    Path, typer.Option(help="Dataset root: the official annotation files (and cropped_aligned/ images).")
]
Override = Annotated[
    list[str] | None,
    typer.Option("--override", "-o", help="section.key=value, e.g. trainer.epochs=5 (repeatable)."),
]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")]


def _config(path: Path, overrides: list[str] | None, progress: bool):
    from mtaffect.train.config import load_config

    cfg = load_config(path, overrides or [])
    if not progress:
        cfg.trainer.progress = False
    return cfg


def _log(msg: str) -> None:
    console.print(msg, highlight=False)


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
    config: Config, data: Data,
    out: Annotated[Path, typer.Option(help="Run folder: best/, metrics.json, val_predictions.parquet.")],
    features: Features = None, override: Override = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a run: skip finished stages.")] = False,
    overwrite: Overwrite = False, progress: Progress = True,
) -> None:  # fmt: skip
    """Train a recipe on a feature store, or from images (configs with a backbone); keep the best val P."""
    from mtaffect.train.fit import fit_from_root

    cfg = _config(config, override, progress)
    _training_data(cfg, features, data)
    result = fit_from_root(cfg, features, data, out, overwrite=overwrite, resume=resume, log=_log)
    console.print(f"[bold]{result.summary()}[/bold]", highlight=False)
    console.print(f"wrote {out}/best, {out}/metrics.json, {out}/val_predictions.parquet", highlight=False)


def cv(
    config: Config, data: Data,
    out: Annotated[Path, typer.Option(help="Folder: fold<k>/ runs, cv.json, test_predictions.parquet.")],
    features: Features = None,
    folds: Annotated[int, typer.Option(help="Number of folds (split by source video).")] = 5,
    test_list: Annotated[
        Path | None, typer.Option(help="Test list for the fold ensemble (default: the one in --data).")
    ] = None,
    override: Override = None, overwrite: Overwrite = False, progress: Progress = True,
) -> None:  # fmt: skip
    """K-fold cross-validation over train + val by video: mean ± std of P and its terms."""
    from mtaffect.data.annotations import LabelTable, load_split
    from mtaffect.data.submission import find_test_list, read_test_list
    from mtaffect.train.cv import cross_validate

    cfg = _config(config, override, progress)
    source = _training_data(cfg, features, data)
    labels = LabelTable.concat([load_split(data, "train"), load_split(data, "val")])
    tl = test_list or find_test_list(data)
    test_images = list(dict.fromkeys(read_test_list(tl))) if tl is not None else None
    res = cross_validate(
        cfg, source, labels, folds, out, test_images=test_images, overwrite=overwrite, log=_log
    )
    console.print(res.table())
    console.print(f"wrote {out}/cv.json" + (f" and {out}/test_predictions.parquet" if test_images else ""))


def search(
    config: Config, data: Data,
    out: Annotated[Path, typer.Option(help="Folder: run<i>/ per variant and search.json.")],
    features: Features = None, override: Override = None, overwrite: Overwrite = False,
    progress: Progress = True,
) -> None:  # fmt: skip
    """Strategy search: train every variant of the config's search.grid and rank them by validation P."""
    from mtaffect.data.annotations import load_split
    from mtaffect.train.search import search as run_search
    from mtaffect.train.search import search_table

    cfg = _config(config, override, progress)
    source = _training_data(cfg, features, data)
    rows = run_search(
        cfg, source, load_split(data, "train"), load_split(data, "val"), out, overwrite=overwrite, log=_log
    )
    console.print(search_table(rows))


def infer(
    model: Annotated[Path, typer.Option(help="Checkpoint folder (e.g. RUN_DIR/best).")],
    images: Annotated[Path, typer.Option(help="Annotation file or test list naming the images.")],
    out: Annotated[Path, typer.Option(help="PredictionTable to write (.parquet or .csv).")],
    features: Annotated[
        Path | None, typer.Option(help="Feature store holding the images' features (or use --data).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Dataset root: run the checkpoint's backbone on its cropped_aligned/ images."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per backbone batch (with --data).")] = 256,
    workers: Annotated[int, typer.Option(help="JPEG-decoding processes (with --data).")] = 1,
    overwrite: Overwrite = False,
) -> None:
    """Predict the listed images with a trained checkpoint, from a feature store or from the images."""
    from mtaffect.data.submission import read_image_names
    from mtaffect.io import check_writable
    from mtaffect.models.checkpoint import load_model
    from mtaffect.schema import CROPPED_DIR

    if (features is None) == (data is None):
        raise ValueError("give exactly one of --features STORE (cached features) or --data ROOT (images)")
    check_writable(out, overwrite)
    names = list(dict.fromkeys(read_image_names(images)))  # a test list repeats names: predict each once
    m = load_model(model)
    if data is not None:
        table = m.predict_images(data / CROPPED_DIR, names, batch_size=batch_size, workers=workers)
        if m.failures:
            console.print(f"[yellow]{len(m.failures)} image(s) could not be read[/] (e.g. {m.failures[0]})")
    else:
        table = m.predict_store(features, names)
    table.write(out, overwrite=overwrite)
    console.print(f"wrote {out} ({len(table)} rows)")


def register(app: typer.Typer) -> None:
    """Add ``train``, ``cv``, ``search`` and ``infer`` to ``app``."""
    for fn in (train, cv, search, infer):
        app.command(name=fn.__name__)(user_errors(fn))
