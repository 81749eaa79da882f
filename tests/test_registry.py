"""The registry resolves plain and prefixed names and says what exists when a name is wrong."""

from __future__ import annotations

import pytest

from mtaffect.features.registry import list_backbones
from mtaffect.registry import Registry


def test_plain_and_prefixed_names():
    reg: Registry[tuple] = Registry("widget")
    reg.register("plain")(lambda **kw: ("plain", kw))
    reg.register("hub", prefix=True)(lambda rest, **kw: ("hub", rest, kw))
    assert reg.create("plain", a=1) == ("plain", {"a": 1})
    assert reg.create("hub:org/model", b=2) == ("hub", "org/model", {"b": 2})
    assert reg.names() == ["plain", "hub:<...>"]


def test_errors_name_the_alternatives():
    reg: Registry[int] = Registry("widget")
    reg.register("one")(lambda: 1)
    with pytest.raises(KeyError, match="unknown widget 'two'; available: one"):
        reg.create("two")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("one")(lambda: 1)
    reg.register("hf", prefix=True)(lambda rest: 2)
    with pytest.raises(ValueError, match="give a name after 'hf:'"):
        reg.create("hf:")


def test_builtin_backbones_are_listed():
    names = list_backbones()
    for name in ("fer-minixception", "dinov2-small", "dinov2-giant", "emotiefflib:<...>", "hf:<...>"):
        assert name in names
