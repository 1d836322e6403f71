"""The on-disk contract between stages (DESIGN.md §4), read and written only here.

* Outputs appear atomically: a stage writes into a hidden sibling and renames it into place.
* A rollout is ``manifest.json`` + webdataset shards ``shard-000000.tar`` ...; one sample per trained
  transition with the fields ``meta.json``, ``state.npy``, ``next.npy`` and (optionally) ``image.png``.
* Scores are one parquet file with a ``key`` column, ``reward`` and ``reward_<name>`` columns.
* Nothing is ever unpickled: arrays are ``.npy`` read with ``allow_pickle=False``, and a shard member
  that is not one of the known fields (a ``.pth``, a pickle, anything else) is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import TempflowError

ROLLOUT_SCHEMA = "tempflow.rollout/1"
SCORES_SCHEMA = "tempflow.scores/1"
MANIFEST = "manifest.json"
SAMPLE_FIELDS = ("meta.json", "state.npy", "next.npy", "image.png")
REQUIRED_FIELDS = ("meta.json", "state.npy", "next.npy")
META_FIELDS = ("prompt", "prompt_index", "seed", "group", "step", "branch", "sigma", "sigma_next", "log_prob", "algo")
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def seed_group(prompt_index: int, seed: int, step: int) -> str:
    """The advantage group of the branches that share one ``x_k``: (prompt, seed, step)."""
    return f"p{prompt_index}-s{seed}-k{step}"


# --------------------------------------------------------------------------------------------
# Atomic outputs


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def check_out_free(path: Path | str, overwrite: bool, inputs: tuple[Path | str, ...] = ()) -> None:
    """Fail before any work is done when ``path`` may not become a stage's output: it exists and
    may not be replaced, or replacing it would delete the working folder, a parent, or an input."""
    path = Path(path)
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if path.name in ("", ".", "..") or resolved == cwd or resolved in cwd.parents:
        raise TempflowError(f"--out {path} is the working folder or one of its parents; give a new path such as runs/out")
    for given in inputs:
        inp = Path(given).resolve()
        if resolved == inp or resolved in inp.parents:
            raise TempflowError(f"--out {path} would replace the input {given}; choose another --out")
    if path.exists() and not overwrite:
        raise TempflowError(f"{path} already exists; remove it, choose another --out, or pass --overwrite")


@contextlib.contextmanager
def atomic_output(path: Path | str, overwrite: bool = False, inputs: tuple[Path | str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write into; rename it to ``path`` on success.

    On any exception (Ctrl-C included) the temporary is removed and ``path`` is untouched. Leftovers
    of a killed run (``.NAME.partial-PID`` whose process is gone) are cleared first, so a rerun
    succeeds.
    """
    path = Path(path)
    check_out_free(path, overwrite, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.partial-"
    for stale in path.parent.glob(prefix + "*"):
        suffix = stale.name[len(prefix):]
        if suffix.isdigit() and not _pid_alive(int(suffix)):
            _remove(stale)
    tmp = path.parent / f"{prefix}{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"stage wrote nothing to {tmp}")
        if path.exists():
            if not overwrite:  # appeared while the stage ran
                raise TempflowError(f"{path} appeared while the stage ran; remove it or pass --overwrite")
            if path.is_dir() != tmp.is_dir():
                kind = "folder" if path.is_dir() else "file"
                raise TempflowError(f"{path} is a {kind}; --overwrite only replaces a {kind} with a {kind}")
            _remove(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise TempflowError(f"{path}: no such file; expected {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TempflowError(f"{path}: not valid JSON ({err}); expected {what}") from None


# --------------------------------------------------------------------------------------------
# Sample encoding


def npy_bytes(array: np.ndarray) -> bytes:
    """float arrays as ``.npy`` (bf16 and half are widened to float32, losslessly)."""
    array = np.ascontiguousarray(array)
    if array.dtype.kind == "f" and array.dtype.itemsize < 4:
        array = array.astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 ``(H, W, 3)`` as PNG (deterministic bytes for equal pixels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def decode_png(data: bytes, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise TempflowError(f"{where}: image.png is not a readable PNG ({err}); the rollout is damaged") from None


def decode_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise TempflowError(f"{where}: not a plain .npy array ({err}); the rollout is damaged") from None


@dataclass
class Sample:
    """One rollout sample as read from a shard: raw field bytes plus decoding helpers."""

    key: str
    fields: dict[str, bytes]  # the fields that were asked for
    present: set[str]  # every field the sample has in the shard, read or not
    where: str  # "shard-000003.tar" for error messages

    @property
    def meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self.fields["meta.json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TempflowError(f"{self.where} sample {self.key}: meta.json is not valid JSON ({err})") from None
        missing = [f for f in META_FIELDS if f not in meta] if isinstance(meta, dict) else list(META_FIELDS)
        if missing:
            raise TempflowError(f"{self.where} sample {self.key}: meta.json lacks {', '.join(missing)}; the rollout is damaged")
        return meta

    def array(self, name: str) -> np.ndarray:
        return decode_npy(self.fields[name], f"{self.where} sample {self.key} {name}")

    def image(self) -> np.ndarray:
        return decode_png(self.fields["image.png"], f"{self.where} sample {self.key}")


# --------------------------------------------------------------------------------------------
# Rollout shards


class ShardWriter:
    """Writes samples into ``shard-%06d.tar`` files of at most ``per_shard`` samples each, with
    fixed tar metadata (mtime 0, fixed owner) so equal samples give byte-identical shards."""

    def __init__(self, folder: Path, per_shard: int) -> None:
        import webdataset as wds

        self._wds = wds
        self.folder = folder
        self.per_shard = per_shard
        self.shards: list[dict[str, Any]] = []
        self.count = 0
        self._writer = None
        self._file = None
        self._in_shard = 0
        self._keys: set[str] = set()

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if not _KEY.match(key):
            raise ValueError(f"sample key {key!r} must be letters, digits, '_' or '-' (no dots)")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        unknown = set(fields) - set(SAMPLE_FIELDS)
        if unknown:
            raise ValueError(f"unknown sample fields {sorted(unknown)}")
        self._keys.add(key)
        if self._writer is None or self._in_shard >= self.per_shard:
            self._close_shard()
            name = f"shard-{len(self.shards):06d}.tar"
            self._file = open(self.folder / name, "wb")
            self._writer = self._wds.TarWriter(self._file, encoder=False, mtime=0, user="tempflow", group="tempflow")
            self.shards.append({"name": name, "samples": 0})
            self._in_shard = 0
        self._writer.write({"__key__": key, **fields})
        self._in_shard += 1
        self.shards[-1]["samples"] += 1
        self.count += 1

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            last = self.shards[-1]
            last["sha256"] = sha256_file(self.folder / last["name"])
            self._writer = self._file = None

    def close(self) -> list[dict[str, Any]]:
        self._close_shard()
        return self.shards


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_json(folder / MANIFEST, {"schema": ROLLOUT_SCHEMA, **manifest})


def read_manifest(folder: Path | str) -> dict[str, Any]:
    """The rollout's manifest, after checking its schema and that every shard it lists exists."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TempflowError(f"{folder}: no such rollout folder; create one with `tempflow rollout --out {folder}`")
    manifest = read_json(folder / MANIFEST, "a rollout manifest written by `tempflow rollout`")
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    if schema != ROLLOUT_SCHEMA:
        raise TempflowError(
            f"{folder / MANIFEST}: rollout schema {schema!r}, this tempflow reads {ROLLOUT_SCHEMA!r}; "
            "re-run `tempflow rollout` with this version"
        )
    for key in ("shards", "samples", "config", "policy", "nfe", "prompts", "sigmas"):
        if key not in manifest:
            raise TempflowError(f"{folder / MANIFEST}: missing {key!r}; the manifest is damaged")
    for shard in manifest["shards"]:
        if not isinstance(shard, dict) or not isinstance(shard.get("name"), str) or "/" in shard["name"]:
            raise TempflowError(f"{folder / MANIFEST}: shard entry {shard!r} is not {{name, sha256, samples}}; the manifest is damaged")
        if not (folder / shard["name"]).is_file():
            raise TempflowError(f"{folder / shard['name']}: listed in the manifest but missing; the rollout is incomplete")
    return manifest


def manifest_hash(folder: Path | str) -> str:
    return sha256_file(Path(folder) / MANIFEST)


def verify_shards(folder: Path, manifest: dict[str, Any]) -> None:
    """Compare every shard's sha256 with the manifest: catches truncation and tampering up front."""
    for shard in manifest["shards"]:
        path = folder / shard["name"]
        if sha256_file(path) != shard.get("sha256"):
            raise TempflowError(
                f"{path}: sha256 does not match the manifest (truncated or modified); re-run `tempflow rollout`"
            )


def _iter_shard(path: Path, fields: Iterable[str] | None) -> Iterator[Sample]:
    """Samples of one shard in order, grouping consecutive members by key (webdataset's rule: the
    key is the member name up to its first dot). Only ``fields`` are read; others are skipped."""
    wanted = set(SAMPLE_FIELDS if fields is None else fields)
    current: Sample | None = None
    seen: set[str] = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    raise TempflowError(f"{path.name}: member {member.name!r} is not a regular file; refused")
                key, dot, field = member.name.partition(".")
                if not dot or field not in SAMPLE_FIELDS:
                    raise TempflowError(
                        f"{path.name}: member {member.name!r} is not a tempflow sample field "
                        f"({', '.join(SAMPLE_FIELDS)}); refused, tempflow never unpickles or runs artifact content"
                    )
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    if key in seen:
                        raise TempflowError(f"{path.name}: sample {key!r} appears twice; the shard is damaged")
                    seen.add(key)
                    current = Sample(key=key, fields={}, present=set(), where=path.name)
                current.present.add(field)
                if field in wanted:
                    handle = tar.extractfile(member)
                    current.fields[field] = handle.read() if handle else b""
    except (tarfile.TarError, EOFError, OSError) as err:
        raise TempflowError(f"{path}: unreadable tar ({err}); the rollout is damaged, re-run `tempflow rollout`") from None
    if current is not None:
        yield current


def iter_rollout(
    folder: Path | str, manifest: dict[str, Any] | None = None, fields: Iterable[str] | None = None, verify: bool = True
) -> Iterator[Sample]:
    """Every sample of a rollout, shard by shard, in the order written.

    Memory holds one sample at a time. Each sample is checked to carry the required fields.
    """
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    if verify:
        verify_shards(folder, manifest)
    fields = None if fields is None else tuple(fields)
    for shard in manifest["shards"]:
        for sample in _iter_shard(folder / shard["name"], fields):
            missing = [f for f in REQUIRED_FIELDS if f not in sample.present]
            if missing:
                raise TempflowError(f"{sample.where}: sample {sample.key} lacks {', '.join(missing)}; the rollout is damaged")
            yield sample


# --------------------------------------------------------------------------------------------
# Scores


def write_scores(path: Path, keys: list[str], total: np.ndarray, components: dict[str, np.ndarray], meta: dict) -> None:
    """One row per rollout sample: ``key``, ``reward`` (weighted total), ``reward_<name>`` per component."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"key": pa.array(keys, type=pa.string()), "reward": pa.array(total, type=pa.float64())}
    for name, values in components.items():
        columns[f"reward_{name}"] = pa.array(values, type=pa.float64())
    table = pa.table(columns)
    table = table.replace_schema_metadata({"tempflow": json.dumps({"schema": SCORES_SCHEMA, **meta}, sort_keys=True)})
    pq.write_table(table, path)


def read_scores(path: Path | str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Columns and tempflow metadata of a scores file, after checking schema and finiteness."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise TempflowError(f"{path}: no such scores file; create it with `tempflow score --out {path}`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise TempflowError(f"{path}: not a readable parquet file ({err})") from None
    raw = (table.schema.metadata or {}).get(b"tempflow")
    try:
        meta = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("schema") != SCORES_SCHEMA:
        found = meta.get("schema") if isinstance(meta, dict) else "unreadable metadata"
        raise TempflowError(f"{path}: scores schema {found!r}, this tempflow reads {SCORES_SCHEMA!r}")
    if "key" not in table.column_names or "reward" not in table.column_names:
        raise TempflowError(f"{path}: needs 'key' and 'reward' columns, found {table.column_names}")
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    bad = ~np.isfinite(columns["reward"].astype(np.float64))
    if bad.any():
        first = columns["key"][int(np.argmax(bad))]
        raise TempflowError(f"{path}: {int(bad.sum())} rewards are NaN or infinite (first at key {first}); fix the reward")
    return columns, meta


def check_keys_match(scores_keys: Iterable[str], rollout_keys: Iterable[str], scores_path: Path, rollout: Path) -> None:
    """Scores and rollout must hold exactly the same keys: a partial join would train on a subset silently."""
    scores_list = list(scores_keys)
    s, r = set(scores_list), set(rollout_keys)
    if len(s) != len(scores_list):
        raise TempflowError(f"{scores_path}: duplicate keys; re-run `tempflow score`")
    if s != r:
        only_s, only_r = sorted(s - r), sorted(r - s)
        detail = f"{len(only_s)} keys only in the scores (e.g. {only_s[:1]}), {len(only_r)} only in the rollout (e.g. {only_r[:1]})"
        raise TempflowError(f"{scores_path} does not match rollout {rollout}: {detail}; score this rollout again")
