"""Registry mirrors from containerd's hosts.toml, against mirrors as they really behave.

Parsing: containerd's own example files (docs/hosts.md, kept verbatim) and the
rules of its parser (core/remotes/docker/config/hosts.go): file order, default
capabilities, relative paths, directory names with ports, `_default`.

Behaviour, with real parts: an origin Distribution registry and a second one
run as its pull-through cache (`proxy: remoteurl:`), which answers a Range
request on a blob it has not cached with 200 and the whole blob; kitfs must
take the range from the origin instead without reading that body, count it,
and still hand out the right bytes. A mirror nobody listens on, one that
accepts and never answers, and one that corrupts bytes (tests/faultproxy.py
in front of a real registry) all fall through to the next host; a pull-only
mirror is never asked for a manifest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from faultproxy import Corrupt, FaultProxy, Hang, Slow, Status

from helpers import kitfs, make_project, ok, one_line_error, source_files
from kitfs.errors import IntegrityError
from kitfs.oci.auth import Credential
from kitfs.oci.client import ClientOptions, RegistryClient
from kitfs.oci.hosts import CAPABILITIES, HostEntry, HostsError, load_hosts, parse_hosts
from kitfs.oci.mirrors import Route
from mounting import mounted
from registry import RegistryServer, free_port, start_registry
from scraping import scrape, value

MiB = 1 << 20

# -- containerd's examples, verbatim from containerd/containerd docs/hosts.md --------------

CONTAINERD_DOCKER_DEFAULT = '''\
server = "https://docker.io"

[host."https://registry-1.docker.io"]
  capabilities = ["pull", "resolve"]
'''

CONTAINERD_LOCAL_MIRROR = '''\
server = "https://registry-1.docker.io"    # Exclude this to not use upstream

[host."https://public-mirror.example.com"]
  capabilities = ["pull"]                  # Requires less trust, won't resolve tag to digest from this host
[host."https://docker-mirror.internal"]
  capabilities = ["pull", "resolve"]
  ca = "docker-mirror.crt"                 # Or absolute path /etc/containerd/certs.d/docker.io/docker-mirror.crt
'''  # noqa: E501 - verbatim

CONTAINERD_SKIP_VERIFY = '''\
server = "https://registry-1.docker.io"

[host."http://192.168.31.250:5000"]
  capabilities = ["pull", "resolve", "push"]
  skip_verify = true
'''

CONTAINERD_HOSTS = '''\
[host."https://mirror.registry"]
  capabilities = ["pull"]
  ca = "/etc/certs/mirror.pem"
  skip_verify = false
  [host."https://mirror.registry".header]
    x-custom-2 = ["value1", "value2"]

[host."https://mirror-bak.registry/us"]
  capabilities = ["pull"]
  skip_verify = true

[host."http://mirror.registry"]
  capabilities = ["pull"]

[host."https://test-1.registry"]
  capabilities = ["pull", "resolve", "push"]
  ca = ["/etc/certs/test-1-ca.pem", "/etc/certs/special.pem"]
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"],["/etc/certs/client.pem", ""]]

[host."https://test-2.registry"]
  client = "/etc/certs/client.pem"

[host."https://test-3.registry"]
  client = ["/etc/certs/client-1.pem", "/etc/certs/client-2.pem"]

[host."https://non-compliant-mirror.registry/v2/upstream"]
  capabilities = ["pull"]
  override_path = true
'''


def test_containerd_examples_parse_as_containerd_reads_them() -> None:
    hosts = parse_hosts(CONTAINERD_DOCKER_DEFAULT, "/d")
    assert [h.root for h in hosts] == ["https://registry-1.docker.io/v2", "https://docker.io/v2"]
    assert hosts[0].capabilities == {"pull", "resolve"} and hosts[0].mirror
    assert hosts[1].capabilities == CAPABILITIES and not hosts[1].mirror

    hosts = parse_hosts(CONTAINERD_LOCAL_MIRROR, "/etc/containerd/certs.d/docker.io")
    assert [(h.root, sorted(h.capabilities)) for h in hosts] == [
        ("https://public-mirror.example.com/v2", ["pull"]),
        ("https://docker-mirror.internal/v2", ["pull", "resolve"]),
        ("https://registry-1.docker.io/v2", sorted(CAPABILITIES)),
    ]
    assert hosts[1].ca == ("/etc/containerd/certs.d/docker.io/docker-mirror.crt",)

    mirror, server = parse_hosts(CONTAINERD_SKIP_VERIFY, "/d")
    assert server.root == "https://registry-1.docker.io/v2"
    assert mirror.root == "http://192.168.31.250:5000/v2" and mirror.skip_verify is True
    assert mirror.netloc == "192.168.31.250:5000"

    hosts = parse_hosts(CONTAINERD_HOSTS, "/d")
    assert [h.root for h in hosts] == [
        "https://mirror.registry/v2", "https://mirror-bak.registry/us/v2",
        "http://mirror.registry/v2", "https://test-1.registry/v2",
        "https://test-2.registry/v2", "https://test-3.registry/v2",
        "https://non-compliant-mirror.registry/v2/upstream",
        None,  # no server: the registry itself, last
    ]
    first, bak, _, test1, test2, test3, noncompliant, _ = hosts
    assert first.header == (("x-custom-2", "value1"), ("x-custom-2", "value2"))
    assert first.skip_verify is False and bak.skip_verify is True and test1.skip_verify is None
    assert test1.ca == ("/etc/certs/test-1-ca.pem", "/etc/certs/special.pem")
    assert test1.client == (("/etc/certs/client.cert", "/etc/certs/client.key"),
                            ("/etc/certs/client.pem", ""))
    assert test2.client == (("/etc/certs/client.pem", ""),)
    assert test3.client == (("/etc/certs/client-1.pem", ""), ("/etc/certs/client-2.pem", ""))
    assert test2.capabilities == CAPABILITIES  # none given: all, as containerd
    assert noncompliant.capabilities == {"pull"}


def test_server_and_paths_follow_containerds_rules(tmp_path: Path) -> None:
    text = '''
server = "registry.example:5000"
ca = "certs/root.pem"
dial_timeout = "1m30s"
[host."mirror.example/cache"]
  client = [["c.cert", "/abs/c.key"]]
  dial_timeout = "250ms"
[host."https://root.example/"]
  override_path = true
'''
    mirror, root, server = parse_hosts(text, str(tmp_path))
    assert mirror.root == "https://mirror.example/cache/v2"  # https, /v2 added
    assert mirror.client == ((str(tmp_path / "c.cert"), "/abs/c.key"),)
    assert mirror.dial_timeout == 0.25
    assert root.root == "https://root.example"  # override_path: the path is the API root
    assert server.root == "https://registry.example:5000/v2" and not server.mirror
    assert server.ca == (str(tmp_path / "certs/root.pem"),) and server.dial_timeout == 90.0


def test_top_level_capabilities_restrict_only_a_named_server() -> None:
    """containerd gives the implicit server pull, resolve and push whatever top-level
    `capabilities` say: without `server` they must not lock the registry itself out."""
    implicit = parse_hosts('capabilities = ["pull"]\n[host."https://m"]\n', "/d")
    assert implicit[-1] == HostEntry(root=None, capabilities=CAPABILITIES)
    named = parse_hosts('server = "https://s"\ncapabilities = ["pull"]\n', "/d")
    assert named[-1].capabilities == frozenset({"pull"})


def test_host_directories_with_ports_and_default(tmp_path: Path) -> None:
    for name, mirror in (("reg.example_5000_", "a"), ("reg.example:5000", "b"),
                         ("_default", "c"), ("other.example", "d")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "hosts.toml").write_text(f'[host."https://{mirror}"]\n')

    def first_root(registry: str) -> str | None:
        hosts = load_hosts(str(tmp_path), registry)
        assert hosts is not None
        return hosts[0].root

    assert first_root("reg.example:5000") == "https://a/v2"  # host_port_ before host:port
    (tmp_path / "reg.example_5000_" / "hosts.toml").unlink()
    (tmp_path / "reg.example_5000_").rmdir()
    assert first_root("reg.example:5000") == "https://b/v2"
    assert first_root("other.example") == "https://d/v2"
    assert first_root("unknown.example") == "https://c/v2"  # _default
    (tmp_path / "_default" / "hosts.toml").unlink()
    (tmp_path / "_default" / "ca.crt").write_text("x")
    # A directory without hosts.toml: Docker's certificate files, for the registry itself.
    assert load_hosts(str(tmp_path), "unknown.example") == [
        HostEntry(root=None, ca=(str(tmp_path / "_default" / "ca.crt"),))]


@pytest.mark.parametrize(("text", "says"), [
    ('[host."https://m"]\n  capabilities = ["pull", "fly"]\n', "unknown capability 'fly'"),
    ('[host."https://m"\n', "not valid TOML"),
    ('[host."https://m"]\n  ca = 3\n', "ca must be a string or a list of strings"),
    ('[host."https://m"]\n  client = [["a"]]\n', "is not a path or a [certificate, key]"),
    ('[host."https://m"]\n  dial_timeout = "soon"\n', "is not a duration"),
])
def test_bad_hosts_file_is_one_line_error(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "127.0.0.1_1_").mkdir()
    (tmp_path / "127.0.0.1_1_" / "hosts.toml").write_text(text)
    line = one_line_error(kitfs("inspect", "127.0.0.1:1/x/y:z", "--hosts-dir", str(tmp_path)))
    assert says in line and "hosts.toml" in line


@pytest.mark.parametrize(("text", "says"), [
    ('[host."https://[::1"]\n', "not a valid URL"),
    ('[host."https://m:abc"]\n', "not a valid URL"),
    ('[host."ftp://m"]\n', "not an http(s) URL"),
    ('server = "https://m:99999999"\n', "not a valid URL"),
    ('[host."https://m".header]\n  x-team = "équipe"\n', "not ASCII"),
    ('[host."https://m".header]\n  "x team" = "a"\n', "not an HTTP token"),
])
def test_bad_host_urls_are_hosts_errors(text: str, says: str) -> None:
    """HostsError is the CLI's one-line error (above); these were internal errors."""
    with pytest.raises(HostsError) as failed:
        parse_hosts(text, "/d", where="/d/hosts.toml")
    assert says in str(failed.value) and "\n" not in str(failed.value)
    assert str(failed.value).startswith("/d/hosts.toml: ")


def test_missing_ca_file_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "127.0.0.1_1_").mkdir()
    (tmp_path / "127.0.0.1_1_" / "hosts.toml").write_text(
        '[host."https://m"]\n  ca = "nope.pem"\n')
    line = one_line_error(kitfs("inspect", "127.0.0.1:1/x/y:z", "--hosts-dir", str(tmp_path)))
    assert f"cannot load {tmp_path}/127.0.0.1_1_/nope.pem" in line, line


def test_missing_hosts_dir_is_one_line_error(tmp_path: Path) -> None:
    line = one_line_error(kitfs("inspect", "127.0.0.1:1/x/y:z",
                                "--hosts-dir", str(tmp_path / "nope")))
    assert "hosts directory" in line and "does not exist" in line


# -- real registries ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """The registry ModelKits live in; its access log counts the bytes it serves."""
    server = start_registry(tmp_path_factory.mktemp("origin"), access_log=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def kit(origin: RegistryServer, tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[str, dict[str, str]]:
    """A ModelKit with an 8 MiB weights file in the origin, and its files' hashes."""
    project = make_project(tmp_path_factory.mktemp("project") / "p", weight_bytes=8 * MiB)
    ref = f"{origin.host}/mirrors/kit:v1"
    ok(kitfs("pack", str(project), "-t", ref,
             home=tmp_path_factory.mktemp("packer")))
    return ref, source_files(project)


def hosts_dir(root: Path, registry: str, text: str) -> Path:
    """A hosts directory with `text` as `registry`'s hosts.toml."""
    directory = root / "hosts"
    name = registry.replace(":", "_") + "_"
    (directory / name).mkdir(parents=True, exist_ok=True)
    (directory / name / "hosts.toml").write_text(text)
    return directory


def unpack(ref: str, out: Path, *extra: str, home: Path | None = None,
           ) -> subprocess.CompletedProcess[str]:
    """`kitfs unpack` into `out`, with a chunk cache of its own (not the machine's)."""
    return kitfs("unpack", ref, "-d", str(out), "--cache-dir", str(out) + "-cache", *extra,
                 home=home)


def unpacked(root: Path) -> dict[str, str]:
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and path.name != "Kitfile":
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def blob_digests(ref: str) -> list[tuple[str, int]]:
    """(digest, size) of the ModelKit's layers, largest first (asked of the origin)."""
    registry, _, rest = ref.partition("/")
    repo, _, tag = rest.partition(":")

    async def get() -> bytes:
        async with RegistryClient(registry) as client:
            return (await client.get_manifest(repo, tag))[0]

    layers = json.loads(trio.run(get))["layers"]
    return sorted(((layer["digest"], layer["size"]) for layer in layers),
                  key=lambda item: -item[1])


def test_pull_through_cache_answering_ranges_with_whole_blobs(
    origin: RegistryServer, kit: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    ref, _ = kit
    digest, size = blob_digests(ref)[0]
    cache = start_registry(tmp_path / "cache", request_log=True, proxy=f"http://{origin.host}")
    try:
        hosts = hosts_dir(tmp_path, origin.host,
                          f'[host."http://{cache.host}"]\n  capabilities = ["pull", "resolve"]\n')

        async def ranges() -> tuple[bytes, bytes, dict[str, object]]:
            options = ClientOptions(hosts_dir=str(hosts))
            async with RegistryClient(origin.host, options) as client:
                mark = origin.mark()
                first = await client.read_range("mirrors/kit", digest, 1000, 4096, size=size)
                served = origin.served(mark)
                stats = client.stats.to_json()
                stats["origin_sizes"] = served.sizes.get(digest, [])
            # A new client (a new process): the cache has filled itself meanwhile.
            async with RegistryClient(origin.host, options) as client:
                with trio.fail_after(20):
                    while True:
                        mark = origin.mark()
                        second = await client.read_range("mirrors/kit", digest, 5000, 4096,
                                                         size=size)
                        if client.stats.mirror_full_answers == 0:
                            break
                        await trio.sleep(0.2)  # not filled yet (it is, within ms, on loopback)
                stats["second_full_answers"] = client.stats.mirror_full_answers
                stats["origin_sizes_second"] = origin.served(mark).sizes.get(digest, [])
            return first, second, stats

        first, second, stats = trio.run(ranges)
        blob_requests = [r for r in cache.requests() if f"/blobs/{digest}" in r.uri]
        # The cache was asked first (with containerd's ns=) and answered with the whole
        # blob: kitfs saw the 200 and hung up, which Distribution logs as its copy's 500.
        assert blob_requests[0].status in (200, 500) and "ns=" in blob_requests[0].uri
        assert stats["mirror_full_answers"] == 1, stats
        # kitfs read only what it asked for: the range, from the origin, not the body of 200.
        assert stats["bytes_received"] < 4096 + 64 * 1024, stats
        # The origin served that range, and the cache at most one blob while filling itself.
        sizes = stats["origin_sizes"]
        assert isinstance(sizes, list) and 4096 in sizes, stats
        assert sum(sizes) - 4096 <= size, stats
        # Filled, the cache serves the next range itself, as a range.
        assert stats["second_full_answers"] == 0, stats
        assert 4096 not in stats["origin_sizes_second"], stats  # type: ignore[operator]
        assert blob_requests[-1].status == 206
        # The bytes: what the origin holds.
        whole = origin_blob(origin, digest)
        assert first == whole[1000:5096] and second == whole[5000:9096]
    finally:
        cache.stop()


def origin_blob(origin: RegistryServer, digest: str) -> bytes:
    async def get() -> bytes:
        async with RegistryClient(origin.host) as client:
            return await client.get_blob("mirrors/kit", digest, 64 * MiB)
    return trio.run(get)


def test_mount_through_pull_through_cache(
    origin: RegistryServer, kit: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """The whole ModelKit mounted through a cold cache: every file right, the cache's
    200-for-Range seen and counted in `kitfs status`, and kitfs receiving about one
    model's worth of bytes, not that plus whole blobs it did not ask for."""
    ref, files = kit
    layers = blob_digests(ref)
    cache = start_registry(tmp_path / "cache", request_log=True, proxy=f"http://{origin.host}")
    try:
        hosts = hosts_dir(tmp_path, origin.host,
                          f'[host."http://{cache.host}"]\n  capabilities = ["pull", "resolve"]\n')
        port = free_port()
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache-dir", "--hosts-dir", str(hosts),
                     "--prefetch", "none", "--metrics-addr", f"127.0.0.1:{port}") as mp:
            assert {rel: hashlib.sha256((mp / rel).read_bytes()).hexdigest()
                    for rel in files} == files
            registry = status_registry(mp)
            samples, _ = scrape(port)
            assert value(samples, "kitfs_registry_mirror_events_total", mountpoint=str(mp),
                         registry=origin.host, event="full_answer") >= 1
        assert registry["mirror_full_answers"] >= 1, registry
        assert registry["mirror_fallbacks"] >= registry["mirror_full_answers"], registry
        [mirror] = registry["mirrors"]
        assert mirror["registry"] == cache.host and mirror["requests"]["ok"] >= 1, mirror
        model = sum(size for _, size in layers)
        assert registry["bytes_received"] <= model + 1 * MiB, (registry, model)
        assert any("ns=" in r.uri for r in cache.requests() if "/blobs/" in r.uri)
    finally:
        cache.stop()


def status_registry(mp: Path, counter: str = "mirror_full_answers") -> dict[str, Any]:
    """The mount's registry counters from `kitfs status --json`, once its state shows
    `counter` (the daemon rewrites its state every second or so)."""
    deadline = time.monotonic() + 15  # a bound on polling, not a timing under test
    while True:
        [doc] = json.loads(ok(kitfs("status", str(mp), "--json")))
        [registry] = doc["status"]["engine"]["registry"]
        if registry[counter] or time.monotonic() > deadline:
            return dict(registry)
        time.sleep(0.3)


def test_dead_mirrors_fall_back_to_the_registry(
    origin: RegistryServer, kit: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    ref, files = kit
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts (the kernel does) and never answers
    try:
        dead = f"127.0.0.1:{free_port()}"
        text = (f'[host."http://{dead}"]\n  capabilities = ["pull", "resolve"]\n'
                f'[host."http://127.0.0.1:{silent.getsockname()[1]}"]\n'
                '  capabilities = ["pull", "resolve"]\n')
        hosts = hosts_dir(tmp_path, origin.host, text)
        proc = unpack(ref, tmp_path / "out", "--hosts-dir", str(hosts),
                     "--timeout", "8", home=tmp_path / "home")
        ok(proc)
        assert unpacked(tmp_path / "out") == files
        silent.setblocking(False)
        silent.accept()[0].close()  # it was tried (and given up on)
    finally:
        silent.close()


def test_lying_mirror_is_refused_and_the_next_host_used(
    origin: RegistryServer, kit: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    ref, files = kit
    digest, size = blob_digests(ref)[0]
    with FaultProxy(origin.host) as liar:
        liar.add(Corrupt([100, 5000]), path=f"/blobs/{digest}")
        hosts = hosts_dir(tmp_path, origin.host,
                          f'[host."http://{liar.host}"]\n  capabilities = ["pull"]\n')
        mark = origin.mark()
        ok(kitfs("pull", ref, "--hosts-dir", str(hosts), home=tmp_path / "home"))
        assert liar.blob_requests(digest) == 1  # the mirror was asked once, and lied
        assert size in origin.served(mark).sizes.get(digest, [])  # the registry served it
        # Unpack from local storage: the blob pulled is the origin's, byte for byte.
        ok(unpack(ref, tmp_path / "out", home=tmp_path / "home"))
        assert unpacked(tmp_path / "out") == files
        # A pull-only mirror is never asked what a name means.
        assert not liar.requests(path="/manifests/")


def test_lying_mirror_that_is_the_last_puller_is_an_integrity_error(
    origin: RegistryServer, kit: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """The server may only resolve, so the liar is the one host able to pull: its bytes are
    refused once and the read fails with an IntegrityError, instead of asking it again
    forever."""
    ref, _ = kit
    digest, size = blob_digests(ref)[-1]
    with FaultProxy(origin.host) as liar:
        liar.add(Corrupt([0]), path=f"/blobs/{digest}")
        hosts = hosts_dir(tmp_path, origin.host,
                          f'server = "http://{origin.host}"\ncapabilities = ["resolve"]\n'
                          f'[host."http://{liar.host}"]\n  capabilities = ["pull"]\n')

        async def get() -> None:
            options = ClientOptions(hosts_dir=str(hosts))
            async with RegistryClient(origin.host, options) as client:
                with trio.fail_after(60):  # a hang guard, not a timing
                    await client.get_blob("mirrors/kit", digest, size=size)

        with pytest.raises(IntegrityError) as failed:
            trio.run(get)
        assert "\n" not in str(failed.value) and "digest" in str(failed.value)
        assert liar.blob_requests(digest) == 1


@pytest.mark.parametrize("claim", ["start", "total"])
def test_mirrors_malformed_range_answer_takes_the_next_host(
    origin: RegistryServer, kit: tuple[str, dict[str, str]], tmp_path: Path, claim: str
) -> None:
    """A mirror's 206 that starts elsewhere than asked, or claims a blob size the descriptor
    denies, is the mirror's fault: the range comes from the registry, right, and the
    mirror is not asked for that blob again (its size claim never fails the read)."""
    ref, _ = kit
    digest, size = blob_digests(ref)[0]
    content_range = ("bytes 0-4095/" + str(size) if claim == "start"
                     else f"bytes 1000-5095/{size + 1}")
    with FaultProxy(origin.host) as liar:
        liar.add(Status(206, b"\0" * 4096, {"Content-Range": content_range}),
                 path=f"/blobs/{digest}")
        hosts = hosts_dir(tmp_path, origin.host,
                          f'[host."http://{liar.host}"]\n  capabilities = ["pull"]\n')

        async def ranges() -> list[bytes]:
            options = ClientOptions(hosts_dir=str(hosts))
            async with RegistryClient(origin.host, options) as client:
                return [await client.read_range("mirrors/kit", digest, 1000, 4096, size=size),
                        await client.read_range("mirrors/kit", digest, 9000, 100, size=size)]

        first, second = trio.run(ranges)
        blob = origin_blob(origin, digest)
        assert first == blob[1000:5096] and second == blob[9000:9100]
        assert liar.blob_requests(digest) == 1


def test_resolve_only_on_hosts_allowed_to(
    origin: RegistryServer, kit: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    ref, files = kit
    with FaultProxy(origin.host) as pull_only, FaultProxy(origin.host) as resolver:
        text = (f'[host."http://{pull_only.host}"]\n  capabilities = ["pull"]\n'
                f'[host."http://{resolver.host}"]\n  capabilities = ["resolve"]\n')
        hosts = hosts_dir(tmp_path, origin.host, text)
        ok(unpack(ref, tmp_path / "out", "--hosts-dir", str(hosts),
                 home=tmp_path / "home"))
        assert unpacked(tmp_path / "out") == files
        assert not pull_only.requests(path="/manifests/")
        assert pull_only.requests(path="/blobs/")
        manifests = resolver.requests(path="/manifests/")
        assert manifests and all("ns=" in s.path for s in manifests)
        assert not resolver.requests(path="/blobs/")


@pytest.mark.parametrize("after_bytes", [None, 65536])
def test_silent_mirror_then_origin(origin: RegistryServer, kit: tuple[str, dict[str, str]],
                                   tmp_path: Path, after_bytes: int | None) -> None:
    """A mirror that answers nothing for blobs, or stalls in the middle of one: the reads
    still finish from the origin, well within the deadline."""
    ref, files = kit
    digest = blob_digests(ref)[0][0] if after_bytes else ""  # mid-body: the big blob
    with FaultProxy(origin.host) as stuck:
        stuck.add(Hang(60, after_bytes), path=f"/blobs/{digest}")
        hosts = hosts_dir(tmp_path, origin.host,
                          f'[host."http://{stuck.host}"]\n  capabilities = ["pull"]\n')
        ok(unpack(ref, tmp_path / "out", "--hosts-dir", str(hosts),
                 "--timeout", "8", home=tmp_path / "home"))
        assert unpacked(tmp_path / "out") == files
        tried = stuck.requests(path=f"/blobs/{digest}")
        assert tried  # it was tried
        # A range it stalled on was resumed from the next host, never from the mirror.
        starts = {int(t.range.split("=")[1].split("-")[0]) for t in tried if t.range}
        assert not {start + (after_bytes or 0) for start in starts} & starts, tried


def test_silent_then_trickling_mirror_leave_the_registry_its_time(
    origin: RegistryServer, kit: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """A silent mirror and then one trickling bytes: each attempt gets a share of what is
    left of the read's deadline, so the registry still serves the read within it."""
    ref, _ = kit
    digest, size = blob_digests(ref)[0]
    with FaultProxy(origin.host) as silent, FaultProxy(origin.host) as trickle:
        silent.add(Hang(60), path=f"/blobs/{digest}")
        trickle.add(Slow(64 << 10), path=f"/blobs/{digest}")
        hosts = hosts_dir(tmp_path, origin.host,
                          f'[host."http://{silent.host}"]\n  capabilities = ["pull"]\n'
                          f'[host."http://{trickle.host}"]\n  capabilities = ["pull"]\n')

        async def read() -> bytes:
            options = ClientOptions(hosts_dir=str(hosts))
            async with RegistryClient(origin.host, options) as client:
                # The read's deadline, as a mount gives one (the mirrors alone would
                # take 7.5 s, a share of --timeout, and 16 s for this MiB).
                with trio.fail_after(4):
                    return await client.read_range("mirrors/kit", digest, 0, MiB, size=size)

        got = trio.run(read)
        assert got == origin_blob(origin, digest)[:MiB]
        assert silent.blob_requests(digest) == 1 and trickle.blob_requests(digest) == 1
        silent.close()


class _Recorder(BaseHTTPRequestHandler):
    """A mirror that wants credentials of its own: 401 (Basic) to everything; it keeps
    the headers of every request it got."""

    seen: list[dict[str, str]]

    def do_GET(self) -> None:
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="mirror"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_registry_credentials_never_reach_a_mirror(
    auth_registry: RegistryServer, kitops_home: Path, tmp_path: Path
) -> None:
    host = auth_registry.host
    ok(kitfs("login", host, "-u", str(auth_registry.username), "--password-stdin",
             stdin=f"{auth_registry.password}\n"))
    project = make_project(tmp_path / "p", weight_bytes=256 << 10)
    ref = f"{host}/mirrors/private:v1"
    ok(kitfs("pack", str(project), "-t", ref))
    handler = type("Handler", (_Recorder,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        mirror = f"127.0.0.1:{server.server_address[1]}"
        hosts = hosts_dir(tmp_path, host,
                          f'[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
                          f'  [host."http://{mirror}".header]\n    x-tenant = ["a", "b"]\n')
        ok(unpack(ref, tmp_path / "out", "--hosts-dir", str(hosts)))
        assert unpacked(tmp_path / "out") == source_files(project)
        seen = handler.seen
        assert seen  # asked first, refused without its own credentials: next host
        assert len(seen) == 1, seen  # and then left alone for a while, not asked each time
        assert all(s.get("x-tenant") == "a, b" for s in seen), seen  # hosts.toml's header
        assert not [s for s in seen if "authorization" in s], seen
    finally:
        server.shutdown()
        server.server_close()


def test_server_elsewhere_gets_its_own_credentials_only(
    auth_registry: RegistryServer, kitops_home: Path, tmp_path: Path
) -> None:
    """`server` naming another host than the registry is sent that host's credentials,
    never the registry's: a name whose server is the logged-in registry pulls with them,
    and the logged-in registry's name pointed at a stranger sends it nothing."""
    host = auth_registry.host
    port = host.rpartition(":")[2]
    ok(kitfs("login", host, "-u", str(auth_registry.username), "--password-stdin",
             stdin=f"{auth_registry.password}\n"))
    project = make_project(tmp_path / "p", weight_bytes=4 << 10)
    ok(kitfs("pack", str(project), "-t", f"{host}/mirrors/server:v1"))
    handler = type("Handler", (_Recorder,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        stranger = f"127.0.0.1:{server.server_address[1]}"
        hosts = hosts_dir(tmp_path, f"localhost:{port}", f'server = "http://{host}"\n')
        hosts_dir(tmp_path, host, f'server = "http://{stranger}"\n')
        # Credentials stored for the host contacted, not for the name in the reference.
        ok(kitfs("inspect", f"localhost:{port}/mirrors/server:v1", "--hosts-dir", str(hosts)))
        one_line_error(kitfs("inspect", f"{host}/mirrors/server:v1", "--hosts-dir", str(hosts)))
        assert handler.seen  # asked, and refused without credentials of its own
        assert not [s for s in handler.seen if "authorization" in s], handler.seen
    finally:
        server.shutdown()
        server.server_close()


def test_docker_hubs_api_host_is_docker_io(kitops_home: Path) -> None:
    """containerd's own docker.io hosts.toml: registry-1.docker.io is docker.io itself, so
    no `?ns=` and docker.io's credentials; another host is a proxy with its own (none)."""
    hub = Credential(username="hub", password="pw")

    async def credentials() -> Credential | None:
        return hub

    async def creds() -> list[Credential | None]:
        text = ('server = "https://registry-1.docker.io"\n'
                '[host."https://public-mirror.example.com"]\n'
                '[host."https://docker-mirror.internal"]\n')
        route = Route("docker.io", ClientOptions(), parse_hosts(text, "/d"), None, credentials)
        sessions = [h.session for h in route.hosts]
        assert [s.namespace for s in sessions] == ["docker.io", "docker.io", None]
        try:
            return [await s.auth.credential() for s in sessions]
        finally:
            await route.aclose()

    assert trio.run(creds) == [None, None, hub]


def test_refusing_mirror_is_named_in_the_error(
    origin: RegistryServer, kit: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """The only host allowed to resolve is a mirror that denies us: the error names the
    mirror to log in to, not the registry."""
    ref, _ = kit
    with FaultProxy(origin.host) as refusing:
        refusing.add(Status(403))
        hosts = hosts_dir(tmp_path, origin.host,
                          f'server = "http://{origin.host}"\ncapabilities = ["pull"]\n'
                          f'[host."http://{refusing.host}"]\n  capabilities = ["resolve"]\n')
        line = one_line_error(kitfs("inspect", ref, "--hosts-dir", str(hosts),
                                    home=tmp_path / "home"))
        assert f"kit login {refusing.host}`" in line, line


def test_mount_refuses_a_lying_mirrors_ranges(
    origin: RegistryServer, kit: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """A mount checks each chunk against its own digest: a chunk a mirror got wrong fails
    that read (EIO, as any lie does), and the mirror is not asked for the blob again, so
    the next read of it comes from the registry, right."""
    ref, files = kit
    digest, _ = blob_digests(ref)[0]
    with FaultProxy(origin.host) as liar:
        liar.add(Corrupt(range(0, 16 * MiB, 4096)), path=f"/blobs/{digest}")
        hosts = hosts_dir(tmp_path, origin.host,
                          f'[host."http://{liar.host}"]\n  capabilities = ["pull"]\n')
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache-dir", "--hosts-dir", str(hosts),
                     "--prefetch", "none") as mp:
            path = mp / "model" / "model.safetensors"
            with pytest.raises(OSError) as failed:
                path.read_bytes()
            assert failed.value.errno == errno.EIO
            asked = liar.blob_requests(digest)
            assert asked >= 1
            got = {rel: hashlib.sha256((mp / rel).read_bytes()).hexdigest() for rel in files}
            assert got == files
            assert liar.blob_requests(digest) == asked  # not asked again
            registry = status_registry(mp, "mirror_bad_blobs")
            assert registry["mirror_bad_blobs"] >= 1, registry


def test_mirror_tls_from_hosts_toml(
    origin: RegistryServer, kit: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """An https:// mirror with a private CA: trusted through hosts.toml's `ca` (a path
    relative to the file), and without it refused by TLS, so the registry serves."""
    ref, files = kit
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    cache = start_registry(tmp_path / "cache", request_log=True, tls=(cert, key),
                           proxy=f"http://{origin.host}")
    try:
        mirror = f'[host."https://{cache.host}"]\n  capabilities = ["pull", "resolve"]\n'
        hosts = hosts_dir(tmp_path, origin.host, mirror + '  ca = "mirror-ca.pem"\n')
        shutil.copy(cert, next(hosts.iterdir()) / "mirror-ca.pem")
        ok(unpack(ref, tmp_path / "out", "--hosts-dir", str(hosts)))
        assert unpacked(tmp_path / "out") == files
        served = len(cache.requests())
        assert served > 0  # the mirror, over TLS, trusted through its ca
        hosts_dir(tmp_path, origin.host, mirror)  # no ca: the mirror's certificate fails
        ok(unpack(ref, tmp_path / "again", "--hosts-dir", str(hosts)))
        assert unpacked(tmp_path / "again") == files
        assert len(cache.requests()) == served
    finally:
        cache.stop()


class _PeerRecorder(BaseHTTPRequestHandler):
    """An https mirror that asks for (but does not require) a client certificate, notes
    whether one came, and has nothing (404)."""

    peers: list[bool]

    def do_GET(self) -> None:
        self.peers.append(bool(self.connection.getpeercert()))  # type: ignore[attr-defined]
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_registry_client_certificate_never_reaches_a_mirror(
    origin: RegistryServer, kit: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """--cert/--key are the registry's: a mirror that would accept them is never shown
    them (only a hosts.toml `client` entry of its own would be)."""
    ref, _ = kit
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cert)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    handler = type("Handler", (_PeerRecorder,), {"peers": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        mirror = f"127.0.0.1:{server.server_address[1]}"
        hosts = hosts_dir(tmp_path, origin.host,
                          f'[host."https://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
                          f'  ca = "{cert}"\n')
        ok(kitfs("inspect", ref, "--hosts-dir", str(hosts), "--cert", str(cert),
                 "--key", str(key), home=tmp_path / "home"))
        assert handler.peers and not any(handler.peers), handler.peers
        hosts_dir(tmp_path, origin.host,  # its own `client` entry: that one it is shown
                  f'[host."https://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
                  f'  ca = "{cert}"\n  client = [["{cert}", "{key}"]]\n')
        handler.peers.clear()
        ok(kitfs("inspect", ref, "--hosts-dir", str(hosts), home=tmp_path / "home"))
        assert handler.peers and all(handler.peers), handler.peers
    finally:
        server.shutdown()
        server.server_close()


def test_pushes_go_to_the_registry_only(
    origin: RegistryServer, tmp_path: Path
) -> None:
    """A mirror with every capability is still not where kitfs pushes (or checks what the
    registry already has before pushing): that is the registry's `server`."""
    project = make_project(tmp_path / "p", weight_bytes=64 << 10)
    ref = f"{origin.host}/mirrors/pushed:v1"
    with FaultProxy(origin.host) as mirror:
        hosts = hosts_dir(tmp_path, origin.host, f'[host."http://{mirror.host}"]\n')
        ok(kitfs("pack", str(project), "-t", ref, "--hosts-dir", str(hosts),
                 home=tmp_path / "home"))
        assert not [s for s in mirror.requests() if s.method != "GET"], mirror.requests()
        assert not mirror.requests(path="/blobs/")
    assert unpack(ref, tmp_path / "out").returncode == 0
    assert unpacked(tmp_path / "out") == source_files(project)
