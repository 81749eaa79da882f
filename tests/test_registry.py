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


def test_options_a_backbone_does_not_take_are_named_before_it_is_built():
    from mtaffect.features.registry import accepts_option, create_backbone

    with pytest.raises(
        ValueError,
        match=r"'fer-minixception' does not take the options bogus, size; its "
        r"options: weights, fuse, channels_last, chunk",
    ):
        create_backbone("fer-minixception", size=3, bogus=1)
    # hf:<model>: the factory's first parameter is the model, not an option (nothing is loaded here)
    with pytest.raises(ValueError, match=r"'hf:/no/such/vit' does not take the option model;"):
        create_backbone("hf:/no/such/vit", model="x")
    with pytest.raises(KeyError, match="unknown backbone 'nope'"):
        create_backbone("nope", bogus=1)
    # an option of the wrong type (e.g. from --backbone-arg or a config): an error line, not a traceback
    with pytest.raises(ValueError, match=r"'fer-minixception' cannot be built with weights=\[1\]: expected"):
        create_backbone("fer-minixception", weights=[1])
    assert accepts_option("hf:x", "trust_remote_code") and not accepts_option("hf:x", "model")
    assert not accepts_option("fer-minixception", "trust_remote_code") and not accepts_option("nope", "x")
