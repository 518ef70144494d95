"""Tensor extents from safetensors headers: a hint, so anything odd means none, never an error."""

from __future__ import annotations

import json
import struct

import pytest

from kitfs.modelkit.safetensors import MAX_HEADER, header_length, tensor_extents


def header(table: object) -> bytes:
    return json.dumps(table).encode()


def test_extents_are_file_offsets_past_the_header_and_found_by_any_byte() -> None:
    raw = header({"__metadata__": {"format": "pt"},
                  "b": {"dtype": "BF16", "shape": [4], "data_offsets": [8, 16]},
                  "a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]},
                  "empty": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]}})
    base = 8 + len(raw)
    extents = tensor_extents(raw, base + 16)
    assert extents is not None and len(extents) == 2  # the empty tensor holds no byte
    assert extents.at(base) == (base, base + 8)
    assert extents.at(base + 7) == (base, base + 8)
    assert extents.at(base + 8) == (base + 8, base + 16)
    assert extents.at(base - 1) is None  # the header itself
    assert extents.at(base + 16) is None  # past the last tensor


def test_header_length_comes_from_the_first_8_bytes_and_must_fit() -> None:
    assert header_length(struct.pack("<Q", 100), 108) == 100
    assert header_length(struct.pack("<Q", 100), 107) is None  # beyond the file
    assert header_length(struct.pack("<Q", MAX_HEADER + 1), 1 << 40) is None
    assert header_length(b"\x01\x00", 1 << 20) is None  # a file shorter than the prefix
    assert header_length(struct.pack("<Q", 1 << 63), 1 << 40) is None  # random bytes


@pytest.mark.parametrize("raw", [
    b"\xff\xfe not json",
    b"[1, 2]",
    header({"t": {"data_offsets": [0]}}),
    header({"t": {"data_offsets": [8, 4]}}),
    header({"t": {"data_offsets": [-1, 4]}}),
    header({"t": {"data_offsets": [0, 1.5]}}),
    header({"t": {"data_offsets": [0, True]}}),
    header({"t": "not a table"}),
    header({"t": {"data_offsets": [0, 1 << 40]}}),  # past the end of the file
    b"[" * 100_000,  # nested past the parser's recursion limit
])
def test_a_malformed_header_gives_no_extents(raw: bytes) -> None:
    assert tensor_extents(raw, 1 << 20) is None
