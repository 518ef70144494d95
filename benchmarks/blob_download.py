"""How fast does one blob come out of a registry: curl vs kitfs's RegistryClient.

Starts a CNCF Distribution registry (`docker-registry`) on loopback with its
storage in a temporary directory, pushes one random blob with RegistryClient,
then downloads it several rounds, contenders interleaved so the noise of this
VM hits them all alike:

- curl -s -o /dev/null on the blob URL (what a user would reach for),
- RegistryClient.stream_blob (whole blob, sha256 verified, data discarded),
- RegistryClient.read_range in parallel 16 MiB ranges (4 and 8 in flight),
- optionally the same stream at other socket read sizes (--read-sizes), to
  show what the read-size change buys.

Prints a Markdown table of medians (GB/s, ratio to curl) and writes JSON to
benchmarks/results/blob_download.json.

    .venv/bin/python benchmarks/blob_download.py --size 1G
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpcore
import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kitfs.oci import client as client_module
from kitfs.oci.client import ClientOptions, RegistryClient
from kitfs.oci.transport import SOCKET_READ_SIZE
from kitfs.units import parse_size
from registry import start_registry

REPO = "bench/blob"
RESULTS = Path(__file__).resolve().parent / "results" / "blob_download.json"


def make_blob(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 16 << 20))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return "sha256:" + h.hexdigest()


def drop_page_cache_hint(path: Path) -> None:
    """Keep the comparison about the network path: the blob is hot for everyone alike."""
    with path.open("rb") as f:
        while f.read(64 << 20):
            pass


def run_curl(url: str, size: int) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{size_download}", url],
        capture_output=True,
        check=True,
    )
    elapsed = time.perf_counter() - start
    if int(float(done.stdout.decode())) != size:
        raise RuntimeError(f"curl got {done.stdout!r} bytes, expected {size}")
    return elapsed


def run_curl_sha256(url: str, digest: str) -> float:
    """curl piped into OpenSSL's sha256 (coreutils' sha256sum is 4x slower here, no SHA-NI):
    a download verified against its digest, as every kitfs download is."""
    start = time.perf_counter()
    done = subprocess.run(
        f"curl -s -f {url} | openssl dgst -sha256 -r", shell=True, capture_output=True, check=True
    )
    elapsed = time.perf_counter() - start
    if done.stdout.split()[0].decode() != digest.split(":", 1)[1]:
        raise RuntimeError("curl + openssl sha256 got different bytes")
    return elapsed


def httpx_only() -> httpx.AsyncBaseTransport:
    """httpx's own transport, without kitfs's lean blob path: what that path buys."""
    return httpx.AsyncHTTPTransport(http1=True, trust_env=False)


async def run_stream(host: str, digest: str, size: int, plain_httpx: bool = False) -> float:
    async with RegistryClient(host, transport=httpx_only() if plain_httpx else None) as c:
        start = time.perf_counter()
        got = 0
        async with c.stream_blob(REPO, digest) as chunks:
            async for chunk in chunks:
                got += len(chunk)
        elapsed = time.perf_counter() - start
    if got != size:
        raise RuntimeError(f"stream got {got} bytes, expected {size}")
    return elapsed


async def run_ranges(
    host: str, digest: str, size: int, range_size: int, parallel: int, plain_httpx: bool = False
) -> float:
    offsets = list(range(0, size, range_size))
    got = 0

    async with RegistryClient(host, transport=httpx_only() if plain_httpx else None) as c:

        async def worker() -> None:
            nonlocal got
            while offsets:
                offset = offsets.pop(0)
                data = await c.read_range(REPO, digest, offset, min(range_size, size - offset))
                got += len(data)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(parallel):
                nursery.start_soon(worker)
        elapsed = time.perf_counter() - start
    if got != size:
        raise RuntimeError(f"ranges got {got} bytes, expected {size}")
    return elapsed


def with_read_size(read_size: int, fn: Callable[[], Awaitable[float]]) -> Callable[[], float]:
    def run() -> float:
        old = httpcore.AsyncHTTP11Connection.READ_NUM_BYTES
        httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = read_size
        try:
            return trio.run(fn)
        finally:
            httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = old

    return run


def with_inline_hash(fn: Callable[[], Awaitable[float]]) -> Callable[[], float]:
    def run() -> float:
        old = client_module._THREADED_HASH_MIN
        client_module._THREADED_HASH_MIN = 1 << 62
        try:
            return trio.run(fn)
        finally:
            client_module._THREADED_HASH_MIN = old

    return run


def fmt_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="blob size (default 1G)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--range-size", default="16M")
    parser.add_argument("--parallel", default="2,4,8", help="range requests in flight")
    parser.add_argument(
        "--read-sizes",
        default="64K,1M,4M",
        help="socket read sizes to compare for stream_blob through plain httpx ('' to skip)",
    )
    parser.add_argument(
        "--no-inline-hash",
        action="store_true",
        help="skip the stream variant that hashes on the event loop thread",
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    size = parse_size(args.size)
    range_size = parse_size(args.range_size)
    parallels = [int(p) for p in args.parallel.split(",") if p]
    read_sizes = [parse_size(s) for s in args.read_sizes.split(",") if s]

    with tempfile.TemporaryDirectory(prefix="kitfs-bench-") as tmp:
        root = Path(tmp)
        server = start_registry(root)
        host = server.host
        try:
            blob = root / "blob.bin"
            print(f"generating {fmt_size(size)} random blob...", file=sys.stderr)
            digest = make_blob(blob, size)

            async def push() -> float:
                async with RegistryClient(host, ClientOptions()) as c:
                    start = time.perf_counter()
                    await c.push_blob(REPO, digest, size, str(blob))
                    return time.perf_counter() - start

            push_s = trio.run(push)
            print(f"pushed in {push_s:.2f}s ({size / push_s / 1e9:.2f} GB/s)", file=sys.stderr)
            blob.unlink()  # keep the page cache for the registry's copy
            stored = next((root / "data").rglob("data"))
            drop_page_cache_hint(stored)

            url = f"http://{host}/v2/{REPO}/blobs/{digest}"
            contenders: dict[str, Callable[[], float]] = {
                "curl": lambda: run_curl(url, size),
                "curl + openssl sha256": lambda: run_curl_sha256(url, digest),
                "stream_blob": lambda: trio.run(run_stream, host, digest, size),
            }
            for p in parallels:
                contenders[f"read_range {fmt_size(range_size)} x{p}"] = lambda p=p: trio.run(
                    run_ranges, host, digest, size, range_size, p
                )
            for rs in read_sizes:
                contenders[f"stream_blob via httpx ({fmt_size(rs)} reads)"] = with_read_size(
                    rs, lambda: run_stream(host, digest, size, True)
                )
            if read_sizes:
                p0 = 4 if 4 in parallels else parallels[0]
                contenders[f"read_range via httpx ({fmt_size(SOCKET_READ_SIZE)} reads) x{p0}"] = (
                    lambda: trio.run(run_ranges, host, digest, size, range_size, p0, True)
                )
            if not args.no_inline_hash:
                contenders["stream_blob (hash inline)"] = with_inline_hash(
                    lambda: run_stream(host, digest, size)
                )

            # warm up: connections, page cache, registry's own caches
            trio.run(run_stream, host, digest, size)
            run_curl(url, size)

            times: dict[str, list[float]] = {name: [] for name in contenders}
            for r in range(args.rounds):
                for name, fn in contenders.items():
                    times[name].append(fn())
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            server.stop()

    rates = {name: [size / t / 1e9 for t in ts] for name, ts in times.items()}
    medians = {name: statistics.median(v) for name, v in rates.items()}
    curl = medians["curl"]
    print(
        f"\nBlob download, {fmt_size(size)}, {args.rounds} rounds interleaved, "
        f"registry on loopback ({platform.node()}, {os.cpu_count()} CPUs)\n"
    )
    print("| contender | median GB/s | min | max | vs curl |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, v in rates.items():
        print(
            f"| {name} | {medians[name]:.2f} | {min(v):.2f} | {max(v):.2f} | "
            f"{medians[name] / curl:.2f} |"
        )
    print(f"\npush_blob (chunked PATCH upload): {size / push_s / 1e9:.2f} GB/s")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "size": size,
                "rounds": args.rounds,
                "range_size": range_size,
                "socket_read_size": SOCKET_READ_SIZE,
                "cpus": os.cpu_count(),
                "push_gbps": size / push_s / 1e9,
                "results": {
                    name: {
                        "median_gbps": medians[name],
                        "gbps": rates[name],
                        "ratio_vs_curl": medians[name] / curl,
                    }
                    for name in rates
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
