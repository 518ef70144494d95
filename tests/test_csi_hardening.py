"""The CSI driver's node side against bad records, stuck daemons and bad requests.

Unit level, with real files (and, where it matters, real mounts), where a full
gRPC round trip would add nothing: the Records and the Node, the supervisor's
and the mount helper's pieces. tests/test_csi.py drives the whole driver.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kitfs.csi.volumes import Attributes, DaemonRecord, Records, VolumeRecord, daemon_key

ATTRS = Attributes("127.0.0.1:5000/org/model:v1", "model", "lazy", "model")
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def records(tmp_path: Path) -> Records:
    return Records(tmp_path / "state", tmp_path / "staging")


def daemon_record(records: Records, key: str | None = None) -> DaemonRecord:
    key = key or daemon_key(DIGEST, ATTRS)
    return DaemonRecord(key, ATTRS.reference, DIGEST, ATTRS, str(records.mountpoint(key)),
                        None)


def test_a_record_key_is_never_a_path(records: Records, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    good = daemon_record(records)
    records.save_daemon(good)
    forged = dict(good.to_json(), key="../../victim")
    (records.root / "daemons" / f"{good.key}.json").write_text(json.dumps(forged))
    (records.root / "daemons" / "..%2f..%2fvictim.json").write_text(json.dumps(forged))

    assert records.daemons() == []  # both skipped: key not the file's stem, not a key
    for daemon in records.daemons():
        records.drop_daemon(daemon.key)
    with pytest.raises(ValueError):
        records.drop_daemon("../../victim")
    assert (victim / "precious").read_text() == "keep me"


def test_stored_paths_must_be_the_derived_ones(records: Records, tmp_path: Path) -> None:
    good = daemon_record(records)
    records.save_daemon(good)
    assert records.daemons() == [good]
    path = records.root / "daemons" / f"{good.key}.json"
    for field, value in (("mountpoint", str(tmp_path)), ("home", str(tmp_path / "x"))):
        path.write_text(json.dumps(dict(good.to_json(), **{field: value})))
        assert records.daemon(good.key) is None
    with_home = DaemonRecord(good.key, good.reference, DIGEST, ATTRS, good.mountpoint,
                             str(records.home(good.key)))
    records.save_daemon(with_home)
    assert records.daemon(good.key) == with_home


@pytest.mark.parametrize("target", ["relative/mount", "/pods/x/../../etc/mount",
                                    "/pods/x/./mount", "/pods/x//mount", "/pods/x/mount/"])
def test_volume_targets_must_be_canonical(records: Records, target: str) -> None:
    key = daemon_key(DIGEST, ATTRS)
    good = VolumeRecord("vol", "/pods/x/mount", key, ATTRS, "default/x")
    records.save_volume(good)
    assert records.volumes() == [good]
    # A record naming another target than its file is named for, or a bad one.
    bad = VolumeRecord("vol", target, key, ATTRS, "default/x")
    records._volume_path(good.target).write_text(json.dumps(bad.to_json()))
    assert records.volumes() == [] and records.volume(good.target) is None
    records.save_volume(bad)  # a file named for it: still not canonical
    assert records.volume(target) is None and records.volumes() == []


def test_a_volume_record_key_is_a_key(records: Records) -> None:
    records.save_volume(VolumeRecord("vol", "/pods/x/mount", "../x", ATTRS, ""))
    assert records.volumes() == []
