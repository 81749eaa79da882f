"""``mtaffect tune``: the command line of the post-processing search (wired in by ``register(app)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtaffect.clikit import Overwrite, console, user_errors, write_result
from mtaffect.io import check_writable


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
    @user_errors
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
            str,
            typer.Option(
                help="Kernel widths (gaussian sigma, box half-width), e.g. 2,8,32 (default: 1 to 200); "
                "windows wider than --max-span are skipped."
            ),
        ] = "",
        max_span: Annotated[
            float | None,
            typer.Option(help="Widest window tried: 2 x reach + 1 (gaussian reach: 3 sigma; default 401)."),
        ] = None,
        units: Annotated[
            str, typer.Option(help="Kernel units to try: frames, rows (+-reach annotated rows), or both.")
        ] = "frames",
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
        overwrite: Overwrite = False,
    ) -> None:
        """Tune smoothing, AU thresholds and blend weights on validation; print each step's gain."""
        from mtaffect.data.annotations import read_annotations
        from mtaffect.data.predictions import PredictionTable
        from mtaffect.post.tune import DEFAULT_MAX_SPAN, DEFAULT_WIDTHS, SearchSpace
        from mtaffect.post.tune import tune as run_tune

        check_writable(out, overwrite)  # fail before the search, not after it
        if json_out is not None:
            check_writable(json_out, overwrite)
        paths = [*pred, *(more_preds or [])]
        space = SearchSpace(
            kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
            widths=_numbers(widths, "--widths") if widths.strip() else DEFAULT_WIDTHS,
            causal=causal,
            units=tuple(u.strip() for u in units.split(",") if u.strip()),
            max_span=max_span if max_span is not None else DEFAULT_MAX_SPAN,
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
            write_result(report.to_dict(), json_out, overwrite)
