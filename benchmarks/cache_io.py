"""What the chunk store's safety costs: ChunkStore put/get of 8 MiB chunks vs plain files.

Contenders, interleaved in every round so this VM's noise hits them all alike:

- write: plain `open/write/close`; plain write + fdatasync + rename (what any
  crash-safe writer pays); `ChunkStore.put` (header + xxh3 + the same); and
  `ChunkStore.put(sync=False)`.
- read (warm page cache, i.e. what a just-fetched chunk costs): plain
  `open/read`; `ChunkStore.get` (header check + xxh3 of the payload).
- read (cold: pages dropped with POSIX_FADV_DONTNEED first): the same two.

Write contenders run in a different order each round (unsynced writes leave
dirty pages whose writeback slows whoever runs next).

Then the bookkeeping a daemon pays on a big cache: building a store (must
not scan), the first `usage()` (a full scan), a `gc` that finds nothing to
do, and a `gc` that evicts 10%, all on 10k chunk files (small payloads: the
scan costs per file, not per byte); and the per-call cost of `touch` and of
the memory tier.

Prints a Markdown table of medians (GB/s, ratio to the plain contender) and
writes JSON to benchmarks/results/cache_io.json.

    .venv/bin/python benchmarks/cache_io.py --chunks 32 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kitfs.cache import ChunkStore, MemoryTier, chunk_key_for_position

RESULTS = Path(__file__).resolve().parent / "results" / "cache_io.json"
LAYER = "sha256:" + "5a" * 32


def plain_write(directory: Path, chunks: list[bytes], sync: bool) -> None:
    for i, data in enumerate(chunks):
        final = directory / f"plain-{i}"
        tmp = directory / f".plain-{i}.tmp" if sync else final
        with open(tmp, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fdatasync(f.fileno())
        if sync:
            os.rename(tmp, final)


def plain_read(directory: Path, n: int) -> int:
    total = 0
    for i in range(n):
        with open(directory / f"plain-{i}", "rb") as f:
            total += len(f.read())
    return total


def put_all(store: ChunkStore, pairs: list[tuple[str, bytes]]) -> None:
    for k, c in pairs:
        store.put(k, c)


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_round(
    base: Path,
    keys: list[str],
    chunks: list[bytes],
    record: Callable[[str, float], None],
    rotate: int,
) -> None:
    n = len(chunks)
    plain_dir = base / "plain"
    fresh_dir = base / "plain-nosync"
    plain_dir.mkdir()
    fresh_dir.mkdir()
    store = ChunkStore(base / "store")
    nosync = ChunkStore(base / "store-nosync", sync=False)
    pairs = list(zip(keys, chunks, strict=True))

    def store_get() -> None:
        for k in keys:
            if store.get(k) is None:
                raise SystemExit(f"chunk {k} missing")

    writers: list[tuple[str, Callable[[], object]]] = [
        ("write: plain open/write/close", lambda: plain_write(fresh_dir, chunks, False)),
        ("write: plain + fdatasync + rename", lambda: plain_write(plain_dir, chunks, True)),
        ("write: ChunkStore.put", lambda: put_all(store, pairs)),
        ("write: ChunkStore.put(sync=False)", lambda: put_all(nosync, pairs)),
    ]
    # Rotate the order each round: unsynced writes leave dirty pages whose
    # writeback slows whoever runs next, which must not always be the same one.
    for name, fn in writers[rotate % 4 :] + writers[: rotate % 4]:
        record(name, timed(fn))
    os.sync()

    for _ in range(2):  # warm: the first pass may still fault pages in
        warm_plain = timed(lambda: plain_read(plain_dir, n))
        warm_store = timed(store_get)
    record("read warm: plain open/read", warm_plain)
    record("read warm: ChunkStore.get", warm_store)

    drop_cache([plain_dir / f"plain-{i}" for i in range(n)])
    record("read cold: plain open/read", timed(lambda: plain_read(plain_dir, n)))
    drop_cache([store.path(k) for k in keys])
    record("read cold: ChunkStore.get", timed(store_get))


def io_rounds(base: Path, n: int, size: int, rounds: int) -> dict[str, list[float]]:
    chunks = [os.urandom(size) for _ in range(n)]
    keys = [chunk_key_for_position(LAYER, size, i) for i in range(n)]
    gbps: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        gbps.setdefault(name, []).append(n * size / seconds / 1e9)

    for r in range(rounds):
        round_dir = base / f"round-{r}"
        round_dir.mkdir()
        one_round(round_dir, keys, chunks, record, r)
        shutil.rmtree(round_dir)
    return gbps


def bookkeeping(base: Path, files: int) -> dict[str, float]:
    root = base / "big"
    writer = ChunkStore(root, sync=False)
    for i in range(files):
        writer.put(chunk_key_for_position(LAYER, 4096, i), b"x" * 1024)
    out: dict[str, float] = {}
    start = time.perf_counter()
    store = ChunkStore(root)
    out[f"ChunkStore() on {files} files"] = time.perf_counter() - start
    start = time.perf_counter()
    usage = store.usage()
    out["first usage() (full scan)"] = time.perf_counter() - start
    assert usage.chunks == files
    calls = 100_000
    start = time.perf_counter()
    for _ in range(calls):
        store.usage()
    out["later usage() per call (counter)"] = (time.perf_counter() - start) / calls
    start = time.perf_counter()
    store.gc(target=None)
    out["gc, nothing to evict"] = time.perf_counter() - start
    start = time.perf_counter()
    result = store.gc(target=int(usage.bytes * 0.9))
    out[f"gc evicting {result.removed_chunks} of {files}"] = time.perf_counter() - start
    k = chunk_key_for_position(LAYER, 4096, files - 1)
    n = 100_000
    start = time.perf_counter()
    for _ in range(n):
        store.touch(k)
    out["touch() per call (throttled)"] = (time.perf_counter() - start) / n
    tier = MemoryTier(capacity=64 << 20)
    blob = b"x" * (1 << 20)
    tier_keys = [f"k{i}" for i in range(128)]  # twice the capacity: every put evicts
    start = time.perf_counter()
    for i in range(n):
        tier.put(tier_keys[i % 128], blob)
    out["MemoryTier.put per call (evicting)"] = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for i in range(n):
        tier.get(tier_keys[i % 128])
    out["MemoryTier.get per call"] = (time.perf_counter() - start) / n
    shutil.rmtree(root)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=32, help="chunks per contender per round")
    parser.add_argument("--chunk-mib", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--files", type=int, default=10_000, help="files for the scan/gc timing")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="kitfs-cache-bench-") as tmp:
        base = Path(tmp)
        gbps = io_rounds(base, args.chunks, args.chunk_mib << 20, args.rounds)
        book = bookkeeping(base, args.files)

    medians = {name: statistics.median(v) for name, v in gbps.items()}
    baselines = {
        "write": medians["write: plain + fdatasync + rename"],
        "read warm": medians["read warm: plain open/read"],
        "read cold": medians["read cold: plain open/read"],
    }
    print(f"\n{args.chunks} x {args.chunk_mib} MiB chunks, {args.rounds} rounds, medians\n")
    print("| contender | GB/s | vs plain | min | max |")
    print("|---|---|---|---|---|")
    for name, med in medians.items():
        base_gbps = baselines[name.split(":")[0]]
        low, high = min(gbps[name]), max(gbps[name])
        print(f"| {name} | {med:.2f} | {med / base_gbps:.2f} | {low:.2f} | {high:.2f} |")
    print(f"\nbookkeeping on {args.files} chunk files\n")
    print("| operation | time |")
    print("|---|---|")
    for name, seconds in book.items():
        shown = f"{seconds * 1e6:.2f} us" if seconds < 1e-3 else f"{seconds * 1e3:.1f} ms"
        print(f"| {name} | {shown} |")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "chunks": args.chunks,
                "chunk_mib": args.chunk_mib,
                "rounds": args.rounds,
                "gbps": gbps,
                "median_gbps": medians,
                "bookkeeping_seconds": book,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
