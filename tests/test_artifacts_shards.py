"""Webdataset shards (stages.artifacts.shards): read by webdataset itself, and a member that is not
a plain field of the rollout (a pickle) refused without being unpickled."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

from tests.conftest import (
    _assert_refused,
    _manifest,
    _read_rollout,
    _rollout,
    _score_cli,
    _split_member,
    _WritesMarker,
)


def test_shards_read_by_webdataset(policy_dir, tmp_path):
    """webdataset.WebDataset reads the shards (raw bytes) and finds the same keys and bytes."""
    import webdataset

    rollout = _rollout(policy_dir, tmp_path / "r")
    ours = _read_rollout(rollout)
    urls = [str(rollout / s["name"]) for s in _manifest(rollout)["shards"]]
    theirs = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in theirs] == list(ours)
    for sample in theirs:
        fields = {k: v for k, v in sample.items() if not k.startswith("__")}
        assert fields == ours[sample["__key__"]]


def _rebuild_shard_with(rollout: Path, key: str, name: str, payload: bytes) -> str:
    """Insert member ``name`` right after sample ``key``'s members; fix the manifest's sha256."""
    manifest = _manifest(rollout)
    for shard in manifest["shards"]:
        path = rollout / shard["name"]
        with tarfile.open(path, mode="r:") as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        if not any(_split_member(m.name)[0] == key for m, _ in members):
            continue
        last = max(i for i, (m, _) in enumerate(members) if _split_member(m.name)[0] == key)
        extra = tarfile.TarInfo(name)
        extra.size, extra.mtime = len(payload), 0
        members.insert(last + 1, (extra, payload))
        with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data in members:
                tar.addfile(member, io.BytesIO(data))
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (rollout / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return shard["name"]
    raise AssertionError(f"no shard holds {key}")


def test_pickle_member_is_refused_without_unpickling(policy_dir, tmp_path):
    """A shard with a .pth (pickle) member whose hash is made to match: score refuses and never unpickles it."""
    # the payload is live: unpickling a twin of it does create its marker
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_WritesMarker(control)))
    assert control.is_dir()

    marker = tmp_path / "unpickled-marker"
    payload = pickle.dumps({"weights": _WritesMarker(marker)})
    rollout = _rollout(policy_dir, tmp_path / "r")
    _rebuild_shard_with(rollout, "p00000_s000_k000_b00", "p00000_s000_k000_b00.pth", payload)

    out = tmp_path / "s.parquet"
    _assert_refused(_score_cli(rollout, out), out, "refused", ".pth")
    assert not marker.exists(), "the .pth member was unpickled"
