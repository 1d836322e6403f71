"""A battery of bad inputs for every stage: the CLASS of failure matters, not one example of it.

DESIGN.md §5: "Bad input of any kind ends with a non-zero exit and one line on stderr that names the
problem; never a traceback." §4: outputs appear atomically, inputs are never modified, nothing is
ever unpickled. Every case below builds one damaged artifact or one bad option and checks:

* the exit code is non-zero, stderr is EXACTLY one line starting with ``error: ``, no ``Traceback``
  anywhere (an exception escaping the command counts as a traceback);
* no output is left behind: every output path (``--out``, ``--metrics``) is absent afterwards, or
  byte-for-byte unchanged when it existed before; the listing of its parent (hidden entries
  included) is unchanged, so no leftover slot in ``.tempflow-partial`` either;
* every input file and folder hashes the same before and after;
* for a representative subset, once the pristine artifact is restored the same command exits 0.

Cases marked ``either`` may also be accepted, but then the output must be sane (finite log-probs,
states and policy outputs). To corrupt a shard's content the tar is rewritten AND the manifest's
sha256 fixed (and, for update, the scores' manifest hash), so each case reaches the deeper check
it is about instead of the sha256 check.

Cases that would otherwise allocate without bound or loop for hours run under a watchdog (an
address-space cap a few GiB above the process's current size and a wall-clock alarm); hitting it
is reported as a failure of the case, never a hang of the suite.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import struct
import tarfile
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from tempflow_cli.main import cli
from tests.conftest import PROMPTS, invoke, make_rollout

SMALL_ROLLOUT = ["--num-steps", "4", "--seeds-per-prompt", "2", "--branches", "2", "--batch-size", "8",
                 "--samples-per-shard", "10"]  # conftest.small_rollout_config, as options
SMALL_EVAL = ["--num-steps", "2", "--images-per-prompt", "1"]
CASE_SECONDS = 6.0  # a refusal takes well under a second; a stage that does not refuse is stopped here
HEADROOM = 4 << 30  # bytes of address space a case may add to the process


# --------------------------------------------------------------------------------------------
# Pristine artifacts, built once per session: policy -> rollout -> scores -> policy2 (with optimizer
# state) -> rollout2 -> scores2. The whole folder is copied per case, so relative references
# (policy2's KL reference is ../policy) stay valid.


@pytest.fixture(scope="session")
def pristine(_policy_template, tmp_path_factory) -> Path:
    import torch

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("battery") / "base"
    base.mkdir()
    shutil.copytree(_policy_template, base / "policy")
    (base / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    make_rollout(base / "policy", base / "rollout")
    r = invoke("score", "--rollout", base / "rollout", "--reward", "jpeg_compressibility", "--out", base / "scores.parquet")
    assert r.exit_code == 0, r.output
    r = invoke("update", "--policy", base / "policy", "--rollout", base / "rollout", "--rewards", base / "scores.parquet",
               "--out", base / "policy2")
    assert r.exit_code == 0, r.output
    assert (base / "policy2" / "optimizer.json").is_file()
    make_rollout(base / "policy2", base / "rollout2")
    r = invoke("score", "--rollout", base / "rollout2", "--reward", "jpeg_compressibility", "--out", base / "scores2.parquet")
    assert r.exit_code == 0, r.output
    (base / "metrics").mkdir()  # what `tempflow report` reads: update metrics and eval folders
    shutil.copy(base / "policy2" / "metrics.json", base / "metrics" / "it00.json")
    r = invoke("eval", "--policy", base / "policy", "--prompts", base / "prompts.txt", *SMALL_EVAL,
               "--out", base / "evals" / "base")
    assert r.exit_code == 0, r.output
    return base


# --------------------------------------------------------------------------------------------
# Commands


@dataclass
class Cmd:
    args: list[str]
    outs: list[Path]  # every path the command may write (--out, --metrics), absolute
    inputs: list[Path]


def _paths(ws: Path) -> dict[str, Path]:
    return {
        "policy": ws / "policy", "prompts": ws / "prompts.txt", "rollout": ws / "rollout",
        "scores": ws / "scores.parquet", "policy2": ws / "policy2", "rollout2": ws / "rollout2",
        "scores2": ws / "scores2.parquet", "metrics": ws / "metrics", "evals": ws / "evals", "ckpt": ws / "ckpt",
    }


DEFAULT_OUT = {"init": "out_policy", "rollout": "out_rollout", "score": "out.parquet", "update": "out_policy",
               "update2": "out_policy", "eval": "out_eval", "report": "out_report", "pretrain": "out_base"}
PRETRAIN_FAST = ["--world", "shapes", "--steps", "2", "--autoencoder-steps", "2", "--batch-size", "2",
                 "--autoencoder-batch-size", "2", "--checkpoint-every", "1"]


def _base_args(stage: str, p: dict[str, Path]) -> tuple[list[Any], list[Path]]:
    """Arguments (without --out) and inputs of each stage's command."""
    if stage == "init":
        return ["init", "--image-size", "16"], []
    if stage == "rollout":
        return (["rollout", "--policy", p["policy"], "--prompts", p["prompts"], *SMALL_ROLLOUT],
                [p["policy"], p["prompts"]])
    if stage == "score":
        return ["score", "--rollout", p["rollout"], "--reward", "jpeg_compressibility"], [p["rollout"]]
    if stage == "update":
        return (["update", "--policy", p["policy"], "--rollout", p["rollout"], "--rewards", p["scores"]],
                [p["policy"], p["rollout"], p["scores"]])
    if stage == "update2":  # the second update: optimizer state in policy2, KL reference ../policy
        return (["update", "--policy", p["policy2"], "--rollout", p["rollout2"], "--rewards", p["scores2"]],
                [p["policy2"], p["rollout2"], p["scores2"], p["policy"]])
    if stage == "eval":
        return ["eval", "--policy", p["policy"], "--prompts", p["prompts"], *SMALL_EVAL], [p["policy"], p["prompts"]]
    if stage == "report":
        return ["report", "--metrics-dir", p["metrics"], "--eval-dir", p["evals"]], [p["metrics"], p["evals"]]
    if stage == "pretrain":  # a damaged checkpoint must stay as it was: it counts as an input here
        return ["pretrain", *PRETRAIN_FAST, "--checkpoint", p["ckpt"]], [p["ckpt"]]
    raise AssertionError(stage)


# --------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    id: str
    stage: str
    setup: Callable[[Path, dict[str, Path]], None] | None = None  # damages the workspace / retargets paths
    extra: Callable[[Path], list[Any]] | tuple = ()  # more options
    out: Callable[[Path], Any] | None = None  # --out, default ws/DEFAULT_OUT (a str is relative to the cwd)
    metrics: Callable[[Path], Any] | None = None  # update --metrics
    expect: str = "refuse"  # "refuse", or "either" (a sane output is accepted too)
    repair: bool = False  # restore the pristine workspace and rerun: must succeed
    marker: bool = False  # a pickle in the input creates ws/../unpickled-marker when loaded
    seconds: float = CASE_SECONDS
    reward: str | None = None  # score: this --reward instead of jpeg_compressibility

    def __post_init__(self) -> None:
        assert self.expect in ("refuse", "either")


CASES: list[Case] = []


def case(id: str, stage: str, **kw: Any) -> None:
    CASES.append(Case(id=f"{stage}-{id}", stage=stage, **kw))


# ---- low-level writers --------------------------------------------------------------------


def _dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _manifest(rollout: Path) -> dict:
    return json.loads((rollout / "manifest.json").read_text())


def _write_manifest(rollout: Path, manifest: dict) -> None:
    (rollout / "manifest.json").write_text(_dump_json(manifest))


def _edit_manifest(fn: Callable[[dict], Any]) -> Callable:
    def setup(ws: Path, p: dict[str, Path], key: str = "rollout") -> None:
        m = _manifest(p[key])
        fn(m)  # edits in place (what it returns, e.g. a popped value, is ignored)
        _write_manifest(p[key], m)
    return setup


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path, mode="r:") as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else b"") for m in tar]


def _write_members(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            member = _copy_info(member)
            if member.isfile():
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
            else:
                tar.addfile(member)


def _copy_info(member: tarfile.TarInfo) -> tarfile.TarInfo:
    info = tarfile.TarInfo(member.name)
    for attr in ("size", "mtime", "mode", "type", "linkname", "uid", "gid", "uname", "gname"):
        setattr(info, attr, getattr(member, attr))
    return info


def _file_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime, info.mode = 0, 0o644
    return info


def _fix_hashes(rollout: Path) -> None:
    """Recompute every listed shard's sha256 (the manifest otherwise catches the edit first)."""
    m = _manifest(rollout)
    for shard in m["shards"]:
        path = rollout / shard["name"]
        if path.is_file():
            shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    _write_manifest(rollout, m)


def _keys(rollout: Path) -> list[tuple[str, str]]:
    """(shard name, key) of every sample, in order."""
    out = []
    for shard in _manifest(rollout)["shards"]:
        seen = []
        for member, _ in _members(rollout / shard["name"]):
            key = member.name.partition(".")[0]
            if key not in seen:
                seen.append(key)
        out += [(shard["name"], k) for k in seen]
    return out


def _carriers(rollout: Path, fld: str) -> list[tuple[str, str]]:
    """(shard name, key) of every sample carrying member ``fld``, in order."""
    out = []
    for shard in _manifest(rollout)["shards"]:
        out += [(shard["name"], m.name.partition(".")[0]) for m, _ in _members(rollout / shard["name"])
                if m.name.partition(".")[2] == fld]
    return out


def _sharers(rollout: Path) -> list[tuple[str, str]]:
    """(shard name, key) of the samples that name another's state (no state.npy of their own)."""
    holders = set(_carriers(rollout, "state.npy"))
    return [k for k in _carriers(rollout, "meta.json") if k not in holders]


def edit_sample(which: str, fld: str, fn: Callable[[bytes], bytes | None]) -> Callable:
    """A setup replacing field ``fld`` of the first/last sample carrying it (``sharer``: the first
    that names another's state) by ``fn(old)`` (None: remove the member), then fixing the manifest's
    hashes."""
    def setup(ws: Path, p: dict[str, Path], key: str = "rollout") -> None:
        rollout = p[key]
        shard, sample = _sharers(rollout)[0] if which == "sharer" else _carriers(rollout, fld)[0 if which == "first" else -1]
        members, found = [], False
        for member, data in _members(rollout / shard):
            if member.name == f"{sample}.{fld}":
                data, found = fn(data), True
                if data is None:
                    continue
            members.append((member, data))
        assert found, f"{sample} has no {fld}"
        _write_members(rollout / shard, members)
        _fix_hashes(rollout)
    return setup


def edit_meta(fn: Callable[[dict], Any], which: str = "first") -> Callable:
    def change(data: bytes) -> bytes:
        meta = json.loads(data)
        fn(meta)  # edits in place
        return json.dumps(meta).encode()  # allow_nan: NaN is written as NaN
    return edit_sample(which, "meta.json", change)


def _name_last_holder(ws: Path, p: dict[str, Path]) -> None:
    """The first sharer names the last sample holding a state: one that comes after it."""
    last = _carriers(p["rollout"], "state.npy")[-1][1]
    edit_meta(lambda m: m.update(state_key=last), "sharer")(ws, p)


def edit_shard(fn: Callable[[Path, list], list | None], which: int = 0, fix: bool = True) -> Callable:
    """A setup rewriting one shard's member list (fn returns the new list, or writes the file itself)."""
    def setup(ws: Path, p: dict[str, Path], key: str = "rollout") -> None:
        rollout = p[key]
        path = rollout / _manifest(rollout)["shards"][which]["name"]
        new = fn(path, _members(path))
        if isinstance(new, list):
            _write_members(path, new)
        if fix:
            _fix_hashes(rollout)
    return setup


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _npy_claiming(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """An .npy whose header claims ``shape`` but which holds 16 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + b"\x00" * 16


class _Marker:
    """Unpickling this creates the folder ``path``: proof that an artifact was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _marker_path(ws: Path) -> Path:
    return ws.parent / "unpickled-marker"


def _pickled_npy(ws: Path) -> bytes:
    evil = np.empty(1, dtype=object)
    evil[0] = _Marker(_marker_path(ws))
    buf = io.BytesIO()
    np.save(buf, evil, allow_pickle=True)
    return buf.getvalue()


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buf, format=fmt)
    return buf.getvalue()


def _png_mode(data: bytes, mode: str) -> bytes:
    """The same picture as a PNG of another PIL mode (L: grayscale, RGBA, P: a palette)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _short_of_its_header(data: bytes) -> bytes:
    """The array's header intact, its last 4 bytes of data cut off."""
    return data[:-4]


def _png_claiming(width: int, height: int, depth: int = 8) -> bytes:
    """A well-formed PNG header claiming ``width x height`` RGB pixels, with a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _with_nan(array: np.ndarray, value: float = np.nan) -> np.ndarray:
    array = array.copy()
    array.flat[array.size // 2] = value
    return array


def resync_scores(p: dict[str, Path], rollout: str = "rollout", scores: str = "scores") -> None:
    """Point the scores' recorded manifest hash at the (edited) manifest, so update gets past it."""
    manifest = p[rollout] / "manifest.json"
    if not manifest.is_file() or not p[scores].is_file():
        return
    table = pq.read_table(p[scores])
    meta = json.loads(table.schema.metadata[b"tempflow"])
    meta["rollout_manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    pq.write_table(table.replace_schema_metadata({"tempflow": json.dumps(meta, sort_keys=True)}), p[scores])


def edit_scores(fn: Callable[[pa.Table], pa.Table], meta: Callable[[dict], Any] | None = None,
                raw_meta: bytes | None = None, drop_meta: bool = False) -> Callable:
    def setup(ws: Path, p: dict[str, Path]) -> None:
        table = pq.read_table(p["scores"])
        m = json.loads(table.schema.metadata[b"tempflow"])
        if meta is not None:
            meta(m)  # edits in place
        table = fn(table)
        if drop_meta:
            table = table.replace_schema_metadata(None)
        else:
            table = table.replace_schema_metadata({"tempflow": raw_meta if raw_meta is not None else json.dumps(m)})
        pq.write_table(table, p["scores"])
    return setup


def _overflowing_weight(p: dict[str, Path]) -> None:
    """Scores whose metadata weight is the JSON number 1e999 (Python reads it as inf) over a zero column."""
    table = pq.read_table(p["scores"])
    table = set_column("reward_jpeg_compressibility", lambda t: [0.0] * t.num_rows)(table)
    meta = json.loads(table.schema.metadata[b"tempflow"])
    meta["rewards"][0]["weight"] = 1.0
    raw = json.dumps(meta).replace('"weight": 1.0', '"weight": 1e999')
    pq.write_table(table.replace_schema_metadata({"tempflow": raw}), p["scores"])


def set_column(name: str, values: Callable[[pa.Table], Any], type: Any = None) -> Callable[[pa.Table], pa.Table]:
    def fn(table: pa.Table) -> pa.Table:
        array = pa.array(values(table), type=type)
        if name in table.column_names:
            return table.set_column(table.column_names.index(name), name, array)
        return table.append_column(name, array)
    return fn


def _equal_rewards_in_first_group(ws: Path, p: dict[str, Path]) -> None:
    """Every sample of the first sample's advantage group gets one reward (its components kept the
    weighted sum): the update skips that group."""
    shard, first = _keys(p["rollout"])[0]
    group = next(json.loads(data)["group"] for m, data in _members(p["rollout"] / shard) if m.name == f"{first}.meta.json")
    members = {key for name, key in _keys(p["rollout"])
               for m, data in _members(p["rollout"] / name) if m.name == f"{key}.meta.json" and json.loads(data)["group"] == group}

    def same(table: pa.Table) -> pa.Table:
        keys = table.column("key").to_pylist()
        for column in ("reward", _COMPONENT):
            values = [0.5 if k in members else v for k, v in zip(keys, table.column(column).to_pylist())]
            table = table.set_column(table.column_names.index(column), column, pa.array(values, pa.float64()))
        return table
    edit_scores(same)(ws, p)


def _rewards(table: pa.Table) -> np.ndarray:
    return table.column("reward").to_numpy().copy()


def write_bytes(rel: str, data: bytes | Callable[[bytes], bytes]) -> Callable:
    def setup(ws: Path, p: dict[str, Path]) -> None:
        path = ws / rel
        new = data(path.read_bytes()) if callable(data) else data
        path.write_bytes(new)
    return setup


def remove(rel: str) -> Callable:
    def setup(ws: Path, p: dict[str, Path]) -> None:
        path = ws / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return setup


def replace_by_dir(rel: str) -> Callable:
    def setup(ws: Path, p: dict[str, Path]) -> None:
        remove(rel)(ws, p)
        (ws / rel).mkdir()
        (ws / rel / "x").write_text("x")
    return setup


def edit_json(rel: str, fn: Callable[[Any], Any]) -> Callable:
    def setup(ws: Path, p: dict[str, Path]) -> None:
        path = ws / rel
        obj = json.loads(path.read_text())
        fn(obj)  # edits in place
        path.write_text(_dump_json(obj))
    return setup


def edit_tensors(rel: str, fn: Callable[[dict], None]) -> Callable:
    def setup(ws: Path, p: dict[str, Path]) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        path = ws / rel
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        fn(tensors)
        save_file(tensors, path, metadata=metadata)
    return setup


def _bump_first(tensors: dict) -> None:
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01


def _nan_first(tensors: dict) -> None:
    name = sorted(tensors)[0]
    t = tensors[name].clone()
    t.view(-1)[0] = float("nan")
    tensors[name] = t


def _reshape_first(tensors: dict) -> None:
    import torch

    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(tensors[name].numel() + 3)


def chain(*setups: Callable) -> Callable:
    def setup(ws: Path, p: dict[str, Path]) -> None:
        for s in setups:
            s(ws, p)
    return setup


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


NOT_UTF8 = b"\xff\xfe\x00{\"format\": \x81\x82}"
NOT_UTF8_NO_BOM = b"{\"prompt\": \"\x81\xff\"}"  # json.loads(bytes) would sniff a \xff\xfe BOM as UTF-16
GARBAGE = bytes(range(256)) * 8


# ---- 1. rollout artifacts, read by score and update --------------------------------------------
#
# Each is registered for both readers; for update the scores' manifest hash is resynced after the
# edit, so the case reaches the check it is about.

def rollout_case(id: str, setup: Callable, stages: set[str] = frozenset({"score", "update"}), repair: bool = False,
                 marker: bool = False, extra: tuple = ()) -> None:
    for stage in sorted(stages):
        def full(ws: Path, p: dict[str, Path], setup=setup, stage=stage) -> None:
            setup(ws, p)
            if stage == "update":
                resync_scores(p)
        case(id, stage, setup=full, repair=repair, marker=marker, extra=extra)


# manifest.json
rollout_case("manifest-missing", lambda ws, p: (p["rollout"] / "manifest.json").unlink(), repair=True)
rollout_case("manifest-not-json", lambda ws, p: (p["rollout"] / "manifest.json").write_text("{\"schema\": "), repair=True)
rollout_case("manifest-not-utf8", lambda ws, p: (p["rollout"] / "manifest.json").write_bytes(NOT_UTF8))
rollout_case("manifest-is-list", lambda ws, p: (p["rollout"] / "manifest.json").write_text("[]"))
rollout_case("manifest-is-dir", replace_by_dir("rollout/manifest.json"))
rollout_case("manifest-schema-999", _edit_manifest(lambda m: m.update(schema="tempflow.rollout/999")))
for _key in ("shards", "samples", "config", "sigmas", "prompts", "policy", "nfe"):
    rollout_case(f"manifest-lacks-{_key}", _edit_manifest(lambda m, k=_key: m.pop(k)), repair=_key == "sigmas")
for _key in ("algo", "noise_level", "num_steps"):
    rollout_case(f"config-lacks-{_key}", _edit_manifest(lambda m, k=_key: m["config"].pop(k)))
rollout_case("config-not-dict", _edit_manifest(lambda m: m.update(config="tempflow")))
rollout_case("config-noise_level-string", _edit_manifest(lambda m: m["config"].update(noise_level="0.7")))
rollout_case("samples-as-string", _edit_manifest(lambda m: m.update(samples=str(m["samples"]))))
rollout_case("samples-count-wrong", _edit_manifest(lambda m: m.update(samples=m["samples"] - 1)))
rollout_case("sigmas-not-a-list", _edit_manifest(lambda m: m.update(sigmas=3.0)))
rollout_case("sigmas-too-short", _edit_manifest(lambda m: m.update(sigmas=m["sigmas"][:2])))
rollout_case("prompts-not-a-list", _edit_manifest(lambda m: m.update(prompts="a red circle")))
rollout_case("policy-not-a-dict", _edit_manifest(lambda m: m.update(policy="8ccfb0ea")))
rollout_case("shards-not-a-list", _edit_manifest(lambda m: m.update(shards="shard-000000.tar")))
rollout_case("shards-entry-a-string", _edit_manifest(lambda m: m.update(shards=[s["name"] for s in m["shards"]])))
rollout_case("shards-entry-name-int", _edit_manifest(lambda m: m["shards"][0].update(name=0)))
rollout_case("shards-entry-without-sha256", _edit_manifest(lambda m: m["shards"][0].pop("sha256")))
rollout_case("shards-entry-sha256-int", _edit_manifest(lambda m: m["shards"][0].update(sha256=0)))
rollout_case("shard-name-with-slash",
             _edit_manifest(lambda m: m["shards"][0].update(name="../rollout/" + m["shards"][0]["name"])))
rollout_case("shard-name-dotdot", _edit_manifest(lambda m: m["shards"][0].update(name="..")))
rollout_case("shards-listed-twice", _edit_manifest(lambda m: m.update(shards=m["shards"] + m["shards"][:1],
                                                                      samples=m["samples"] + m["shards"][0]["samples"])))
rollout_case("shards-empty-samples-zero", _edit_manifest(lambda m: m.update(shards=[], samples=0)))

# the shards themselves
rollout_case("shard-truncated", edit_shard(lambda path, ms: path.write_bytes(_truncate(path.read_bytes())), fix=False),
             repair=True)
rollout_case("shard-truncated-hash-fixed", edit_shard(lambda path, ms: path.write_bytes(_truncate(path.read_bytes()))))
rollout_case("shard-garbage-hash-fixed", edit_shard(lambda path, ms: path.write_bytes(GARBAGE)), repair=True)
rollout_case("shard-empty-hash-fixed", edit_shard(lambda path, ms: path.write_bytes(b"")))
rollout_case("shard-gzipped-hash-fixed", edit_shard(lambda path, ms: path.write_bytes(zlib.compress(path.read_bytes()))))
rollout_case("shard-missing", lambda ws, p: (p["rollout"] / _manifest(p["rollout"])["shards"][1]["name"]).unlink())
rollout_case("shard-is-a-dir", lambda ws, p: replace_by_dir(f"rollout/{_manifest(p['rollout'])['shards'][1]['name']}")(ws, p))


def _plus_member(name: str, payload: Callable[[Path], bytes] | bytes, kind: bytes = tarfile.REGTYPE, linkname: str = ""):
    def fn(path: Path, members: list) -> list:
        info = _file_info(name)
        info.type, info.linkname = kind, linkname
        data = payload(path) if callable(payload) else payload
        return members[:4] + [(info, data)] + members[4:]  # after the first sample's four fields
    return fn


def _pickle_payload(path: Path) -> bytes:
    return pickle.dumps({"weights": _Marker(path.parent.parent.parent / "unpickled-marker")})


rollout_case("shard-member-pth", edit_shard(lambda path, ms: _plus_member("p00000_s000_k000_b00.pth", _pickle_payload)(path, ms)),
             marker=True, repair=True)
rollout_case("shard-member-unknown-field", edit_shard(_plus_member("p00000_s000_k000_b00.txt", b"hello")))
rollout_case("shard-member-without-dot", edit_shard(_plus_member("README", b"hello")))
rollout_case("shard-member-dir", edit_shard(_plus_member("p00000_s000_k000_b00.meta.json", b"", tarfile.DIRTYPE)))
rollout_case("shard-member-symlink",
             edit_shard(_plus_member("p00000_s000_k000_b00.image.png", b"", tarfile.SYMTYPE, "/etc/passwd")))
rollout_case("shard-member-absolute-path", edit_shard(_plus_member("/tmp/p00000_s000_k000_b00.meta.json", b"{}")))


def _dup_adjacent(path: Path, members: list) -> list:
    return members[:4] + members[:4] + members[4:]


def _dup_later(path: Path, members: list) -> list:
    return members + members[:4]


def _dup_other_shard(ws: Path, p: dict[str, Path]) -> None:
    """The first sample of shard 0 appended to shard 1; the counts fixed so only the key repeats."""
    rollout = p["rollout"]
    m = _manifest(rollout)
    first = _members(rollout / m["shards"][0]["name"])[:4]
    second = rollout / m["shards"][1]["name"]
    _write_members(second, _members(second) + first)
    m["shards"][1]["samples"] += 1
    m["samples"] += 1
    _write_manifest(rollout, m)
    _fix_hashes(rollout)


rollout_case("sample-duplicated-adjacent", edit_shard(_dup_adjacent))
rollout_case("sample-duplicated-same-shard", edit_shard(_dup_later))
rollout_case("sample-duplicated-other-shard", _dup_other_shard, repair=True)
rollout_case("holder-lacks-mean", edit_sample("first", "mean.npy", lambda d: None))
rollout_case("sample-lacks-meta", edit_sample("first", "meta.json", lambda d: None))

# meta.json of one sample
rollout_case("meta-not-json", edit_sample("first", "meta.json", lambda d: b"{\"prompt\": "), repair=True)
rollout_case("meta-not-utf8", edit_sample("first", "meta.json", lambda d: NOT_UTF8_NO_BOM))
rollout_case("meta-utf16-bom", edit_sample("first", "meta.json", lambda d: NOT_UTF8))
rollout_case("meta-is-list", edit_sample("first", "meta.json", lambda d: b"[1, 2]"))
for _key in ("step", "prompt", "log_prob", "prompt_index", "sigma"):
    rollout_case(f"meta-lacks-{_key}", edit_meta(lambda m, k=_key: m.pop(k)))
_UPDATE = {"update"}
LATE = ("--batch-size", "4")  # update: the damaged last sample is then trained after the first, ratio-checked step
rollout_case("meta-log_prob-nan", edit_meta(lambda m: m.update(log_prob=float("nan"))), _UPDATE, repair=True)
rollout_case("meta-log_prob-inf-late", edit_meta(lambda m: m.update(log_prob=float("inf")), "last"), _UPDATE, extra=LATE)
rollout_case("meta-log_prob-string", edit_meta(lambda m: m.update(log_prob="-1.5")), _UPDATE)
rollout_case("meta-step-99", edit_meta(lambda m: m.update(step=99)), _UPDATE)
rollout_case("meta-step-negative", edit_meta(lambda m: m.update(step=-1)), _UPDATE)
rollout_case("meta-step-last", edit_meta(lambda m: m.update(step=3)), _UPDATE)
rollout_case("meta-step-string", edit_meta(lambda m: m.update(step="0")), _UPDATE)
rollout_case("meta-step-float", edit_meta(lambda m: m.update(step=0.5)), _UPDATE)
rollout_case("meta-prompt_index-99", edit_meta(lambda m: m.update(prompt_index=99)), _UPDATE)
rollout_case("meta-prompt_index-negative", edit_meta(lambda m: m.update(prompt_index=-1)), _UPDATE)
rollout_case("meta-prompt_index-other-prompt", edit_meta(lambda m: m.update(prompt_index=1)), _UPDATE)
rollout_case("meta-prompt_index-string", edit_meta(lambda m: m.update(prompt_index="0")), _UPDATE)
rollout_case("meta-sigma-wrong", edit_meta(lambda m: m.update(sigma=0.5)), _UPDATE)
rollout_case("meta-prompt-not-a-string", edit_meta(lambda m: m.update(prompt=["a red circle"])), {"score"})
rollout_case("meta-image_key-dangling",
             chain(edit_sample("first", "image.png", lambda d: None), edit_meta(lambda m: m.update(image_key="nope"))),
             {"score"})
rollout_case("meta-image_key-not-a-string",
             chain(edit_sample("first", "image.png", lambda d: None), edit_meta(lambda m: m.update(image_key=[1]))),
             {"score"})
rollout_case("sample-lacks-image-and-image_key", edit_sample("first", "image.png", lambda d: None), {"score"})

# the state links (state_key, state_refs): checked by every reader; how x_(k+1) was drawn (noise_seed,
# std, next_sha256): checked by the update, which reads x_(k+1)
rollout_case("holder-lacks-state-late", edit_sample("last", "state.npy", lambda d: None), extra=LATE)
rollout_case("meta-state_key-dangling", edit_meta(lambda m: m.update(state_key="nope"), "sharer"), repair=True)
rollout_case("meta-state_key-not-a-string", edit_meta(lambda m: m.update(state_key=[1]), "sharer"))
rollout_case("meta-state_key-names-a-later-sample", _name_last_holder)
rollout_case("meta-state_key-and-own-state", edit_meta(lambda m: m.update(state_key="p00000_s000_k000_b01")))
rollout_case("meta-state_key-missing", edit_meta(lambda m: m.pop("state_key"), "sharer"))
rollout_case("meta-state_refs-one-too-many", edit_meta(lambda m: m.update(state_refs=m["state_refs"] + 1)))
rollout_case("meta-state_refs-one-too-few", edit_meta(lambda m: m.update(state_refs=m["state_refs"] - 1)))
rollout_case("meta-state_refs-string", edit_meta(lambda m: m.update(state_refs="1")))
rollout_case("meta-noise_seed-other", edit_meta(lambda m: m.update(noise_seed=m["noise_seed"] + 1)), _UPDATE, repair=True)
rollout_case("meta-noise_seed-other-late", edit_meta(lambda m: m.update(noise_seed=m["noise_seed"] + 1), "last"), _UPDATE,
             extra=LATE)
rollout_case("meta-noise_seed-negative", edit_meta(lambda m: m.update(noise_seed=-1), "sharer"), _UPDATE)
rollout_case("meta-std-doubled", edit_meta(lambda m: m.update(std=2 * m["std"]), "sharer"), _UPDATE)
rollout_case("meta-std-zero", edit_meta(lambda m: m.update(std=0.0)), _UPDATE)
rollout_case("meta-next_sha256-garbage", edit_meta(lambda m: m.update(next_sha256="00" * 32)), _UPDATE)
rollout_case("meta-next_sha256-int", edit_meta(lambda m: m.update(next_sha256=0)), _UPDATE)

# state.npy / mean.npy: read whole by update only, but every reader checks every sample's headers
# (dtype, shape, byte count), so a sample whose arrays are broken is refused even where it is not used
_ARR = {"update"}
_HEADER = {"score", "update"}
rollout_case("state-wrong-shape", edit_sample("first", "state.npy", lambda d: _npy(_load_npy(d)[:, :8, :8])), _HEADER,
             repair=True)
rollout_case("state-wrong-shape-late", edit_sample("last", "state.npy", lambda d: _npy(_load_npy(d)[:, :8, :8])), _HEADER,
             extra=LATE)
rollout_case("mean-wrong-shape", edit_sample("first", "mean.npy", lambda d: _npy(_load_npy(d)[:2])), _HEADER)
rollout_case("state-zero-dim", edit_sample("first", "state.npy", lambda d: _npy(np.float32(1.0))), _HEADER)
rollout_case("state-dtype-int64-late", edit_sample("last", "state.npy", lambda d: _npy((_load_npy(d) * 100).astype(np.int64))),
             _HEADER, extra=LATE)
rollout_case("state-dtype-str-late", edit_sample("last", "state.npy", lambda d: _npy(_load_npy(d).astype("<U8"))), _HEADER,
             extra=LATE)
rollout_case("state-dtype-complex-late", edit_sample("last", "state.npy", lambda d: _npy(_load_npy(d).astype(np.complex64))),
             _HEADER, extra=LATE)
rollout_case("state-dtype-bool-late", edit_sample("last", "state.npy", lambda d: _npy(_load_npy(d) > 0)), _HEADER,
             extra=LATE)
rollout_case("state-huge-header", edit_sample("first", "state.npy", lambda d: _npy_claiming((10**12,))), _HEADER)
rollout_case("mean-huge-header-late", edit_sample("last", "mean.npy", lambda d: _npy_claiming((10**6, 10**6))), _HEADER,
             extra=LATE)
rollout_case("state-header-shape-mismatch", edit_sample("first", "state.npy", lambda d: _npy_claiming((3, 16, 16))), _HEADER)
rollout_case("state-header-claims-its-shape-holds-less", edit_sample("first", "state.npy", _short_of_its_header), _HEADER)
rollout_case("state-garbage", edit_sample("first", "state.npy", lambda d: GARBAGE), _HEADER)
rollout_case("state-empty", edit_sample("first", "state.npy", lambda d: b""), _HEADER)
rollout_case("state-nan-late", edit_sample("last", "state.npy", lambda d: _npy(_with_nan(_load_npy(d)))), _ARR, repair=True,
             extra=LATE)
rollout_case("state-inf-late", edit_sample("last", "state.npy", lambda d: _npy(_with_nan(_load_npy(d), np.inf))), _ARR, extra=LATE)
rollout_case("mean-nan-late", edit_sample("last", "mean.npy", lambda d: _npy(_with_nan(_load_npy(d)))), _ARR, extra=LATE)
rollout_case("state-huge-values-late", edit_sample("last", "state.npy", lambda d: _npy(_load_npy(d) * np.float32(1e30))), _ARR, extra=LATE)
# an outside fault matrix found a broken sample passing unread in a group the update skips (every
# reward of the group equal): the update's every read checks every sample's headers
case("update-broken-state-in-a-skipped-group", "update",
     setup=chain(edit_sample("first", "state.npy", lambda d: GARBAGE), _equal_rewards_in_first_group, lambda ws, p: resync_scores(p)))


def _pickled_state(ws: Path, p: dict[str, Path]) -> None:
    edit_sample("first", "state.npy", lambda d: _pickled_npy(ws))(ws, p)


rollout_case("state-pickled-object-array", _pickled_state, _HEADER, marker=True)

# image.png: decoded by score only, its header (8-bit RGB, the manifest's resolution) checked by every reader
_IMG = {"score"}
rollout_case("image-garbage", edit_sample("first", "image.png", lambda d: GARBAGE), _HEADER, repair=True)
rollout_case("image-empty", edit_sample("first", "image.png", lambda d: b""), _HEADER)
rollout_case("image-truncated", edit_sample("first", "image.png", _truncate), _IMG)
rollout_case("image-is-jpeg", edit_sample("first", "image.png", lambda d: _png(np.zeros((16, 16, 3), np.uint8), "JPEG")), _HEADER)
rollout_case("image-other-size", edit_sample("last", "image.png", lambda d: _png(np.zeros((8, 8, 3), np.uint8))), _HEADER,
             repair=True)
rollout_case("image-header-60000x60000", edit_sample("first", "image.png", lambda d: _png_claiming(60000, 60000)), _HEADER)
rollout_case("image-header-12000x12000", edit_sample("first", "image.png", lambda d: _png_claiming(12000, 12000)), _HEADER)
# an outside fault matrix found an image of another colour mode scored and trained on
rollout_case("image-grayscale", edit_sample("first", "image.png", lambda d: _png_mode(d, "L")), _HEADER)
rollout_case("image-rgba", edit_sample("first", "image.png", lambda d: _png_mode(d, "RGBA")), _HEADER, repair=True)
rollout_case("image-palette", edit_sample("last", "image.png", lambda d: _png_mode(d, "P")), _HEADER)
rollout_case("image-16-bit", edit_sample("first", "image.png", lambda d: _png_claiming(16, 16, depth=16)), _HEADER)


# ---- 2. scores parquet, read by update ------------------------------------------------------

_COMPONENT = "reward_jpeg_compressibility"
case("scores-missing", "update", setup=remove("scores.parquet"))
case("scores-is-a-dir", "update", setup=replace_by_dir("scores.parquet"))
case("scores-not-parquet", "update", setup=write_bytes("scores.parquet", GARBAGE), repair=True)
case("scores-empty-file", "update", setup=write_bytes("scores.parquet", b""))
case("scores-truncated", "update", setup=write_bytes("scores.parquet", _truncate))
case("scores-without-metadata", "update", setup=edit_scores(lambda t: t, drop_meta=True))
case("scores-metadata-not-json", "update", setup=edit_scores(lambda t: t, raw_meta=b"{\"schema\": "))
case("scores-metadata-not-utf8", "update", setup=edit_scores(lambda t: t, raw_meta=NOT_UTF8))
case("scores-metadata-a-list", "update", setup=edit_scores(lambda t: t, raw_meta=b"[1]"))
case("scores-weight-overflows", "update", setup=lambda ws, p: _overflowing_weight(p))
case("scores-schema-999", "update", setup=edit_scores(lambda t: t, meta=lambda m: m.update(schema="tempflow.scores/999")))
case("scores-without-manifest-hash", "update", setup=edit_scores(lambda t: t, meta=lambda m: m.pop("rollout_manifest_sha256")))
case("scores-without-key-column", "update", setup=edit_scores(lambda t: t.drop_columns(["key"])))
case("scores-without-reward-column", "update", setup=edit_scores(lambda t: t.drop_columns(["reward"])))
case("scores-reward-strings", "update", setup=edit_scores(set_column("reward", lambda t: ["high"] * t.num_rows)))
case("scores-reward-numeric-strings", "update",
     setup=edit_scores(set_column("reward", lambda t: [str(v) for v in _rewards(t)])))
case("scores-reward-bool", "update", setup=edit_scores(set_column("reward", lambda t: list(_rewards(t) > _rewards(t).mean()))))
case("scores-reward-nan", "update", setup=edit_scores(set_column("reward", lambda t: _with_nan(_rewards(t)), pa.float64())),
     repair=True)
case("scores-reward-inf", "update", setup=edit_scores(set_column("reward", lambda t: _with_nan(_rewards(t), np.inf), pa.float64())))
case("scores-reward-null", "update",
     setup=edit_scores(set_column("reward", lambda t: [None] + list(_rewards(t)[1:]), pa.float64())))
case("scores-reward-all-1e300", "update", setup=edit_scores(set_column("reward", lambda t: _rewards(t) * 1e300, pa.float64())))
case("scores-reward-one-1e300", "update",
     setup=edit_scores(set_column("reward", lambda t: _with_nan(_rewards(t), 1e300), pa.float64())))
case("scores-reward-list-type", "update",
     setup=edit_scores(set_column("reward", lambda t: [[float(v)] for v in _rewards(t)])))
case("scores-key-renamed", "update",
     setup=edit_scores(set_column("key", lambda t: ["p99999_s000_k000_b00"] + t.column("key").to_pylist()[1:])))
case("scores-row-dropped", "update", setup=edit_scores(lambda t: t.slice(1)))
case("scores-no-rows", "update", setup=edit_scores(lambda t: t.slice(0, 0)))
case("scores-duplicate-key", "update", setup=edit_scores(lambda t: pa.concat_tables([t, t.slice(0, 1)])), repair=True)
case("scores-duplicate-key-instead-of-one", "update",
     setup=edit_scores(set_column("key", lambda t: t.column("key").to_pylist()[:-1] + t.column("key").to_pylist()[:1])))
case("scores-keys-int", "update", setup=edit_scores(set_column("key", lambda t: list(range(t.num_rows)))))
case("scores-key-null", "update", setup=edit_scores(set_column("key", lambda t: [None] + t.column("key").to_pylist()[1:],
                                                              pa.string())))
case("scores-component-strings", "update", setup=edit_scores(set_column(_COMPONENT, lambda t: ["x"] * t.num_rows)))
case("scores-component-nan", "update",
     setup=edit_scores(set_column(_COMPONENT, lambda t: _with_nan(t.column(_COMPONENT).to_numpy()), pa.float64())))
case("scores-reward-not-the-weighted-sum", "update",
     setup=edit_scores(set_column("reward", lambda t: _rewards(t) + 1.0, pa.float64())))

# ---- 3. policy folders, read by rollout, update and eval ------------------------------------

_DENOISER = "transformer/diffusion_pytorch_model.safetensors"
POLICY_CASES: list[tuple[str, Callable, bool, bool]] = [  # (id, setup, repair, marker)
    ("policy-missing", remove("policy"), False, False),
    ("policy-is-a-file", lambda ws, p: (remove("policy")(ws, p), (ws / "policy").write_text("x")), False, False),
    ("config-missing", remove("policy/config.json"), False, False),
    ("config-not-json", write_bytes("policy/config.json", b"{\"format\": "), False, False),
    ("config-not-utf8", write_bytes("policy/config.json", NOT_UTF8), True, False),
    ("config-is-a-list", write_bytes("policy/config.json", b"[]"), False, False),
    ("config-is-a-dir", replace_by_dir("policy/config.json"), False, False),
    ("config-schema-999", edit_json("policy/config.json", lambda c: c.update(schema="tempflow.policy/999")), False, False),
    ("config-two-versions", edit_json("policy/config.json", lambda c: c.update(format="tempflow.policy/999")), False, False),
    ("config-kind-unknown", edit_json("policy/config.json", lambda c: c.update(kind="sd9")), False, False),
    ("config-kind-missing", edit_json("policy/config.json", lambda c: c.pop("kind")), False, False),
    ("config-extra-field", edit_json("policy/config.json", lambda c: c.update(colour="red")), False, False),
    ("config-model-not-a-dict", edit_json("policy/config.json", lambda c: c.update(model="tiny")), False, False),
    ("config-model-image_size-string", edit_json("policy/config.json", lambda c: c["model"].update(image_size="16")), False, False),
    ("config-model-unknown-field", edit_json("policy/config.json", lambda c: c["model"].update(colour="red")), False, False),
    ("config-identity-wrong", edit_json("policy/config.json", lambda c: c.update(identity="0" * 64)), False, False),
    ("config-identity-empty-weights-edited",
     chain(edit_json("policy/config.json", lambda c: c.update(identity="")), edit_tensors(f"policy/{_DENOISER}", _bump_first)), True, False),
    ("config-identity-missing-weights-edited",
     chain(edit_json("policy/config.json", lambda c: c.pop("identity")), edit_tensors(f"policy/{_DENOISER}", _bump_first)), False, False),
    ("weights-edited", edit_tensors(f"policy/{_DENOISER}", _bump_first), True, False),
    ("weights-nan-identity-empty",
     chain(edit_json("policy/config.json", lambda c: c.update(identity="")), edit_tensors(f"policy/{_DENOISER}", _nan_first)), False, False),
    ("weights-truncated", write_bytes(f"policy/{_DENOISER}", _truncate), True, False),
    ("weights-garbage", write_bytes(f"policy/{_DENOISER}", GARBAGE), False, False),
    ("weights-missing", remove(f"policy/{_DENOISER}"), False, False),
    ("weights-tensor-reshaped-identity-empty",
     chain(edit_json("policy/config.json", lambda c: c.update(identity="")), edit_tensors(f"policy/{_DENOISER}", _reshape_first)), False, False),
    ("text-encoder-weights-truncated", write_bytes("policy/text_encoder/model.safetensors", _truncate), False, False),
    ("denoiser-config-not-json", write_bytes("policy/transformer/config.json", b"{\"_class_name\": "), False, False),
    ("denoiser-config-not-utf8", write_bytes("policy/transformer/config.json", NOT_UTF8), False, False),
    ("tokenizer-garbage", write_bytes("policy/tokenizer/tokenizer.json", b"{\"version\": 1, \"model\": 7}"), False, False),
    ("tokenizer-not-utf8", write_bytes("policy/tokenizer/tokenizer.json", NOT_UTF8), False, False),
]


def _weights_as_pickle(ws: Path, p: dict[str, Path]) -> None:
    (ws / "policy" / _DENOISER).unlink()
    (ws / "policy" / "transformer" / "diffusion_pytorch_model.bin").write_bytes(
        pickle.dumps({"weights": _Marker(_marker_path(ws))}))


POLICY_CASES.append(("weights-only-as-pickle", _weights_as_pickle, False, True))

def _rollout_claims_identity(identity: str) -> Callable:
    """The rollout says it was sampled by ``identity`` (scores resynced): update then gets past its
    sampled-by check to the policy's own weights check."""
    def setup(ws: Path, p: dict[str, Path]) -> None:
        _edit_manifest(lambda m: m["policy"].update(identity=identity))(ws, p)
        resync_scores(p)
    return setup


for _id, _setup, _repair, _marker in POLICY_CASES:
    for _stage in ("rollout", "update", "eval"):
        _full = _setup
        if _stage == "update" and ("identity-empty" in _id or "identity-missing" in _id):
            _full = chain(_setup, _rollout_claims_identity(""))
        case(_id, _stage, setup=_full, repair=_repair and _stage != "eval", marker=_marker)

case("config-step-string", "update", setup=edit_json("policy/config.json", lambda c: c.update(step="0")))
case("config-step-negative", "update", setup=edit_json("policy/config.json", lambda c: c.update(step=-5)))
case("config-reference-a-string", "update", setup=edit_json("policy/config.json", lambda c: c.update(reference="../x")))
case("config-reference-without-path", "update",
     setup=edit_json("policy/config.json", lambda c: c.update(reference={"identity": c["identity"]})))

# optimizer state and the recorded KL reference of policy2 (the second update)
case("optimizer-json-not-json", "update2", setup=write_bytes("policy2/optimizer.json", b"{\"type\": "), repair=True)
case("optimizer-json-not-utf8", "update2", setup=write_bytes("policy2/optimizer.json", NOT_UTF8))
case("optimizer-json-a-list", "update2", setup=write_bytes("policy2/optimizer.json", b"[]"))
case("optimizer-json-params-renamed", "update2",
     setup=edit_json("policy2/optimizer.json", lambda o: o.update(params=o["params"][::-1])))
case("optimizer-json-is-a-dir", "update2", setup=replace_by_dir("policy2/optimizer.json"))
case("optimizer-tensors-truncated", "update2", setup=write_bytes("policy2/optimizer.safetensors", _truncate), repair=True)
case("optimizer-tensors-garbage", "update2", setup=write_bytes("policy2/optimizer.safetensors", GARBAGE))
case("optimizer-tensors-empty", "update2", setup=write_bytes("policy2/optimizer.safetensors", b""))
case("optimizer-tensors-missing", "update2", setup=remove("policy2/optimizer.safetensors"))
case("optimizer-tensor-wrong-shape", "update2", setup=edit_tensors("policy2/optimizer.safetensors", _reshape_first))
case("optimizer-tensor-nan", "update2", setup=edit_tensors("policy2/optimizer.safetensors", _nan_first))
case("optimizer-tensor-unknown-name", "update2",
     setup=edit_tensors("policy2/optimizer.safetensors", lambda t: t.update({"bogus/step": t[sorted(t)[0]].clone()})))
case("optimizer-tensor-dropped", "update2",
     setup=edit_tensors("policy2/optimizer.safetensors", lambda t: t.pop(sorted(t)[-1])))
case("reference-missing", "update2", setup=remove("policy"))
case("reference-weights-edited", "update2", setup=edit_tensors(f"policy/{_DENOISER}", _bump_first))
case("reference-config-not-utf8", "update2", setup=write_bytes("policy/config.json", NOT_UTF8))
case("reference-identity-empty-weights-edited", "update2",
     setup=chain(edit_json("policy/config.json", lambda c: c.update(identity="")), edit_tensors("policy/" + _DENOISER, _bump_first)))
case("option-reference-missing", "update", extra=lambda ws: ["--reference", ws / "nope"])
case("option-reference-not-utf8", "update", setup=lambda ws, p: (shutil.copytree(ws / "policy", ws / "ref"),
                                                                  (ws / "ref" / "config.json").write_bytes(NOT_UTF8)),
     extra=lambda ws: ["--reference", ws / "ref"])
case("option-reference-weights-edited", "update",
     setup=lambda ws, p: (shutil.copytree(ws / "policy", ws / "ref"), edit_tensors("ref/" + _DENOISER, _bump_first)(ws, p)),
     extra=lambda ws: ["--reference", ws / "ref"])

# ---- 4. prompts files, read by rollout, eval and init --vocab-from ----------------------------

PROMPT_CASES = [
    ("prompts-missing", remove("prompts.txt"), False),
    ("prompts-not-utf8", write_bytes("prompts.txt", b"a red circle\n\xff\xfe\x81 blue\n"), True),
    ("prompts-only-comments", write_bytes("prompts.txt", b"# nothing\n\n   \n"), False),
    ("prompts-is-a-dir", replace_by_dir("prompts.txt"), False),
    ("prompts-binary", write_bytes("prompts.txt", GARBAGE), False),
]
for _id, _setup, _repair in PROMPT_CASES:
    for _stage in ("rollout", "eval"):
        case(_id, _stage, setup=_setup, repair=_repair)
    case("vocab-" + _id, "init", setup=_setup, extra=lambda ws: ["--vocab-from", ws / "prompts.txt"], repair=_repair)
case("prompts-outside-the-grammar", "eval", setup=write_bytes("prompts.txt", b"a red circle\na purple elephant\n"))

# ---- 5. bad option values --------------------------------------------------------------------

case("image-size-100000", "init", extra=["--image-size", "100000"])
case("image-size-0", "init", extra=["--image-size", "0"])
case("image-size-negative", "init", extra=["--image-size", "-16"])
case("image-size-odd", "init", extra=["--image-size", "17"])
case("seed-2**64", "init", extra=["--seed", str(2**64)])
case("branches-1e9", "rollout", extra=["--branches", "1000000000"])
case("seeds-per-prompt-1e9", "rollout", extra=["--seeds-per-prompt", "1000000000"])
case("num-steps-1e9", "rollout", extra=["--num-steps", "1000000000"])
case("batch-size-1e9", "rollout", extra=["--batch-size", str(10**9)], expect="either")
case("shift-1e30", "rollout", extra=["--shift", "1e30"], expect="either")
case("shift-1e-30", "rollout", extra=["--shift", "1e-30"], expect="either")
case("noise-level-1e-30", "rollout", extra=["--noise-level", "1e-30"], expect="either")
case("noise-level-1e30", "rollout", extra=["--noise-level", "1e30"], expect="either")
case("shift-nan", "rollout", extra=["--shift", "nan"])
case("noise-level-inf", "rollout", extra=["--noise-level", "inf"])
case("seed-2**64", "rollout", extra=["--seed", str(2**64)], expect="either")
case("learning-rate-1e30", "update", extra=["--learning-rate", "1e30"])
case("beta-1e30", "update", extra=["--beta", "1e30"], expect="either")
case("weight-decay-1e30", "update", extra=["--weight-decay", "1e30"], expect="either")
case("learning-rate-nan", "update", extra=["--learning-rate", "nan"])
case("clip-range-inf", "update", extra=["--clip-range", "inf"])
case("batch-size-0", "score", extra=["--batch-size", "0"])
case("num-steps-0", "eval", extra=["--num-steps", "0"])
case("shift-nan", "eval", extra=["--shift", "nan"])
case("images-per-prompt-1e9", "eval", extra=["--images-per-prompt", "1000000000"])

for _spec in ("os.path", "foo:bar:baz:qux", ":", ":f", "..:f", ".:f", "os:path", "os.path:join", "json:loads",
              "jpeg_compressibility:1e309", "jpeg_compressibility:", "jpeg_compressibility::", "foo bar:baz",
              "stages.rewards:REWARDS", "builtins:print"):
    case(f"reward-{_spec}", "score", reward=_spec)
case("reward-given-twice", "score", extra=["--reward", "jpeg_compressibility:2"])

# ---- 6. bad --out / --metrics paths ------------------------------------------------------------

_FOLDER_STAGES = ("init", "rollout", "update", "eval")


def _existing_file(name: str) -> Callable:
    def setup(ws: Path, p: dict[str, Path]) -> None:
        (ws / name).write_text("precious\n")
    return setup


def _existing_dir(name: str) -> Callable:
    def setup(ws: Path, p: dict[str, Path]) -> None:
        (ws / name).mkdir()
        (ws / name / "keep.txt").write_text("precious\n")
    return setup


for _stage in _FOLDER_STAGES:
    case("out-is-an-existing-file-overwrite", _stage, setup=_existing_file("afile"), out=lambda ws: ws / "afile",
         extra=["--overwrite"])
case("out-is-an-existing-dir-overwrite", "score", setup=_existing_dir("adir"), out=lambda ws: ws / "adir",
     extra=["--overwrite"])

for _stage in ("init", "rollout", "score", "update", "eval"):
    case("out-dot-overwrite", _stage, out=lambda ws: ".", extra=["--overwrite"])
    case("out-dotdot-overwrite", _stage, out=lambda ws: "..", extra=["--overwrite"])
    case("out-parent-is-a-file", _stage, setup=_existing_file("afile"), out=lambda ws: ws / "afile" / "sub")
    case("out-under-proc", _stage, out=lambda ws: Path("/proc/self/tempflow-battery/out"))
case("out-empty-string-overwrite", "score", out=lambda ws: "", extra=["--overwrite"])
case("out-trailing-dot-overwrite", "rollout", out=lambda ws: ws / "work" / ".", extra=["--overwrite"])
for _stage in ("init", "score"):
    case("out-parent-read-only", _stage, setup=lambda ws, p: (ws / "ro").mkdir(), out=lambda ws: ws / "ro" / "out")


def _prompts_in_dir(ws: Path, p: dict[str, Path]) -> None:
    (ws / "pdir").mkdir()
    shutil.copy(ws / "prompts.txt", ws / "pdir" / "prompts.txt")
    p["prompts"] = ws / "pdir" / "prompts.txt"


case("out-is-parent-of-prompts-overwrite", "rollout", setup=_prompts_in_dir, out=lambda ws: ws / "pdir", extra=["--overwrite"])
case("out-is-prompts-overwrite", "rollout", out=lambda ws: ws / "prompts.txt", extra=["--overwrite"])
case("out-is-policy-overwrite", "rollout", out=lambda ws: ws / "policy", extra=["--overwrite"])
case("out-inside-policy-overwrite", "rollout", out=lambda ws: ws / "policy" / "transformer", extra=["--overwrite"])
case("out-is-parent-of-vocab-overwrite", "init", setup=_prompts_in_dir, out=lambda ws: ws / "pdir",
     extra=lambda ws: ["--vocab-from", ws / "pdir" / "prompts.txt", "--overwrite"])
case("out-is-vocab-overwrite", "init", out=lambda ws: ws / "prompts.txt",
     extra=lambda ws: ["--vocab-from", ws / "prompts.txt", "--overwrite"])
case("out-is-rollout-overwrite", "score", out=lambda ws: ws / "rollout", extra=["--overwrite"])
case("out-is-manifest-overwrite", "score", out=lambda ws: ws / "rollout" / "manifest.json", extra=["--overwrite"])
case("out-is-shard-overwrite", "score", out=lambda ws: ws / "rollout" / "shard-000000.tar", extra=["--overwrite"])
case("out-is-policy-overwrite", "update", out=lambda ws: ws / "policy", extra=["--overwrite"])
case("out-inside-policy-overwrite", "update", out=lambda ws: ws / "policy" / "transformer", extra=["--overwrite"])
case("out-inside-rollout-overwrite", "update", out=lambda ws: ws / "rollout" / "new", extra=["--overwrite"])
case("out-is-scores-overwrite", "update", out=lambda ws: ws / "scores.parquet", extra=["--overwrite"])
case("out-is-reference-overwrite", "update2", out=lambda ws: ws / "policy", extra=["--overwrite"])
case("out-is-policy-overwrite", "eval", out=lambda ws: ws / "policy", extra=["--overwrite"])
case("out-inside-policy-overwrite", "eval", out=lambda ws: ws / "policy" / "tokenizer", extra=["--overwrite"])
case("out-is-parent-of-prompts-overwrite", "eval", setup=_prompts_in_dir, out=lambda ws: ws / "pdir", extra=["--overwrite"])
case("out-is-prompts-overwrite", "eval", out=lambda ws: ws / "prompts.txt", extra=["--overwrite"])

case("metrics-inside-out", "update", metrics=lambda ws: ws / "out_policy" / "m.json")
case("metrics-inside-out-overwrite", "update", metrics=lambda ws: ws / "out_policy" / "metrics.json", extra=["--overwrite"])
case("metrics-is-out", "update", metrics=lambda ws: ws / "out_policy")
case("metrics-parent-is-a-file", "update", setup=_existing_file("afile"), metrics=lambda ws: ws / "afile" / "m.json")
case("metrics-under-proc", "update", metrics=lambda ws: Path("/proc/self/tempflow-battery/m.json"))
case("metrics-is-scores-overwrite", "update", metrics=lambda ws: ws / "scores.parquet", extra=["--overwrite"])
case("metrics-is-manifest-overwrite", "update", metrics=lambda ws: ws / "rollout" / "manifest.json", extra=["--overwrite"])
case("metrics-inside-policy-overwrite", "update", metrics=lambda ws: ws / "policy" / "config.json", extra=["--overwrite"])
case("metrics-is-dot-overwrite", "update", metrics=lambda ws: ".", extra=["--overwrite"])
case("metrics-is-an-existing-dir-overwrite", "update", setup=_existing_dir("adir"), metrics=lambda ws: ws / "adir",
     extra=["--overwrite"])


# ---- 7. report: update metrics and eval folders -------------------------------------------------

case("metrics-not-json", "report", setup=write_bytes("metrics/it00.json", b"{not json"), repair=True)
case("metrics-not-utf8", "report", setup=write_bytes("metrics/it00.json", NOT_UTF8))
case("metrics-a-list", "report", setup=write_bytes("metrics/it00.json", b"[1, 2]"))
case("metrics-nan", "report", setup=write_bytes("metrics/it00.json", lambda d: d.replace(b'"loss": ', b'"loss": NaN, "x": ')))
case("metrics-lacks-reward", "report", setup=edit_json("metrics/it00.json", lambda m: m.pop("reward_mean")))
case("metrics-nfe-a-string", "report", setup=edit_json("metrics/it00.json", lambda m: m.update(rollout_nfe="12")))
case("metrics-kl-a-bool", "report", setup=edit_json("metrics/it00.json", lambda m: m.update(kl=True)))
case("metrics-dir-empty", "report", setup=remove("metrics/it00.json"))
case("metrics-dir-missing", "report", setup=remove("metrics"))
case("eval-metrics-not-utf8", "report", setup=write_bytes("evals/base/metrics.json", NOT_UTF8), repair=True)
case("eval-metrics-reward-a-string", "report", setup=edit_json("evals/base/metrics.json", lambda m: m.update(reward="0.5")))
case("eval-metrics-lacks-policy", "report", setup=edit_json("evals/base/metrics.json", lambda m: m.pop("policy")))
case("eval-metrics-step-a-string", "report",
     setup=edit_json("evals/base/metrics.json", lambda m: m["policy"].update(step="0")))
case("eval-metrics-per-task-a-list", "report", setup=edit_json("evals/base/metrics.json", lambda m: m.update(per_task=[])))
case("eval-dir-empty", "report", setup=remove("evals/base"))
case("eval-same-policy-twice", "report", setup=lambda ws, p: shutil.copytree(ws / "evals" / "base", ws / "evals" / "again"))
case("eval-option-not-name-dir", "report", extra=["--eval", "base"])
case("eval-option-name-twice", "report", extra=lambda ws: ["--eval", f"base={ws / 'evals' / 'base'}"])
case("out-inside-metrics-dir", "report", out=lambda ws: ws / "metrics" / "report")
case("out-is-metrics-dir-overwrite", "report", out=lambda ws: ws / "metrics", extra=["--overwrite"])
case("out-is-eval-dir-overwrite", "report", out=lambda ws: ws / "evals", extra=["--overwrite"])
case("out-is-parent-of-evals-overwrite", "report", out=lambda ws: ws, extra=["--overwrite"])
case("out-parent-is-a-file", "report", setup=_existing_file("afile"), out=lambda ws: ws / "afile" / "sub")
case("out-is-an-existing-file-overwrite", "report", setup=_existing_file("afile"), out=lambda ws: ws / "afile",
     extra=["--overwrite"])

# ---- 8. pretrain: its checkpoint folder and options ----------------------------------------------


def _checkpoint(state: bytes | None, tensors: bytes | Callable | None = None, extra_file: bool = False) -> Callable:
    """A checkpoint folder at ws/ckpt: state.json bytes (None: a matching valid one) and a tensors
    file (bytes, or a function returning the tensors to save)."""
    def setup(ws: Path, p: dict[str, Path]) -> None:
        from dataclasses import asdict

        from safetensors.torch import save_file

        from stages.artifacts.pretrain_checkpoint import PRETRAIN_SCHEMA
        from stages.policies.tiny import build_policy, model_config
        from stages.pretrain import PretrainConfig

        p["ckpt"].mkdir()
        config = PretrainConfig(world="shapes", steps=2, autoencoder_steps=2, batch_size=2, autoencoder_batch_size=2,
                                checkpoint_every=1)
        model = model_config(build_policy(config.preset, config.seed, {"image_size": config.image_size}))
        info = {"schema": PRETRAIN_SCHEMA, "phase": "autoencoder", "step": 1, "config": asdict(config),
                "model": model, "losses": [0.5], "extra": {}}
        (p["ckpt"] / "state.json").write_bytes(state if state is not None else _dump_json(info).encode())
        if callable(tensors):
            save_file(tensors(), p["ckpt"] / "state.safetensors")
        elif tensors is not None:
            (p["ckpt"] / "state.safetensors").write_bytes(tensors)
        if extra_file:
            (p["ckpt"] / "notes.md").write_text("mine\n")
    return setup


def _tensors() -> dict:
    import torch

    return {"param/vae.encoder.conv_in.weight": torch.zeros(1, 2)}


case("checkpoint-state-not-json", "pretrain", setup=_checkpoint(b"{not json", GARBAGE))
case("checkpoint-state-not-utf8", "pretrain", setup=_checkpoint(NOT_UTF8, GARBAGE))
case("checkpoint-tensors-garbage", "pretrain", setup=_checkpoint(None, GARBAGE))
case("checkpoint-tensors-missing", "pretrain", setup=_checkpoint(None, None))
case("checkpoint-tensors-misshapen", "pretrain", setup=_checkpoint(None, _tensors))
case("checkpoint-with-a-user-file", "pretrain", setup=_checkpoint(None, GARBAGE, extra_file=True))
case("checkpoint-is-a-user-folder", "pretrain", setup=_existing_dir("ckpt"))
case("checkpoint-is-a-file", "pretrain", setup=_existing_file("ckpt"))
case("checkpoint-is-dot", "pretrain", extra=["--checkpoint", "."])
case("device-foo", "pretrain", extra=["--device", "foo"])
case("checkpoint-is-out", "pretrain", extra=lambda ws: ["--checkpoint", ws / "out_base"])
case("checkpoint-inside-out", "pretrain", extra=lambda ws: ["--checkpoint", ws / "out_base" / "ck"])
case("checkpoint-is-parent-of-out", "pretrain", extra=lambda ws: ["--checkpoint", ws])
for _option, _value in [("learning-rate", "1e30"), ("autoencoder-learning-rate", "nan"), ("image-size", "100000"),
                        ("image-size", "24"), ("steps", str(10**9)), ("batch-size", str(10**6)), ("seed", str(2**64)),
                        ("ema", "1.5"), ("sigma-shift", "nan"), ("warmup", "-1"), ("preset", "nope")]:
    case(f"{_option}-{_value}", "pretrain", extra=[f"--{_option}", _value])
case("out-dot-overwrite", "pretrain", out=lambda ws: ".", extra=["--overwrite"])
case("out-parent-is-a-file", "pretrain", setup=_existing_file("afile"), out=lambda ws: ws / "afile" / "sub")
case("out-is-an-existing-file-overwrite", "pretrain", setup=_existing_file("afile"), out=lambda ws: ws / "afile",
     extra=["--overwrite"])


# --------------------------------------------------------------------------------------------
# Checking one case


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(path: Path) -> Any:
    """Everything under ``path`` (hidden entries included): kinds, link targets, file hashes."""
    if not os.path.lexists(path):
        return None
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_file():
        return ("file", _sha(path))
    if not path.is_dir():
        return ("other",)
    entries: dict[str, Any] = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            entries[os.path.relpath(os.path.join(root, name), path)] = "dir"
        for name in files:
            full = Path(root) / name
            entries[os.path.relpath(full, path)] = ("link", os.readlink(full)) if full.is_symlink() else _sha(full)
    return ("dir", entries)


def _anchor(path: Path) -> Path:
    """The nearest existing folder at or above ``path``'s parent."""
    parent = path.parent
    while not parent.is_dir():
        parent = parent.parent
    return parent


def _listing(folder: Path) -> list[str] | None:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return None


class _Hung(BaseException):
    """Raised by the watchdog's alarm: the command neither finished nor refused in time."""


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def watchdog(seconds: float):
    """Bound a command's wall time (SIGALRM) and the address space it may add (RLIMIT_AS)."""
    def on_alarm(signum, frame):
        raise _Hung()

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_bytes() + HEADROOM
    if hard == resource.RLIM_INFINITY or cap < hard:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@dataclass
class Run:
    exit_code: int | None
    stdout: str
    stderr: str
    exception: BaseException | None
    where: str = ""  # innermost frame of an escaping exception
    hung: bool = False
    args: list[str] = field(default_factory=list)


def _stop_leftover_displays() -> None:
    """A command that died inside a progress display leaves it registered on the CLI's module-level
    rich consoles; in a real process that dies with it, in-process it would break the next case."""
    try:
        from tempflow_cli import ui
    except ImportError:
        return
    for console in ui.consoles() if ui.consoles.cache_info().currsize else ():
        stack = getattr(console, "_live_stack", None)
        while stack:
            live = stack[-1]
            with contextlib.suppress(Exception):
                live.stop()
            if stack and stack[-1] is live:
                stack.pop()


def run_cli(args: list[Any], seconds: float) -> Run:
    args = [str(a) for a in args]
    try:
        with watchdog(seconds):
            r = CliRunner().invoke(cli, args, catch_exceptions=True)
    except _Hung:
        _stop_leftover_displays()
        return Run(None, "", "", None, hung=True, args=args)
    _stop_leftover_displays()
    exc = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
    where = ""
    if exc is not None and r.exc_info is not None:
        frame = traceback.extract_tb(r.exc_info[2])[-1]
        where = f" at {Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return Run(r.exit_code, r.stdout, r.stderr, exc, where=where, args=args)


def contract_violations(run: Run, seconds: float) -> list[str]:
    """What a refusal got wrong: exit code, stderr shape, tracebacks."""
    if run.hung:
        return [f"no result within {seconds:.0f}s (neither refused up front nor finished)"]
    problems = []
    if run.exception is not None:
        text = str(run.exception).strip().splitlines()
        problems.append(f"traceback {type(run.exception).__name__}{run.where}: {text[0][:160] if text else ''}")
    if run.exit_code == 0:
        problems.append("exit 0 (accepted)")
    lines = run.stderr.splitlines()
    if run.exception is None and run.exit_code != 0:  # an escaping exception or a success says it all
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines: {run.stderr.strip()[:300]!r}")
        elif not lines[0].startswith("error: "):
            problems.append(f"stderr line does not start with 'error: ': {lines[0][:200]!r}")
    if "Traceback" in run.stdout + run.stderr:
        problems.append("'Traceback' in the output")
    return problems


def _finite_rollout(folder: Path) -> list[str]:
    """Problems of an accepted rollout: every log_prob, x_k and SDE mean must be finite."""
    problems = []
    m = json.loads((folder / "manifest.json").read_text())
    if not all(np.isfinite(m["sigmas"])):
        problems.append("manifest sigmas not finite")
    for shard in m["shards"]:
        for member, data in _members(folder / shard["name"]):
            if member.name.endswith(".meta.json"):
                if not np.isfinite(json.loads(data)["log_prob"]):
                    problems.append(f"{member.name}: log_prob {json.loads(data)['log_prob']}")
            elif member.name.endswith(".npy") and not np.isfinite(_load_npy(data)).all():
                problems.append(f"{member.name}: non-finite values")
            if len(problems) > 2:
                return problems
    return problems


def _finite_policy(folder: Path) -> list[str]:
    """Problems of an accepted policy: finite weights and a finite velocity on a plain input."""
    import torch
    from safetensors.torch import load_file

    from stages.policies.base import load_policy

    problems = []
    for path in sorted(folder.rglob("*.safetensors")):
        if path.name == "optimizer.safetensors":
            continue
        bad = [name for name, t in load_file(path).items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            problems.append(f"{path.relative_to(folder)}: non-finite weights {bad[:2]}")
    if problems:
        return problems
    policy, _ = load_policy(folder)
    torch.manual_seed(0)
    x = torch.randn(2, *policy.sample_shape)
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor([1.0, 0.5]), policy.encode(PROMPTS[:2]))
    if not torch.isfinite(v).all():
        problems.append("the policy's velocity is not finite")
    elif float(v.abs().max()) > 1e6:
        problems.append(f"the policy's velocity reaches {float(v.abs().max()):.3g}")
    metrics = folder / "metrics.json"
    if metrics.is_file():
        values = json.loads(metrics.read_text())
        bad = [k for k, v in values.items() if isinstance(v, float) and not np.isfinite(v)]
        if bad:
            problems.append(f"metrics not finite: {bad}")
    return problems


def accepted_output_problems(stage: str, out: Path) -> list[str]:
    if not out.exists():
        return [f"exit 0 but {out} does not exist"]
    try:
        if stage == "rollout":
            return _finite_rollout(out)
        if stage in ("init", "update", "update2"):
            return _finite_policy(out)
    except Exception as err:  # the output could not even be read back
        return [f"accepted output unreadable: {type(err).__name__}: {err}"]
    return []


def _build(c: Case, ws: Path, p: dict[str, Path]) -> tuple[Cmd, list[Path]]:
    base, inputs = _base_args(c.stage, p)
    out = c.out(ws) if c.out else ws / DEFAULT_OUT[c.stage]
    extra = c.extra(ws) if callable(c.extra) else list(c.extra)
    args = [*base, "--out", out]
    if c.reward is not None:
        args = [a if a != "jpeg_compressibility" else c.reward for a in args]
    outs = [out]
    if c.metrics is not None:
        args += ["--metrics", c.metrics(ws)]
        outs.append(c.metrics(ws))
    args += extra
    cwd = ws / "work"
    abs_outs = [Path(os.path.abspath(cwd / o)) for o in outs]
    words = [str(a) for a in extra]
    for flag in ("--vocab-from", "--reference"):  # options naming more inputs
        if flag in words:
            inputs = inputs + [Path(words[words.index(flag) + 1])]
    return Cmd(args=args, outs=abs_outs, inputs=inputs), abs_outs


def _fresh_workspace(pristine: Path, ws: Path) -> None:
    if ws.exists():
        shutil.rmtree(ws)
    shutil.copytree(pristine, ws, symlinks=True)
    (ws / "work").mkdir()


@contextlib.contextmanager
def _read_only(folder: Path):
    folder.chmod(0o500)
    try:
        yield
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(c: Case, pristine: Path, tmp_path: Path, monkeypatch) -> None:
    ws = tmp_path / "ws"
    _fresh_workspace(pristine, ws)
    monkeypatch.chdir(ws / "work")
    p = _paths(ws)
    if c.setup is not None:
        c.setup(ws, p)
    cmd, outs = _build(c, ws, p)

    read_only = c.id.endswith("out-parent-read-only")
    guard = _read_only(ws / "ro") if read_only else contextlib.nullcontext()
    with guard:
        if read_only:
            try:
                (ws / "ro" / ".probe").write_text("x")
            except PermissionError:
                pass
            else:
                (ws / "ro" / ".probe").unlink()
                pytest.skip("running as root: chmod 0o500 does not stop writes (see out-parent-is-a-file, out-under-proc)")

        before_outs = {o: snapshot(o) for o in outs}
        before_inputs = {i: snapshot(i) for i in cmd.inputs}
        anchors = {_anchor(o) for o in outs}
        before_listing = {a: _listing(a) for a in anchors}

        run = run_cli(cmd.args, c.seconds)
        if os.environ.get("TEMPFLOW_BATTERY_LOG"):  # what each case answered, for reading the battery
            with open(os.environ["TEMPFLOW_BATTERY_LOG"], "a") as log:
                answer = "HUNG" if run.hung else (f"{type(run.exception).__name__}{run.where}: {run.exception}"
                                                  if run.exception else run.stderr.strip().splitlines()[-1:])
                log.write(f"{c.id} | exit {run.exit_code} | {answer}\n")

        problems = contract_violations(run, c.seconds)
        accepted = not run.hung and run.exit_code == 0 and run.exception is None
        if c.expect == "either" and accepted:
            problems = accepted_output_problems(c.stage, outs[0])
        else:
            for o in outs:
                after = snapshot(o)
                if after != before_outs[o]:
                    problems.append(f"output {o} {'left behind' if before_outs[o] is None else 'changed'}"
                                    if after is not None else f"existing output {o} removed")
        if not (c.expect == "either" and accepted):
            for a in anchors:
                if a.parts[:2] == ("/", "proc"):
                    continue
                after = _listing(a)
                if after != before_listing[a]:
                    added = sorted(set(after or []) - set(before_listing[a] or []))
                    gone = sorted(set(before_listing[a] or []) - set(after or []))
                    problems.append(f"{a} listing changed (added {added}, removed {gone})")
        for i, snap in before_inputs.items():
            if snapshot(i) != snap:
                problems.append(f"input {i.relative_to(ws) if i.is_relative_to(ws) else i} modified")
        if c.marker and _marker_path(ws).exists():
            problems.append("an artifact was UNPICKLED (marker created)")

    assert not problems, f"{' '.join(cmd.args[:1])}: " + "; ".join(problems)

    if c.repair:
        _fresh_workspace(pristine, ws)
        monkeypatch.chdir(ws / "work")  # the old working folder went with the old workspace
        rerun = run_cli(cmd.args, 120)
        ok = not rerun.hung and rerun.exit_code == 0 and rerun.exception is None
        assert ok, (f"after restoring the pristine inputs the command still fails: exit {rerun.exit_code}, "
                    f"{rerun.exception!r}, {rerun.stderr.strip()[:300]!r}")
        assert outs[0].exists()
