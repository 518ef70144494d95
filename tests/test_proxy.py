"""Proxies: kit's `--proxy` and Go's HTTP_PROXY / HTTPS_PROXY / NO_PROXY, for every verb
and the mount daemon, shown through a real forwarding proxy (Debian's tinyproxy).

How a test knows a request went through the proxy: tinyproxy opens its
connections from 127.0.0.2 (tests/tinyproxy.py), and the registry's request
log records each client's address, so every request a command made is
checked one by one ("all from 127.0.0.2": through the proxy; "none": direct).
tinyproxy's own log lists what it was asked to forward (absolute URLs) and
which tunnels it opened (CONNECT host:port).

The loopback rule: Go, and so kit, never take a proxy from the environment
for `localhost` or a loopback address (golang.org/x/net/http/httpproxy,
useProxy), while `--proxy` applies to every host. So `--proxy` is shown
against a registry on 127.0.0.1, and the environment against one named by
this machine's host name (not loopback to Go, which looks at the name, not at
what it resolves to); nothing on the machine is changed for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tinyproxy import OUTGOING, Tinyproxy, running_tinyproxy, tls_front

from helpers import kitfs, make_project, ok, one_line_error, source_files
from kitfs.errors import UsageError
from kitfs.oci.proxy import NoProxy, Proxies, Proxy, mask_url, parse_proxy
from mounting import mounted
from registry import RegistryServer, free_port, start_registry

SECRET = "pr0xy-s3cret"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "KITFS_PROXY")
FUSE = os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
needs_fuse = pytest.mark.skipif(not FUSE, reason="needs /dev/fuse and fusermount3")


# -- Go's rules, unit by unit ---------------------------------------------------------------


def env_proxies(**env: str) -> Proxies:
    return Proxies.from_environment(env)


@pytest.mark.parametrize(("no_proxy", "url", "proxied"), [
    # loopback is never proxied from the environment, whatever NO_PROXY says
    ("", "http://localhost:5000/v2/", False),
    ("", "http://127.0.0.1:5000/v2/", False),
    ("", "http://127.8.9.10/v2/", False),
    ("", "http://[::1]:5000/v2/", False),
    ("", "http://[::ffff:127.0.0.1]:5000/v2/", False),
    ("", "http://foo.localhost:5000/v2/", True),  # only the name `localhost` itself
    ("", "http://registry.example.com/v2/", True),
    ("", "http://10.1.2.3:5000/v2/", True),
    # a domain matches itself and its subdomains; a leading dot or *. only subdomains
    ("example.com", "http://example.com/v2/", False),
    ("example.com", "http://r.example.com/v2/", False),
    ("example.com", "http://notexample.com/v2/", True),
    (".example.com", "http://example.com/v2/", True),
    (".example.com", "http://r.example.com/v2/", False),
    ("*.example.com", "http://example.com/v2/", True),
    ("*.example.com", "http://a.b.example.com/v2/", False),
    (" Example.COM ", "http://R.example.com/v2/", False),  # case and spaces do not matter
    # ports: an entry with one matches that port only (the scheme's default counts)
    ("example.com:5000", "http://r.example.com:5000/v2/", False),
    ("example.com:5000", "http://r.example.com:5001/v2/", True),
    ("example.com:80", "http://example.com/v2/", False),
    ("example.com:443", "https://example.com/v2/", False),
    # addresses and networks compare addresses; names are not resolved
    ("10.1.2.3", "http://10.1.2.3:5000/v2/", False),
    ("10.1.2.3:5000", "http://10.1.2.3:5001/v2/", True),
    ("10.0.0.0/8", "http://10.200.0.1/v2/", False),
    ("10.0.0.0/8", "http://11.0.0.1/v2/", True),
    ("fd00::/8", "http://[fd12::1]:5000/v2/", False),
    ("[fd00::1]:5000", "http://[fd00::1]:5000/v2/", False),
    ("[fd00::1]:5000", "http://[fd00::1]:5001/v2/", True),
    ("10.1.2.3", "http://ten.example.com/v2/", True),
    ("3.4", "http://1.2.3.4/v2/", True),  # a domain entry never matches an address
    # `*` exempts everything; lists; junk entries are skipped
    ("*", "http://registry.example.com/v2/", False),
    ("a.org, ,b.org", "http://x.b.org/v2/", False),
    (":80,[bad,a.org", "http://x.a.org/v2/", False),
    # international names compare as punycode
    ("bücher.example", "http://xn--bcher-kva.example/v2/", False),
])
def test_no_proxy_rules_are_gos(no_proxy: str, url: str, proxied: bool) -> None:
    proxies = env_proxies(HTTP_PROXY="proxy.corp:3128", HTTPS_PROXY="proxy.corp:3128",
                          NO_PROXY=no_proxy)
    assert (proxies.for_url(url) is not None) is proxied


def test_environment_names_and_schemes() -> None:
    # each scheme its own variable, no fallback from one to the other
    only_http = env_proxies(HTTP_PROXY="http://h:1")
    assert only_http.for_url("http://r.example/v2/") == Proxy("http", "h", 1)
    assert only_http.for_url("https://r.example/v2/") is None
    only_https = env_proxies(https_proxy="https://s:2")
    assert only_https.for_url("https://r.example/v2/") == Proxy("https", "s", 2)
    assert only_https.for_url("http://r.example/v2/") is None
    # uppercase wins over lowercase; an empty uppercase one does not hide the lowercase
    both = env_proxies(HTTP_PROXY="http://upper:1", http_proxy="http://lower:2")
    assert both.for_url("http://r.example/v2/") == Proxy("http", "upper", 1)
    empty = env_proxies(HTTP_PROXY="", http_proxy="http://lower:2", no_proxy="other.example")
    assert empty.for_url("http://r.example/v2/") == Proxy("http", "lower", 2)
    assert empty.for_url("http://other.example/v2/") is None
    # host:port alone means http://; default ports per scheme
    assert parse_proxy("proxy.corp:3128", "X") == Proxy("http", "proxy.corp", 3128)
    assert parse_proxy("http://proxy.corp", "X").port == 80
    assert parse_proxy("https://proxy.corp", "X").port == 443
    # no proxy at all
    assert not env_proxies().configured and env_proxies().for_url("http://r/") is None


def test_explicit_proxy_covers_every_host() -> None:
    """kit's --proxy is http.ProxyURL: loopback included, NO_PROXY and the environment ignored."""
    proxies = Proxies.from_environment(
        {"HTTP_PROXY": "http://env:1", "NO_PROXY": "*"}, "http://flag:2")
    flag = Proxy("http", "flag", 2)
    for url in ("http://127.0.0.1:5000/v2/", "http://localhost/v2/",
                "https://registry.example.com/v2/", "http://[::1]:5000/v2/"):
        assert proxies.for_url(url) == flag


def test_credentials_are_sent_and_never_shown() -> None:
    proxy = parse_proxy("http://us%40er:p%3Ass@proxy.corp:3128", "--proxy")
    assert (proxy.username, proxy.password) == ("us@er", "p:ss")
    assert proxy.authorization == "Basic dXNAZXI6cDpzcw=="  # base64("us@er:p:ss")
    assert proxy.url == "http://us%40er:p%3Ass@proxy.corp:3128"
    assert str(proxy) == "http://us%40er:***@proxy.corp:3128"
    assert "p%3Ass" not in repr(proxy) and "p:ss" not in repr(proxy)
    assert Proxy("http", "::1", 8080).netloc == "[::1]:8080"
    assert parse_proxy("http://user@p:1", "X").authorization == "Basic dXNlcjo="
    assert mask_url("http://user:pw@h:1") == "http://user:***@h:1"
    assert mask_url("user:pw@h:1") == "user:***@h:1"
    assert mask_url("http://h:1") == "http://h:1"


def test_unusable_proxies(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(UsageError, match="http:// and https:// proxies only") as err:
        Proxies.from_environment({}, "socks5://u:secret@h:1080")
    assert "secret" not in str(err.value) and "u:***@h" in str(err.value)
    # from the environment it is kept, and refused when a request would use it (going
    # round a SOCKS proxy silently could break a network's rules; local verbs still work)
    socks = Proxies.from_environment({"HTTPS_PROXY": "socks5://h"})
    assert socks.for_url("https://r.example/v2/") == Proxy("socks5", "h", 1080)
    assert socks.https is not None and not socks.https.supported
    with pytest.raises(UsageError, match="not a proxy URL"):
        Proxies.from_environment({}, "http://u:secret@[bad")
    # an environment value Go cannot parse is ignored, as Go ignores it
    ignored = Proxies.from_environment({"HTTP_PROXY": "http://u:secret@[bad"})
    assert ignored.http is None
    assert "ignored" in caplog.text and "secret" not in caplog.text
    assert NoProxy.parse("*").everything


# -- through tinyproxy ----------------------------------------------------------------------


def base_env() -> dict[str, str]:
    """This environment without any proxy setting (kitfs gets only what a test gives it)."""
    return {k: v for k, v in os.environ.items() if k.upper() not in PROXY_VARS}




@dataclass
class Watch:
    """What the registry and the proxy were asked from a mark on."""

    registry: RegistryServer
    proxy: Tinyproxy
    registry_from: int = 0
    proxy_from: int = 0

    def mark(self) -> Watch:
        self.registry_from = self.registry.log_size()
        self.proxy_from = self.proxy.log_size()
        return self

    def settle(self) -> None:
        time.sleep(0.2)  # both write their logs right after answering

    def through_proxy(self) -> list[str]:
        """Every request since the mark came through the proxy; what was asked."""
        self.settle()
        answered = self.registry.requests(self.registry_from)
        assert answered, "the registry was asked nothing"
        direct = [r for r in answered if not r.remote.startswith(OUTGOING + ":")]
        assert not direct, f"requests that bypassed the proxy: {direct}"
        return [f"{r.method} {r.uri} {r.status}" for r in answered]

    def direct(self) -> None:
        """Every request since the mark went straight to the registry; the proxy saw none."""
        self.settle()
        answered = self.registry.requests(self.registry_from)
        assert answered, "the registry was asked nothing"
        proxied = [r for r in answered if r.remote.startswith(OUTGOING + ":")]
        assert not proxied, f"requests that went through the proxy: {proxied}"
        assert self.proxy.requests(self.proxy_from) == []

    def forwarded(self) -> list[tuple[str, str]]:
        return self.proxy.requests(self.proxy_from)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tinyproxy]:
    with running_tinyproxy(tmp_path_factory.mktemp("tinyproxy")) as server:
        yield server


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tinyproxy]:
    with running_tinyproxy(tmp_path_factory.mktemp("tinyproxy-auth"),
                           credentials=("kit", SECRET)) as server:
        yield server


@pytest.fixture(scope="module")
def loopback_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path_factory.mktemp("px-registry"), request_log=True)
    yield server
    server.stop()


def host_name() -> tuple[str, str]:
    """This machine's host name and the IPv4 address it resolves to: a registry name that
    is not loopback to Go (which judges the name), whatever its address."""
    name = socket.gethostname()
    try:
        address = socket.getaddrinfo(name, None, socket.AF_INET)[0][4][0]
    except OSError:
        pytest.skip(f"this machine's host name {name!r} does not resolve")
    if name.lower() == "localhost" or address == OUTGOING:
        pytest.skip(f"host name {name!r} ({address}) cannot tell proxied from direct here")
    return name, str(address)


@pytest.fixture(scope="module")
def named_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    name, address = host_name()
    server = start_registry(tmp_path_factory.mktemp("px-named"), request_log=True,
                            listen=address, name=name)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One self-signed certificate for this machine's host name and 127.0.0.1: the TLS
    registry's and the https:// proxy's, so one --ca-file trusts both."""
    name, _ = host_name()
    root = tmp_path_factory.mktemp("px-tls-files")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def tls_registry(
    tls_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegistryServer]:
    name, address = host_name()
    server = start_registry(tmp_path_factory.mktemp("px-tls"), request_log=True,
                            listen=address, name=name, tls=tls_files)
    yield server
    server.stop()


@dataclass
class Published:
    ref: str
    project: Path
    files: dict[str, str]


def publish(registry: RegistryServer, repo: str, root: Path, *extra: str) -> Published:
    """A ModelKit packed straight into `registry` (no proxy involved)."""
    project = make_project(root / "project", weight_bytes=3 << 20)
    ref = f"{registry.host}/{repo}:v1"
    ok(kitfs("pack", str(project), "-t", ref, *extra, home=root / "packer", env=base_env()))
    return Published(ref, project, source_files(project))


@pytest.mark.registry
def test_every_verb_through_the_proxy_flag(
    loopback_registry: RegistryServer, proxy: Tinyproxy, tmp_path: Path
) -> None:
    """pack, push, inspect, ls, info, pull, unpack, list and remove -r, each with --proxy against a
    registry on 127.0.0.1: every request the registry answered came through tinyproxy,
    which forwarded each as an absolute http:// URL."""
    reg, env = loopback_registry, base_env()
    flag = ["--proxy", proxy.url()]
    watch = Watch(reg, proxy)
    project = make_project(tmp_path / "project", weight_bytes=2 << 20)
    ref = f"{reg.host}/flag/tiny:v1"

    def run(*args: str, home: str = "home") -> str:
        watch.mark()
        out = ok(kitfs(*args, *flag, home=tmp_path / home, env=env))
        asked = watch.through_proxy()
        forwarded = watch.forwarded()
        assert forwarded and all(t.startswith(f"http://{reg.host}/v2/") for _, t in forwarded)
        assert len(forwarded) == len(asked), (forwarded, asked)  # one by one, nothing else
        return out

    digest = run("pack", str(project), "-t", ref).strip().rsplit("@", 1)[1]
    ok(kitfs("pack", str(project), "-t", "local/tiny:v2", home=tmp_path / "home", env=env))
    run("push", "local/tiny:v2", f"{reg.host}/flag/tiny:v2")
    assert digest in run("inspect", ref, home="reader")
    assert "model/model.safetensors" in run("ls", ref, home="reader")
    assert "tiny-llm" in run("info", "--remote", ref, home="reader")
    assert run("pull", ref).splitlines()[-1] == f"{reg.host}/flag/tiny@{digest}"
    out = tmp_path / "unpacked"
    run("unpack", ref, "-d", str(out), "--cache-dir", str(tmp_path / "ucache"),
        home="unpacker")
    assert (out / "model" / "model.safetensors").read_bytes() == (
        project / "model" / "model.safetensors").read_bytes()
    listed = run("list", f"{reg.host}/flag/tiny", home="reader")
    assert "v1" in listed and "v2" in listed
    run("remove", "-r", f"{reg.host}/flag/tiny:v2", home="reader")
    # pull fetched every blob through the proxy: the layers as GETs it forwarded
    manifest = json.loads((tmp_path / "home" / "storage" / "blobs" / "sha256"
                           / digest.split(":", 1)[1]).read_bytes())
    stored = {p.name for p in (tmp_path / "home" / "storage" / "blobs" / "sha256").iterdir()}
    assert {layer["digest"].split(":", 1)[1] for layer in manifest["layers"]} <= stored


@needs_fuse
@pytest.mark.fuse
@pytest.mark.registry
def test_mount_reads_through_an_authenticating_proxy(
    loopback_registry: RegistryServer, auth_proxy: Tinyproxy, tmp_path: Path
) -> None:
    """The daemon gets --proxy (credentials and all) and fetches every byte through it, in
    range requests; the password shows nowhere: not in the daemon's command line, its
    environment is its own, not in its log."""
    kit = publish(loopback_registry, "mnt/tiny", tmp_path)
    watch = Watch(loopback_registry, auth_proxy).mark()
    with mounted(kit.ref, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "none",
                 "--proxy", auth_proxy.url(), home=tmp_path / "mounter",
                 env=base_env()) as mnt:
        weights = mnt / "model" / "model.safetensors"
        size = weights.stat().st_size
        rng = random.Random(7)
        with weights.open("rb") as f:
            for _ in range(8):  # scattered reads first: each a range request of its own
                at = rng.randrange(size)
                f.seek(at)
                assert f.read(4096) == (kit.project / "model" / "model.safetensors"
                                        ).read_bytes()[at : at + 4096]
        for rel, digest in kit.files.items():
            assert hashlib.sha256((mnt / rel).read_bytes()).hexdigest() == digest, rel
        state = json.loads(ok(kitfs("status", str(mnt), "--json")))[0]
        pid = int(state["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert SECRET not in cmdline and "--proxy" not in cmdline
        log = state.get("log")
    asked = watch.through_proxy()
    assert any("/blobs/sha256:" in a and a.endswith(" 206") for a in asked), asked
    forwarded = watch.forwarded()
    assert any(method == "GET" and "/blobs/sha256:" in target for method, target in forwarded)
    if log and Path(log).exists():
        assert SECRET not in Path(log).read_text(errors="replace")


@pytest.mark.registry
def test_environment_proxy_and_no_proxy(
    named_registry: RegistryServer, proxy: Tinyproxy, tmp_path: Path
) -> None:
    """HTTP_PROXY (or http_proxy) for a registry named by this machine's host name: every
    verb goes through it, a mount's daemon too (it inherits the environment); NO_PROXY
    entries that match the name send it direct, as Go matches them."""
    reg = named_registry
    name, port = reg.host.rsplit(":", 1)
    kit = publish(reg, "env/tiny", tmp_path, "--plain-http")
    watch = Watch(reg, proxy)

    def inspect(env: dict[str, str], *extra: str) -> None:
        watch.mark()
        ok(kitfs("inspect", kit.ref, "--plain-http", *extra, home=tmp_path / "reader", env=env))

    with_proxy = dict(base_env(), HTTP_PROXY=proxy.url())
    inspect(with_proxy)
    watch.through_proxy()
    assert all(t.startswith(f"http://{reg.host}/") for _, t in watch.forwarded())
    watch.mark()
    ok(kitfs("ls", kit.ref, "--plain-http", home=tmp_path / "reader", env=with_proxy))
    watch.through_proxy()
    watch.mark()
    ok(kitfs("pull", kit.ref, "--plain-http", home=tmp_path / "puller",
             env=dict(base_env(), http_proxy=proxy.url())))  # lowercase, as Go reads it
    watch.through_proxy()
    if FUSE:
        watch.mark()
        with mounted(kit.ref, tmp_path / "mnt", tmp_path / "cache", "--plain-http",
                     "--prefetch", "none", home=tmp_path / "mounter", env=with_proxy) as mnt:
            for rel, digest in kit.files.items():
                assert hashlib.sha256((mnt / rel).read_bytes()).hexdigest() == digest, rel
        asked = watch.through_proxy()
        assert any("/blobs/sha256:" in a for a in asked), asked

    # NO_PROXY: these skip the proxy...
    for no_proxy in (name, name.upper(), f"{name}:{port}", "*", f"other.example,{name}"):
        inspect(dict(with_proxy, NO_PROXY=no_proxy))
        watch.direct()
    inspect(dict(with_proxy, no_proxy=name))
    watch.direct()
    # ...these do not: another port, the address the name resolves to (Go does not
    # resolve), a subdomains-only entry
    for no_proxy in (f"{name}:1", socket.gethostbyname(name), f".{name}", "other.example"):
        inspect(dict(with_proxy, NO_PROXY=no_proxy))
        watch.through_proxy()
    # a SOCKS proxy (kit would use it, kitfs cannot): refused when a request needs it,
    # in one line, while a verb that stays local works and NO_PROXY still exempts
    socks = dict(base_env(), HTTP_PROXY=f"socks5://kit:{SECRET}@127.0.0.1:{free_port()}")
    proc = kitfs("inspect", kit.ref, "--plain-http", home=tmp_path / "reader", env=socks)
    line = one_line_error(proc)
    assert "http:// and https:// proxies only, not socks5://" in line, line
    assert "kit:***@" in line and SECRET not in proc.stderr, line
    ok(kitfs("list", home=tmp_path / "puller", env=socks))
    inspect(dict(socks, NO_PROXY=name))
    watch.direct()
    # HTTPS_PROXY is not used for an http:// registry, even when it is the only one set
    inspect(dict(base_env(), HTTPS_PROXY=f"http://127.0.0.1:{free_port()}"))
    watch.direct()
    # and --proxy overrides the environment, NO_PROXY included
    inspect(dict(with_proxy, NO_PROXY="*", HTTP_PROXY=f"http://127.0.0.1:{free_port()}"),
            "--proxy", proxy.url())
    watch.through_proxy()


@pytest.mark.registry
def test_environment_never_proxies_loopback(
    loopback_registry: RegistryServer, proxy: Tinyproxy, tmp_path: Path
) -> None:
    """As Go: HTTP_PROXY is not used for 127.0.0.1 or localhost (it names a dead proxy here,
    and the registry is still reached, directly); --proxy is."""
    kit = publish(loopback_registry, "loop/tiny", tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    env = dict(base_env(), HTTP_PROXY=dead, HTTPS_PROXY=dead)
    watch = Watch(loopback_registry, proxy)
    for ref in (kit.ref, kit.ref.replace("127.0.0.1", "localhost")):
        watch.mark()
        ok(kitfs("inspect", ref, home=tmp_path / "reader", env=env))
        watch.direct()
    line = one_line_error(kitfs("inspect", kit.ref, "--proxy", dead, home=tmp_path / "reader",
                                env=env))
    assert f"proxy {dead}" in line and "Connection refused" in line, line


@pytest.mark.registry
def test_https_registry_through_connect_tunnels(
    tls_registry: RegistryServer, tls_files: tuple[Path, Path], proxy: Tinyproxy,
    auth_proxy: Tinyproxy, tmp_path: Path,
) -> None:
    """An https:// registry through HTTPS_PROXY: one CONNECT tunnel per connection, TLS to
    the registry inside it (its certificate checked against --ca-file), for the manifest
    requests and the blob path alike; credentials on the CONNECT for a proxy that wants
    them; HTTP_PROXY (dead here) is not consulted for https://."""
    reg = tls_registry
    ca = ["--ca-file", str(tls_files[0])]
    kit = publish(reg, "tls/tiny", tmp_path, *ca)
    dead = f"http://127.0.0.1:{free_port()}"
    for server in (proxy, auth_proxy):
        env = dict(base_env(), HTTPS_PROXY=server.url(), HTTP_PROXY=dead)
        watch = Watch(reg, server)
        for verb, home in (("inspect", "reader"), ("ls", "reader"), ("pull", f"p{server.port}")):
            watch.mark()
            ok(kitfs(verb, kit.ref, *ca, home=tmp_path / home, env=env))
            watch.through_proxy()
            tunnels = watch.forwarded()
            assert tunnels and all(t == ("CONNECT", reg.host) for t in tunnels), tunnels
    stored = tmp_path / f"p{proxy.port}" / "storage" / "blobs" / "sha256"
    assert len(list(stored.iterdir())) >= 3  # manifest, config, layers: all through tunnels
    # a tunnel the proxy refuses: one line, naming the proxy, the password masked
    env = dict(base_env(), HTTPS_PROXY=f"http://kit:wrong-{SECRET}@{auth_proxy.address}")
    line = one_line_error(kitfs("inspect", kit.ref, *ca, home=tmp_path / "r2", env=env))
    assert f"proxy http://kit:***@{auth_proxy.address} refused the credentials" in line, line
    assert SECRET not in line
    env = dict(base_env(), HTTPS_PROXY=f"http://{auth_proxy.address}")
    line = one_line_error(kitfs("inspect", kit.ref, *ca, home=tmp_path / "r2", env=env))
    assert "wants credentials" in line, line


@pytest.mark.registry
def test_an_https_proxy(
    loopback_registry: RegistryServer, tls_registry: RegistryServer,
    tls_files: tuple[Path, Path], auth_proxy: Tinyproxy, tmp_path: Path,
) -> None:
    """TLS to the proxy itself (tinyproxy behind stunnel), its certificate checked as the
    registry's is (--ca-file): requests to an http:// registry forwarded inside it, and
    to an https:// registry through a tunnel inside it (TLS in TLS), on the manifest
    path and the blob path; with credentials, which travel inside the TLS."""
    ca = ["--ca-file", str(tls_files[0])]
    plain = publish(loopback_registry, "tlsproxy/plain", tmp_path / "plain")
    secure = publish(tls_registry, "tlsproxy/secure", tmp_path / "secure", *ca)
    with tls_front(auth_proxy, *tls_files) as url:
        assert url.startswith("https://kit:")
        for kit, reg in ((plain, loopback_registry), (secure, tls_registry)):
            watch = Watch(reg, auth_proxy)
            for verb in ("ls", "pull"):
                watch.mark()
                ok(kitfs(verb, kit.ref, *ca, "--proxy", url, home=tmp_path / f"h-{reg.tls}",
                         env=base_env()))
                watch.through_proxy()
                forwarded = watch.forwarded()
                want = ("CONNECT", reg.host) if reg.tls else None
                assert forwarded and all(
                    f == want if want else f[1].startswith(f"http://{reg.host}/")
                    for f in forwarded), forwarded
        # the proxy's certificate is checked: without the CA file, one line saying whose
        line = one_line_error(kitfs("ls", plain.ref, "--proxy", url, home=tmp_path / "h2",
                                    env=base_env()))
        assert "TLS certificate of proxy https://kit:***@" in line and SECRET not in line, line


@pytest.mark.registry
def test_a_proxy_that_fails_is_one_line_naming_it(
    loopback_registry: RegistryServer, proxy: Tinyproxy, auth_proxy: Tinyproxy, tmp_path: Path
) -> None:
    kit = publish(loopback_registry, "fail/tiny", tmp_path)
    env = base_env()

    def error(proxy_url: str, *extra: str, ref: str = kit.ref, verb: str = "inspect") -> str:
        started = time.monotonic()
        line = one_line_error(kitfs(verb, ref, "--proxy", proxy_url, *extra,
                                    home=tmp_path / "reader", env=env))
        assert time.monotonic() - started < 30, line
        assert SECRET not in line, line
        return line

    down = f"127.0.0.1:{free_port()}"
    line = error(f"http://kit:{SECRET}@{down}")
    assert f"cannot connect to proxy http://kit:***@{down}" in line, line
    assert "Connection refused" in line, line
    # a proxy that wants credentials, and one that gets wrong ones (407, forwarded)
    assert "wants credentials" in error(f"http://{auth_proxy.address}")
    # (tinyproxy answers wrong ones with 401 and WWW-Authenticate, as if it were the registry)
    line = error(f"http://kit:not-{SECRET}@{auth_proxy.address}")
    assert f"(through proxy http://kit:***@{auth_proxy.address})" in line, line
    # a proxy that refuses this client (403)
    with running_tinyproxy(tmp_path / "strict", allow="10.9.9.9") as strict:
        line = error(strict.url())
        assert "HTTP 403" in line and f"(through proxy {strict.url()})" in line, line
    # a proxy that cannot reach the registry answers for it (tinyproxy: 500)
    gone = f"127.0.0.1:{free_port()}/fail/tiny:v1"
    line = error(proxy.url(), "--timeout", "3", ref=gone)
    assert "HTTP 500" in line and f"(through proxy {proxy.url()})" in line, line
    # a proxy that hangs: --timeout bounds it
    with proxy.paused():
        started = time.monotonic()
        line = error(proxy.url(), "--timeout", "2")
        assert time.monotonic() - started < 15, line
    assert f"through proxy {proxy.url()}" in line, line
    # a proxy URL kitfs cannot use at all
    line = error(f"socks5://kit:{SECRET}@{down}")
    assert "http:// and https:// proxies only" in line and "kit:***@" in line, line


@needs_fuse
@pytest.mark.fuse
@pytest.mark.registry
def test_mount_through_a_dead_proxy_is_one_line(
    loopback_registry: RegistryServer, tmp_path: Path
) -> None:
    kit = publish(loopback_registry, "deadmnt/tiny", tmp_path)
    down = f"127.0.0.1:{free_port()}"
    (tmp_path / "mnt").mkdir()
    proc = kitfs("mount", kit.ref, str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "c"),
                 "--proxy", f"http://kit:{SECRET}@{down}", "--timeout", "3",
                 home=tmp_path / "mounter", env=base_env())
    if proc.returncode == 0:  # the daemon went round the proxy: leave nothing mounted
        kitfs("umount", str(tmp_path / "mnt"))
    line = one_line_error(proc)
    assert f"proxy http://kit:***@{down}" in line and SECRET not in proc.stderr, line
