"""What `predict` accepts as input: folders (recursive, numbered frames as sequences), URLs, cameras,
PIL images and BGR arrays, and videos or streams that end before their declared length."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
from http_helpers import QuietHandler, serving, serving_folder
from PIL import Image

from mtaffect.predict.sources import (
    ArrayInput,
    ArraySource,
    FrameSequence,
    InputError,
    StreamInput,
    VideoSource,
    camera_input,
    classify,
    expand_inputs,
    open_source,
)


def _jpg(path: Path, value: int = 128, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def write_clip(path: Path, n: int = 200, codec: str = "libx264", options: dict | None = None) -> Path:
    """A tiny 64x64 clip at 25 frames/s (no faces: these tests are about containers)."""
    with av.open(str(path), "w", options=options or {}) as c:
        s = c.add_stream(codec, rate=25)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(n):
            img = np.full((64, 64, 3), (i * 7) % 255, np.uint8)
            img[: i % 64] = 30
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    out = path.with_name(f"cut_{path.name}")
    out.write_bytes(data[: len(data) // 2])
    return out


def decode_all(source) -> int:
    return sum(1 for _ in source)


# ---- folders ----------------------------------------------------------------------------------------------


def test_cropped_aligned_layout_needs_recursive_and_gives_one_sequence_per_video(tmp_path):
    root = tmp_path / "cropped_aligned"
    for video, frames in (("v2", (3, 1, 10, 2)), ("v10", (5, 6))):
        for f in frames:
            _jpg(root / video / f"{f:05d}.jpg")
    with pytest.raises(InputError, match="--recursive"):
        expand_inputs(root)
    seqs = expand_inputs(root, recursive=True)
    assert [s.folder.name for s in seqs] == ["v2", "v10"]  # natural order of folders
    assert seqs[0].frames == (1, 2, 3, 10)  # frame numbers from the names, sorted numerically
    assert [p.name for p in seqs[0].paths] == ["00001.jpg", "00002.jpg", "00003.jpg", "00010.jpg"]
    src = open_source(seqs[0], fps=30)
    frames = list(src)
    assert src.info.kind == "sequence" and src.info.temporal
    # numbered from 1, as ffmpeg and s-Aff-Wild2 number them: 00001.jpg is frame 0 at time 0, as a video's
    # first frame is; the gap before 00010.jpg stays a gap in time
    assert [f.index for f in frames] == [0, 1, 2, 9]
    np.testing.assert_allclose([f.time for f in frames], np.array([0, 1, 2, 9]) / 30)


def test_a_sequence_numbered_from_0_keeps_its_numbers_and_without_fps_has_no_times(tmp_path):
    for f in (0, 1, 2):
        _jpg(tmp_path / "v" / f"{f:04d}.png")
    (seq,) = expand_inputs(tmp_path / "v")
    assert seq.origin == 0
    frames = list(open_source(seq))
    assert [f.index for f in frames] == [0, 1, 2] and all(np.isnan(f.time) for f in frames)
    resumed = open_source(seq, fps=10)
    resumed.after = 0  # a job resumed after frame 0 (the table's frame numbers)
    assert [(f.index, f.time) for f in resumed] == [(1, 0.1), (2, 0.2)]


def test_subfolders_are_not_skipped_silently(tmp_path):
    _jpg(tmp_path / "a.jpg")
    _jpg(tmp_path / "sub" / "b.jpg")
    _jpg(tmp_path / ".hidden" / "c.jpg")
    with pytest.warns(UserWarning, match=r"1 subfolder\(s\) not searched \(sub\).*--recursive"):
        assert [p.name for p in expand_inputs(tmp_path)] == ["a.jpg"]
    assert [p.name for p in expand_inputs(tmp_path, recursive=True)] == ["a.jpg", "b.jpg"]


def test_numbered_images_are_a_sequence_unless_stills_are_asked(tmp_path):
    for f in (1, 2, 3):
        _jpg(tmp_path / "frames" / f"{f}.png")
    _jpg(tmp_path / "photos" / "IMG_0001.jpg")
    _jpg(tmp_path / "photos" / "IMG_0002.jpg")
    (seq,) = expand_inputs(tmp_path / "frames")
    assert isinstance(seq, FrameSequence) and seq.frames == (1, 2, 3)
    assert len(expand_inputs(tmp_path / "frames", sequences=False)) == 3
    assert all(isinstance(p, Path) for p in expand_inputs(tmp_path / "photos"))  # names not all numbers


def test_an_unreadable_frame_is_skipped_and_listed(tmp_path):
    for f in (1, 2, 3):
        _jpg(tmp_path / f"{f:03d}.jpg")
    (tmp_path / "002.jpg").write_bytes(b"not a jpeg")
    (seq,) = expand_inputs(tmp_path)
    src = open_source(seq)
    assert [f.index for f in src] == [0, 2]
    assert len(src.info.unreadable) == 1 and "002.jpg" in src.info.unreadable[0][0]


# ---- URLs, cameras, PIL, BGR ---------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="symbolic links")
def test_symbolic_link_loops_are_searched_once_and_each_file_counted_once(tmp_path):
    photo = _jpg(tmp_path / "L" / "photo.jpg")
    (tmp_path / "L" / "s1").symlink_to(".", target_is_directory=True)  # two loops: 2^40 paths before
    (tmp_path / "L" / "s2").symlink_to(".", target_is_directory=True)
    assert expand_inputs(tmp_path / "L", recursive=True) == [photo]
    _jpg(tmp_path / "M" / "other.jpg")
    (tmp_path / "L" / "m").symlink_to(tmp_path / "M", target_is_directory=True)
    (tmp_path / "L" / "m2").symlink_to(tmp_path / "M", target_is_directory=True)  # the same folder again
    (tmp_path / "L" / "again.jpg").symlink_to(photo)  # the same photo again
    found = expand_inputs(tmp_path / "L", recursive=True)
    assert sorted(p.name for p in found) == ["other.jpg", "photo.jpg"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_pipe_where_an_image_is_expected_fails_instead_of_blocking(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        open_source(fifo)  # opening it for reading would wait for a writer forever
    with pytest.raises(InputError, match="no images or videos"):  # a folder search skips it
        expand_inputs(tmp_path)


def test_urls_are_never_turned_into_paths(tmp_path):
    url = "rtsp://user:pw@cam.local:554//live/stream?channel=1&subtype=0"
    assert classify(url) == StreamInput(url)
    assert expand_inputs(["https://example.org/a//b.mp4"]) == [StreamInput("https://example.org/a//b.mp4")]
    assert classify("file:///tmp/my%20clip.mp4") == Path("/tmp/my clip.mp4")
    with pytest.raises(InputError, match="unknown URL scheme 'gopher'"):
        classify("gopher://x/y")


def test_camera_numbers(tmp_path, monkeypatch):
    assert camera_input(0, "linux") == StreamInput("/dev/video0", "v4l2", "camera0")
    assert camera_input(1, "darwin") == StreamInput("1", "avfoundation", "camera1")
    with pytest.raises(InputError, match="Windows"):
        camera_input(0, "win32")
    monkeypatch.chdir(tmp_path)
    assert isinstance(classify("0"), StreamInput) and isinstance(classify(2), StreamInput)
    (tmp_path / "0").write_bytes(b"")  # a file named 0 wins over the camera
    assert classify("0") == Path("0")


def test_a_missing_camera_is_an_input_error_naming_it():
    with pytest.raises(InputError, match=r"camera9 \(/dev/video9\): not a readable stream or camera"):
        open_source(StreamInput("/dev/video9", "v4l2", "camera9"))


def test_live_sources_stream_without_a_declared_length():
    src = open_source(StreamInput("testsrc=size=64x48:rate=25:duration=0.4", "lavfi", "test"))
    assert src.info.kind == "stream" and src.info.frames is None
    assert decode_all(src) == 10 and src.info.decoded == 10 and src.info.ended_early is None


def test_pil_images_and_bgr_arrays():
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0] = 200  # red
    im = Image.fromarray(rgb)
    (item,) = expand_inputs(im)
    assert isinstance(item, ArrayInput) and item.name == "<PIL image>"
    np.testing.assert_array_equal(next(iter(open_source(item))).image, rgb)
    bgr = rgb[..., ::-1].copy()
    frame = next(iter(ArraySource(bgr, channels="bgr")))
    np.testing.assert_array_equal(frame.image, rgb)
    with pytest.raises(ValueError, match="channels"):
        ArraySource(bgr, channels="bgra")


def test_a_16_bit_pil_image_is_read_as_the_same_image_from_disk(tmp_path):
    """In memory as from disk: 16-bit values are scaled to 8 bits, not clipped (all white)."""
    grey = np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365  # 0 .. 64155
    im = Image.fromarray(grey)
    assert im.mode.startswith("I")
    im.save(tmp_path / "g16.png")
    (item,) = expand_inputs(im)
    (on_disk,) = expand_inputs(tmp_path / "g16.png")
    expected = ((grey.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    np.testing.assert_array_equal(item.array, np.repeat(expected[..., None], 3, axis=2))
    np.testing.assert_array_equal(item.array, next(iter(open_source(on_disk))).image)
    float_image = Image.fromarray(grey.astype(np.float32))  # no known 8-bit equivalent, as from disk
    with pytest.raises(InputError, match=r"<PIL image>: not a readable image .*32-bit float"):
        expand_inputs(float_image)


# ---- videos and streams that end early -----------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {
        "faststart": write_clip(d / "fast.mp4", options={"movflags": "faststart"}),
        "mkv": write_clip(d / "clip.mkv"),
        "webm": write_clip(d / "clip.webm", codec="libvpx-vp9"),
    }


@pytest.mark.parametrize("kind", ["faststart", "mkv", "webm"])
def test_a_cut_video_keeps_its_frames_and_says_it_ended_early(clips, kind):
    whole = VideoSource(clips[kind])
    assert decode_all(whole) == 200 and whole.info.ended_early is None
    cut = VideoSource(cut_in_half(clips[kind]))
    n = decode_all(cut)
    assert 20 < n < 180 and cut.info.decoded == n
    assert f"decoded {n} of the 200 frames the container" in cut.info.ended_early


def test_http_stream_and_a_stream_that_stops(clips):
    folder = clips["mkv"].parent
    with serving_folder(folder) as base:
        (item,) = expand_inputs(f"{base}/clip.mkv")
        src = open_source(item)
        assert src.info.file == f"{base}/clip.mkv" and src.info.kind == "stream"
        assert decode_all(src) == 200 and src.info.ended_early is None

    data = clips["mkv"].read_bytes()

    class Drops(QuietHandler):  # announces the whole file, then the connection drops half-way
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True

    with serving(Drops) as base:
        src = open_source(f"{base}/live.mkv")
        n = decode_all(src)
        assert 20 < n < 180 and src.info.decoded == n
        assert f"{n} of 200" in src.info.ended_early


def test_lists_of_inputs_may_nest_and_what_is_no_input_is_a_type_error_naming_what_is(tmp_path):
    a, b = _jpg(tmp_path / "a.jpg"), _jpg(tmp_path / "b.jpg")
    assert expand_inputs([[a], (str(b),)]) == [a, b]  # a list of lists: their inputs
    assert expand_inputs([os.fsencode(a)]) == [a]  # a path as bytes
    clip = np.zeros((3, 8, 8, 3), np.uint8)
    two = expand_inputs([clip, clip])  # a list of clips: one input each (they used to be stacked to 5-D)
    assert len(two) == 2 and all(x.shape == (3, 8, 8, 3) for x in two)
    (one,) = expand_inputs([[clip[0], clip[1]]])  # a list of frames in a list: one clip
    assert one.shape == (2, 8, 8, 3)
    for bad in ([a, None], [[a, 1.5]], [{"path": a}]):
        with pytest.raises(TypeError, match=r"is not an input: give an image, video or folder path.*PIL"):
            expand_inputs(bad)
    for bad in (None, 1.5, {"a": a}):
        with pytest.raises(TypeError, match=r"inputs must be an image, video or folder path.*list of these"):
            expand_inputs(bad)
