"""``mtaffect predict``: the application command (wired into the main app with :func:`register`).

Each INPUT (an image, a video, a folder of them, a .txt list of paths, a stream URL, a camera number)
gives one table ``OUT/<name>.<format>`` (a folder or list: one table for all its files; two or more
still images on the command line share ``OUT/images.<format>``, :func:`mtaffect.predict.extras.input_tables`),
plus with ``--plot`` a timeline PNG per face (``OUT/<name>_face<id>.png``), with ``--video`` an annotated
copy of each video (``OUT/<name>_annotated.mp4``), with ``--plot`` or ``--video`` an annotated copy of
each still image (``OUT/<name>_annotated.jpg``), and with ``--report`` one HTML page ``OUT/report.html``.

Each table is a resumable job: rows are written as they are produced into a hidden partial folder, a
killed run resumes when the same command is rerun, and the table appears only when complete.

Per-file mode (``--per-file``; ``--workers N`` and ``--shard K/N`` imply it) gives each file its own
table, claimed on its own, so that many processes share one ``--out`` (:mod:`mtaffect.predict.archive`);
``mtaffect collect OUT`` (or ``--combine``) then writes one table over the folder.

An unreadable input is reported (file and reason) and counted; the other inputs are still processed.
Exit status: 0 when at least one input succeeded, 1 when every input failed, 2 for a usage error
(bad option, existing output without ``--overwrite``, an unusable ``--out`` or ``--device``), 130 when
interrupted (rerun to resume).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from mtaffect.clikit import Overwrite, TrustRemoteCode, console, err_console, user_errors, warn

if TYPE_CHECKING:
    from collections.abc import Callable

    from mtaffect.predict.extras import TableInputs


class _RateColumn(ProgressColumn):
    """Frames per second of the running task."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:5.1f} frames/s" if speed else "  ... frames/s", style="cyan")


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
    per_file: bool = False,
    workers: int = 1,
    shard: str | None = None,
    combine: bool = False,
    landmarks: str = "compact",
    draw: tuple[str, ...] = (),
) -> tuple[int, int]:
    """The command's work; returns (succeeded, failed) input counts (files in per-file mode).

    Everything that can be checked is checked before the model loads: the output folder (not a file,
    creatable, not in use by another run), existing outputs, the device. Each INPUT's table is a
    resumable job (:func:`mtaffect.predict.job.predict_to_file`); in per-file mode (``per_file``, or
    ``workers`` > 1, or a ``shard``) each file's is (:mod:`mtaffect.predict.archive`).
    """
    from mtaffect.io import check_writable
    from mtaffect.predict.archive import UnitOptions, model_identity
    from mtaffect.predict.engines import check_device, is_export_folder
    from mtaffect.predict.extras import input_tables, model_card, summary_line, write_extras
    from mtaffect.predict.job import OutputFolder
    from mtaffect.predict.outputs import check_format
    from mtaffect.predict.pipeline import source_warnings, streaming_threads
    from mtaffect.predict.report import ReportInput, write_report
    from mtaffect.predict.workers import build_predictor

    detection: dict[str, float | None] = {} if min_confidence is None else {"min_confidence": min_confidence}
    if keep_nested:
        detection["nested_overlap"] = None
    if reid_memory is not None:
        detection["reid_memory"] = reid_memory
    from mtaffect.predict.annotate import DEFAULT_DRAW, DRAW_LAYERS

    extra_layers = [d for d in DRAW_LAYERS if d not in DEFAULT_DRAW]  # what --draw adds to the faces
    draw = tuple(dict.fromkeys(draw))
    unknown = [d for d in draw if d not in extra_layers]
    if unknown:
        raise ValueError(f"--draw takes {', '.join(extra_layers)}, got {unknown[0]!r}")
    if "landmarks" in draw:
        if landmarks == "none":
            raise ValueError("--draw landmarks needs the landmarker: drop --landmarks none")
        if landmarks == "compact":  # the points are drawn from the table's x_i, y_i columns
            landmarks = "dense"
        if not (plot or video):
            raise ValueError("--draw landmarks draws on the annotated copies: add --video or --plot")

    fmt = check_format(fmt)
    check_device(engine, device)
    if fps is not None and not fps > 0:
        raise ValueError(f"--fps must be a positive number of frames per second, got {fps}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be 1 or more, got {workers}")
    per_file = per_file or workers > 1 or shard is not None
    if workers > 1 and engine == "onnxruntime" and not is_export_folder(model):
        raise ValueError(
            f"--workers with --engine onnxruntime runs an export folder: every worker would export "
            f"{model or 'default'} again (10-30 s each); export it once with `mtaffect export --model "
            f"{model or 'default'} --out DIR`, then pass --model DIR"
        )
    if combine and not per_file:
        raise ValueError(
            "--combine combines the tables of a per-file run: add --per-file (or --workers/--shard), or run "
            "`mtaffect collect OUT` on such a folder"
        )
    if trust_remote_code:  # the person's explicit decision for an hf: backbone; never the checkpoint's
        if engine == "onnxruntime":
            raise ValueError("--trust-remote-code is for --engine torch: an export folder runs no code")
        if model in (None, "default"):
            raise ValueError("--trust-remote-code needs --model: the embedded default model runs no code")
    kwargs = dict(
        model=model,
        device=device,
        batch_size=batch_size,
        detect_every=detect_every,
        max_faces=max_faces,
        min_face_size="auto" if min_face_size == "auto" else float(min_face_size),
        every=every,
        post=post,
        smoothing=smoothing,
        aligned=aligned,
        temporal=temporal,
        engine=engine,
        precision=precision,
        landmarks=landmarks,
        **detection,
    )
    settings = {
        "every": every,
        "detect_every": detect_every,
        "min_face_size": min_face_size,
        "max_faces": max_faces,
        "smoothing": smoothing,
        "post": post or "none",
        "aligned": aligned,
        "landmarks": landmarks,
    }
    layers = (*DEFAULT_DRAW, *draw) if draw else None  # the annotated copies' layers (None: the default)
    if per_file:
        opts = UnitOptions(
            out,
            fmt,
            overwrite,
            resume,
            fps,
            plot,
            video,
            report,
            report_settings=settings,
            model=model_identity(model),
            draw=layers,
        )
        return _run_per_file(
            inputs,
            opts,
            kwargs,
            workers=workers,
            shard=shard,
            combine=combine,
            progress=progress,
            recursive=recursive,
            sequences=sequences,
            trust_remote_code=trust_remote_code,
        )
    groups = input_tables(inputs)
    tables = [out / f"{g.name}.{fmt}" for g in groups]
    report_path = out / "report.html"
    with OutputFolder(out, log=_note):
        for p in [*tables, *([report_path] if report else [])]:
            check_writable(p, overwrite)  # fail before any work, not after an hour of video
        if engine == "onnxruntime" and not is_export_folder(model):
            _note(
                f"exporting {model or 'default'} for onnxruntime first (10-30 s; `mtaffect export --model "
                f"{model or 'default'} --out DIR` once, then --model DIR, skips this)"
            )
        predictor = build_predictor(kwargs, streaming_threads(), trust_remote_code)
        job = {
            "overwrite": overwrite,
            "resume": resume,
            "fps": fps,
            "recursive": recursive,
            "sequences": sequences,
            "identity": model_identity(model),
        }
        report_inputs: list[ReportInput] = []
        ok_count = fail_count = 0
        said: set[str] = set()  # a note about many inputs, once
        with _progress_bar(progress) as bar:
            for group, table_path in zip(groups, tables, strict=True):
                results = _run_job(predictor, group, table_path, fmt, bar, job)
                for r in results:
                    if not r.ok:
                        err_console.print(
                            f"[bold red]error:[/] {escape(r.error)}", highlight=False, soft_wrap=True
                        )
                        report_inputs.append(ReportInput(r.info, r.table, error=r.error))
                    for msg in source_warnings(r.info):
                        if msg not in said:
                            said.add(msg)
                            warn(msg)
                good = [r for r in results if r.ok]
                ok_count, fail_count = ok_count + len(good), fail_count + len(results) - len(good)
                if good:  # the stills' table: each photo's outputs keep its own name
                    entries, written = write_extras(
                        good,
                        "" if group.stills else group.name,
                        table_path,
                        plot=plot,
                        video=video,
                        report=report,
                        overwrite=overwrite,
                        draw=layers,
                    )
                    report_inputs += entries
                    _say(summary_line(group.label, good, written), bar)
        if report:
            settings = _report_settings(settings, predictor, temporal)
            write_report(report_path, report_inputs, model_card(predictor), settings, overwrite=overwrite)
            console.print(f"wrote {report_path}")
    if fail_count:
        err_console.print(f"{fail_count} of {ok_count + fail_count} input(s) failed", highlight=False)
    return ok_count, fail_count


def _report_settings(settings: dict, predictor, temporal: str) -> dict:
    """The settings line of the report: the options given and what the predictor resolved."""
    settings = {
        **settings,
        "min_confidence": predictor.min_confidence,
        "nested_overlap": predictor.nested_overlap,
        "reid_memory_s": predictor.reid_memory,
    }
    if predictor.window > 1:
        settings["temporal"] = f"{temporal} (window {predictor.window})"
    return settings


def _say(text: str, bar: Progress | None = None) -> None:
    """A result line on standard output; above a live progress bar (which is on standard error) when
    both are the terminal: printed past the bar, it would be drawn over."""
    if bar is not None and bar.live.is_started and not bar.disable and console.is_terminal:
        bar.console.print(text, highlight=False, soft_wrap=True)
    else:
        console.print(text, highlight=False, soft_wrap=True)


def _note(msg: str) -> None:
    err_console.print(f"note: {escape(msg)}", highlight=False, soft_wrap=True)


def _progress_bar(enabled: bool) -> Progress:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=err_console, disable=not enabled, transient=False)


def _run_job(predictor, group: TableInputs, table_path: Path, fmt: str, bar: Progress, job: dict) -> list:
    """One table's INPUTs (:class:`~mtaffect.predict.extras.TableInputs`) as a resumable job; its
    warnings printed; Ctrl-C keeps the partial rows."""
    from mtaffect.predict.job import partial_dir, predict_to_file
    from mtaffect.predict.outputs import empty_table
    from mtaffect.predict.pipeline import FileResult
    from mtaffect.predict.sources import SourceInfo

    task = bar.add_task(group.name, total=None)
    arg = group.inputs[0] if len(group.inputs) == 1 else list(group.inputs)

    def started(info, one_file=len(group.inputs) == 1 and not Path(group.inputs[0]).is_dir()):
        if one_file:  # a folder or the stills keep their name and count frames without a total
            bar.update(task, description=Path(info.file).name, total=info.expected_analysed)

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = predict_to_file(
                predictor,
                arg,
                table_path,
                fmt,
                **job,
                log=_note,
                on_start=started,
                progress=lambda n: bar.advance(task, n),
            )
    except ValueError as e:  # e.g. an empty folder: this input fails, the others go on
        results = [FileResult(SourceInfo(group.label, "unknown"), empty_table(), error=str(e))]
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


class _ArchiveBar:
    """One progress display for a per-file run: files done, frames analysed (of those expected), the
    overall rate and the time left; the expected total is corrected as each file ends."""

    def __init__(self, enabled: bool, files: int, frames: list[int]) -> None:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("frames"),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
        )
        self.progress = Progress(*columns, console=err_console, disable=not enabled, transient=False)
        self.files, self.done = files, 0
        self.expected = frames
        self.seen: dict[int, int] = {}
        self.task = self.progress.add_task(self._label(), total=max(1, sum(frames)))

    def _label(self) -> str:
        return f"files {self.done}/{self.files}"

    def advance(self, index: int, n: int) -> None:
        self.seen[index] = self.seen.get(index, 0) + n
        self.progress.advance(self.task, n)

    def file_ended(self, index: int) -> None:
        """File ``index`` ended: its expected frames give way to those it analysed in this run (none
        when skipped, part of it when resumed)."""
        self.done += 1
        t = self.progress.tasks[0]
        total = (t.total or 0) - self.expected[index] + self.seen.get(index, 0)
        self.progress.update(self.task, total=max(1, total, t.completed), description=self._label())

    def __enter__(self) -> _ArchiveBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)


def _run_per_file(
    inputs: list[str],
    opts,
    kwargs: dict,
    *,
    workers: int,
    shard: str | None,
    combine: bool,
    progress: bool,
    recursive: bool,
    sequences: bool,
    trust_remote_code: bool,
) -> tuple[int, int]:
    """Per-file mode (:mod:`mtaffect.predict.archive`): plan the files, claim and run this process's
    share (in this process, or on ``workers`` processes), then combine when the folder is complete."""
    import dataclasses
    from functools import partial

    from mtaffect.predict import archive
    from mtaffect.predict.claims import JobRecords
    from mtaffect.predict.collect import check_collect_outputs, collect
    from mtaffect.predict.job import OutputFolder
    from mtaffect.predict.workers import WorkerSpec, build_predictor, run_pool

    k_n = archive.parse_shard(shard) if shard is not None else None
    plan = archive.plan_units(inputs, recursive=recursive, sequences=sequences)
    units = plan.units if k_n is None else plan.shard(*k_n)
    for e in plan.errors:
        err_console.print(f"[bold red]error:[/] {escape(e)}", highlight=False, soft_wrap=True)
    if plan.repeated:
        _note(f"{plan.repeated} file(s) named more than once by the inputs: each runs once")
    cores = os.cpu_count() or 1
    threads = archive.worker_threads(min(workers, max(1, len(units))), cores)
    with OutputFolder(opts.out, log=_note, shared=True):
        if combine or opts.report:
            check_collect_outputs(opts.out, opts.fmt, opts.report, opts.overwrite, combine)
        # built here too, with one worker or many: a model that does not load fails once, before any work
        predictor = build_predictor(kwargs, threads, trust_remote_code)
        opts = dataclasses.replace(
            opts, report_settings=_report_settings(opts.report_settings, predictor, kwargs["temporal"])
        )
        records = archive.read_records(units, opts)  # one read of each file's record for both checks
        archive.check_in_the_way(predictor, units, opts, records)
        state = [archive.file_state(predictor, u, opts, records) for u in units]
        done = {i for i, s in enumerate(state) if s == "done"}
        if done:
            _note(f"{len(done)} of {len(units)} file(s) done earlier with the same settings: skipped")
        every = kwargs["every"]
        frames = [0 if state[i] else archive.expected_frames(u, every) for i, u in enumerate(units)]
        order = [i for i in archive.longest_first(units, frames) if i not in done]
        used = min(workers, max(1, len(order)))
        threads = threads if used == 1 else archive.worker_threads(used, cores)
        where = f" (shard {k_n[0]}/{k_n[1]} of {len(plan.units)})" if k_n else ""
        _note(
            f"{len(order)} file(s) to run{where}; {used} worker(s) x {threads} thread(s) on {cores} core(s)"
            + (" (+1 video decoding thread each)" if used * (threads + 1) <= cores else "")
        )
        if workers > cores:
            warn(f"--workers {workers} is more than the {cores} core(s) here: they will share them")
        tally = {"done": 0, "failed": 0, "skipped": len(done)}
        skipped: dict[str, int] = {"done": len(done)} if done else {}
        said: set[str] = set()  # warnings said once, however many files give them
        with _ArchiveBar(progress, len(order), frames) as bar:

            def ended(index: int, outcome) -> None:
                tally[outcome.status] += 1
                if outcome.status == "skipped":
                    skipped[outcome.why] = skipped.get(outcome.why, 0) + 1
                bar.file_ended(index)
                _print_outcome(outcome, bar.progress, said)

            try:
                if used == 1:
                    for i in order:
                        ended(i, archive.run_unit(predictor, units[i], opts, partial(bar.advance, i)))
                else:
                    spec = WorkerSpec(kwargs, units, opts, trust_remote_code, threads)
                    del predictor
                    events: dict[str, Callable[..., None]] = {
                        "progress": bar.advance,
                        "done": ended,
                        "warning": warn,
                    }
                    run_pool(spec, order, used, lambda kind, *a: events.get(kind, lambda *_: None)(*a))
            except KeyboardInterrupt:
                bar.progress.stop()
                err_console.print(
                    f"interrupted: the rows so far are kept in {opts.out}; rerun the same command to resume",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(130) from None
        why = {
            "done": "done earlier with the same settings",
            "running": "running in another process",
            "failed": "failed in another process during this run",
        }
        detail = "; ".join(f"{n} {why[k]}" for k, n in sorted(skipped.items()))
        console.print(
            f"this process: {tally['done']} file(s) done, {tally['failed']} failed, {tally['skipped']} "
            f"skipped{f' ({detail})' if detail else ''}",
            highlight=False,
            soft_wrap=True,
        )
        if combine or opts.report:
            _finish_folder(plan, opts, JobRecords(opts.out), combine, collect)
    ok = tally["done"] + skipped.get("done", 0) + skipped.get("running", 0)
    failed = tally["failed"] + skipped.get("failed", 0) + len(plan.errors)
    return ok, failed


def _print_outcome(outcome, bar: Progress | None = None, said: set[str] | None = None) -> None:
    """What one file of a per-file run ended with; a warning in ``said`` (one that names no file, such
    as the missing frame rate of frame folders) is not said again, and is added to it."""
    for msg in outcome.notes:
        _note(msg)
    for msg in outcome.warnings:
        if said is None or msg not in said:
            warn(msg)
        if said is not None:
            said.add(msg)
    if outcome.status == "failed":
        err_console.print(
            f"[bold red]error:[/] {escape(outcome.error or 'failed')}", highlight=False, soft_wrap=True
        )
    elif outcome.status == "done" and outcome.why == "extras":
        _say(
            f"{outcome.source}: done earlier; outputs made from its table -> "
            f"{', '.join(outcome.outputs[1:])}",
            bar,
        )
    elif outcome.status == "done":
        rate = f", {outcome.fps:.1f} frames/s" if outcome.seconds > 0 else ""
        _say(
            f"{outcome.source}: {outcome.frames} frames, {outcome.faces} face track(s){rate} -> "
            f"{', '.join(outcome.outputs)}",
            bar,
        )


def _finish_folder(plan, opts, records, combine: bool, collect) -> None:
    """Combine the folder when every file of the plan (every shard) has finished; else say who will."""
    fmt = opts.fmt
    states = [(records.read(u.table_name(fmt)) or {}).get("status") for u in plan.units]
    waiting = sum(s not in ("done", "failed") for s in states)
    if waiting:
        _note(
            f"{waiting} of {len(plan.units)} file(s) are not finished (other shards or processes, or "
            "interrupted): the last run to finish writes the combined outputs, or run `mtaffect collect "
            f"{opts.out}`"
        )
    elif "done" not in states:
        _note("no file of these inputs is done: nothing to combine")
    else:
        found = collect(opts.out, fmt, report=opts.report, overwrite=opts.overwrite, combine=combine)
        _print_collected(found)


def _print_collected(found) -> None:
    """What a collect wrote, and what it left out."""
    console.print(
        f"combined {len(found.done)} file(s), {found.rows} row(s) -> "
        + ", ".join(str(p) for p in found.written),
        highlight=False,
        soft_wrap=True,
    )
    if found.settings > 1:
        warn(
            f"the combined files were made with {found.settings} different settings or models (several "
            "runs into one folder); their job records in .mtaffect-jobs/ say which"
        )
    if found.superseded:
        warn(
            f"{len(found.superseded)} older table(s) of files combined from a newer one: "
            + ", ".join(found.superseded[:5])
        )
    for name, error in found.failed.items():
        warn(f"{name}: failed: {error}")
    if found.running:
        warn(f"{len(found.running)} file(s) still running: {', '.join(found.running[:5])}")
    if found.unfinished:
        warn(
            f"{len(found.unfinished)} file(s) unfinished (a killed run; rerun predict to resume): "
            + ", ".join(found.unfinished[:5])
        )


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
            bool,
            typer.Option(
                "--video",
                help="Annotated MP4 per video and per folder of numbered frames (at --fps); annotated JPEG "
                "per still image.",
            ),
        ] = False,
        report: Annotated[
            bool,
            typer.Option(
                "--report",
                help="One self-contained HTML report (per-file runs: a page per file, and an index "
                "OUT/report.html when every file is done).",
            ),
        ] = False,
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
        per_file: Annotated[
            bool,
            typer.Option(
                "--per-file",
                help="One table per file (OUT/<stem>.<format>; without it, the still images named on "
                "the command line share OUT/images.<format>), each claimed and resumed on its own: "
                "many processes (or machines) may run the same command into the same --out.",
            ),
        ] = False,
        workers: Annotated[
            int,
            typer.Option(
                help="Processes running files in parallel, each with its own model and a fair share of "
                "the CPU threads (implies --per-file).",
            ),
        ] = 1,
        shard: Annotated[
            str | None,
            typer.Option(
                help="K/N: run only shard K of N (1-based) of the files, split by a stable hash of their "
                "paths: one array job per shard (implies --per-file).",
            ),
        ] = None,
        landmarks: Annotated[
            str,
            typer.Option(
                help="Face landmarker (MediaPipe's 478 points): compact (pose, gaze, 52 blendshapes, AU "
                "evidence and intensities), dense (also x_0..x_477, y_.., z_.. columns) or none (faster; "
                "pose from five points).",
            ),
        ] = "compact",
        draw: Annotated[
            list[str] | None,
            typer.Option(
                help="Extra layers on the annotated copies (--video/--plot): landmarks (the 478 points; "
                "implies --landmarks dense). Repeat for several.",
            ),
        ] = None,
        combine: Annotated[
            bool,
            typer.Option(
                "--combine",
                help="Per-file runs: when every file is done, write OUT/combined.<format> and "
                "OUT/combined_summary.csv over the whole folder (see `mtaffect collect`).",
            ),
        ] = False,
    ) -> None:
        """Faces, 12 AUs, 8 expressions and valence/arousal for every frame of images and videos.

        Exit status: 0 if at least one input succeeded (per-file runs: or nothing was left to do), 1 if
        all failed, 2 for a usage error, 130 when interrupted (rerun to resume).
        """
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if min_face_size != "auto":
            try:
                float(min_face_size)
            except ValueError as e:
                raise ValueError(f"--min-face-size must be 'auto' or a number, got {min_face_size!r}") from e
        good, failed = run_predict(
            inputs,
            out,
            model,
            post,
            every,
            detect_every,
            batch_size,
            device,
            max_faces,
            min_face_size,
            smoothing,
            fmt,
            plot,
            video,
            report,
            overwrite,
            progress=not quiet,
            recursive=recursive,
            aligned=aligned,
            sequences=not stills,
            fps=fps,
            temporal=temporal,
            resume=not no_resume,
            trust_remote_code=trust_remote_code,
            min_confidence=min_confidence,
            keep_nested=keep_nested,
            reid_memory=reid_memory,
            engine=engine,
            precision=precision,
            per_file=per_file,
            workers=workers,
            shard=shard,
            combine=combine,
            landmarks=landmarks,
            draw=tuple(draw or ()),
        )
        if good == 0 and failed:  # a shard with no file, or all done earlier, is not a failure
            raise typer.Exit(1)

    @app.command()
    @user_errors
    def collect(
        out: Annotated[Path, typer.Argument(help="Output folder of per-file predict runs.")],
        fmt: Annotated[str, typer.Option("--format", help="Combined table format: csv or parquet.")] = "csv",
        report: Annotated[
            bool, typer.Option("--report", help="Also OUT/report.html: one row per file, linked to its page.")
        ] = False,
        overwrite: Overwrite = False,
    ) -> None:
        """Combine what per-file predict runs (--per-file, --workers, --shard) finished in OUT: one table
        (OUT/combined.<format>) and one per-face summary (OUT/combined_summary.csv).

        Files still running, failed or unfinished are listed, not combined; rerun predict to finish them.
        """
        from mtaffect.predict.collect import collect as collect_folder

        _print_collected(collect_folder(out, fmt, report=report, overwrite=overwrite))
