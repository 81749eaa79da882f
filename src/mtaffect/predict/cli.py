"""``mtaffect predict``: the application command (wired into the main app with :func:`register`).

Each INPUT (an image, a video, a folder of them, a .txt list of paths) gives one table
``OUT/<name>.<format>`` (a folder or list: one table for all its files), plus with ``--plot`` a
timeline PNG per face (``OUT/<name>_face<id>.png``), with ``--video`` an annotated copy of each video
(``OUT/<name>_annotated.mp4``), with ``--plot`` or ``--video`` an annotated copy of each still image
(``OUT/<name>_annotated.jpg``), and with ``--report`` one HTML page ``OUT/report.html`` for the run.

An unreadable input is reported (file and reason) and counted; the other inputs are still processed.
Exit status: 0 when at least one input succeeded, 1 when every input failed, 2 for a usage error
(bad option, existing output without ``--overwrite``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from mtaffect.clikit import Overwrite, console, err_console, user_errors


class _RateColumn(ProgressColumn):
    """Frames per second of the running task."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:5.1f} frames/s" if speed else "  ... frames/s", style="cyan")


def _output_names(inputs: list[Path]) -> list[str]:
    """A distinct file stem per input (clip, clip-2, ...)."""
    names, seen = [], {}
    for p in inputs:
        base = p.name if p.is_dir() else p.stem
        base = base or "input"
        n = seen.get(base, 0) + 1
        seen[base] = n
        names.append(base if n == 1 else f"{base}-{n}")
    return names


def run_predict(
    inputs: list[Path],
    out: Path,
    model: str | None = None,
    post: Path | None = None,
    every: int = 1,
    detect_every: int = 1,
    batch_size: int = 64,
    device: str = "cpu",
    max_faces: int | None = None,
    min_face_size: str = "auto",
    smoothing: str = "none",
    fmt: str = "csv",
    plot: bool = False,
    video: bool = False,
    report: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    min_confidence: float | None = None,
    keep_nested: bool = False,
    reid_memory: float | None = None,
) -> tuple[int, int]:
    """The command's work; returns (succeeded, failed) input counts."""
    from mtaffect.io import check_writable
    from mtaffect.predict.outputs import check_format, write_table
    from mtaffect.predict.pipeline import Predictor, streaming_threads
    from mtaffect.predict.report import ReportInput, write_report

    detection = {} if min_confidence is None else {"min_confidence": min_confidence}
    if keep_nested:
        detection["nested_overlap"] = None
    if reid_memory is not None:
        detection["reid_memory"] = reid_memory

    fmt = check_format(fmt)
    mfs: float | str = "auto" if min_face_size == "auto" else float(min_face_size)
    names = _output_names(inputs)
    tables = [out / f"{n}.{fmt}" for n in names]
    report_path = out / "report.html"
    for p in [*tables, *([report_path] if report else [])]:
        check_writable(p, overwrite)  # fail before any work, not after an hour of video
    predictor = Predictor(
        model=model,
        device=device,
        batch_size=batch_size,
        detect_every=detect_every,
        max_faces=max_faces,
        min_face_size=mfs,
        every=every,
        post=post,
        smoothing=smoothing,
        num_threads=streaming_threads(),
        **detection,
    )
    card = _model_card(predictor)
    report_inputs: list[ReportInput] = []
    ok_count = fail_count = 0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, disable=not progress, transient=False) as bar:
        for arg, name, table_path in zip(inputs, names, tables, strict=True):
            task = bar.add_task(name, total=None)

            def started(info, task=task, is_dir=arg.is_dir()):
                if not is_dir:  # a folder keeps its name and counts frames without a total
                    bar.update(task, description=Path(info.file).name, total=info.expected_analysed)

            results, frames = [], []
            try:
                for res in predictor.iter_predict(
                    arg, progress=lambda n, t=task: bar.advance(t, n), on_start=started
                ):
                    results.append(res)
            except ValueError as e:  # e.g. an empty folder
                from mtaffect.predict.outputs import empty_table
                from mtaffect.predict.pipeline import FileResult
                from mtaffect.predict.sources import SourceInfo

                results.append(FileResult(SourceInfo(str(arg), "unknown"), empty_table(), error=str(e)))
            bar.update(task, completed=bar.tasks[task].completed, total=bar.tasks[task].completed or 1)
            good = [r for r in results if r.ok]
            for r in results:
                if not r.ok:
                    fail_count += 1
                    err_console.print(f"[bold red]error:[/] {r.error}", highlight=False, soft_wrap=True)
                    report_inputs.append(ReportInput(r.info, r.table, error=r.error))
            if not good:
                continue
            ok_count += len(good)
            import pandas as pd

            frames = [r.table for r in good if len(r.table)]
            table = pd.concat(frames, ignore_index=True) if frames else good[0].table
            write_table(table, table_path, fmt, overwrite=overwrite)
            written = [str(table_path)]
            for r in good:
                outputs = [str(table_path)]
                pngs = {}
                if plot or report:
                    from mtaffect.predict.plots import timeline_pngs, write_png

                    pngs = timeline_pngs(r.table, r.info.file)
                    if plot:
                        stem = name if len(good) == 1 else f"{name}_{Path(r.info.file).stem}"
                        for fid, data in pngs.items():
                            p = write_png(data, out / f"{stem}_face{fid}.png", overwrite=overwrite)
                            outputs.append(str(p))
                            written.append(str(p))
                if (plot or video) and r.info.kind == "image":
                    from mtaffect.predict.annotate import annotate_image

                    stem = name if len(good) == 1 else f"{name}_{Path(r.info.file).stem}"
                    p = annotate_image(
                        r.info.file, r.table, out / f"{stem}_annotated.jpg", overwrite=overwrite
                    )
                    outputs.append(str(p))
                    written.append(str(p))
                if video and r.info.kind == "video":
                    from mtaffect.predict.annotate import annotate_video

                    stem = name if len(good) == 1 else f"{name}_{Path(r.info.file).stem}"
                    p = annotate_video(
                        r.info.file, r.table, out / f"{stem}_annotated.mp4", overwrite=overwrite
                    )
                    outputs.append(str(p))
                    written.append(str(p))
                report_inputs.append(ReportInput(r.info, r.table, pngs, r.seconds, r.analysed, outputs))
            n_frames = sum(r.analysed for r in good)
            secs = sum(r.seconds for r in good)
            n_faces = int(table.loc[table["success"] == 1].groupby(["file", "face_id"]).ngroups)
            rate = f", {n_frames / secs:.1f} frames/s" if secs > 0 else ""
            console.print(
                f"{arg}: {n_frames} frames, {n_faces} face track(s){rate} -> {', '.join(written)}",
                highlight=False,
                soft_wrap=True,
            )
    if report:
        settings = {
            "every": every,
            "detect_every": detect_every,
            "min_face_size": min_face_size,
            "max_faces": max_faces,
            "smoothing": smoothing,
            "post": post or "none",
            "min_confidence": predictor.min_confidence,
            "nested_overlap": predictor.nested_overlap,
            "reid_memory_s": predictor.reid_memory,
        }
        write_report(report_path, report_inputs, card, settings, overwrite=overwrite)
        console.print(f"wrote {report_path}")
    if fail_count:
        err_console.print(f"{fail_count} of {ok_count + fail_count} input(s) failed", highlight=False)
    return ok_count, fail_count


def _model_card(predictor) -> dict:
    m = predictor.model
    card = m.card() if hasattr(m, "card") else {}
    card = {str(k): str(v) for k, v in card.items()}
    if "name" not in card:
        card["name"] = str(getattr(m, "name", type(m).__name__))
    card.setdefault("backbone", m.backbone)
    card["AU thresholds"] = ", ".join(f"{t:.2f}" for t in predictor.au_thresholds)
    return card


def register(app: typer.Typer) -> None:
    """Add ``predict`` to ``app``."""

    @app.command()
    @user_errors
    def predict(
        inputs: Annotated[
            list[Path], typer.Argument(help="Images, videos, folders of them, or .txt lists of paths.")
        ],
        out: Annotated[Path, typer.Option(help="Output folder (created).")] = Path("mtaffect_out"),
        model: Annotated[
            str | None,
            typer.Option(
                help="Trained checkpoint (from `mtaffect train`), or emotiefflib:<model> (e.g. "
                "emotiefflib:enet_b0_8_va_mtl: a local .onnx or EmotiEffLib's cache); default: embedded model"
            ),
        ] = None,
        post: Annotated[
            Path | None, typer.Option(help="Post-processing YAML (from `mtaffect tune`).")
        ] = None,
        every: Annotated[int, typer.Option(help="Analyse every N-th video frame.")] = 1,
        detect_every: Annotated[
            int, typer.Option(help="Full face detection every K analysed frames; tracking in between.")
        ] = 1,
        batch_size: Annotated[int, typer.Option(help="Faces per backbone batch.")] = 64,
        device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
        max_faces: Annotated[int | None, typer.Option(help="Keep the K largest faces per frame.")] = None,
        min_face_size: Annotated[
            str,
            typer.Option(
                help="Smallest face in pixels, or 'auto': the larger of 40 px (stills: 20) and 1/30 of "
                "the frame's shorter side."
            ),
        ] = "auto",
        smoothing: Annotated[
            str, typer.Option(help="Per-track smoothing: none, causal or centred.")
        ] = "none",
        fmt: Annotated[str, typer.Option("--format", help="Table format: csv or parquet.")] = "csv",
        min_confidence: Annotated[
            float,
            typer.Option(help="Drop detections with a lower face probability (0.9 measured on real photos)."),
        ] = 0.9,
        keep_nested: Annotated[
            bool, typer.Option("--keep-nested", help="Keep faces detected inside a larger face.")
        ] = False,
        reid_memory: Annotated[
            float,
            typer.Option(
                help="Seconds a face that left is remembered and re-identified by appearance (0: off)."
            ),
        ] = 30.0,
        plot: Annotated[
            bool, typer.Option("--plot", help="Timeline PNG per face; annotated JPEG per still image.")
        ] = False,
        video: Annotated[
            bool, typer.Option("--video", help="Annotated MP4 per video; annotated JPEG per still image.")
        ] = False,
        report: Annotated[bool, typer.Option("--report", help="One self-contained HTML report.")] = False,
        overwrite: Overwrite = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    ) -> None:
        """Faces, 12 AUs, 8 expressions and valence/arousal for every frame of images and videos.

        Exit status: 0 if at least one input succeeded, 1 if all failed, 2 for a usage error.
        """
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if min_face_size != "auto":
            try:
                float(min_face_size)
            except ValueError as e:
                raise ValueError(f"--min-face-size must be 'auto' or a number, got {min_face_size!r}") from e
        good, _ = run_predict(
            inputs, out, model, post, every, detect_every, batch_size, device, max_faces, min_face_size,
            smoothing, fmt, plot, video, report, overwrite, progress=not quiet,
            min_confidence=min_confidence, keep_nested=keep_nested, reid_memory=reid_memory,
        )  # fmt: skip
        if good == 0:
            raise typer.Exit(1)
