"""References parse exactly as `kit` parses them (cases from kit's reference_test.go and more)."""

from __future__ import annotations

import pytest

from kitfs.errors import BadReferenceError
from kitfs.oci.reference import Reference, parse_reference

D = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


@pytest.mark.parametrize(
    ("text", "registry", "repo", "target", "extra"),
    [
        ("testregistry.io/org/repo:test-tag", "testregistry.io", "org/repo", "test-tag", ()),
        ("testregistry.io/org/repo:t,extraTag1,extraTag2", "testregistry.io", "org/repo", "t",
         ("extraTag1", "extraTag2")),
        ("test-repository:test-tag,x1", "localhost", "test-repository", "test-tag", ("x1",)),
        ("localhost:5000/org/repo:t", "localhost:5000", "org/repo", "t", ()),
        (D, "localhost", "_", D, ()),
        ("org/repo:t", "localhost", "org/repo", "t", ()),
        ("a/b/c/d", "localhost", "a/b/c/d", "latest", ()),
        ("test.io/a/b/c/d", "test.io", "a/b/c/d", "latest", ()),
        ("testrepo@" + D, "localhost", "testrepo", D, ()),
        ("testrepo:ignoredtag@" + D, "localhost", "testrepo", D, ()),
        ("testorg.com/testrepo@" + D, "testorg.com", "testrepo", D, ()),
        ("127.0.0.1:5000/m:v1", "127.0.0.1:5000", "m", "v1", ()),
        ("[::1]:5000/m", "[::1]:5000", "m", "latest", ()),
    ],
)
def test_parses_like_kit(
    text: str, registry: str, repo: str, target: str, extra: tuple[str, ...]
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.target, ref.extra_tags) == (
        registry, repo, target, extra,
    )


def test_local_and_remote() -> None:
    assert parse_reference("org/model:v1").is_local
    assert not parse_reference("localhost:5000/model:v1").is_local
    assert parse_reference("reg.io/m:a,b").tags == ("a", "b")


def test_digest_wins_and_str_round_trips() -> None:
    ref = parse_reference("reg.io/m@" + D)
    assert ref.tag is None and ref.digest == D
    assert str(ref) == "reg.io/m@" + D
    assert parse_reference(str(ref)) == ref
    assert str(parse_reference("reg.io/m")) == "reg.io/m:latest"
    assert Reference("reg.io", "m", "v1").with_digest(D).target == D


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("reg.io/Model:v1", "must be lowercase"),
        ("reg.io/-model", "invalid repository"),
        ("reg.io/model:-bad", "invalid tag"),
        ("reg.io/model:v1,bad tag", "invalid tag"),
        ("reg.io/model@sha256:abc", "invalid digest"),
        ("reg.io/", "missing repository"),
        ("bad_host.io:99999999/m", "invalid registry"),
    ],
)
def test_bad_references_say_why(text: str, message: str) -> None:
    with pytest.raises(BadReferenceError, match=message) as info:
        parse_reference(text)
    assert "\n" not in str(info.value)
