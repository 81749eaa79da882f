"""CLI command ``export``; ``register(app)`` adds it to a typer app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mtaffect.clikit import Overwrite, console, user_errors


def export(
    out: Annotated[Path, typer.Option(help="Export folder to create (face model, MTCNN, export.json).")],
    model: Annotated[
        str, typer.Option(help="'default' (the embedded model), a checkpoint folder (RUN/best) or a run.")
    ] = "default",
    quantize: Annotated[
        bool, typer.Option("--quantize", help="Also write face_model.int8.onnx (dynamic int8 weights).")
    ] = False,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (18-21); default 18.")] = None,
    window: Annotated[
        int | None, typer.Option(help="Temporal models: fix the window length T (default: dynamic).")
    ] = None,
    detector: Annotated[
        bool, typer.Option("--detector/--no-detector", help="Include MTCNN (leave out for aligned faces).")
    ] = True,
    overwrite: Overwrite = False,
) -> None:
    """Export a model and MTCNN to ONNX for onnxruntime (runs without torch); checked against PyTorch."""
    from mtaffect.export.exporter import DEFAULT_OPSET, export_model

    manifest = export_model(
        model,
        out,
        quantize=quantize,
        opset=opset or DEFAULT_OPSET,
        window=window,
        detector=detector,
        overwrite=overwrite,
        log=lambda m: console.print(m, highlight=False),
    )
    sizes = ", ".join(f"{name} {rec['bytes'] / 1e6:.2f} MB" for name, rec in manifest["files"].items())
    console.print(f"files: {sizes}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(user_errors(export))
