"""The I/O layer every stage writes through: locked output slots, atomic commits and swaps.

A stage writes its output into a *slot*: ``PARENT/.tempflow-partial/<pid>-<random>/new``, where
PARENT is the output's parent folder. The process holds an flock on its slot folder for as long
as it lives, so a slot that nobody holds is a leftover of a killed run, whatever its name or PID,
and is removed by the next stage that writes into PARENT (several processes, e.g. the ranks of a
distributed run, share the scheme: each holds its own slot). The slot is moved into place in one
rename; with --overwrite a folder is swapped in with one ``renameat2(RENAME_EXCHANGE)`` on Linux,
elsewhere the old output is first moved into the slot (``old``) and a killed swap is undone by the
cleaner, so that at every instant the old or the new output is whole.

What an output holds is the business of :mod:`stages.artifacts`; this module only moves it into place.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import fcntl
import functools
import os
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from stages.support.distributed import Ranks, broadcast
from stages.support.errors import TempflowError

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
            self.folder = path.parent / PARTIALS / f"{os.getpid()}-{os.urandom(4).hex()}"
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


@contextlib.contextmanager
def shared_output(path: Path, here: Ranks, overwrite: bool, inputs: tuple[Path | str, ...]) -> Iterator[Path]:
    """An output folder every rank writes into: :func:`atomic_output` on rank 0, whose temporary
    folder (created here) the other ranks are told. The caller gathers from every rank before
    leaving the block, so rank 0 commits only what all have finished."""
    if not here.main:
        yield Path(broadcast(None, here))
        return
    with atomic_output(path, overwrite=overwrite, inputs=inputs) as tmp:
        tmp.mkdir()
        broadcast(str(tmp), here)
        yield tmp
