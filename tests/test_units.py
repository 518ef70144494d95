from __future__ import annotations

import pytest

from kitfs.errors import UsageError
from kitfs.units import human_bytes, parse_size


@pytest.mark.parametrize(("text", "value"), [
    ("100", 100), ("64K", 65536), ("50G", 50 << 30), ("1.5GiB", 3 << 29), ("2tb", 2 << 40),
    ("512 MiB", 512 << 20)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "G", "-1G", "12X", "1..5G"])
def test_bad_sizes(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_size(bad)


def test_human_bytes() -> None:
    assert human_bytes(10) == "10 B"
    assert human_bytes(3 << 29) == "1.5 GiB"
