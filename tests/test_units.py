"""Units shared by every path that needs frame order: image names -> (video, frame), and windows."""

import numpy as np
import pytest

from mtaffect.data.units import ImageNameError, make_windows, split_image_names


def test_split_image_names_reads_video_and_frame():
    video, frame = split_image_names(["v1/00012.jpg", "a/b/7.png", "v1/3.jpg"])
    assert video.tolist() == ["v1", "a/b", "v1"]
    assert frame.tolist() == [12, 7, 3]


def test_split_image_names_strict_names_the_bad_row():
    with pytest.raises(ImageNameError, match=r"row 1: image 'v1/cover.jpg'"):
        split_image_names(["v1/1.jpg", "v1/cover.jpg"])
    with pytest.raises(ImageNameError, match="row 0"):
        split_image_names(["00001.jpg"])  # no video folder


def test_split_image_names_lenient_keeps_list_order_for_odd_names():
    video, frame = split_image_names(["v/cover.jpg", "v/5.jpg", "loose.png"], strict=False)
    assert video.tolist() == ["v", "v", ""]
    assert frame.tolist() == [0, 5, 2]  # a non-numeric stem takes its list position


def test_split_image_names_refuses_frame_numbers_over_18_digits():
    names = ["v/99999999999999999999999.jpg", "v/1000000000000000000.jpg", "v/3.jpg"]
    with pytest.raises(ImageNameError, match="row 0"):  # was pyarrow's ArrowInvalid
        split_image_names(names)
    video, frame = split_image_names(names, strict=False)
    assert video.tolist() == ["v", "v", "v"]
    assert frame.tolist() == [0, 1, 3]  # as any other stem that is not a frame number
    assert split_image_names(["v/999999999999999999.jpg"])[1].tolist() == [999999999999999999]


def test_windows_stay_in_one_video_sorted_by_frame_and_pad_the_last():
    video = np.array(["b"] * 5 + ["a"] * 3, dtype=object)
    frame = np.array([9, 3, 5, 1, 7, 20, 10, 30])  # unsorted, sparse
    idx, mask = make_windows(video, frame, window=4, stride=2)
    for w, m in zip(idx, mask, strict=True):
        assert len(set(video[w])) == 1  # never across videos
        real = frame[w[m]]
        assert (np.diff(real) > 0).all()  # consecutive annotated frames in order
        assert (w[~m] == w[m][-1]).all()  # padding repeats the last real frame
    # video a: frames 10, 20, 30 -> one padded window; video b: 1,3,5,7 then 5,7,9 (padded)
    assert sorted(tuple(frame[w[m]]) for w, m in zip(idx, mask, strict=True)) == [
        (1, 3, 5, 7),
        (5, 7, 9),
        (10, 20, 30),
    ]
    idx, mask = make_windows(video, frame, window=2, stride=2)  # stride == window: each frame once
    assert sorted(idx[mask].tolist()) == list(range(8))


def test_shifted_edges_fill_the_last_window_with_real_frames_and_count_each_frame_once():
    video = np.array(["a"] * 7 + ["b"] * 2, dtype=object)
    frame = np.array([1, 2, 3, 4, 5, 6, 7, 1, 2])
    pad_idx, pad_mask = make_windows(video, frame, window=3, stride=3)
    idx, mask = make_windows(video, frame, window=3, stride=3, edge="shift")
    assert sorted(idx[mask].tolist()) == sorted(pad_idx[pad_mask].tolist()) == list(range(9))  # once each
    a_last = [w for w in idx if set(video[w]) == {"a"}][-1]
    assert frame[a_last].tolist() == [5, 6, 7]  # ends on the last frame: no padding, real context
    b = [(w, m) for w, m in zip(idx, mask, strict=True) if set(video[w]) == {"b"}]
    ((w, m),) = b  # too short for a window: padded
    assert frame[w].tolist() == [1, 2, 2] and m.tolist() == [True, True, False]
    idx, mask = make_windows(video, frame, window=3, stride=1, edge="shift")  # training strides
    assert set(idx[mask].tolist()) == set(range(9))
    with pytest.raises(ValueError, match="window edge"):
        make_windows(video, frame, 3, 3, edge="wrap")


def test_first_unsafe_name_finds_what_unsafe_name_reason_refuses():
    from mtaffect.data.units import first_unsafe_name, unsafe_name_reason

    odd = ["a/00001.jpg", "a..b/00001.jpg", "a/..00001.jpg", "ab:/1.jpg", "a/b:c/1.jpg", "", "..."]
    assert first_unsafe_name(odd) is None  # '..' inside a part, a colon elsewhere: safe
    for bad in (
        "../x/00001.jpg",
        "a/../../1.jpg",
        "a\\..\\1.jpg",
        "/etc/1.jpg",
        "\\\\srv\\1.jpg",
        "C:/1.jpg",
        "c:x.jpg",
        "..",
    ):
        names = [*odd, bad, "../second.jpg"]
        assert first_unsafe_name(names) == (len(odd), unsafe_name_reason(bad)), bad
    assert first_unsafe_name(np.array(["v/1.jpg", "/abs/2.jpg"], dtype=object)) == (1, "is an absolute path")
