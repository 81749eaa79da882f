"""Every parser of a user's file, fed a few hundred random mutations of a valid file.

Through the CLI's own error path (``clikit.user_errors``, in-process: no subprocesses), each mutation
must either parse into something valid or end with exit code 2 and one ``error:`` line naming the
file (and the line, for line-based formats) -- never a traceback, never a silently wrong result.
What a parser accepts is compared with what the file says, read independently (the csv module, JSON,
YAML): every value read is a value written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtaffect import clikit
from mtaffect.data.annotations import LabelTable, read_annotations
from mtaffect.data.predictions import PredictionTable
from mtaffect.data.submission import _IMAGE_RE, read_image_names, read_test_list
from mtaffect.data.units import unsafe_name_reason
from mtaffect.post.config import PostConfig
from mtaffect.schema import AU_NAMES, AU_PROB_COLUMNS, EXPR_PROB_COLUMNS, NUM_EXPR, OFFICIAL_HEADER
from mtaffect.train.config import TrainConfig, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
pytestmark = pytest.mark.slow  # hundreds of parses per test: `make test` and CI run them, not test-fast
EXAMPLES = 250  # per parser (1,500 parses in all)

#: Byte strings a careless or hostile edit tends to introduce.
TOKENS = [
    b",",
    b"\n",
    b"\r",
    b"\r\n",
    b"\x00",
    b"-5",
    b"-1",
    b"nan",
    b"inf",
    b"1e999",
    b"..",
    b"/",
    b"/etc/",
    b"\xff",
    b"\xc3",
    b" ",
    b'"',
    b"'",
    b":",
    b"#",
    b"{",
    b"}",
    b"[",
    b"- ",
    b"\t",
    b"9" * 25,
    "é".encode(),
    b"!!python/object/apply:os.system ['true']",
    b"&a",
    b"*a",
    b"~",
    b"true",
    b"0",
    b"1",
    b"2",
    b".5",
    OFFICIAL_HEADER.encode(),
]

_OP = st.sampled_from(["insert", "delete", "replace", "dup_line", "drop_line", "swap_lines", "truncate"])
_PIECE = st.one_of(st.sampled_from(TOKENS), st.binary(min_size=1, max_size=3))
MUTATIONS = st.lists(st.tuples(_OP, st.integers(0, 1 << 20), _PIECE), min_size=1, max_size=4)


def mutate(data: bytes, ops: list[tuple[str, int, bytes]]) -> bytes:
    """Apply edit operations (positions taken modulo the current length)."""
    for op, pos, piece in ops:
        n = len(data)
        at = pos % (n + 1)
        if op == "insert":
            data = data[:at] + piece + data[at:]
        elif op == "delete":
            data = data[:at] + data[at + len(piece) :]
        elif op == "replace":
            data = data[:at] + piece + data[at + len(piece) :]
        elif op == "truncate":
            data = data[:at]
        else:
            lines = data.split(b"\n")
            i, j = pos % len(lines), (pos // 7) % len(lines)
            if op == "dup_line":
                lines.insert(i, lines[i])
            elif op == "drop_line":
                del lines[i]
            else:
                lines[i], lines[j] = lines[j], lines[i]
            data = b"\n".join(lines)
    return data


def through_cli(fn: Callable[[], object]) -> tuple[object, str | None]:
    """Run ``fn`` as a command runs it: (result, None), or (None, the printed text) on exit code 2.

    Any other exception propagates and fails the test: that is a traceback the user would see.
    """
    code = 0
    with clikit.err_console.capture() as captured, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = clikit.user_errors(fn)()
        except typer.Exit as exc:
            code = exc.exit_code
    if code == 0:
        return result, None
    assert code == 2
    return None, captured.get()


def check_error(text: str, path: Path, *, line_based: bool) -> None:
    """One ``error:`` line naming the file, and its line where the problem is in one."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), text
    message = " ".join(lines)
    assert str(path) in message, message
    assert message.count(f"{path}:") <= 1 or message.count(str(path)) == message.count(f"{path}:"), message
    assert not re.search(re.escape(str(path)) + r":\d+: " + re.escape(str(path)), message), message
    if line_based:
        file_level = ("empty", "binary", "names no images", "no data rows", "not UTF-8")
        assert re.search(re.escape(str(path)) + r":\d+", message) or any(w in message for w in file_level), (
            message
        )


def fuzz_settings(max_examples: int = EXAMPLES, **kw):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,  # the same examples every run: a deterministic test
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        database=None,
        **kw,
    )


# ---- valid files ---------------------------------------------------------------------------------------
def _annotation_bytes(rows: int = 12) -> bytes:
    rng = np.random.default_rng(0)
    lines = [OFFICIAL_HEADER]
    for i in range(rows):
        aus = ",".join(str(int(x)) for x in rng.integers(-1, 2, len(AU_NAMES)))
        lines.append(f"vid{i % 3}/{i + 1:05d}.jpg,{rng.uniform(-1, 1):.3f},-5,{i % 8},{aus}")
    return ("\n".join(lines) + "\n").encode()


def _test_list_bytes() -> bytes:
    return ("image\n" + "".join(f"vid{i % 3}/{i + 1:05d}.jpg,\n" for i in range(12))).encode()


def _predictions_bytes() -> bytes:
    rng = np.random.default_rng(1)
    cols = ["image", "valence", "arousal", *EXPR_PROB_COLUMNS, *AU_PROB_COLUMNS]
    lines = [",".join(cols)]
    for i in range(8):
        expr = rng.dirichlet(np.ones(8))
        vals = [rng.uniform(-1, 1), rng.uniform(-1, 1), *expr, *rng.uniform(0, 1, 12)]
        lines.append(f"vid0/{i + 1:05d}.jpg," + ",".join(f"{v:.4f}" for v in vals))
    return ("\n".join(lines) + "\n").encode()


def _submission_bytes() -> bytes:
    rng = np.random.default_rng(2)
    lines = [OFFICIAL_HEADER]
    for i in range(8):
        aus = ",".join(str(int(x)) for x in rng.integers(0, 2, 12))
        lines.append(f"vid0/{i + 1:05d}.jpg,{rng.uniform(-1, 1):.3f},{rng.uniform(-1, 1):.3f},{i % 8},{aus}")
    return ("\n".join(lines) + "\n").encode()


def _post_bytes() -> bytes:
    return (
        b"format: mtaffect-postproc\nformat_version: 1\n"
        b"kernels: {va: {kind: gaussian, width: 6.0, causal: false}, au: {kind: box, width: 2}}\n"
        b"au_thresholds: {AU1: 0.41, AU2: 0.3, AU26: 0.37}\n"
        b"expr_bias: {Neutral: 0.0, Other: 0.2}\n"
        b"blend_weights: null\ninfo: {tuned_on: val}\n"
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fuzz_one(path: Path, data: bytes, parse: Callable[[Path], object], *, line_based: bool) -> object:
    """Write ``data`` to ``path`` and parse it through the CLI: the result (to check further), or None
    after checking the ``error:`` line."""
    path.write_bytes(data)
    result, err = through_cli(lambda: parse(path))
    if err is not None:
        check_error(err, path, line_based=line_based)
        return None
    return result


def _rows_written(data: bytes) -> dict[str, list[list[str]]]:
    """The data rows of a CSV-like file as the csv module reads them: image -> its rows' other fields."""
    text = data.decode("utf-8-sig", errors="replace")
    rows: dict[str, list[list[str]]] = {}
    for rec in list(csv.reader(io.StringIO(text, newline=None)))[1:]:
        if rec and rec[0].strip():
            rows.setdefault(rec[0].strip(), []).append([c.strip() for c in rec[1:]])
    return rows


def _same(got: list, fields: list[str], dtype) -> bool:
    """Whether the values read equal the fields written (as the reader's dtype rounds them)."""
    try:
        want = np.array([float(f) for f in fields[: len(got)]], dtype=dtype)
    except ValueError:
        return False
    return len(want) == len(got) and bool(np.array_equal(np.asarray(got, dtype), want, equal_nan=True))


def _all_safe(names) -> bool:
    return all(unsafe_name_reason(n) is None for n in names)


# ---- the parsers -----------------------------------------------------------------------------------------
@fuzz_settings()
@given(ops=MUTATIONS)
def test_annotation_files(folder: Path, ops):
    data = mutate(_annotation_bytes(), ops)
    table = fuzz_one(folder / "ann.txt", data, read_annotations, line_based=True)
    if table is not None:
        LabelTable.from_frame(table.frame)  # every row that was read is a valid row
        assert _all_safe(table.images)
        written = _rows_written(data)
        for i, image in enumerate(table.images):  # ... and one the file holds, value for value
            got = [table.valence[i], table.arousal[i], table.expression[i], *table.aus[i]]
            assert any(_same(got, row, np.float32) for row in written[image]), (image, got, written[image])


@fuzz_settings()
@given(ops=MUTATIONS)
def test_test_lists(folder: Path, ops):
    data = mutate(_test_list_bytes(), ops)
    names = fuzz_one(folder / "MTL.txt", data, read_test_list, line_based=True)
    if names is not None:
        assert names and all(_IMAGE_RE.match(n) for n in names) and _all_safe(names)
        assert _in_file_order(names, data)


def _in_file_order(names: list[str], data: bytes) -> bool:
    """Whether ``names`` are first fields of the file's lines, in the file's order (read == written)."""
    text = data.decode("utf-8-sig", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    firsts = iter(line.split(",")[0].strip() for line in text.split("\n"))
    return all(any(name == first for first in firsts) for name in names)


@fuzz_settings()
@given(ops=MUTATIONS, base=st.sampled_from(["annotations", "test list"]))
def test_image_lists_of_either_kind(folder: Path, ops, base):
    data = mutate(_annotation_bytes() if base == "annotations" else _test_list_bytes(), ops)
    names = fuzz_one(folder / "images.txt", data, read_image_names, line_based=True)
    if names is not None:
        assert names and _all_safe(names)
        assert _in_file_order(list(dict.fromkeys(names)), data)


@fuzz_settings()
@given(ops=MUTATIONS, kind=st.sampled_from(["table", "submission"]))
def test_prediction_tables_and_submissions(folder: Path, ops, kind):
    """A PredictionTable CSV, or a challenge submission read as predictions."""
    path = folder / ("pred.csv" if kind == "table" else "submission.txt")
    data = mutate(_predictions_bytes() if kind == "table" else _submission_bytes(), ops)
    table = fuzz_one(path, data, PredictionTable.read, line_based=False)
    if table is not None:
        PredictionTable(table.frame)  # what was read passes validation as a whole
        if kind == "table":  # a submission's labels become probabilities: its rows are checked above
            written = _rows_written(data)
            for i, image in enumerate(table.images):
                got = [table.valence[i], table.arousal[i], *table.expr_probs[i], *table.au_probs[i]]
                assert any(_same(got, row, np.float64) for row in written[image]), (image, got)


@fuzz_settings()
@given(ops=MUTATIONS)
def test_post_configs(folder: Path, ops):
    data = mutate(_post_bytes(), ops)
    config = fuzz_one(folder / "post.yaml", data, PostConfig.load, line_based=False)
    if config is not None:
        assert PostConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
        written = yaml.safe_load(data.decode("utf-8")) or {}
        for name, value in (written.get("au_thresholds") or {}).items():  # read == written
            assert config.au_thresholds[AU_NAMES.index(name)] == pytest.approx(float(value))
        for task, kernel in (written.get("kernels") or {}).items():
            assert config.kernels[task].kind == kernel["kind"]
            assert config.kernels[task].width == pytest.approx(float(kernel["width"]))


@fuzz_settings()
@given(ops=MUTATIONS, recipe=st.sampled_from(sorted(p.name for p in CONFIGS.glob("*.yaml"))))
def test_recipe_configs(folder: Path, ops, recipe):
    path = folder / "recipe.yaml"
    data = mutate((CONFIGS / recipe).read_bytes(), ops)
    config = fuzz_one(path, data, load_config, line_based=False)
    if config is not None:
        assert isinstance(config, TrainConfig)
        written = yaml.safe_load(data.decode("utf-8"))
        model = written.get("model") or {}
        assert config.model.recipe == model["recipe"]  # read == written (a config names its recipe)
        assert config.model.hparams == (model.get("hparams") or {})
        # and what a run folder writes of it (config.yaml) reads back as the same config
        saved = yaml.safe_load(yaml.safe_dump(config.to_dict()))
        assert config_from_dict(saved).to_dict() == config.to_dict()


# ---- the JSON formats of folders (mtaffect.persist's header) -------------------------------------------
def _export_folder(folder: Path) -> Path:
    from mtaffect.persist import EXPORT, header

    root = folder / "export"
    root.mkdir(exist_ok=True)
    files = {}
    for name in ("face_model.onnx", "mtcnn_pnet.onnx", "mtcnn_rnet.onnx", "mtcnn_onet.onnx"):
        (root / name).write_bytes(name.encode())
        files[name] = {"sha256": hashlib.sha256(name.encode()).hexdigest(), "bytes": len(name)}
    manifest = {
        **header(EXPORT),
        "files": files,
        "face_model": {
            "file": "face_model.onnx",
            "int8_file": None,
            "head_file": None,
            "temporal": False,
            "window": None,
            "outputs": {"va": {"shape": ["batch", 2]}},
            "head_inputs": {"features": {"shape": ["batch", 8]}},
            "backbone": {"name": "x"},
        },
        "preprocessing": {"resize": {"size": 64}, "colour": "L"},
        "postprocessing": {"au_thresholds": [0.5] * 12},
        "detector": {"files": {k: f"mtcnn_{k}.onnx" for k in ("pnet", "rnet", "onet")}},
    }
    (root / "export.json").write_text(json.dumps(manifest, indent=1))
    return root


@fuzz_settings()
@given(ops=MUTATIONS)
def test_export_manifests(folder: Path, ops):
    from mtaffect.runtime.manifest import read_manifest

    root = _export_folder(folder)
    data = mutate((root / "export.json").read_bytes(), ops)
    manifest = fuzz_one(root / "export.json", data, lambda p: read_manifest(p.parent), line_based=False)
    if manifest is not None:
        assert manifest == json.loads(data)  # read == written
        for name in manifest["files"]:
            assert (root / name).resolve().parent == root.resolve()  # every file inside the folder


@fuzz_settings()
@given(ops=MUTATIONS)
def test_run_records(folder: Path, ops):
    from mtaffect.persist import RUN, header
    from mtaffect.train.state import read_run

    run = folder / "run"
    run.mkdir(exist_ok=True)
    valid = json.dumps({**header(RUN), "train": {"content_sha256": "ab" * 32}, "stores": {}}).encode()
    data = mutate(valid, ops)
    record = fuzz_one(run / "run.json", data, lambda p: read_run(p.parent), line_based=False)
    if record is not None:
        assert record == json.loads(data)


@fuzz_settings()
@given(ops=MUTATIONS)
def test_per_file_job_records(folder: Path, ops):
    """A damaged record is not trusted (the file is run again), never a traceback nor a wrong record."""
    from mtaffect.persist import JOB_RECORD, header
    from mtaffect.predict.claims import JobRecords

    out = folder / "jobs"
    records = JobRecords(out)
    records.folder.mkdir(parents=True, exist_ok=True)
    valid = json.dumps({**header(JOB_RECORD), "table": "v.csv", "status": "done", "signature": {"a": 1}})
    data = mutate(valid.encode(), ops)
    (records.folder / "v.csv.json").write_bytes(data)
    found, err = through_cli(records.all)
    assert err is None
    if found:
        assert found == {"v.csv": json.loads(data)}


# ---- round trips: what our writers write is what the readers read ------------------------------------------
ROUND_TRIPS = 40  # examples per format
#: Video names a user's data may hold: digits, separators, spaces, non-ASCII (never a comma, a '/' or '..').
_VIDEO = st.text(st.sampled_from("0123456789abcXYZ-_.é字 "), min_size=1, max_size=8).filter(
    lambda v: v.strip() == v and v not in (".", "..")
)
_FRAMES = st.lists(st.integers(0, 99999), min_size=1, max_size=12, unique=True)
_UNIT = st.floats(0, 1, allow_nan=False, width=64)


def _names(videos: list[str], frames: list[int]) -> list[str]:
    return [f"{videos[i % len(videos)]}/{f:05d}.jpg" for i, f in enumerate(frames)]


#: Values a float writer gets wrong first: the ends, the smallest subnormal, one ulp below 1, thirds.
EDGES = [0.0, 1.0, 5e-324, 1 - 2**-53, 0.1, 1 / 3, 2 / 3, 1e-17]


def _values(draw, rng: np.random.Generator, shape: tuple[int, ...], low: float) -> np.ndarray:
    """Random values in [low, 1] (numpy, fast), some replaced by drawn edge values (signed when low < 0)."""
    out = rng.uniform(low, 1, shape)
    flat = out.reshape(-1)
    signs = st.sampled_from([1, -1] if low < 0 else [1])
    edits = st.lists(st.tuples(st.integers(0, flat.size - 1), st.sampled_from(EDGES), signs), max_size=6)
    for at, edge, sign in draw(edits):
        flat[at] = sign * edge
    return out


@st.composite
def prediction_tables(draw) -> PredictionTable:
    names = _names(draw(st.lists(_VIDEO, min_size=1, max_size=3, unique=True)), draw(_FRAMES))
    n = len(names)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    raw = _values(draw, rng, (n, NUM_EXPR), 0.0) + 1e-3  # never all zero
    expr = raw / raw.sum(1, keepdims=True)
    aus, va = _values(draw, rng, (n, 12), 0.0), _values(draw, rng, (n, 2), -1.0)
    face_id = rng.integers(0, 5, n)
    return PredictionTable.from_arrays(names, va[:, 0], va[:, 1], expr, aus, face_id=face_id)


@fuzz_settings(max_examples=ROUND_TRIPS)
@given(table=prediction_tables(), suffix=st.sampled_from([".csv", ".parquet"]))
def test_a_prediction_table_reads_back_exactly_as_written(folder: Path, table, suffix):
    path = table.write(folder / f"rt{suffix}", overwrite=True)
    back = PredictionTable.read(path)
    assert list(back.images) == list(table.images)
    for column in ("valence", "arousal", "expr_probs", "au_probs"):  # CSV too: an exact float round trip
        np.testing.assert_array_equal(getattr(back, column), getattr(table, column), err_msg=column)
    assert back.frame["face_id"].tolist() == table.frame["face_id"].tolist()


@fuzz_settings(max_examples=ROUND_TRIPS)
@given(table=prediction_tables(), thresholds=st.lists(_UNIT, min_size=12, max_size=12), data=st.data())
def test_a_submission_reads_back_as_the_hard_decisions_it_wrote(folder: Path, table, thresholds, data):
    from mtaffect.data.submission import validate_submission, write_submission

    order = data.draw(st.permutations(list(table.images)))  # the test list's order, not the table's
    path = write_submission(table, order, folder / "sub.txt", au_thresholds=thresholds, overwrite=True)
    assert validate_submission(path, order) == []
    back, want = PredictionTable.read(path), table.align_to(order)
    assert list(back.images) == list(order)
    np.testing.assert_array_equal(back.expr_probs.argmax(1), want.expr_probs.argmax(1))
    np.testing.assert_array_equal(back.au_probs, (want.au_probs >= np.array(thresholds)).astype(float))
    for column in ("valence", "arousal"):  # written as text: to the digits the format keeps
        np.testing.assert_allclose(getattr(back, column), getattr(want, column), atol=5e-4, err_msg=column)


@st.composite
def label_tables(draw) -> LabelTable:
    names = _names(draw(st.lists(_VIDEO, min_size=1, max_size=3, unique=True)), draw(_FRAMES))
    n = len(names)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    va = _values(draw, rng, (n, 2), -1.0)
    va[rng.random((n, 2)) < 0.2] = -5.0  # the missing code
    frame = {"image": names, "valence": va[:, 0], "arousal": va[:, 1], "expression": rng.integers(-1, 8, n)}
    for au in AU_NAMES:
        frame[au] = rng.integers(-1, 2, n)
    return LabelTable.from_frame(pd.DataFrame(frame))


@fuzz_settings(max_examples=ROUND_TRIPS)
@given(table=label_tables())
def test_an_annotation_file_reads_back_exactly_as_written(folder: Path, table):
    from mtaffect.data.annotations import write_annotations

    back = read_annotations(write_annotations(table, folder / "rt.txt", overwrite=True), keep_duplicates=True)
    assert list(back.images) == list(table.images)
    for column in ("valence", "arousal", "expression", "aus", "valence_mask", "expr_mask", "au_mask"):
        np.testing.assert_array_equal(getattr(back, column), getattr(table, column), err_msg=column)


@fuzz_settings(max_examples=ROUND_TRIPS)
@given(videos=st.lists(_VIDEO, min_size=1, max_size=4, unique=True), frames=_FRAMES)
def test_a_stores_image_index_reads_back_in_order_and_an_edit_is_refused(folder: Path, videos, frames):
    from mtaffect.features.store import StoreError, images_digest, read_images, write_images

    names = list(dict.fromkeys(_names(videos, frames)))
    path = folder / "images.txt"
    write_images(path, names)
    assert list(read_images(path, images_digest(names))) == names
    if len(names) > 1:  # the same names in another order would mislabel every row: refused
        path.write_text("".join(f"{n}\n" for n in names[::-1]), encoding="utf-8")
        with pytest.raises(StoreError):
            read_images(path, images_digest(names))
