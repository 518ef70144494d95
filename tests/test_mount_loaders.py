"""Real readers through a real mount: safetensors, numpy, mmap, several processes, two daemons.

Every test mounts with `kitfs mount` (a daemon process) against the session's
Distribution registry and compares what it reads with the packed source.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import kitfs
from mounting import mounted
from registry import RegistryServer

pytestmark = pytest.mark.fuse


def sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small LLM-shaped project with real safetensors shards (F16/F32/I64 tensors)."""
    root = tmp_path_factory.mktemp("llm") / "proj"
    (root / "model").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for shard in range(3):
        tensors = {
            f"layers.{shard}.w{i}": rng.standard_normal((256 + i, 512)).astype(np.float16)
            for i in range(6)
        }
        tensors[f"layers.{shard}.bias"] = rng.standard_normal(512).astype(np.float32)
        tensors[f"layers.{shard}.ids"] = np.arange(1000, dtype=np.int64)
        save_file(tensors, str(root / "model" / f"model-{shard:05d}-of-00003.safetensors"))
    (root / "model" / "config.json").write_text(json.dumps({"hidden_size": 512}))
    (root / "Kitfile").write_text(
        "manifestVersion: 1.0.0\nmodel:\n  name: llm\n  path: ./model\n")
    return root


@pytest.fixture(scope="module")
def llm_ref(llm: Path, registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory
            ) -> str:
    ref = f"{registry.host}/mount/llm:v1"
    proc = kitfs("pack", str(llm), "-t", ref, home=tmp_path_factory.mktemp("home"))
    assert proc.returncode == 0, proc.stderr
    return ref


LOADER = r"""
import sys, hashlib
from pathlib import Path
from safetensors import safe_open
out = hashlib.sha256()
for shard in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(shard), framework="numpy") as f:
        for name in sorted(f.keys()):
            arr = f.get_tensor(name)
            out.update(name.encode()); out.update(arr.tobytes())
print(out.hexdigest())
"""


def load_all(model_dir: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", LOADER, str(model_dir)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_safetensors_loads_every_tensor_through_the_mount(
    llm: Path, llm_ref: str, tmp_path: Path
) -> None:
    with mounted(llm_ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        assert load_all(mnt / "model") == load_all(llm / "model")


def test_four_reader_processes_at_once(llm: Path, llm_ref: str, tmp_path: Path) -> None:
    script = ("import hashlib,sys,random\n"
              "p=sys.argv[1]; rng=random.Random(int(sys.argv[2]))\n"
              "d=open(p,'rb').read(); print(hashlib.sha256(d).hexdigest())\n")
    shard = "model/model-00001-of-00003.safetensors"
    want = sha_file(llm / shard)
    with mounted(llm_ref, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "none") as mnt:
        procs = [subprocess.Popen([sys.executable, "-c", script, str(mnt / shard), str(i)],
                                  stdout=subprocess.PIPE, text=True) for i in range(4)]
        outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == [want] * 4


def test_numpy_memmap_and_pread_fuzz(llm: Path, llm_ref: str, tmp_path: Path) -> None:
    shard = "model/model-00002-of-00003.safetensors"
    src = (llm / shard).read_bytes()
    rng = np.random.default_rng(11)
    with mounted(llm_ref, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "none") as mnt:
        mm = np.memmap(mnt / shard, dtype=np.uint8, mode="r")
        assert mm.shape[0] == len(src)
        assert bytes(mm[-4097:]) == src[-4097:]
        fd = os.open(mnt / shard, os.O_RDONLY)
        try:
            for _ in range(200):
                off = int(rng.integers(0, len(src)))
                size = int(rng.choice([1, 3, 4095, 4097, 65537, 1 << 20]))
                assert os.pread(fd, size, off) == src[off : off + size]
        finally:
            os.close(fd)
        del mm


def test_two_daemons_share_one_cache(llm: Path, llm_ref: str, tmp_path: Path) -> None:
    cache = tmp_path / "shared-cache"
    shard = "model/model-00000-of-00003.safetensors"
    want = sha_file(llm / shard)
    with mounted(llm_ref, tmp_path / "a", cache) as a, \
            mounted(llm_ref, tmp_path / "b", cache) as b:
        procs = [subprocess.Popen([sys.executable, "-c",
                                   "import hashlib,sys;print(hashlib.sha256("
                                   "open(sys.argv[1],'rb').read()).hexdigest())", str(m / shard)],
                                  stdout=subprocess.PIPE, text=True) for m in (a, b)]
        assert [p.communicate(timeout=120)[0].strip() for p in procs] == [want, want]
        assert load_all(a / "model") == load_all(b / "model")


def test_registry_stopped_mid_read_gives_eio_not_a_hang(tmp_path: Path) -> None:
    import errno
    import time

    from helpers import make_project
    from registry import running_registry

    project = make_project(tmp_path / "p", weight_bytes=24 << 20)
    src = (project / "model" / "model.safetensors").read_bytes()
    with running_registry(tmp_path / "reg") as reg:
        ref = f"{reg.host}/mount/stopped:v1"
        assert kitfs("pack", str(project), "-t", ref, home=tmp_path / "h").returncode == 0
        with mounted(ref, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "none",
                     "--timeout", "5") as mnt:
            path = mnt / "model" / "model.safetensors"
            fd = os.open(path, os.O_RDONLY)
            try:
                assert os.pread(fd, 1 << 20, 0) == src[: 1 << 20]
                reg.stop()
                assert os.pread(fd, 4096, 8192) == src[8192:12288]  # cached chunk
                start = time.monotonic()
                with pytest.raises(OSError) as info:
                    os.pread(fd, 4096, 20 << 20)
                assert info.value.errno == errno.EIO
                assert time.monotonic() - start < 30
                assert (mnt / "Kitfile").read_bytes()  # metadata keeps working
            finally:
                os.close(fd)


def test_a_random_readers_tensor_comes_in_few_requests_and_no_further(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """Through the kernel: a pread of one tensor mid-shard (what a random or lazy reader
    does) is answered with the rest of the tensor asked for at once, not a registry round
    trip per 1 MiB FUSE request, and fetches little beyond the tensor."""
    root = tmp_path / "proj"
    (root / "model").mkdir(parents=True)
    rng = np.random.default_rng(5)
    tensors = {f"w{i}": rng.standard_normal((n, 1024)).astype(np.float16)
               for i, n in enumerate((2048, 6144 + 7, 3072))}  # 4 MiB, 12 MiB, 6 MiB
    shard = root / "model" / "model.safetensors"
    save_file(tensors, str(shard))
    (root / "Kitfile").write_text("manifestVersion: 1.0.0\nmodel:\n  name: t\n  path: ./model\n")
    ref = f"{registry.host}/mount/tensors:v1"
    proc = kitfs("pack", str(root), "-t", ref, home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    begin, end = (8 + n + o for o in json.loads(raw[8 : 8 + n])["w1"]["data_offsets"])
    with mounted(ref, tmp_path / "mnt", tmp_path / "cache", "--prefetch", "none") as mnt:
        fd = os.open(mnt / "model" / "model.safetensors", os.O_RDONLY)
        try:
            assert os.pread(fd, end - begin, begin) == raw[begin:end]
        finally:
            os.close(fd)
        read_at = time.time()
        deadline = read_at + 15
        while True:  # the daemon publishes its counters every second
            doc = json.loads(kitfs("status", str(mnt), "--json").stdout)[0]
            status = doc["status"]["engine"]
            updated = datetime.datetime.fromisoformat(doc["updated"]).timestamp()
            if updated > read_at + 0.2 and not status["requests_in_flight"]:
                break
            assert time.time() < deadline, doc
            time.sleep(0.2)
    # The kernel asks for 12 MiB in 1 MiB requests: one range request each before (15 with
    # what it reads on past the tensor's end). Now the header's block, the tensor in one
    # request, and the kernel's own readahead past the tensor's end (about 1.5 MiB here,
    # 2-3 requests), fetched block by block, not ahead: 5 seen.
    assert status["requests"] <= 7, status
    assert status["bytes_fetched"] <= (end - begin) + (3 << 20), status
