"""--filter means what it means to `kit unpack`."""

from __future__ import annotations

import pytest

from kitfs.errors import UsageError
from kitfs.modelkit.filters import FilterSet


def test_no_filter_keeps_everything() -> None:
    fs = FilterSet.parse([])
    assert fs.keeps_kitfile()
    assert fs.keeps_layer("dataset", "train", "./data/train")


def test_model_covers_parts_but_not_kitfile() -> None:
    fs = FilterSet.parse(["model"])
    assert fs.keeps_layer("model", "m", "./model")
    assert fs.keeps_layer("modelpart", "lora", "./lora")
    assert not fs.keeps_layer("code", None, "./src")
    assert not fs.keeps_kitfile()


def test_ids_match_name_or_path_as_written() -> None:
    fs = FilterSet.parse(["datasets:train,./data/eval", "kitfile"])
    assert fs.keeps_layer("dataset", "train", "./data/train")
    assert fs.keeps_layer("dataset", None, "./data/eval")
    assert not fs.keeps_layer("dataset", "eval", "data/eval")
    assert not fs.keeps_layer("model", "train", "./model")
    assert fs.keeps_kitfile()


def test_several_types_in_one_filter() -> None:
    fs = FilterSet.parse(["model,docs"])
    assert fs.keeps_layer("docs", None, "./README.md")
    assert not fs.keeps_layer("dataset", "x", "./x")


@pytest.mark.parametrize("bad", ["weights", "model:a:b", "model,,docs"])
def test_bad_filters(bad: str) -> None:
    with pytest.raises(UsageError, match="invalid filter"):
        FilterSet.parse([bad])
