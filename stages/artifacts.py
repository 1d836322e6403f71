"""The on-disk contract between stages (DESIGN.md §4), read and written only here.

* Outputs appear atomically: a stage writes into a locked slot beside the output and renames it into
  place; ``--overwrite`` swaps so that the old or the new output is whole at every instant.
* Inputs are read once and verified: a :class:`Rollout` holds its shards open, so a stage trains on
  exactly the bytes whose sha256 it checked.
* A rollout is ``manifest.json`` + webdataset shards ``shard-000000.tar`` ...; one sample per trained
  transition with the fields ``meta.json``, ``state.npy``, ``next.npy`` and (optionally) ``image.png``.
* Scores are one parquet file with a ``key`` column, ``reward`` and ``reward_<name>`` columns.
* Nothing is ever unpickled: an ``.npy`` header is parsed and checked (float32, the manifest's shape,
  the byte count) before its data is viewed, and a shard member that is not one of the known fields
  (a ``.pth``, a pickle, anything else) is refused.
* Every value a later stage relies on is checked where it enters: manifest fields, sample metas,
  arrays (finite), PNG sizes, reward columns (finite numbers within :data:`REWARD_LIMIT`).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import errno
import fcntl
import functools
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import signal
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import TempflowError

ROLLOUT_SCHEMA = "tempflow.rollout/4"
# 2: prompt embeddings, sampling settings and dtype; 3: trained_steps (was branch_steps) and their
# step_inclusion chances, decodes; 4: step_spread, the drawing weights of --branch-steps spread:N
SCORES_SCHEMA = "tempflow.scores/1"
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.safetensors"
"""Each prompt's conditioning once (``prompt.NAME``, one row per manifest prompt) and the negative
prompt's (``negative.NAME``, one row) when guidance uses one; float32."""
SAMPLE_FIELDS = ("meta.json", "state.npy", "next.npy", "image.png")
REQUIRED_FIELDS = ("meta.json", "state.npy", "next.npy")
META_FIELDS = ("prompt", "prompt_index", "seed", "group", "step", "branch", "sigma", "sigma_next", "log_prob", "algo")
_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def seed_group(prompt_index: int, seed: int, step: int) -> str:
    """The advantage group of the branches that share one ``x_k``: (prompt, seed, step)."""
    return f"p{prompt_index}-s{seed}-k{step}"


# --------------------------------------------------------------------------------------------
# Atomic outputs
#
# A stage writes its output into a *slot*: ``PARENT/.tempflow-partial/<pid>-<random>/new``, where
# PARENT is the output's parent folder. The process holds an flock on its slot folder for as long
# as it lives, so a slot that nobody holds is a leftover of a killed run, whatever its name or PID,
# and is removed by the next stage that writes into PARENT (several processes, e.g. the ranks of a
# distributed run, share the scheme: each holds its own slot). The slot is moved into place in one
# rename; with --overwrite a folder is swapped in with one ``renameat2(RENAME_EXCHANGE)`` on Linux,
# elsewhere the old output is first moved into the slot (``old``) and a killed swap is undone by the
# cleaner, so that at every instant the old or the new output is whole.

PARTIALS = ".tempflow-partial"
_PROTECTED: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("tempflow_protected", default=())
_COMMITTED: list[Path] = []


@contextlib.contextmanager
def protected_inputs(paths: Iterable[Path | str]) -> Iterator[None]:
    """Every output written inside this block is checked against ``paths`` too (the CLI passes every
    path option a command reads, so no option can name an input that ``--overwrite`` then deletes)."""
    token = _PROTECTED.set(_PROTECTED.get() + tuple(Path(p) for p in paths))
    try:
        yield
    finally:
        _PROTECTED.reset(token)


def committed_outputs() -> list[Path]:
    """Outputs this process has moved into place (so an interrupted command can say what it kept)."""
    return list(_COMMITTED)


def within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or lies inside it (both resolved by the caller)."""
    return path == folder or folder in path.parents


def check_out_free(path: Path | str, overwrite: bool, inputs: tuple[Path | str, ...] = (),
                   kind: str = "dir", outputs: tuple[Path | str, ...] = ()) -> None:
    """Fail before any work is done when ``path`` may not become a stage's output (a ``kind``:
    ``dir`` or ``file``): it exists and may not be replaced, or is of the other kind; replacing it
    would delete the working folder, a parent, an input or another of the stage's ``outputs``; or it
    lies inside one of them."""
    path = Path(path)
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if path.name in ("", ".", "..") or resolved == cwd or resolved in cwd.parents:
        raise TempflowError(f"{path or '.'} is the working folder or one of its parents; give a new path such as runs/out")
    if PARTIALS in path.parts:
        raise TempflowError(f"{path}: {PARTIALS} folders hold tempflow's unfinished outputs; choose another path")
    named = [(p, "the input") for p in (*inputs, *_PROTECTED.get())] + [(p, "the stage's other output") for p in outputs]
    for given, what in named:
        other = Path(given).resolve()
        if within(other, resolved) or _contains_same(resolved, other):
            raise TempflowError(f"{path} would replace {what} {given}; choose another path")
        if not other.is_file() and (within(resolved, other) or _contains_same(other, resolved)):
            raise TempflowError(f"{path} lies inside {what} {given}; write it outside the folders a stage reads or writes")
    if path.is_symlink():
        raise TempflowError(f"{path} is a symbolic link; give the path it points to ({resolved}) or another path")
    if path.parent.is_dir():
        clean_partials(path.parent)  # a killed swap's old output goes back first, so the checks below see it
    exists = path.exists() or path.is_symlink()
    if exists and not overwrite:
        raise TempflowError(f"{path} already exists; remove it, choose another path, or pass --overwrite")
    if exists and path.is_dir() != (kind == "dir"):
        found, wanted = ("folder", "file") if path.is_dir() else ("file", "folder")
        raise TempflowError(f"{path} is a {found}; this stage writes a {wanted} there and --overwrite only "
                            f"replaces a {wanted} with a {wanted}")
    _check_parent_writable(path)


def _contains_same(folder: Path, path: Path) -> bool:
    """``path`` or one of its existing ancestors is the same file as ``folder`` (by device and inode:
    catches a case-insensitive file system or a bind mount, which ``resolve()`` does not)."""
    if not folder.exists():
        return False
    return any(candidate.exists() and os.path.samefile(candidate, folder) for candidate in (path, *path.parents))


def _check_parent_writable(path: Path) -> None:
    """The nearest existing ancestor of ``path`` must be a folder this process may write in."""
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TempflowError(f"{path}: {ancestor} is a file, not a folder; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise TempflowError(f"{path}: no permission to write in {ancestor}; choose another path")


def _lock(folder: Path) -> int | None:
    """An exclusive, non-blocking flock on ``folder``: its fd, or None when another process holds it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except FileNotFoundError:  # another process's cleaner removed it first
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def clean_partials(parent: Path) -> None:
    """Remove every slot under ``parent/.tempflow-partial`` that no live process holds, first moving
    back an old output that a killed swap had moved aside."""
    root = Path(parent) / PARTIALS
    try:
        slots = list(root.iterdir()) if root.is_dir() else []
    except FileNotFoundError:  # removed by another process's cleaner meanwhile
        slots = []
    for slot in slots:
        fd = _lock(slot) if slot.is_dir() and not slot.is_symlink() else None
        if fd is None:
            continue
        try:
            target = Path(parent) / (slot / "target").read_text() if (slot / "target").is_file() else None
            if target is not None and (slot / "old").exists() and not (target.exists() or target.is_symlink()):
                os.replace(slot / "old", target)
            shutil.rmtree(slot, ignore_errors=True)
        finally:
            os.close(fd)
    with contextlib.suppress(OSError):
        root.rmdir()  # only when empty: another process may be writing there


class _Slot:
    """A locked folder under ``PARENT/.tempflow-partial`` that holds one output while it is written."""

    def __init__(self, path: Path) -> None:
        for _ in range(3):  # a cleaner may remove a slot in the instant between its mkdir and its lock
            self.folder = path.parent / PARTIALS / f"{os.getpid()}-{secrets.token_hex(4)}"
            self.folder.mkdir(parents=True)
            self.fd = _lock(self.folder)
            with contextlib.suppress(FileNotFoundError):
                if self.fd is not None and os.path.samestat(os.fstat(self.fd), self.folder.stat()):
                    (self.folder / "target").write_text(path.name)
                    return
            if self.fd is not None:
                os.close(self.fd)
        raise TempflowError(f"{path.parent}: cannot hold a slot in {PARTIALS} (another process keeps removing it)")

    def release(self) -> None:
        """Remove the slot (and what it still holds) and drop its lock; a second call does nothing."""
        if self.fd is None:
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        os.close(self.fd)
        self.fd = None
        with contextlib.suppress(OSError):
            self.folder.parent.rmdir()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot."""
    return _rename(a, b, flags=2)


def _rename(a: Path, b: Path, flags: int) -> bool:
    """Linux ``renameat2(a, b, flags)``: True when done, False where the system or file system lacks
    it; any other failure (``b`` exists under RENAME_NOREPLACE, ...) raises OSError."""
    libc = _libc()
    rename = getattr(libc, "renameat2", None) if libc is not None else None
    if rename is None:
        return False
    at_fdcwd = -100
    if rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    if err == errno.EEXIST:
        raise TempflowError(f"{b} appeared while the stage ran; remove it or pass --overwrite")
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done (main thread only, where Python runs handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in caught[:1]:
            handler = previous[sig]
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(sig)


def _commit(new: Path, path: Path, overwrite: bool, slot: _Slot) -> None:
    """Move ``new`` to ``path``; an existing ``path`` (with ``overwrite``) ends up inside the slot."""
    if path.exists() or path.is_symlink():
        if not overwrite:  # appeared while the stage ran
            raise TempflowError(f"{path} appeared while the stage ran; remove it or pass --overwrite")
        if path.is_dir() != new.is_dir():
            kind = "folder" if path.is_dir() else "file"
            raise TempflowError(f"{path} is a {kind}; --overwrite only replaces a {kind} with a {kind}")
        if new.is_dir() and not path.is_symlink():
            if _exchange(new, path):
                return
            os.replace(path, slot.folder / "old")  # a kill from here on is undone by clean_partials
            try:
                os.replace(new, path)
            except BaseException:
                os.replace(slot.folder / "old", path)
                raise
            return
    if not overwrite and _rename(new, path, flags=1):  # RENAME_NOREPLACE: never over one made meanwhile
        return
    os.replace(new, path)  # atomic for a file, and for a folder onto a free name


@contextlib.contextmanager
def atomic_output(path: Path | str, overwrite: bool = False, inputs: tuple[Path | str, ...] = (),
                  kind: str = "dir") -> Iterator[Path]:
    """Yield a temporary path to write the output ``path`` into (a folder to create, or a file, as
    ``kind`` says); move it into place on success.

    On any exception (Ctrl-C and SIGTERM included) the temporary is removed and ``path`` is
    untouched; after a kill, the next stage writing beside ``path`` removes it. With ``overwrite``
    the old output is replaced only once the new one is complete, and never lost mid-swap.
    """
    path = Path(path)
    check_out_free(path, overwrite, inputs, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    slot = None
    try:
        slot = _Slot(path)
        new = slot.folder / "new"
        yield new
        if not (new.is_dir() if kind == "dir" else new.is_file()):
            raise RuntimeError(f"the stage wrote no {kind} to {new}")
        with _signals_deferred():
            _commit(new, path, overwrite, slot)
            _COMMITTED.append(path)
    finally:
        if slot is not None:
            slot.release()  # the partial, or after the swap the old output; a kill here leaves it to the cleaner


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256_handle(f)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a float")
    return value


def loads_json(data: bytes | str) -> Any:
    """Strict JSON: UTF-8, and no ``NaN``/``Infinity`` or numbers that overflow to them (which
    Python's json accepts by default)."""
    return json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise TempflowError(f"{path}: no such file; expected {what}")
    try:
        return loads_json(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise TempflowError(f"{path}: not valid JSON ({err}); expected {what}") from None


def load_safetensors(path: Path) -> dict[str, Any]:
    """Every tensor of a safetensors file (CPU), or one line naming the file when it is unreadable."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise TempflowError(f"{path}: no such file")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError for any malformed file
        raise TempflowError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err


# --------------------------------------------------------------------------------------------
# Sample encoding

MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest image a rollout may carry; a PNG whose header claims more is refused before decoding."""


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
    """An RGB uint8 ``(H, W, 3)`` array; the size in the header is checked before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    damaged = f"{where}: image.png is not a readable PNG"
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise TempflowError(f"{where}: image.png claims {width}x{height} pixels, more than any policy "
                                    f"draws ({MAX_IMAGE_PIXELS} at most); the rollout is damaged")
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise TempflowError(f"{damaged} ({err}); the rollout is damaged") from None


def decode_npy(data: bytes, where: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A float32 array of ``shape`` with finite values, from ``.npy`` bytes; the header is read first,
    so an array that claims another shape (or terabytes) is refused before anything is allocated."""
    damaged = f"{where}: not a plain float32 .npy array"
    try:
        buf = io.BytesIO(data)
        version = np.lib.format.read_magic(buf)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"npy format version {version}")
        found, fortran, dtype = read_header[version](buf)  # the header only: no allocation, no pickle
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        raise TempflowError(f"{damaged} ({err}); the rollout is damaged") from None
    if dtype != np.dtype("<f4") or fortran:
        raise TempflowError(f"{damaged} (dtype {dtype}{', Fortran order' if fortran else ''}); the rollout is damaged")
    if shape is not None and tuple(found) != tuple(shape):
        raise TempflowError(f"{where}: shape {tuple(found)}, the rollout's states are {tuple(shape)}; the rollout is damaged")
    count = int(np.prod(found, dtype=np.int64))
    payload = memoryview(data)[buf.tell():]
    if len(payload) != 4 * count:
        raise TempflowError(f"{where}: holds {len(payload)} bytes for a {tuple(found)} float32 array; the rollout is damaged")
    array = np.frombuffer(payload, dtype="<f4").reshape(found)
    if not np.isfinite(array).all():
        raise TempflowError(f"{where}: holds NaN or infinite values; the rollout is damaged")
    return array


@dataclass
class Sample:
    """One rollout sample as read from a shard: raw field bytes plus decoding helpers."""

    key: str
    fields: dict[str, bytes]  # the fields that were asked for
    present: set[str]  # every field the sample has in the shard, read or not
    where: str  # "shard-000003.tar" for error messages
    shape: tuple[int, ...] | None = None  # the manifest's sample_shape: what state.npy and next.npy must be

    @property
    def meta(self) -> dict[str, Any]:
        try:
            meta = loads_json(self.fields["meta.json"])
        except (ValueError, UnicodeDecodeError) as err:
            raise TempflowError(f"{self.where} sample {self.key}: meta.json is not valid JSON ({err})") from None
        missing = [f for f in META_FIELDS if f not in meta] if isinstance(meta, dict) else list(META_FIELDS)
        if missing:
            raise TempflowError(f"{self.where} sample {self.key}: meta.json lacks {', '.join(missing)}; the rollout is damaged")
        return meta

    def array(self, name: str) -> np.ndarray:
        return decode_npy(self.fields[name], f"{self.where} sample {self.key} {name}", self.shape)

    def image(self) -> np.ndarray:
        return decode_png(self.fields["image.png"], f"{self.where} sample {self.key}")


def check_meta(key: str, meta: dict[str, Any], manifest: dict[str, Any]) -> None:
    """A sample's meta must describe a trainable transition of this manifest's schedule and prompts."""
    sigmas, prompts = manifest["sigmas"], manifest["prompts"]
    step, index, log_prob = meta["step"], meta["prompt_index"], meta["log_prob"]
    problem = None
    if not _is_int(step) or not 0 <= step <= len(sigmas) - 3:
        problem = f"step {step!r} is not a trainable step 0..{len(sigmas) - 3}"
    elif not _is_int(index) or not 0 <= index < len(prompts) or prompts[index] != meta["prompt"]:
        problem = f"prompt_index {index!r} does not name its prompt in the manifest"
    elif (meta["sigma"], meta["sigma_next"]) != (sigmas[step], sigmas[step + 1]):
        problem = f"sigmas {meta['sigma']}, {meta['sigma_next']} are not step {step}'s of the manifest"
    elif not _is_number(log_prob) or not math.isfinite(log_prob):
        problem = f"log_prob {log_prob!r} is not a finite number"
    elif not _is_int(meta["seed"]) or not _is_int(meta["branch"]) or not isinstance(meta["group"], str):
        problem = "seed and branch must be integers and group a string"
    elif step not in manifest["trained_steps"]:
        problem = f"step {step} is not among the manifest's trained steps {manifest['trained_steps']}"
    elif meta["algo"] != manifest["config"]["algo"]:
        problem = f"algo {meta['algo']!r} is not the manifest's {manifest['config']['algo']!r}"
    elif "image_key" in meta and not (isinstance(meta["image_key"], str) and _KEY.match(meta["image_key"])):
        problem = f"image_key {meta['image_key']!r} is not a sample key"
    if problem:
        raise TempflowError(f"sample {key}: {problem}; the rollout is damaged or mixed with another one")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# Rollout shards


class ShardWriter:
    """Writes samples into ``PREFIX-%06d.tar`` files of at most ``per_shard`` samples each, with
    fixed tar metadata (mtime 0, fixed owner) so equal samples give byte-identical shards."""

    def __init__(self, folder: Path, per_shard: int, prefix: str = "shard") -> None:
        import webdataset as wds

        self._wds = wds
        self.folder = folder
        self.per_shard = per_shard
        self.prefix = prefix
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
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
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

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        """On an error, closes the open shard's file (a partial, deleted with its output slot)."""
        if kind is not None and self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._file.close()
            self._writer = self._file = None


def read_step_spread(policy_dir: Path | str | None, num_steps: int) -> list[float | None] | None:
    """The within-group reward spread per step of ``0..T-2`` recorded with a policy by the update that
    made it (``metrics.json``'s ``step_reward_spread``; None for a step never measured). None when the
    folder has none (a base; an update of a rollout that did not branch) or records another T."""
    path = Path(policy_dir) / "metrics.json" if policy_dir else None
    if path is None or not path.is_file():
        return None
    metrics = read_json(path, "an update's metrics")
    if not isinstance(metrics, dict):
        raise TempflowError(f"{path}: is not a JSON object; the metrics are damaged: restore the policy folder")
    spread = metrics.get("step_reward_spread")
    if spread is None or (isinstance(spread, list) and len(spread) != num_steps - 1):
        return None
    if not (isinstance(spread, list) and all(s is None or (_is_number(s) and s >= 0) for s in spread)):
        raise TempflowError(f"{path}: step_reward_spread {_short(spread)} is not a list of spreads >= 0 (or null); "
                            "the metrics are damaged: restore the policy folder")
    return spread


TIMING_FILE = "timing.json"
"""A rollout's wall time, ``{"seconds": S}`` (sampling and writing), beside the manifest and not in it, so
that a rerun of the same config gives the same manifest bytes. Nothing checks or hashes it."""


def write_timing(folder: Path, seconds: float) -> None:
    write_json(Path(folder) / TIMING_FILE, {"seconds": seconds})


def read_rollout_seconds(folder: Path) -> float | None:
    """The seconds a rollout took; None when it has no readable record (older rollouts)."""
    path = Path(folder) / TIMING_FILE
    try:
        seconds = loads_json(path.read_bytes()).get("seconds")
    except (OSError, ValueError, AttributeError):
        return None
    return float(seconds) if _is_number(seconds) else None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_json(folder / MANIFEST, {"schema": ROLLOUT_SCHEMA, **manifest})


_SHARD_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.tar$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_STATE_ELEMENTS = 1 << 26
"""Largest state a rollout may declare (64M float32 values, 256 MiB per array)."""


def check_manifest(manifest: Any, where: Path) -> dict[str, Any]:
    """The manifest's fields, each of the type and range the stages rely on; one line naming the
    first that is not."""
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    if schema != ROLLOUT_SCHEMA:
        raise TempflowError(f"{where}: rollout schema {schema!r}, this tempflow reads {ROLLOUT_SCHEMA!r}; "
                            "re-run `tempflow rollout` with this version")

    def bad(field: str, expected: str) -> TempflowError:
        return TempflowError(f"{where}: {field} {_short(manifest.get(field))} is not {expected}; the manifest is damaged")

    for key in ("shards", "samples", "config", "policy", "nfe", "prompts", "sigmas", "sample_shape", "sampling",
                "embeddings", "dtype", "trained_steps", "step_inclusion", "step_spread", "decodes"):
        if key not in manifest:
            raise TempflowError(f"{where}: missing {key!r}; the manifest is damaged")
    if not _is_int(manifest["samples"]) or manifest["samples"] < 1:
        raise bad("samples", "a count of at least 1 (a rollout always holds samples)")
    for count in ("nfe", "decodes"):
        if not _is_int(manifest[count]) or manifest[count] < 0:
            raise bad(count, "a count")
    if not isinstance(manifest["policy"], dict) or not isinstance(manifest["policy"].get("identity"), str):
        raise bad("policy", "{identity, ...}")
    prompts = manifest["prompts"]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad("prompts", "a non-empty list of strings")
    shape = manifest["sample_shape"]
    if (not isinstance(shape, list) or not shape or not all(_is_int(n) and n > 0 for n in shape)
            or math.prod(shape) > MAX_STATE_ELEMENTS):
        raise bad("sample_shape", f"a list of positive sizes with at most {MAX_STATE_ELEMENTS} elements")
    config = _manifest_config(manifest["config"], where)
    sigmas = manifest["sigmas"]
    if (not isinstance(sigmas, list) or len(sigmas) != config.num_steps + 1 or not all(_is_number(s) for s in sigmas)
            or sigmas[0] != 1.0 or sigmas[-1] != 0.0 or any(a <= b for a, b in zip(sigmas, sigmas[1:]))):
        raise bad("sigmas", f"{config.num_steps + 1} numbers falling from 1 to 0")
    _check_shard_list(manifest["shards"], manifest["samples"], where)
    _check_sampling(manifest, where, bad)
    _check_steps(manifest, config, bad)
    return manifest


def _check_steps(manifest: dict[str, Any], config: Any, bad: Any) -> None:
    """``trained_steps``: distinct ascending steps of ``0..T-2``; ``step_inclusion``: for a tempflow
    rollout that drew its steps (``sampled:N``, ``weighted:N``, ``spread:N``) one chance in ``(0, 1]``
    per step of ``0..T-2``, summing to the number of trained steps, every certain step among them; else
    null. ``step_spread``: the weights a ``spread:N`` draw used, one per step, from which its chances
    follow; null otherwise, and when no spread was measured yet or every measured one was 0 (the
    chances are then the noise-aware ones)."""
    steps, pi, num_steps = manifest["trained_steps"], manifest["step_inclusion"], config.num_steps
    if not (isinstance(steps, list) and steps and all(_is_int(k) for k in steps)
            and steps == sorted(set(steps)) and 0 <= steps[0] and steps[-1] <= num_steps - 2):
        raise bad("trained_steps", f"distinct ascending steps within 0..{num_steps - 2}")
    _check_spread(manifest, config, bad)
    if not config.draws_steps:
        if pi is not None:
            raise bad("step_inclusion", f"null (--branch-steps {config.branch_steps} draws nothing)")
        return
    if not (isinstance(pi, list) and len(pi) == num_steps - 1 and all(_is_number(p) and 0 < p <= 1 for p in pi)
            and abs(sum(pi) - len(steps)) < 1e-6 and all(k in steps for k, p in enumerate(pi) if p == 1)):
        raise bad("step_inclusion", f"{num_steps - 1} chances in (0, 1] summing to the {len(steps)} trained steps, "
                                    "each certain step among them")
    if manifest["step_spread"] is not None:
        from stages.flow import inclusion_probabilities

        made = inclusion_probabilities(manifest["step_spread"], len(steps))
        if any(abs(a - b) > 1e-9 for a, b in zip(made, pi)):
            raise bad("step_inclusion", "the chances its step_spread weights give")


def _check_spread(manifest: dict[str, Any], config: Any, bad: Any) -> None:
    """``step_spread``: null, or under ``spread:N`` one drawing weight > 0 per step of ``0..T-2``."""
    spread, n = manifest["step_spread"], config.num_steps - 1
    if spread is not None and not (config.draws_by_spread and isinstance(spread, list) and len(spread) == n
                                   and all(_is_number(s) and s > 0 for s in spread)):
        raise bad("step_spread", f"null or, under spread:N, {n} drawing weights > 0")


def _check_sampling(manifest: dict[str, Any], where: Path, bad: Any) -> None:
    """The settings the update must sample with again: resolution, guidance, negative prompt, dtype,
    and the embeddings file's hash."""
    from stages.policies.base import DTYPES

    sampling = manifest["sampling"]
    if not (isinstance(sampling, dict) and set(sampling) == {"resolution", "guidance_scale", "negative_prompt"}
            and _is_int(sampling["resolution"]) and sampling["resolution"] > 0
            and (sampling["guidance_scale"] is None or _is_number(sampling["guidance_scale"]))
            and (sampling["negative_prompt"] is None or isinstance(sampling["negative_prompt"], str))):
        raise bad("sampling", "{resolution, guidance_scale, negative_prompt}")
    if manifest["dtype"] not in DTYPES:
        raise bad("dtype", f"one of {', '.join(DTYPES)}")
    embeddings = manifest["embeddings"]
    if not (isinstance(embeddings, dict) and embeddings.get("file") == EMBEDDINGS
            and isinstance(embeddings.get("sha256"), str) and _SHA256.match(embeddings["sha256"])):
        raise bad("embeddings", f"{{file: {EMBEDDINGS}, sha256}}")


def write_embeddings(folder: Path, cond: dict[str, Any], negative: dict[str, Any] | None) -> dict[str, str]:
    """Store the rollout's conditioning once (float32 safetensors); returns the manifest's entry."""
    from safetensors.torch import save_file

    tensors = {f"prompt.{name}": t.float().contiguous() for name, t in cond.items()}
    tensors.update({f"negative.{name}": t.float().contiguous() for name, t in (negative or {}).items()})
    save_file(tensors, folder / EMBEDDINGS)
    return {"file": EMBEDDINGS, "sha256": sha256_file(folder / EMBEDDINGS)}


def _manifest_config(config: Any, where: Path):
    """The rollout's config, validated the way `tempflow rollout` validates its options."""
    from stages.rollout import RolloutConfig  # the config's one definition

    if not isinstance(config, dict):
        raise TempflowError(f"{where}: config is not an object; the manifest is damaged")
    missing = [f.name for f in dataclasses.fields(RolloutConfig) if f.name not in config]
    if missing:
        raise TempflowError(f"{where}: config lacks {', '.join(missing)}; the manifest is damaged")
    try:
        return RolloutConfig(**config)
    except TypeError as err:
        raise TempflowError(f"{where}: config does not fit this tempflow's rollout options ({err}); "
                            "the manifest is damaged") from None
    except TempflowError as err:
        raise TempflowError(f"{where}: config is invalid ({err}); the manifest is damaged") from None


def _check_shard_list(shards: Any, samples: int, where: Path) -> None:
    if not isinstance(shards, list):
        raise TempflowError(f"{where}: shards is not a list; the manifest is damaged")
    names = set()
    for shard in shards:
        ok = (isinstance(shard, dict) and isinstance(shard.get("name"), str) and _SHARD_NAME.match(shard["name"])
              and isinstance(shard.get("sha256"), str) and _SHA256.match(shard["sha256"])
              and _is_int(shard.get("samples")) and shard["samples"] >= 0 and shard["name"] not in names)
        if not ok:
            raise TempflowError(f"{where}: shard entry {_short(shard)} is not a distinct {{name, sha256, samples}}; "
                                "the manifest is damaged")
        names.add(shard["name"])
    if sum(s["samples"] for s in shards) != samples:
        raise TempflowError(f"{where}: the shards hold {sum(s['samples'] for s in shards)} samples, "
                            f"the manifest says {samples}; the manifest is damaged")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class Rollout:
    """A rollout opened for reading: the manifest as read (and its hash), every shard opened once
    and checked against its sha256. Every later read goes through the same open files and is hashed
    again, so a stage reads exactly the bytes it verified, even while ``rollout --overwrite``
    replaces the folder, or stops when a shard changed in place. Use as a context manager."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise TempflowError(f"{self.folder}: no such rollout folder; create one with `tempflow rollout --out {self.folder}`")
        path = self.folder / MANIFEST
        if not path.is_file():
            raise TempflowError(f"{path}: no such file; expected a rollout manifest written by `tempflow rollout`")
        raw = path.read_bytes()
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        try:
            manifest = loads_json(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise TempflowError(f"{path}: not valid JSON ({err}); expected a rollout manifest") from None
        self.manifest = check_manifest(manifest, path)
        self.shape = tuple(self.manifest["sample_shape"])
        self._files: list[Any] = []
        try:
            self._open_shards()
        except BaseException:
            self.close()
            raise

    def _open_shards(self) -> None:
        _allow_open_files(len(self.manifest["shards"]) + 64)
        for shard in self.manifest["shards"]:
            path = self.folder / shard["name"]
            if not path.is_file():
                raise TempflowError(f"{path}: listed in the manifest but missing; the rollout is incomplete")
            handle = open(path, "rb")
            self._files.append(handle)
            if _sha256_handle(handle) != shard["sha256"]:
                raise TempflowError(f"{path}: sha256 does not match the manifest (truncated, modified, or the rollout "
                                    "was being replaced); re-run `tempflow rollout` or wait until it is done")

    def samples(self, fields: Iterable[str] | None = None) -> Iterator[Sample]:
        """Every sample, shard by shard, in the order written; memory holds one sample at a time.
        Each is checked to carry the required fields; ``fields`` are read, the others skipped."""
        wanted = tuple(SAMPLE_FIELDS if fields is None else fields)
        seen: set[str] = set()
        for shard, handle in zip(self.manifest["shards"], self._files):
            handle.seek(0)
            reader = _HashingReader(handle)
            for sample in _iter_tar(reader, shard["name"], wanted, self.shape):
                missing = [f for f in REQUIRED_FIELDS if f not in sample.present]
                if missing:
                    raise TempflowError(f"{sample.where}: sample {sample.key} lacks {', '.join(missing)}; the rollout is damaged")
                if sample.key in seen:
                    raise TempflowError(f"{sample.where}: sample {sample.key} also appears in an earlier shard; the rollout is damaged")
                seen.add(sample.key)
                yield sample
            if reader.finish() != shard["sha256"]:
                raise TempflowError(f"{self.folder / shard['name']}: changed while it was being read; "
                                    "nothing was written, run the stage again once the rollout is complete")
        if len(seen) != self.manifest["samples"]:
            raise TempflowError(f"{self.folder}: manifest lists {self.manifest['samples']} samples, shards hold {len(seen)}")

    def embeddings(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The stored conditioning: one row per prompt, and the negative prompt's (or None), read
        from bytes checked against the manifest's sha256, each tensor checked in shape and finite."""
        from safetensors.torch import load as load_bytes

        path = self.folder / EMBEDDINGS
        if not path.is_file():
            raise TempflowError(f"{path}: listed in the manifest but missing; the rollout is incomplete")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["embeddings"]["sha256"]:
            raise TempflowError(f"{path}: sha256 does not match the manifest; the rollout is damaged")
        tensors = load_bytes(data)
        cond = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("prompt.")}
        negative = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("negative.")}
        rows = len(self.manifest["prompts"])
        for name, t in tensors.items():
            expected = 1 if name.startswith("negative.") else rows
            if (not name.startswith(("prompt.", "negative.")) or not t.is_floating_point() or t.ndim < 1
                    or t.shape[0] != expected or not bool(t.isfinite().all())):
                raise TempflowError(f"{path}: tensor {name} is not {expected} finite float rows; the rollout is damaged")
        if not cond:
            raise TempflowError(f"{path}: no prompt embeddings; the rollout is damaged")
        return cond, negative or None

    def close(self) -> None:
        for handle in self._files:
            handle.close()
        self._files = []

    def __enter__(self) -> Rollout:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _allow_open_files(count: int) -> None:
    """Raise the soft limit on open files toward the hard one when a rollout has many shards."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _sha256_handle(handle: Any) -> str:
    digest = hashlib.sha256()
    handle.seek(0)
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


class _HashingReader(io.RawIOBase):
    """A read-only stream over ``handle`` that hashes every byte read through it."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.digest = handle, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.handle.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        return n

    def finish(self) -> str:
        """Hash the rest of the file (tar padding) and return the hex digest of all of it."""
        for block in iter(lambda: self.handle.read(1 << 20), b""):
            self.digest.update(block)
        return self.digest.hexdigest()


def _iter_tar(stream: Any, name: str, wanted: tuple[str, ...], shape: tuple[int, ...]) -> Iterator[Sample]:
    """Samples of one shard read front to back, grouping consecutive members by key (webdataset's
    rule: the key is the member name up to its first dot)."""
    current: Sample | None = None
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    raise TempflowError(f"{name}: member {member.name!r} is not a regular file; refused")
                key, dot, field = member.name.partition(".")
                if not dot or field not in SAMPLE_FIELDS or not _KEY.match(key):
                    raise TempflowError(
                        f"{name}: member {member.name!r} is not a tempflow sample field "
                        f"({', '.join(SAMPLE_FIELDS)}); refused, tempflow never unpickles or runs artifact content"
                    )
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    if key in seen:
                        raise TempflowError(f"{name}: sample {key!r} appears twice; the shard is damaged")
                    seen.add(key)
                    current = Sample(key=key, fields={}, present=set(), where=name, shape=shape)
                if field in current.present:
                    raise TempflowError(f"{name}: sample {key!r} has {field} twice; the shard is damaged")
                current.present.add(field)
                if member.size > _max_member_size(field, shape):
                    raise TempflowError(f"{name}: {member.name} is {member.size} bytes, more than a {field} of this "
                                        f"rollout can be ({_max_member_size(field, shape)}); the rollout is damaged")
                if field in wanted:
                    handle = tar.extractfile(member)
                    current.fields[field] = handle.read() if handle else b""
    except (tarfile.TarError, EOFError, OSError) as err:
        raise TempflowError(f"{name}: unreadable tar ({err}); the rollout is damaged, re-run `tempflow rollout`") from None
    if current is not None:
        yield current


def _max_member_size(field: str, shape: tuple[int, ...]) -> int:
    """Bytes a sample field may take, checked before it is read: an array of the rollout's shape
    plus its header, a PNG no larger than :data:`MAX_IMAGE_PIXELS` could need, a small meta.json."""
    if field.endswith(".npy"):
        return 4 * math.prod(shape) + 4096
    if field == "image.png":
        return 4 * MAX_IMAGE_PIXELS + (1 << 20)
    return 1 << 20


# --------------------------------------------------------------------------------------------
# Scores


MAX_REWARD_WEIGHT = 1e6
"""Largest |weight| of a reward component (`--reward NAME:WEIGHT`)."""
REWARD_LIMIT = 1e12
"""Largest |reward| a scores file may hold: group statistics of larger values lose all precision
(and overflow past 1e154); rescale such a reward."""


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


def check_rewards(values: np.ndarray, keys: Any, what: str) -> None:
    """Rewards must be finite and within :data:`REWARD_LIMIT`; one line naming the first bad key."""
    bad = ~np.isfinite(values) | (np.abs(np.nan_to_num(values)) > REWARD_LIMIT)
    if bad.any():
        first = int(np.argmax(bad))
        raise TempflowError(f"{what}: {int(bad.sum())} rewards are NaN or infinite, or beyond ±{REWARD_LIMIT:g} "
                            f"(first {float(values[first])} at key {keys[first]}); fix or rescale the reward")


def read_scores(path: Path | str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Columns and tempflow metadata of a scores file, after checking schema, types and values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise TempflowError(f"{path}: no such scores file; create it with `tempflow score --out {path}`")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise TempflowError(f"{path}: not a readable parquet file ({err})") from None
    meta = _scores_meta(table, path)
    types = {field.name: field.type for field in table.schema}
    if "key" not in types or "reward" not in types:
        raise TempflowError(f"{path}: needs 'key' and 'reward' columns, found {table.column_names}")
    if not (pa.types.is_string(types["key"]) or pa.types.is_large_string(types["key"])):
        raise TempflowError(f"{path}: column 'key' is {types['key']}, not strings; re-run `tempflow score`")
    columns: dict[str, np.ndarray] = {"key": table.column("key").to_numpy(zero_copy_only=False)}
    if any(k is None for k in columns["key"]):
        raise TempflowError(f"{path}: column 'key' has empty (null) keys; re-run `tempflow score`")
    for name in table.column_names:
        if name == "key":
            continue
        if not (pa.types.is_floating(types[name]) or pa.types.is_integer(types[name])) or table.column(name).null_count:
            raise TempflowError(f"{path}: column {name!r} is {types[name]}, not numbers without nulls; "
                                "re-run `tempflow score`")
        columns[name] = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        check_rewards(columns[name], columns["key"], f"{path} column {name!r}")
    _check_weighted_sum(columns, meta, path)
    return columns, meta


def reward_column(name: str) -> str:
    """The scores column suffix of reward ``name`` (``reward_<suffix>``): ``module:function`` becomes
    ``module.function``."""
    return name.replace(":", ".")


def _check_weighted_sum(columns: dict[str, np.ndarray], meta: dict[str, Any], path: Path) -> None:
    """``reward`` must be the weighted sum of the components the metadata names: an edited column
    would otherwise train on a reward nobody asked for."""
    rewards = meta.get("rewards")
    if not isinstance(rewards, list) or not rewards or not all(
            isinstance(r, dict) and isinstance(r.get("name"), str) and _is_number(r.get("weight"))
            and abs(r["weight"]) <= MAX_REWARD_WEIGHT for r in rewards):
        raise TempflowError(f"{path}: scores metadata lists no rewards with weights; re-run `tempflow score`")
    total = np.zeros_like(columns["reward"])
    for reward in rewards:
        column = "reward_" + reward_column(reward["name"])
        if column not in columns:
            raise TempflowError(f"{path}: the metadata names reward {reward['name']} but there is no {column} column")
        total += reward["weight"] * columns[column]
    off = ~(np.abs(total - columns["reward"]) <= 1e-9 * np.maximum(1.0, np.abs(total)))  # NaN counts as off
    if off.any():
        raise TempflowError(f"{path}: 'reward' is not the weighted sum of its components (first at key "
                            f"{columns['key'][int(np.argmax(off))]}); re-run `tempflow score`")


def _scores_meta(table: Any, path: Path) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(b"tempflow")
    try:
        meta = loads_json(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("schema") != SCORES_SCHEMA:
        found = meta.get("schema") if isinstance(meta, dict) else "unreadable metadata"
        raise TempflowError(f"{path}: scores schema {found!r}, this tempflow reads {SCORES_SCHEMA!r}")
    if not isinstance(meta.get("rollout_manifest_sha256"), str):
        raise TempflowError(f"{path}: scores metadata names no rollout (rollout_manifest_sha256); re-run `tempflow score`")
    return meta


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


# --------------------------------------------------------------------------------------------
# The recommender's artifacts: prepared sessions (parquet) and model folders


SESSIONS_SCHEMA = "tempflow.recsys.sessions/1"
REC_MODEL_SCHEMA = "tempflow.recsys.model/1"
SESSION_COLUMNS = {"session": "int64", "position": "int32", "item": "int32", "purchase": "bool",
                   "reward": "float", "time": "double", "split": "int8"}


def write_sessions(path: Path, sessions: Any, meta: dict[str, Any]) -> None:
    """One row per event (:class:`stages.recsys.data.Sessions`); metadata: schema, the item ids in
    index order, the preparation's config and counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: getattr(sessions, name) for name in SESSION_COLUMNS})
    info = {"schema": SESSIONS_SCHEMA, "item_ids": sessions.item_ids, "info": sessions.info, **meta}
    pq.write_table(table.replace_schema_metadata({"tempflow": json.dumps(info, sort_keys=True)}), path)


def read_sessions(path: Path | str) -> Any:
    """Prepared sessions, checked: schema, column types, sorted sessions with positions 0..L-1,
    items within 1..n_items, finite rewards, known split codes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.recsys.data import SPLIT_CODES, Sessions

    path = Path(path)
    if not path.is_file():
        raise TempflowError(f"{path}: no such sessions file; create it with `tempflow rec prepare --out {path}`")
    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {})[b"tempflow"])
    except (pa.ArrowException, OSError, ValueError, KeyError) as err:
        raise TempflowError(f"{path}: not a sessions file of `tempflow rec prepare` ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or meta.get("schema") != SESSIONS_SCHEMA:
        raise TempflowError(f"{path}: schema {meta.get('schema') if isinstance(meta, dict) else None!r}, expected "
                            f"{SESSIONS_SCHEMA}; prepare it again")
    types = {f.name: str(f.type) for f in table.schema}
    if types != SESSION_COLUMNS:
        raise TempflowError(f"{path}: columns {types} are not {SESSION_COLUMNS}; prepare it again")
    if any(table.column(name).null_count for name in SESSION_COLUMNS):
        raise TempflowError(f"{path}: a column holds nulls; prepare it again")
    item_ids, info = meta.get("item_ids"), meta.get("info")
    if not isinstance(item_ids, list) or not all(isinstance(i, str) for i in item_ids) or not isinstance(info, dict):
        raise TempflowError(f"{path}: its metadata lacks the item ids (a list of strings) or the counts; prepare it again")
    columns = {name: table.column(name).to_numpy() for name in SESSION_COLUMNS}
    sessions = Sessions(**columns, item_ids=item_ids, info=info)
    _check_sessions(sessions, path, set(SPLIT_CODES.values()))
    return sessions


def _check_sessions(s: Any, path: Path, codes: set[int]) -> None:
    if len(s.item) == 0:
        raise TempflowError(f"{path}: holds no events")
    new = np.r_[True, s.session[1:] != s.session[:-1]]
    if np.any(np.diff(s.session) < 0) or np.any(s.position != _positions(new)):
        raise TempflowError(f"{path}: rows are not sorted by session with positions 0, 1, ...; prepare it again")
    if s.item.min() < 1 or s.item.max() > len(s.item_ids):
        raise TempflowError(f"{path}: item indices outside 1..{len(s.item_ids)} (the metadata's item_ids)")
    if not np.isfinite(s.reward).all() or not np.isin(s.split, list(codes)).all():
        raise TempflowError(f"{path}: non-finite rewards or unknown split codes; prepare it again")


def _positions(new_session: np.ndarray) -> np.ndarray:
    """0, 1, ... within each run that ``new_session`` starts."""
    index = np.arange(len(new_session))
    return index - np.maximum.accumulate(np.where(new_session, index, 0))
