"""kitfs against what users do today, side by side, on one ModelKit in one run.

    bash scripts/bench [--quick] [--size 2G]          (installs the tools, then runs this)
    .venv/bin/python benchmarks/harness.py --size 2G --rounds 3

Starts a CNCF Distribution registry on loopback (its access log is the meter
for bytes served), writes a synthetic LLM project (benchmarks/synthmodel.py),
`kitfs pack`s and pushes it, then runs every contender in
benchmarks/contenders.py on it: local disk (the reference), curl, skopeo copy
+ untar, ratarmount, rclone mount and kitfs, in interleaved rounds with the
contender order rotated each round, page cache dropped before every cold
phase. Medians go into a Markdown table, JSON and a PNG chart in
benchmarks/results/ (harness-<size>.* or harness-quick.*), each with the
machine it ran on and pass/fail against the targets of the issue. When a
kitfs target fails, a py-spy profile of the daemon doing that work is
recorded next to them, so the table says not only that it is slow but why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # registry.py: the registry launcher tests use too

from benchmarks import workload as w  # noqa: E402
from benchmarks.contenders import (  # noqa: E402
    KITFS,
    NA,
    TOOLS,
    Contender,
    Kitfs,
    Rclone,
    Result,
    Scenario,
    ShardInfo,
    Value,
    all_contenders,
)
from benchmarks.synthmodel import make_model, parse_size  # noqa: E402
from kitfs.cache.memory import DEFAULT_MEMORY_TIER_BYTES  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REPO = "bench/llm"
TAG = "v1"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def kitfs_json(*args: str) -> object:
    done = subprocess.run([*KITFS, *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kitfs {args[0]} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def build_scenario(scratch: Path, size: int, fraction: float, *, registry: w.Registry | None = None,
                   tag: str = TAG) -> tuple[Scenario, dict[str, float]]:
    """Registry up, project written, packed and pushed; where every shard lies in its layer."""
    setup: dict[str, float] = {}
    reg = registry or w.start_registry(scratch / "registry")
    t0 = time.perf_counter()
    project = make_model(scratch / f"project-{tag}", size)
    setup["make_model_s"] = time.perf_counter() - t0
    ref = f"{reg.host}/{REPO}:{tag}"
    t0 = time.perf_counter()
    done = subprocess.run([*KITFS, "pack", str(project), "-t", ref,
                           "--config", str(scratch / "home"), "--work-dir", str(scratch / "work")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        if registry is None:
            reg.stop()
        raise SystemExit(f"kitfs pack failed: {done.stderr.strip()}")
    setup["pack_push_s"] = time.perf_counter() - t0
    inspected = kitfs_json("inspect", ref)
    assert isinstance(inspected, dict)
    layers = inspected["manifest"]["layers"]
    listing = kitfs_json("ls", ref)
    assert isinstance(listing, list)
    shards = sorted((ShardInfo(e["path"], e["layer"], int(e["offset"]), int(e["size"]))
                     for e in listing if str(e["path"]).endswith(".safetensors")),
                    key=lambda s: s.path)
    sc = Scenario(reg, REPO, tag, project, layers, shards, scratch, fraction)
    local = [w.ShardRef(s.path, project / s.path, 0, s.size) for s in shards]
    sc.picks = w.pick_random(local, fraction)
    return sc, setup


def rss_at_size(main: Scenario, label: str) -> dict[str, float]:
    """kitfs daemon memory on another model size, same registry, same workload as `seq`.

    "Memory flat in model size" is judged within one run: the main scenario's
    cold sequential read against the same read of a smaller and/or larger
    ModelKit, each on a fresh mount with an empty cache.
    """
    sc, _ = build_scenario(main.scratch, parse_size(label), main.random_fraction,
                           registry=main.registry, tag=f"rss-{label.lower()}")
    shutil.rmtree(sc.project, ignore_errors=True)  # only the registry's copy is read
    k = Kitfs(sc)
    with k.cold() as m:
        t0 = time.perf_counter()
        n = w.sequential(m.shards)
        gbps = n / (time.perf_counter() - t0) / 1e9
    return {"peak_rss": float(m.usage.peak_rss), "rss_anon": float(m.usage.rss_anon),
            "memory_tier": float(num(m.extra.get("engine_bytes_cached_memory")) or 0),
            "seq_gbps": gbps}


# -- rounds -----------------------------------------------------------------------------


def run_rounds(contenders: list[Contender], rounds: int) -> dict[str, list[Result]]:
    runs: dict[str, list[Result]] = {c.name: [] for c in contenders}
    live = [c for c in contenders if c.unavailable is None]
    for r in range(rounds):
        order = live[r % len(live):] + live[: r % len(live)]
        for c in order:
            t0 = time.perf_counter()
            try:
                res = c.run_round()
            except Exception as e:  # one broken contender must not sink the run
                traceback.print_exc()
                res = {"error_round": NA(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")}
            runs[c.name].append(res)
            log(f"round {r + 1}/{rounds} {c.name}: {time.perf_counter() - t0:.1f} s")
    return runs


def median(values: list[Value]) -> Value:
    nums = [float(v) for v in values if isinstance(v, int | float)]
    if nums:
        return statistics.median(nums)
    nas = [v for v in values if isinstance(v, NA)]
    return nas[0] if nas else None


def summarize(contenders: list[Contender], runs: dict[str, list[Result]]) -> dict[str, Result]:
    out: dict[str, Result] = {}
    for c in contenders:
        if c.unavailable:
            out[c.name] = {"error": NA(c.unavailable)}
            continue
        keys = {k for r in runs[c.name] for k in r}
        out[c.name] = {k: median([r.get(k) for r in runs[c.name]]) for k in sorted(keys)}
        if "peak_rss" in out[c.name] or "peak_rss_seq" in out[c.name]:
            peaks = [r.get(k) for r in runs[c.name] for k in ("peak_rss", "peak_rss_seq")]
            out[c.name]["peak_rss_max"] = max(
                (float(v) for v in peaks if isinstance(v, int | float)), default=None)
    return out


# -- targets ----------------------------------------------------------------------------


def num(v: Value) -> float | None:
    return float(v) if isinstance(v, int | float) else None


def ratio(a: Value, b: Value) -> float | None:
    x, y = num(a), num(b)
    return x / y if x is not None and y else None


@dataclass
class Target:
    name: str
    measured: str
    passed: bool | None  # None: could not be judged in this run


def judge(med: dict[str, Result], runs: dict[str, list[Result]], size_label: str,
          flat: dict[str, float]) -> list[Target]:
    k, loc, curl, pull = (med.get(n, {}) for n in ("kitfs", "local disk", "curl", "pull + untar"))
    out: list[Target] = []

    def add(name: str, value: float | None, ok: Callable[[float], bool], shown: str) -> None:
        out.append(Target(name, shown if value is not None else "not measured",
                          ok(value) if value is not None else None))

    ready = num(k.get("ready_s"))
    libs = num(k.get("ready_libs_cached_s"))
    add("mount ready < 1 s", ready, lambda v: v < 1.0,
        f"{ready:.2f} s from `kitfs mount` until files listable, page cache dropped "
        f"(Python and its libraries read from disk); {libs or 0:.2f} s with them cached"
        if ready else "")
    idle = [num(r.get("weights_idle_s")) for r in runs.get("kitfs", [])]
    idle_nums = [v for v in idle if v is not None]
    at_ready = num(k.get("weights_at_ready"))
    add("no weight bytes fetched before a read", max(idle_nums) if idle_nums else None,
        lambda v: v == 0,
        f"{max(idle_nums) if idle_nums else 0:.0f} B of the model layer served in 0.5 s idle "
        f"after mount (--prefetch none); default --prefetch model: "
        f"{(at_ready or 0) / 2**20:.1f} MiB by the time files were listable")
    r = ratio(k.get("seq_gbps"), curl.get("seq_gbps"))
    add("cold sequential read >= 0.9x curl", r, lambda v: v >= 0.9,
        f"{r:.2f}x ({num(k.get('seq_gbps')) or 0:.2f} vs {num(curl.get('seq_gbps')) or 0:.2f} "
        "GB/s)" if r else "")
    r = ratio(k.get("warm_gbps"), loc.get("seq_gbps"))
    add("warm reads >= 0.8x local disk", r, lambda v: v >= 0.8,
        f"{r:.2f}x ({num(k.get('warm_gbps')) or 0:.2f} vs {num(loc.get('seq_gbps')) or 0:.2f} "
        "GB/s, page cache dropped)" if r else "")
    r = ratio(k.get("hot_gbps"), loc.get("hot_gbps"))
    add("hot reads at page-cache speed (>= 0.8x local hot)", r, lambda v: v >= 0.8,
        f"{r:.2f}x ({num(k.get('hot_gbps')) or 0:.2f} vs {num(loc.get('hot_gbps')) or 0:.2f} "
        "GB/s)" if r else "")
    r = ratio(k.get("load_all_s"), pull.get("load_all_s"))
    add("mount + load every tensor <= 0.6x pull + untar + load", r, lambda v: v <= 0.6,
        f"{r:.2f}x ({num(k.get('load_all_s')) or 0:.1f} vs {num(pull.get('load_all_s')) or 0:.1f}"
        " s)" if r else "")
    amp = num(k.get("amplification"))
    add("random tensor reads fetch <= 1.3 bytes per byte read", amp, lambda v: v <= 1.3,
        f"{amp:.2f} bytes served per byte read (--prefetch none)" if amp else "")
    # Judged between models bigger than the daemon's memory tier: a smaller one
    # cannot fill it, so its RSS says how big the model is, not what the daemon holds.
    judged = sorted((s for s in flat if parse_size(s) > DEFAULT_MEMORY_TIER_BYTES),
                    key=parse_size)
    if len(judged) >= 2:
        lo, hi = flat[judged[0]], flat[judged[-1]]
        shown = ", ".join(f"{s}: {flat[s] / 2**20:.0f} MiB" for s in sorted(flat, key=parse_size))
        out.append(Target(
            f"daemon memory flat in model size (peak RSS at {judged[-1]} within 1.25x of "
            f"{judged[0]}, models bigger than the {DEFAULT_MEMORY_TIER_BYTES >> 20} MiB memory "
            "tier; cold sequential read, same run)", shown, hi <= 1.25 * lo))
    else:
        rss = num(k.get("peak_rss_seq"))
        out.append(Target("daemon memory flat in model size",
                          f"{size_label}: {(rss or 0) / 2**20:.0f} MiB peak RSS (one size: "
                          "--rss-sizes measures others in the same run)", None))
    return out


# -- profile ----------------------------------------------------------------------------


PROFILES = {
    "cold sequential read": "cold-seq",
    "warm sequential read": "warm-seq",
    "cold load": "cold-load",
}


def profile_kitfs(sc: Scenario, out_stem: str, what: str) -> dict[str, object]:
    """py-spy on the kitfs daemon while it does `what`: a flame graph and its top frames.

    Two passes (py-spy writes one format per run): a flame graph for people and
    collapsed stacks that the report ranks. Warm passes fill a chunk cache
    first and drop the page cache, as the warm phase does.
    """
    pyspy = TOOLS / "py-spy"
    if not pyspy.exists():
        return {"workload": what, "error": "py-spy is not installed (bash scripts/bench "
                "installs it)"}
    k = Kitfs(sc)
    k.engine_counters = False
    base = RESULTS / f"{out_stem}-kitfs-profile-{PROFILES[what]}"
    result: dict[str, object] = {"workload": what}
    cache = sc.tempdir("kitfs-profile-")
    try:
        for fmt, path in (("flamegraph", base.with_suffix(".svg")),
                          ("raw", base.with_suffix(".collapsed.txt"))):
            if what.startswith("warm"):
                with k.mounted(cache) as m:
                    w.sequential(m.shards)
            else:
                shutil.rmtree(cache, ignore_errors=True)
                cache.mkdir()
            sc.drop()
            with k.mounted(cache) as m:
                spy = subprocess.Popen([str(pyspy), "record", "--pid", str(m.pid), "--rate",
                                        "200", "--nonblocking", "--format", fmt, "-o", str(path)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                time.sleep(0.5)  # py-spy attaches
                t0 = time.perf_counter()
                n = w.load_all(m.shards) if what == "cold load" else w.sequential(m.shards)
                result[f"{fmt}_gbps"] = n / (time.perf_counter() - t0) / 1e9
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    spy.kill()
            result[fmt] = path.name
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    collapsed = base.with_suffix(".collapsed.txt")
    if collapsed.exists():
        result.update(top_frames(collapsed))
    return result


def import_profile() -> dict[str, object]:
    """What `kitfs mount` pays before it touches the network: the daemon's imports.

    A mount starts two interpreters (the command and the daemon it spawns);
    `-X importtime` says where the daemon's start-up goes, with the page cache
    dropped (as in the cold phases) and warm.
    """
    out: dict[str, object] = {}
    code = "import kitfs.cli, kitfs.commands, kitfs.daemon"
    for label in ("cold", "cached"):
        if label == "cold":
            w.drop_caches()
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                              capture_output=True, text=True, cwd=str(ROOT))
        out[f"interpreter_and_imports_{label}_s"] = time.perf_counter() - t0
        rows = []
        for line in done.stderr.splitlines():
            parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
            if len(parts) == 3 and parts[1].isdigit():
                rows.append((parts[2], int(parts[1]) / 1e6))
        top = [(n, t) for n, t in rows if not n.startswith(" ")]
        out[f"top_imports_{label}"] = sorted(top, key=lambda x: -x[1])[:8]
    return out


def top_frames(collapsed: Path, n: int = 15) -> dict[str, object]:
    """Self and inclusive sample shares by function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += c
        own[frames[-1]] += c
        for f in set(frames):
            if "kitfs/" in f and "kitfs/cli.py" not in f and "kitfs/commands/" not in f:
                incl[f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")"] += c
    return {"samples": total,
            "self": [(f, c / total) for f, c in own.most_common(n)] if total else [],
            "inclusive": [(f, c / total) for f, c in incl.most_common(n)] if total else []}


# -- report -----------------------------------------------------------------------------


def fmt(v: Value, kind: str) -> str:
    if isinstance(v, NA):
        return f"n/a: {v.why}"
    if v is None:
        return "–"
    x = float(v)
    if kind == "s":
        return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"
    if kind == "gbps":
        return f"{x:.2f} GB/s"
    if kind == "mib":
        return f"{x / 2**20:.0f} MiB"
    if kind == "x":
        return f"{x:.2f}"
    if kind == "bytes":
        return f"{x / 2**20:.1f} MiB" if x >= 2**20 else f"{x:.0f} B"
    if kind == "pct":
        return f"{x:.0%}"
    return f"{x:.2f}"


def with_ratio(v: Value, ref: Value, kind: str, label: str, invert: bool = False) -> str:
    text = fmt(v, kind)
    r = ratio(v, ref)
    if r is not None and not isinstance(v, NA):
        text += f" ({r:.2f}x {label})"
    return text


def markdown(doc: dict[str, object], med: dict[str, Result], targets: list[Target],
             contenders: list[Contender]) -> str:
    m = doc["machine"]
    assert isinstance(m, dict)
    loc, curl, pull = (med.get(n, {}) for n in ("local disk", "curl", "pull + untar"))
    lines = [
        f"# kitfs harness: {doc['size_label']} synthetic LLM",
        "",
        f"{doc['weights_gib']:.2f} GiB of BF16 weights in {doc['shards']} safetensors shards, "
        f"{doc['rounds']} round(s) interleaved (contender order rotated), medians. "
        f"Registry: CNCF Distribution on loopback; bytes served from its access log. "
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, kernel "
        f"{m['kernel']}, Python {m['python']}. kitfs {doc['kitfs']}. "
        f"Ran {doc['date']} in {doc['wall_s']:.0f} s.",
        "",
        "## Getting to the weights (cold: page cache dropped, empty caches)",
        "",
        "Times count from the start of the mount / download command. CPU: the mount's (or "
        "curl's) user + system seconds during the cold sequential read, per GiB read (/proc). "
        "Its cache in the page cache: bytes of the contender's cache files resident after "
        "that read, per byte read (fincore): a second copy of the model in memory.",
        "",
        "| contender | files listable | first tensor | every tensor loaded (mmap) "
        "| sequential read | CPU s per GiB read | its cache in the page cache |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in contenders:
        r = med[c.name]
        if all(k.startswith("error") for k in r):
            why = next((v for v in r.values() if isinstance(v, NA)), NA("did not run"))
            lines.append(f"| {c.name} | {fmt(why, '')} | | | | | |")
            continue
        lines.append(
            f"| {c.name} | {fmt(r.get('ready_s'), 's')} | {fmt(r.get('first_tensor_s'), 's')} | "
            f"{with_ratio(r.get('load_all_s'), pull.get('load_all_s'), 's', 'pull')} | "
            f"{with_ratio(r.get('seq_gbps'), curl.get('seq_gbps'), 'gbps', 'curl')}"
            f"{'' if c.name == 'local disk' else _vs(r.get('seq_gbps'), loc.get('seq_gbps'))} | "
            f"{fmt(r.get('seq_cpu_per_gib'), 'x')} | {fmt(r.get('seq_cache_resident'), 'pct')} |")
    lines += [
        "",
        "## Restarts and re-reads",
        "",
        "Warm: a new mount on the populated disk cache, page cache dropped (ratio to local disk "
        "with the page cache dropped). Hot: the same files read again (ratio to local disk from "
        "the page cache).",
        "",
        "| contender | warm: mount + load every tensor | warm sequential "
        "| warm CPU s per GiB | hot sequential |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in contenders:
        r = med[c.name]
        if all(k.startswith("error") for k in r) or c.name in ("curl", "pull + untar"):
            continue
        warm_load = r.get("warm_load_s") if c.name != "local disk" else loc.get("load_all_s")
        warm_gbps = r.get("warm_gbps") if c.name != "local disk" else loc.get("seq_gbps")
        lines.append(
            f"| {c.name} | {with_ratio(warm_load, loc.get('load_all_s'), 's', 'local')} | "
            f"{with_ratio(warm_gbps, loc.get('seq_gbps'), 'gbps', 'local')} | "
            f"{fmt(r.get('warm_cpu_per_gib'), 'x')} | "
            f"{with_ratio(r.get('hot_gbps'), loc.get('hot_gbps'), 'gbps', 'local')} |")
    lines += [
        "",
        "## Random tensor reads and what each contender costs",
        "",
        f"Random: {doc['random_tensors']} whole tensors "
        f"({int(str(doc['random_bytes'])) / 2**20:.0f} MiB, "
        f"{doc['random_fraction']:.0%} of the weights) read with pread in a seeded shuffled order "
        "on a fresh mount. Daemon: peak RSS over the cold phases, CPU seconds of the cold load; "
        "for curl and pull the commands' own (wait4).",
        "",
        "| contender | random read | registry bytes per byte read | range requests (median "
        "size) | weight bytes served by files listable | peak RSS | CPU s | registry served "
        "(cold load) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in contenders:
        r = med[c.name]
        if all(k.startswith("error") for k in r):
            continue
        rss = r.get("peak_rss_max", r.get("peak_rss"))
        reqs = num(r.get("random_requests"))
        reqs_text = (f"{reqs:.0f} ({fmt(r.get('random_request_median'), 'bytes')})"
                     if reqs is not None else "–")
        lines.append(
            f"| {c.name} | {fmt(r.get('random_gbps'), 'gbps')} | "
            f"{fmt(r.get('amplification'), 'x')} | {reqs_text} | "
            f"{fmt(r.get('weights_at_ready'), 'bytes')} | "
            f"{fmt(rss, 'mib')} | {fmt(r.get('cpu_s'), 'x')} | {fmt(r.get('served'), 'bytes')} |")
    k = med.get("kitfs", {})
    if k:
        lines += [
            "",
            "kitfs's own counters (`kitfs status`, medians): random phase "
            f"{fmt(k.get('random_engine_bytes_fetched'), 'bytes')} fetched in "
            f"{fmt(k.get('random_engine_requests'), 'x').split('.')[0]} requests for "
            f"{int(str(doc['random_bytes'])) / 2**20:.0f} MiB read (largest response "
            f"{fmt(k.get('random_request_max'), 'bytes')}); after the cold sequential read "
            f"{fmt(k.get('seq_engine_bytes_cached_memory'), 'bytes')} in the memory tier, "
            f"daemon RSS {fmt(k.get('rss_anon_seq'), 'mib')} anonymous + "
            f"{fmt(k.get('rss_file_seq'), 'mib')} file-backed "
            f"(peak {fmt(k.get('peak_rss_seq'), 'mib')}).",
        ]
    memory = doc.get("memory_by_size")
    if isinstance(memory, dict) and len(memory) > 1:
        lines += ["", "kitfs daemon memory by model size (cold sequential read, fresh mount, "
                  "same run):", "", "| model | peak RSS | anonymous RSS at the end | memory tier "
                  "| sequential read |", "| --- | --- | --- | --- | --- |"]
        for label in sorted(memory, key=parse_size):
            v = memory[label]
            lines.append(f"| {label} | {v['peak_rss'] / 2**20:.0f} MiB | "
                         f"{v['rss_anon'] / 2**20:.0f} MiB | {v['memory_tier'] / 2**20:.0f} MiB | "
                         f"{v['seq_gbps']:.2f} GB/s |")
    lines += ["", "## Targets (ratios from this run)", "", "| target | measured | result |",
              "| --- | --- | --- |"]
    for t in targets:
        verdict = "pass" if t.passed else ("FAIL" if t.passed is False else "not judged")
        lines.append(f"| {t.name} | {t.measured} | {verdict} |")
    prof = doc.get("profile")
    if isinstance(prof, dict) and prof:
        lines += ["", "## Profiles of the kitfs daemon (py-spy, for the failed targets)"]
        runs = prof.get("runs") or []
        assert isinstance(runs, list)
        for p in runs:
            lines += ["", f"### {p['workload']}", ""]
            if "error" in p:
                lines.append(str(p["error"]))
                continue
            lines += [f"{p.get('samples', 0)} samples at 200 Hz of the daemon's busy threads "
                      f"(idle excluded) while it read {p.get('raw_gbps', 0):.2f} GB/s. "
                      f"Flame graph: `{p.get('flamegraph')}`, stacks: `{p.get('raw')}`.",
                      "", "| self | function (line) | | inclusive | kitfs function |",
                      "| ---: | --- | --- | ---: | --- |"]
            own = p.get("self") or []
            inc = p.get("inclusive") or []
            for i in range(min(12, max(len(own), len(inc)))):
                a = own[i] if i < len(own) else ("", 0.0)
                b = inc[i] if i < len(inc) else ("", 0.0)
                lines.append(f"| {a[1]:.0%} | `{a[0]}` | | {b[1]:.0%} | `{b[0]}` |")
        imports = prof.get("imports")
        if isinstance(imports, dict):
            lines += ["", "Mount start-up: a Python interpreter plus `import kitfs.daemon` takes "
                      f"{imports['interpreter_and_imports_cold_s']:.2f} s with the page cache "
                      f"dropped, {imports['interpreter_and_imports_cached_s']:.2f} s cached; "
                      "the slowest top-level imports (cold, cumulative): "
                      + ", ".join(f"`{n}` {t:.2f} s"
                                  for n, t in imports["top_imports_cold"][:6]) + "."]
    failures = [f"{name} round {i + 1}, {k.removeprefix('error_')}: {v.why}"
                for name, rs in doc["runs"].items()  # type: ignore[attr-defined]
                for i, r in enumerate(rs) for k, v in r.items()
                if k.startswith("error_") and isinstance(v, NA)]
    if failures:
        lines += ["", "## Failures (those rounds' figures of that phase are missing from the "
                  "medians)", ""] + [f"- {f}" for f in failures]
    lines += ["", "## Contenders", ""]
    for c in contenders:
        lines.append(f"- **{c.name}**: {c.unavailable or c.about}")
    notes = doc.get("notes") or []
    assert isinstance(notes, list)
    if notes:
        lines += ["", "Notes: " + "; ".join(map(str, notes))]
    return "\n".join(lines) + "\n"


def _vs(v: Value, ref: Value) -> str:
    r = ratio(v, ref)
    return f", {r:.2f}x local" if r is not None else ""


def chart(path: Path, med: dict[str, Result], contenders: list[Contender], title: str) -> None:
    """Three panels: cold times, read throughput, random-read amplification; n/a is written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c.name for c in contenders if c.unavailable is None]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))

    def panel(ax: object, series: tuple[tuple[str, str], ...], xlabel: str, unit: str,
              legend: str = "lower right", clip: float | None = None) -> None:
        h = 0.8 / len(series)
        for i, (key, label) in enumerate(series):
            ys = [j + i * h for j in range(len(names))]
            vals = [num(med[n].get(key)) for n in names]
            shown = [min(v or 0, clip) if clip else (v or 0) for v in vals]
            ax.barh(ys, shown, height=h, label=label)  # type: ignore[attr-defined]
            for y, v, x, n in zip(ys, vals, shown, names, strict=True):
                text = f" {v:.2f}{unit}" if v is not None else (
                    " n/a" if isinstance(med[n].get(key), NA) else "")
                if v is not None and clip and v > clip:
                    text = f" {v:.1f} (bar cut)"
                ax.text(x, y, text, va="center", fontsize=7)  # type: ignore[attr-defined]
        ax.set_yticks([j + h * (len(series) - 1) / 2 for j in range(len(names))], names)  # type: ignore[attr-defined]
        ax.invert_yaxis()  # type: ignore[attr-defined]
        ax.set_xlabel(xlabel)  # type: ignore[attr-defined]
        ax.margins(x=0.18)  # type: ignore[attr-defined]
        if len(series) > 1:
            ax.legend(fontsize=8, loc=legend)  # type: ignore[attr-defined]

    panel(axes[0], (("ready_s", "files listable"), ("first_tensor_s", "first tensor"),
                    ("load_all_s", "every tensor loaded")),
          "seconds from start, cold (lower is better)", "s", "upper right")
    panel(axes[1], (("seq_gbps", "cold"), ("warm_gbps", "warm (disk cache)"),
                    ("hot_gbps", "hot (page cache)")),
          "sequential read GB/s (higher is better)", "")
    amps = [num(med[n].get("amplification")) for n in names if n != "pull + untar"]
    panel(axes[2], (("amplification", "random tensors"),),
          "registry bytes per byte read, random tensors (lower is better)", "",
          clip=max([3.0] + [1.5 * a for a in amps if a is not None]))
    axes[2].axvline(1.3, color="red", linestyle="--", linewidth=1)
    axes[2].text(1.3, len(names) - 0.7, " target 1.3", color="red", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def jsonable(v: object) -> object:
    if isinstance(v, NA):
        return {"na": v.why}
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    return v


def kitfs_version() -> str:
    """The commit measured, and whether kitfs/ had uncommitted changes (others edit it live)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "kitfs")
    return head + (" + uncommitted changes in kitfs/" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default=None, help="weight bytes (default 2G; --quick: 256M)")
    parser.add_argument("--quick", action="store_true", help="small model, one round (< 2 min)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--random-fraction", type=float, default=0.05,
                        help="share of the weights read as random whole tensors")
    parser.add_argument("--only", default="",
                        help="comma-separated contender names to run (local disk, curl and "
                             "pull + untar are always kept: the ratios need them)")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="py-spy the kitfs daemon: auto = when a kitfs target fails "
                             "(not with --quick)")
    parser.add_argument("--rss-sizes", default="256M",
                        help="other model sizes to measure the kitfs daemon's memory on, in the "
                             "same run (e.g. 256M,8G; not with --quick)")
    parser.add_argument("--scratch", default=None, help="work directory (default: $TMPDIR)")
    parser.add_argument("--out", default=None, help="file stem under benchmarks/results")
    args = parser.parse_args()
    if os.geteuid() != 0:
        log("not root: the page cache cannot be dropped, cold numbers are not cold")
    size_label = args.size or ("256M" if args.quick else "2G")
    size = parse_size(size_label)
    rounds = args.rounds or (1 if args.quick else 3)
    stem = args.out or ("harness-quick" if args.quick else f"harness-{size_label}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    version_at_start = kitfs_version()
    scratch = Path(tempfile.mkdtemp(prefix="kitfs-harness-", dir=args.scratch))
    sc: Scenario | None = None
    contenders: list[Contender] = []
    try:
        log(f"building a {size_label} ModelKit in {scratch}")
        sc, setup = build_scenario(scratch, size, args.random_fraction)
        sc.artifacts = RESULTS / stem
        for old in RESULTS.glob(f"{stem}-kitfs-*"):
            old.unlink()  # profiles and stall dumps of an earlier run of this stem
        log(f"made in {setup['make_model_s']:.1f} s, packed + pushed in "
            f"{setup['pack_push_s']:.1f} s: {len(sc.shards)} shards")
        contenders = all_contenders(sc)
        if args.only:
            keep = {n.strip() for n in args.only.split(",")} | {"local disk", "curl",
                                                                  "pull + untar"}
            contenders = [c for c in contenders if c.name in keep]
        runs = run_rounds(contenders, rounds)
        med = summarize(contenders, runs)
        flat: dict[str, float] = {}
        memory: dict[str, dict[str, float]] = {}
        k_med = med.get("kitfs", {})
        if num(k_med.get("peak_rss_seq")) is not None:
            flat[size_label] = float(num(k_med.get("peak_rss_seq")) or 0)
            memory[size_label] = {"peak_rss": flat[size_label],
                                  "rss_anon": num(k_med.get("rss_anon_seq")) or 0,
                                  "memory_tier": num(k_med.get("seq_engine_bytes_cached_memory"))
                                  or 0, "seq_gbps": num(k_med.get("seq_gbps")) or 0}
            for label in [x for x in args.rss_sizes.split(",") if x and not args.quick]:
                log(f"kitfs daemon memory on a {label} ModelKit")
                try:
                    memory[label] = rss_at_size(sc, label)
                    flat[label] = memory[label]["peak_rss"]
                except Exception as e:
                    traceback.print_exc()
                    sc.notes.append(f"memory at {label} not measured: {e}")
        targets = judge(med, runs, size_label, flat)
        profile: dict[str, object] = {}
        failing = {t.name for t in targets if t.passed is False}
        want = args.profile == "always" or (args.profile == "auto" and not args.quick and failing)
        if want and "kitfs" in med:
            workloads = [wl for wl, hit in (
                ("cold sequential read", any("cold sequential" in f for f in failing)),
                ("warm sequential read", any(f.startswith("warm") for f in failing)),
                ("cold load", any("load every tensor" in f for f in failing)
                 and not any("cold sequential" in f for f in failing)),
            ) if hit or (args.profile == "always" and wl != "cold load")]
            profile["runs"] = []
            for wl in workloads:
                log(f"profiling the kitfs daemon: {wl}")
                profile["runs"].append(profile_kitfs(sc, stem, wl))  # type: ignore[attr-defined]
            if args.profile == "always" or any(f.startswith("mount ready") for f in failing):
                profile["imports"] = import_profile()
        weights = sc.weight_bytes()
        doc: dict[str, object] = {
            "size_label": size_label, "weights_gib": weights / 2**30, "shards": len(sc.shards),
            "rounds": rounds, "machine": w.machine(),
            "kitfs": version_at_start if kitfs_version() == version_at_start else
            f"{version_at_start}, changed during the run to {kitfs_version()}",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "random_fraction": args.random_fraction, "random_tensors": len(sc.picks),
            "random_bytes": sum(p.tensor.nbytes for p in sc.picks),
            "model_layer_bytes": sc.model_layer_size, "setup": setup,
            "notes": sc.notes, "medians": med, "runs": runs, "memory_by_size": memory,
            "targets": [t.__dict__ for t in targets], "profile": profile,
            "contenders": {c.name: c.unavailable or c.about for c in contenders},
        }
        doc["wall_s"] = time.perf_counter() - start
        md = markdown(doc, med, targets, contenders)
        (RESULTS / f"{stem}.md").write_text(md)
        (RESULTS / f"{stem}.json").write_text(json.dumps(jsonable(doc), indent=1) + "\n")
        chart(RESULTS / f"{stem}.png", med, contenders,
              f"kitfs harness, {size_label} model, {rounds} round(s), "
              f"{doc['machine']['cpus']} CPUs")  # type: ignore[index]
        print(md)
        log(f"wrote {RESULTS / stem}.md/.json/.png in {time.perf_counter() - start:.0f} s")
    finally:
        for c in contenders:
            if isinstance(c, Rclone):
                c.close()
        if sc is not None:
            sc.registry.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
