"""``mtaffect predict``: the application command (wired into the main app with :func:`register`).

Each INPUT (an image, a video, a folder of them, a .txt list of paths, a stream URL, a camera number)
gives one table ``OUT/<name>.<format>`` (a folder or list: one table for all its files), plus with
``--plot`` a timeline PNG per face (``OUT/<name>_face<id>.png``), with ``--video`` an annotated copy of
each video (``OUT/<name>_annotated.mp4``), with ``--plot`` or ``--video`` an annotated copy of each
still image (``OUT/<name>_annotated.jpg``), and with ``--report`` one HTML page ``OUT/report.html``.

Each table is a resumable job: rows are written as they are produced into a hidden partial folder, a
killed run resumes when the same command is rerun, and the table appears only when complete.

An unreadable input is reported (file and reason) and counted; the other inputs are still processed.
Exit status: 0 when at least one input succeeded, 1 when every input failed, 2 for a usage error
(bad option, existing output without ``--overwrite``, an unusable ``--out`` or ``--device``), 130 when
interrupted (rerun to resume).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from mtaffect.clikit import Overwrite, TrustRemoteCode, console, err_console, user_errors, warn


class _RateColumn(ProgressColumn):
    """Frames per second of the running task."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:5.1f} frames/s" if speed else "  ... frames/s", style="cyan")


def _output_names(inputs: list[str]) -> list[str]:
    """A distinct file stem per input (clip, clip-2, ...); URLs and cameras get a name of their own."""
    from urllib.parse import urlsplit

    from mtaffect.predict.sources import StreamInput, classify

    names, seen = [], {}
    for arg in inputs:
        try:
            item = classify(arg)
        except ValueError:
            item = Path(arg)
        if isinstance(item, StreamInput):
            parts = urlsplit(item.url)
            base = item.name or Path(parts.path).stem or (parts.hostname or "stream")
        else:
            p = Path(item)
            base = p.name if p.is_dir() else p.stem
        base = re.sub(r"[^\w.-]+", "_", base).strip("._") or "input"
        n = seen.get(base, 0) + 1
        seen[base] = n
        names.append(base if n == 1 else f"{base}-{n}")
    return names


def run_predict(
    inputs: list[str],
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
    *,
    recursive: bool = False,
    aligned: bool = False,
    sequences: bool = True,
    fps: float | None = None,
    temporal: str = "centred",
    resume: bool = True,
    trust_remote_code: bool = False,
    min_confidence: float | None = None,
    keep_nested: bool = False,
    reid_memory: float | None = None,
    engine: str = "torch",
    precision: str | None = None,
) -> tuple[int, int]:
    """The command's work; returns (succeeded, failed) input counts.

    Everything that can be checked is checked before the model loads: the output folder (not a file,
    creatable, not in use by another run), existing outputs, the device. Each INPUT's table is a
    resumable job (:func:`mtaffect.predict.job.predict_to_file`).
    """
    from mtaffect.io import check_writable
    from mtaffect.predict.engines import check_device, is_export_folder
    from mtaffect.predict.job import OutputFolder
    from mtaffect.predict.outputs import check_format
    from mtaffect.predict.pipeline import Predictor, source_warnings, streaming_threads
    from mtaffect.predict.report import ReportInput, write_report

    detection = {} if min_confidence is None else {"min_confidence": min_confidence}
    if keep_nested:
        detection["nested_overlap"] = None
    if reid_memory is not None:
        detection["reid_memory"] = reid_memory

    fmt = check_format(fmt)
    check_device(engine, device)
    if fps is not None and not fps > 0:
        raise ValueError(f"--fps must be a positive number of frames per second, got {fps}")
    names = _output_names(inputs)
    tables = [out / f"{n}.{fmt}" for n in names]
    report_path = out / "report.html"
    with OutputFolder(out, log=_note):
        for p in [*tables, *([report_path] if report else [])]:
            check_writable(p, overwrite)  # fail before any work, not after an hour of video
        if engine == "onnxruntime" and not is_export_folder(model):
            _note(f"exporting {model or 'default'} for onnxruntime first (10-30 s; `mtaffect export --model "
                  f"{model or 'default'} --out DIR` once, then --model DIR, skips this)")  # fmt: skip
        if trust_remote_code:  # the person's explicit decision for an hf: backbone; never the checkpoint's
            if engine == "onnxruntime":
                raise ValueError("--trust-remote-code is for --engine torch: an export folder runs no code")
            if model in (None, "default"):
                raise ValueError("--trust-remote-code needs --model: the embedded default model runs no code")
            from mtaffect.models.checkpoint import load_model

            model = load_model(model, device=device, trust_remote_code=True)
        predictor = Predictor(
            model=model, device=device, batch_size=batch_size, detect_every=detect_every,
            max_faces=max_faces, min_face_size="auto" if min_face_size == "auto" else float(min_face_size),
            every=every, post=post, smoothing=smoothing, num_threads=streaming_threads(), aligned=aligned,
            temporal=temporal, engine=engine, precision=precision, **detection,
        )  # fmt: skip
        job = {"overwrite": overwrite, "resume": resume, "fps": fps, "recursive": recursive,
               "sequences": sequences}  # fmt: skip
        extras = {"plot": plot, "video": video and not aligned, "report": report, "overwrite": overwrite}
        report_inputs: list[ReportInput] = []
        ok_count = fail_count = 0
        with _progress_bar(progress) as bar:
            for arg, name, table_path in zip(inputs, names, tables, strict=True):
                results = _run_job(predictor, arg, name, table_path, fmt, bar, job)
                for r in results:
                    if not r.ok:
                        err_console.print(
                            f"[bold red]error:[/] {escape(r.error)}", highlight=False, soft_wrap=True
                        )
                        report_inputs.append(ReportInput(r.info, r.table, error=r.error))
                    for msg in source_warnings(r.info):
                        warn(msg)
                good = [r for r in results if r.ok]
                ok_count, fail_count = ok_count + len(good), fail_count + len(results) - len(good)
                if good:
                    report_inputs += _write_extras(arg, good, name, table_path, **extras)
        if report:
            settings = {"every": every, "detect_every": detect_every, "min_face_size": min_face_size,
                        "max_faces": max_faces, "smoothing": smoothing, "post": post or "none",
                        "aligned": aligned, "min_confidence": predictor.min_confidence,
                        "nested_overlap": predictor.nested_overlap,
                        "reid_memory_s": predictor.reid_memory}  # fmt: skip
            if predictor.window > 1:
                settings["temporal"] = f"{temporal} (window {predictor.window})"
            write_report(report_path, report_inputs, _model_card(predictor), settings, overwrite=overwrite)
            console.print(f"wrote {report_path}")
    if fail_count:
        err_console.print(f"{fail_count} of {ok_count + fail_count} input(s) failed", highlight=False)
    return ok_count, fail_count


def _note(msg: str) -> None:
    err_console.print(f"note: {escape(msg)}", highlight=False, soft_wrap=True)


def _progress_bar(enabled: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
               TimeElapsedColumn())  # fmt: skip
    return Progress(*columns, console=err_console, disable=not enabled, transient=False)


def _run_job(predictor, arg: str, name: str, table_path: Path, fmt: str, bar: Progress, job: dict) -> list:
    """One INPUT's table as a resumable job; its warnings printed; Ctrl-C keeps the partial rows."""
    from mtaffect.predict.job import partial_dir, predict_to_file
    from mtaffect.predict.outputs import empty_table
    from mtaffect.predict.pipeline import FileResult
    from mtaffect.predict.sources import SourceInfo

    task = bar.add_task(name, total=None)

    def started(info, is_dir=Path(arg).is_dir()):
        if not is_dir:  # a folder keeps its name and counts frames without a total
            bar.update(task, description=Path(info.file).name, total=info.expected_analysed)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = predict_to_file(
                predictor, arg, table_path, fmt, **job, log=_note, on_start=started,
                progress=lambda n: bar.advance(task, n),
            )  # fmt: skip
    except ValueError as e:  # e.g. an empty folder: this input fails, the others go on
        results = [FileResult(SourceInfo(str(arg), "unknown"), empty_table(), error=str(e))]
    except KeyboardInterrupt:
        bar.stop()
        err_console.print(
            f"interrupted: the rows so far are kept in {partial_dir(table_path)}; rerun the same command "
            "to resume",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    for w in caught:
        warn(str(w.message))
    bar.update(task, completed=bar.tasks[task].completed, total=bar.tasks[task].completed or 1)
    return results


def _write_extras(
    arg: str, good: list, name: str, table_path: Path, plot: bool, video: bool, report: bool, overwrite: bool
) -> list:
    """Timelines, annotated videos and report entries of an INPUT's successful results; one summary line."""
    from mtaffect.predict.report import ReportInput

    out = table_path.parent
    written = [str(table_path)]
    report_inputs = []
    for r, stem in zip(good, _file_stems(name, [r.info.file for r in good]), strict=True):
        outputs = [str(table_path)]
        pngs = {}
        if plot or report:
            from mtaffect.predict.plots import timeline_pngs, write_png

            pngs = timeline_pngs(r.table, r.info.file)
            if plot:
                for fid, data in pngs.items():
                    outputs.append(str(write_png(data, out / f"{stem}_face{fid}.png", overwrite=overwrite)))
        if (plot or video) and r.info.kind == "image":
            from mtaffect.predict.annotate import annotate_image

            p = annotate_image(r.info.file, r.table, out / f"{stem}_annotated.jpg", overwrite=overwrite)
            outputs.append(str(p))
        if video and r.info.kind == "video":
            from mtaffect.predict.annotate import annotate_video

            p = annotate_video(r.info.file, r.table, out / f"{stem}_annotated.mp4", overwrite=overwrite)
            outputs.append(str(p))
        written += outputs[1:]
        report_inputs.append(ReportInput(r.info, r.table, pngs, r.seconds, r.analysed, outputs))
    n_frames = sum(r.analysed for r in good)
    secs = sum(r.seconds for r in good)
    n_faces = sum(
        int(r.table.loc[r.table["success"] == 1].groupby(["file", "face_id"]).ngroups) for r in good
    )
    rate = f", {n_frames / secs:.1f} frames/s" if secs > 0 else ""
    console.print(
        f"{arg}: {n_frames} frames, {n_faces} face track(s){rate} -> {', '.join(written)}",
        highlight=False,
        soft_wrap=True,
    )
    return report_inputs


def _file_stems(name: str, files: list[str]) -> list[str]:
    """Output stems of an INPUT's files: ``name`` alone for one file, else ``name_<file stem>``, with the
    parent folders added where two files share a stem (``--recursive``: ``a/00001.jpg``, ``b/00001.jpg``)."""
    if len(files) == 1:
        return [name]
    paths = [Path(f) for f in files]
    depth = 1
    while True:
        stems = ["_".join((*p.parent.parts[len(p.parent.parts) - depth + 1 :], p.stem)) for p in paths]
        if len(set(stems)) == len(stems) or depth > max(len(p.parts) for p in paths):
            return [f"{name}_{s}" for s in stems]
        depth += 1


def _model_card(predictor) -> dict:
    card = predictor.engine.card()
    card["AU thresholds"] = ", ".join(f"{t:.2f}" for t in predictor.au_thresholds)
    return card


def register(app: typer.Typer) -> None:
    """Add ``predict`` to ``app``."""

    @app.command()
    @user_errors
    def predict(
        inputs: Annotated[
            list[str],
            typer.Argument(
                help="Images, videos, folders of them, .txt lists of paths, stream URLs (rtsp://, "
                "http(s)://...) or a camera number (0 = the first camera)."
            ),
        ],
        out: Annotated[Path, typer.Option(help="Output folder (created).")] = Path("mtaffect_out"),
        model: Annotated[
            str | None,
            typer.Option(
                help="Trained checkpoint (from `mtaffect train`), or emotiefflib:<model> (e.g. "
                "emotiefflib:enet_b0_8_va_mtl: a local .onnx or EmotiEffLib's cache), or with --engine "
                "onnxruntime an export folder (`mtaffect export`); default: embedded model"
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
        device: Annotated[
            str, typer.Option(help="cpu, cuda, cuda:N (torch: also mps; onnxruntime: CUDA provider).")
        ] = "cpu",
        engine: Annotated[
            str,
            typer.Option(
                help="Run the networks with torch, or onnxruntime (--model: an export folder, or a model "
                "exported first; needs no torch)."
            ),
        ] = "torch",
        precision: Annotated[
            str | None,
            typer.Option(
                help="onnxruntime: float32 (default) or int8 (an export made with --quantize: smaller, "
                "not faster on CPU)."
            ),
        ] = None,
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
        recursive: Annotated[
            bool, typer.Option("--recursive", "-r", help="Search folders' subfolders too.")
        ] = False,
        aligned: Annotated[
            bool,
            typer.Option(
                "--aligned",
                help="Inputs are already cropped, aligned faces (s-Aff-Wild2 cropped_aligned): no "
                "detection, one face per image, decoded as `extract` decodes them.",
            ),
        ] = False,
        stills: Annotated[
            bool,
            typer.Option(
                "--stills", help="Folders of numbered images are separate stills, not frame sequences."
            ),
        ] = False,
        fps: Annotated[
            float | None,
            typer.Option(help="Frame rate of frame sequences (folders of numbered images): gives times."),
        ] = None,
        temporal: Annotated[
            str,
            typer.Option(
                help="Temporal checkpoints: centred (their training windows over each face track) or "
                "causal (a window ending at each frame, for live use)."
            ),
        ] = "centred",
        no_resume: Annotated[
            bool,
            typer.Option(
                "--no-resume", help="Start again instead of resuming the unfinished rows of a killed run."
            ),
        ] = False,
        overwrite: Overwrite = False,
        trust_remote_code: TrustRemoteCode = False,
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
            smoothing, fmt, plot, video, report, overwrite, progress=not quiet, recursive=recursive,
            aligned=aligned, sequences=not stills, fps=fps, temporal=temporal, resume=not no_resume,
            trust_remote_code=trust_remote_code, min_confidence=min_confidence, keep_nested=keep_nested,
            reid_memory=reid_memory, engine=engine, precision=precision,
        )  # fmt: skip
        if good == 0:
            raise typer.Exit(1)
