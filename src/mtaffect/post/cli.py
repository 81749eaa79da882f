"""``mtaffect tune``: the command line of the post-processing search (wired in by ``register(app)``)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console

from mtaffect.io import atomic_open, check_writable

F = TypeVar("F", bound=Callable)
#: Errors that are the user's to fix: one line and exit code 2 (as the main CLI does).
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError)


def _user_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            Console(stderr=True).print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from exc

    return wrapper  # type: ignore[return-value]


def _numbers(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{what} is empty")
    return values


def register(app: typer.Typer) -> None:
    """Add the ``tune`` command to ``app``."""

    @app.command(
        context_settings={"allow_interspersed_args": True},
        epilog="Apply the result with `--post POSTPROC.yaml` (evaluate, submit, predict).",
    )
    @_user_errors
    def tune(
        gt: Annotated[Path, typer.Option(help="Validation annotation file (official format).")],
        pred: Annotated[
            list[Path],
            typer.Option(
                help="Prediction table(s) of the validation images: --pred A.parquet [B.parquet ...]."
            ),
        ],
        out: Annotated[Path, typer.Option(help="Post-processing YAML to write.")],
        more_preds: Annotated[
            list[Path] | None,
            typer.Argument(help="More prediction tables (after --pred A).", show_default=False),
        ] = None,
        tune_videos: Annotated[
            float, typer.Option(help="Fraction of the videos the search sees (nested); the rest scores it.")
        ] = 0.5,
        split_seed: Annotated[int, typer.Option(help="Seed of the tuning/held-out video split.")] = 0,
        nested: Annotated[
            bool, typer.Option(help="Tune on some videos, report on the others (--no-nested: optimistic).")
        ] = True,
        refit: Annotated[
            bool, typer.Option(help="Save a config re-tuned on all videos (the held-out gain estimates it).")
        ] = False,
        kinds: Annotated[str, typer.Option(help="Kernel kinds to try: gaussian,box.")] = "gaussian,box",
        widths: Annotated[
            str, typer.Option(help="Kernel widths in frames (gaussian sigma, box half-width).")
        ] = "1,2,3,4,6,8,12,16,24,32",
        causal: Annotated[bool, typer.Option(help="Search past-only kernels (streaming use).")] = False,
        thresholds: Annotated[str, typer.Option(help="AU threshold search: exact or grid.")] = "exact",
        bootstrap: Annotated[
            int, typer.Option(help="Exact thresholds: average F1 over this many video resamples (0: off).")
        ] = 50,
        expr_bias: Annotated[
            bool, typer.Option(help="Also tune a per-class expression bias (can overfit few videos).")
        ] = False,
        blend_step: Annotated[float, typer.Option(help="Blend weight grid step.")] = 0.1,
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Also write the report as JSON.")
        ] = None,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Replace existing output files.")
        ] = False,
    ) -> None:
        """Tune smoothing, AU thresholds and blend weights on validation; print each step's gain."""
        from mtaffect.data.annotations import read_annotations
        from mtaffect.data.predictions import PredictionTable
        from mtaffect.post.tune import SearchSpace
        from mtaffect.post.tune import tune as run_tune

        console = Console()
        check_writable(out, overwrite)  # fail before the search, not after it
        if json_out is not None:
            check_writable(json_out, overwrite)
        paths = [*pred, *(more_preds or [])]
        space = SearchSpace(
            kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
            widths=_numbers(widths, "--widths"),
            causal=causal,
            threshold_method=thresholds,
            bootstrap=bootstrap,
            expr_bias=expr_bias,
            blend_step=blend_step,
        )
        labels = read_annotations(gt)
        tables = [PredictionTable.read(p) for p in paths]
        report = run_tune(
            labels,
            tables,
            space=space,
            nested=nested,
            tune_fraction=tune_videos,
            split_seed=split_seed,
            refit=refit,
            names=[str(p) for p in paths],
        )
        for table in report.tables():
            console.print(table)
        for line in report.lines():
            console.print(line, highlight=False)
        report.config.save(out, overwrite=overwrite)
        console.print(f"wrote {out}")
        if json_out is not None:
            with atomic_open(json_out, "w", overwrite=overwrite) as fh:
                json.dump(report.to_dict(), fh, indent=2)
                fh.write("\n")
            console.print(f"wrote {json_out}")
