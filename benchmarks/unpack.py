"""`kitfs unpack` against what a user does without kit, side by side on one ModelKit in one run.

    .venv/bin/python benchmarks/unpack.py                  # 2 GiB synthetic LLM, 3 rounds
    .venv/bin/python benchmarks/unpack.py --size 256M --rounds 1 --rss-sizes ""

Starts a CNCF Distribution registry on loopback (its access log counts the
bytes each contender fetched), writes a synthetic LLM project
(benchmarks/synthmodel.py), `kitfs pack`s and pushes it, and tags the same
layers once more without kitfs's table of contents (what `kit pack` pushes:
the tars are byte for byte the same). Then, in interleaved rounds with the
order rotated and the page cache dropped before each, every contender
writes the model's files into an empty directory:

- kitfs unpack: a fresh chunk cache each time (cold), layers kitfs packed
  (each chunk checked against the table of contents as it arrives);
- kitfs unpack, kit's layers: the same tars without a table of contents
  (each layer hashed end to end before its files are renamed into place);
- skopeo copy + tar -x: `skopeo copy docker://REF oci:DIR`, then `tar -xf` of
  every layer blob (what a user does without kit: pull, then unpack);
- curl | tar -x: every layer blob streamed from the registry into `tar -x`,
  nothing checked (the speed of light for one stream per layer).

Reported: the median wall time of each, its ratio to kitfs unpack (the
issue's targets: at most 0.5x the time of skopeo copy + tar, at least 0.8x
the rate of curl | tar), CPU seconds, peak RSS (VmHWM, polled) and the
registry bytes. With --rss-sizes, kitfs unpack also runs once on models of
those sizes: its peak RSS must stay flat as the model grows. Results go to
benchmarks/results/unpack.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # registry.py: the registry launcher tests use too

from benchmarks import workload as w  # noqa: E402
from benchmarks.synthmodel import make_model, parse_size  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
KITFS = [sys.executable, "-m", "kitfs.cli"]
REPO = "bench/unpack"
TOC_ANNOTATION = "dev.kitfs.toc.digest"


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed: {proc.stderr[-2000:]}")
    return proc  # type: ignore[no-any-return]


def publish(registry: w.Registry, project: Path, size: str, home: Path) -> tuple[str, str,
                                                                                  list[str]]:
    """Pack and push `project`; tag its layers again without the table of contents, as kit
    pushes them. (kitfs ref, kit-style ref, layer digests)."""
    tag = f"m{size.lower()}"
    ref = f"{registry.host}/{REPO}:{tag}"
    run([*KITFS, "pack", str(project), "-t", ref, "--config", str(home)])
    base = f"http://{registry.host}/v2/{REPO}/manifests"
    accept = "application/vnd.oci.image.manifest.v1+json"
    manifest = json.loads(run(["curl", "-sf", "-H", f"Accept: {accept}",
                               f"{base}/{tag}"]).stdout)
    manifest.get("annotations", {}).pop(TOC_ANNOTATION, None)
    body = json.dumps(manifest).encode()
    put = subprocess.run(["curl", "-sf", "-X", "PUT", "-H", f"Content-Type: {accept}",
                          "--data-binary", "@-", f"{base}/{tag}-kit"], input=body,
                         capture_output=True)
    if put.returncode != 0:
        raise SystemExit(f"pushing the kit-style manifest failed: {put.stderr.decode()}")
    return ref, f"{registry.host}/{REPO}:{tag}-kit", [x["digest"] for x in manifest["layers"]]


def tree_digest(root: Path) -> str:
    """One sha256 over every file's path, mode and bytes (to check each contender's output)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == "Kitfile":  # only kit and kitfs write it
            continue
        h.update(f"{rel}\0{path.stat().st_mode & 0o777:o}\0".encode())
        with path.open("rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
    return h.hexdigest()


class Bench:
    def __init__(self, registry: w.Registry, scratch: Path, ref: str, kit_ref: str,
                 layers: list[str]) -> None:
        self.registry = registry
        self.scratch = scratch
        self.ref = ref
        self.kit_ref = kit_ref
        self.layers = layers
        self.digests: dict[str, str] = {}
        self.notes: list[str] = []

    def fresh(self, name: str) -> Path:
        path = self.scratch / name
        shutil.rmtree(path, ignore_errors=True)
        why = w.drop_caches()
        if why and why not in self.notes:
            self.notes.append(why)
        return path

    def measure(self, name: str, out: Path, steps: list[list[str]]) -> dict[str, float]:
        mark = self.registry.mark()
        use = w.Usage()
        t0 = time.perf_counter()
        for cmd in steps:
            use.add(w.run_measured(cmd))
        wall = time.perf_counter() - t0
        served = self.registry.served(mark).total
        digest = tree_digest(out)
        if self.digests.setdefault("want", digest) != digest:
            raise SystemExit(f"{name} wrote other files than the first contender")
        return {"wall_s": wall, "cpu_s": use.cpu_s, "peak_rss": use.peak_rss,
                "served": served}

    def kitfs(self, ref: str, name: str) -> dict[str, float]:
        out = self.fresh(name)
        cache = self.scratch / f"{name}-cache"
        shutil.rmtree(cache, ignore_errors=True)
        try:
            return self.measure(name, out, [[*KITFS, "unpack", ref, "-d", str(out),
                                             "--cache-dir", str(cache)]])
        finally:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)

    def kitfs_unpack(self) -> dict[str, float]:
        return self.kitfs(self.ref, "kitfs")

    def kitfs_kit_layers(self) -> dict[str, float]:
        return self.kitfs(self.kit_ref, "kitfs-kit")

    def skopeo_tar(self) -> dict[str, float]:
        out = self.fresh("skopeo")
        oci = self.scratch / "skopeo-oci"
        shutil.rmtree(oci, ignore_errors=True)
        out.mkdir()
        steps = [["skopeo", "copy", "-q", "--src-tls-verify=false",
                  f"docker://{self.ref}", f"oci:{oci}:v1"]]
        steps += [["tar", "-xf", str(oci / "blobs" / "sha256" / d.split(":", 1)[1]),
                   "-C", str(out)] for d in self.layers]
        try:
            return self.measure("skopeo copy + tar -x", out, steps)
        finally:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(oci, ignore_errors=True)

    def curl_tar(self) -> dict[str, float]:
        out = self.fresh("curl")
        out.mkdir()
        url = f"http://{self.registry.host}/v2/{REPO}/blobs"
        steps = [["bash", "-c", f"set -o pipefail; curl -sf {url}/{d} | tar -x -C {out}"]
                 for d in self.layers]
        try:
            result = self.measure("curl | tar -x", out, steps)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        result["peak_rss"] = 0  # curl and tar behind bash: not measured
        return result


CONTENDERS = {
    "kitfs unpack": Bench.kitfs_unpack,
    "kitfs unpack, kit's layers": Bench.kitfs_kit_layers,
    "skopeo copy + tar -x": Bench.skopeo_tar,
    "curl | tar -x": Bench.curl_tar,
}


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G", help="weights of the synthetic model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-sizes", default="256M",
                        help="other model sizes kitfs unpack runs once on, for peak RSS "
                             "against model size (comma separated; empty: none)")
    parser.add_argument("--scratch", default=None, help="where the models and outputs go")
    args = parser.parse_args()
    if shutil.which("skopeo") is None:
        raise SystemExit("skopeo is not installed (apt-get install skopeo; scripts/setup)")
    with tempfile.TemporaryDirectory(prefix="kitfs-unpack-bench-", dir=args.scratch) as tmp:
        scratch = Path(tmp)
        registry = w.start_registry(scratch / "registry")
        try:
            report = bench(registry, scratch, args)
        finally:
            registry.stop()
    write_report(report)


def bench(registry: w.Registry, scratch: Path, args: argparse.Namespace) -> dict[str, object]:
    project = make_model(scratch / "project", parse_size(args.size))
    ref, kit_ref, layers = publish(registry, project, args.size, scratch / "home")
    total = sum(p.stat().st_size for p in project.rglob("*") if p.is_file())
    shutil.rmtree(project)
    b = Bench(registry, scratch, ref, kit_ref, layers)
    names = list(CONTENDERS)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            result = CONTENDERS[name](b)
            runs[name].append(result)
            print(f"round {r + 1} {name}: {result['wall_s']:.2f} s, "
                  f"{mib(result['peak_rss'])}", flush=True)
    rss = {args.size: statistics.median(x["peak_rss"] for x in runs["kitfs unpack"])}
    for size in [s for s in args.rss_sizes.split(",") if s and s != args.size]:
        other = make_model(scratch / f"project-{size}", parse_size(size))
        other_ref, _, _ = publish(registry, other, size, scratch / "home")
        shutil.rmtree(other)
        b.digests.pop("want", None)  # another model: other files
        rss[size] = b.kitfs(other_ref, f"kitfs-{size}")["peak_rss"]
        print(f"kitfs unpack at {size}: {mib(rss[size])}", flush=True)
    med = {n: {k: statistics.median(x[k] for x in runs[n]) for k in runs[n][0]} for n in names}
    kitfs_s = med["kitfs unpack"]["wall_s"]
    return {
        "machine": w.machine(), "size": args.size, "bytes": total, "rounds": args.rounds,
        "notes": b.notes, "median": med, "runs": runs, "kitfs_peak_rss_by_size": rss,
        "ratios": {
            "kitfs_time_vs_skopeo_tar": kitfs_s / med["skopeo copy + tar -x"]["wall_s"],
            "kitfs_rate_vs_curl_tar": med["curl | tar -x"]["wall_s"] / kitfs_s,
            "kit_layers_time_vs_skopeo_tar": (med["kitfs unpack, kit's layers"]["wall_s"]
                                              / med["skopeo copy + tar -x"]["wall_s"]),
            "kit_layers_rate_vs_curl_tar": (med["curl | tar -x"]["wall_s"]
                                            / med["kitfs unpack, kit's layers"]["wall_s"]),
        },
    }


def write_report(report: dict[str, object]) -> None:
    med: dict[str, dict[str, float]] = report["median"]  # type: ignore[assignment]
    ratios: dict[str, float] = report["ratios"]  # type: ignore[assignment]
    rss: dict[str, float] = report["kitfs_peak_rss_by_size"]  # type: ignore[assignment]
    size, total = report["size"], int(report["bytes"])  # type: ignore[call-overload]
    kitfs_s = med["kitfs unpack"]["wall_s"]
    lines = [
        f"# kitfs unpack, {size} synthetic LLM ({total / 1e9:.2f} GB of files), "
        f"medians of {report['rounds']} interleaved rounds",
        "",
        "| contender | wall | GB/s | vs kitfs unpack (time) | CPU | peak RSS | registry bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in med.items():
        shown = name.replace("|", "\\|")  # a pipe inside a Markdown table cell
        lines.append(f"| {shown} | {m['wall_s']:.2f} s | {total / m['wall_s'] / 1e9:.2f} "
                     f"| {m['wall_s'] / kitfs_s:.2f}x | {m['cpu_s']:.1f} s "
                     f"| {mib(m['peak_rss'])} | {m['served'] / 1e9:.2f} GB |")
    t_skopeo = ratios["kitfs_time_vs_skopeo_tar"]
    r_curl = ratios["kitfs_rate_vs_curl_tar"]
    lines += [
        "",
        f"- kitfs unpack takes {t_skopeo:.2f}x the time of skopeo copy + tar -x "
        f"(target <= 0.5: {'pass' if t_skopeo <= 0.5 else 'FAIL'}); with kit's layers "
        f"{ratios['kit_layers_time_vs_skopeo_tar']:.2f}x.",
        f"- kitfs unpack runs at {r_curl:.2f}x the rate of curl | tar -x (target >= 0.8: "
        f"{'pass' if r_curl >= 0.8 else 'FAIL'}); with kit's layers "
        f"{ratios['kit_layers_rate_vs_curl_tar']:.2f}x.",
    ]
    if len(rss) > 1:
        sizes = sorted(rss, key=parse_size)
        flat = rss[sizes[-1]] / rss[sizes[0]]
        lines.append("- kitfs unpack peak RSS by model size: " + ", ".join(
            f"{s} {mib(rss[s])}" for s in sizes) + f" ({flat:.2f}x from smallest to largest).")
    machine = report["machine"]
    lines += ["", f"Machine: {json.dumps(machine)}."]
    if report["notes"]:
        lines.append("Notes: " + "; ".join(report["notes"]) + ".")  # type: ignore[arg-type]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "unpack.md").write_text(text)
    (RESULTS / "unpack.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
