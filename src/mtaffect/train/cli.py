"""CLI commands ``train``, ``cv``, ``search`` and ``infer``; ``register(app)`` adds them to a typer app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtaffect.clikit import Overwrite, console, user_errors

Config = Annotated[Path, typer.Option(help="Recipe YAML (configs/*.yaml).")]
Features = Annotated[Path, typer.Option(help="Feature store (from `mtaffect extract`).")]
Data = Annotated[Path, typer.Option(help="Dataset root with the official annotation files.")]
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


def _config(path: Path, overrides: list[str] | None, progress: bool):
    from mtaffect.train.config import load_config

    cfg = load_config(path, overrides or [])
    if not progress:
        cfg.trainer.progress = False
    return cfg


def _log(msg: str) -> None:
    console.print(msg, highlight=False)


def train(
    config: Config, features: Features, data: Data,
    out: Annotated[Path, typer.Option(help="Run folder: best/, metrics.json, val_predictions.parquet.")],
    override: Override = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run from its last finished epoch.")
    ] = False,
    trainval: Annotated[
        bool,
        typer.Option(
            "--trainval",
            help="Refit on train + val for the configured epochs, without validation or selection "
            "(how final test models are made).",
        ),
    ] = False,
    overwrite: Overwrite = False, progress: Progress = True,
) -> None:  # fmt: skip
    """Train a recipe on a feature store; keep the epoch with the best validation P."""
    from mtaffect.train.fit import fit_from_root

    cfg = _config(config, override, progress)
    result = fit_from_root(
        cfg, features, data, out, trainval=trainval, overwrite=overwrite, resume=resume, log=_log
    )
    if result.rank != 0:  # under DDP only rank 0 reports (and writes)
        return
    console.print(f"[bold]{result.summary()}[/bold]", highlight=False)
    written = ["best", "metrics.json"] + (
        [] if result.val_predictions is None else ["val_predictions.parquet"]
    )
    console.print("wrote " + ", ".join(f"{out}/{w}" for w in written), highlight=False)


def cv(
    config: Config, features: Features, data: Data,
    out: Annotated[Path, typer.Option(help="Folder: fold<k>/ runs, cv.json, test_predictions.parquet.")],
    folds: Annotated[int, typer.Option(help="Number of folds (split by source video).")] = 5,
    test_list: Annotated[
        Path | None, typer.Option(help="Test list for the fold ensemble (default: the one in --data).")
    ] = None,
    override: Override = None, overwrite: Overwrite = False, progress: Progress = True,
    allow_missing: AllowMissing = False,
) -> None:  # fmt: skip
    """K-fold cross-validation over train + val by video: mean ± std of P and its terms."""
    from mtaffect.data.annotations import LabelTable, load_split
    from mtaffect.data.submission import find_test_list, read_test_list
    from mtaffect.train.cv import cross_validate
    from mtaffect.train.fit import env_rank

    cfg = _config(config, override, progress)
    labels = LabelTable.concat([load_split(data, "train"), load_split(data, "val")])
    tl = test_list or find_test_list(data)
    test_images = list(dict.fromkeys(read_test_list(tl))) if tl is not None else None
    res = cross_validate(
        cfg, features, labels, folds, out, test_images=test_images, overwrite=overwrite,
        allow_missing=allow_missing, log=_log,
    )  # fmt: skip
    if env_rank() != 0:
        return
    console.print(res.table())
    console.print(f"wrote {out}/cv.json" + (f" and {out}/test_predictions.parquet" if test_images else ""))


def search(
    config: Config, features: Features, data: Data,
    out: Annotated[Path, typer.Option(help="Folder: run<i>/ per variant and search.json.")],
    override: Override = None, overwrite: Overwrite = False, progress: Progress = True,
) -> None:  # fmt: skip
    """Strategy search: train every variant of the config's search.grid and rank them by validation P."""
    from mtaffect.data.annotations import load_split
    from mtaffect.train.search import search as run_search
    from mtaffect.train.search import search_table

    cfg = _config(config, override, progress)
    rows = run_search(
        cfg, features, load_split(data, "train"), load_split(data, "val"), out, overwrite=overwrite, log=_log
    )
    from mtaffect.train.fit import env_rank

    if env_rank() == 0:
        console.print(search_table(rows))


def infer(
    model: Annotated[Path, typer.Option(help="Checkpoint folder (e.g. RUN_DIR/best).")],
    features: Features,
    images: Annotated[Path, typer.Option(help="Annotation file or test list naming the images.")],
    out: Annotated[Path, typer.Option(help="PredictionTable to write (.parquet or .csv).")],
    overwrite: Overwrite = False, allow_missing: AllowMissing = False,
) -> None:  # fmt: skip
    """Predict the listed images from a feature store with a trained checkpoint."""
    from mtaffect.data.submission import read_image_names
    from mtaffect.io import check_writable
    from mtaffect.models.checkpoint import load_model

    check_writable(out, overwrite)
    names = list(dict.fromkeys(read_image_names(images)))  # a test list repeats names: predict each once
    m = load_model(model)
    table = m.predict_store(features, names, allow_missing=allow_missing)
    table.write(out, overwrite=overwrite)
    bad = int((table.frame["valid"] == 0).sum()) if allow_missing else 0
    note = f"; {bad} image(s) failed extraction: valid = 0" if bad else ""
    console.print(f"wrote {out} ({len(table)} rows{note})")


def register(app: typer.Typer) -> None:
    """Add ``train``, ``cv``, ``search`` and ``infer`` to ``app``."""
    for fn in (train, cv, search, infer):
        app.command(name=fn.__name__)(user_errors(fn))
