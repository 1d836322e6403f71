"""Webdataset shards: tar files of samples, each sample a run of members ``KEY.FIELD`` (the key is
the member name up to its first dot). Written with fixed tar metadata, so equal samples give
byte-identical shards; read as a stream through a hashing reader, so a reader checks the sha256 of
exactly the bytes it used.

Which fields a sample has and what they hold is the rollout schema's (:mod:`stages.artifacts.rollout`);
this module only refuses what is not a plain member of a known field.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import resource
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.artifacts.codecs import sha256_file
from stages.support.errors import TempflowError

# webdataset is imported when a shard is written, for start-up time.

KEY = re.compile(r"^[A-Za-z0-9_-]+$")
"""A sample key: letters, digits, ``_`` and ``-`` (no dot, which would end the key)."""


class ShardWriter:
    """Writes samples into ``PREFIX-%06d.tar`` files of at most ``per_shard`` samples each, with
    fixed tar metadata (mtime 0, fixed owner) so equal samples give byte-identical shards."""

    def __init__(self, folder: Path, per_shard: int, fields: tuple[str, ...], prefix: str = "shard") -> None:
        import webdataset as wds

        self._wds = wds
        self.folder, self.per_shard, self.fields, self.prefix = folder, per_shard, fields, prefix
        self.shards: list[dict[str, Any]] = []
        self.count = 0
        self._writer = None
        self._file = None
        self._in_shard = 0
        self._keys: set[str] = set()

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if not KEY.match(key):
            raise ValueError(f"sample key {key!r} must be letters, digits, '_' or '-' (no dots)")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        unknown = set(fields) - set(self.fields)
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
        """Close the last shard; every shard's ``{name, samples, sha256}``."""
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


@dataclass
class ShardSample:
    """One sample as read from a shard: the bytes of the fields asked for, the first bytes of the
    others (enough for their headers), and every field's size."""

    key: str
    where: str  # "shard-000003.tar", for messages
    fields: dict[str, bytes] = field(default_factory=dict)
    heads: dict[str, bytes] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def present(self) -> set[str]:
        """Every field the sample has in the shard, read or not."""
        return set(self.sizes)


class HashingReader(io.RawIOBase):
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


def iter_shard(stream: Any, name: str, known: tuple[str, ...], wanted: tuple[str, ...],
               head_bytes: dict[str, int], max_size: Callable[[str], int]) -> Iterator[ShardSample]:
    """The samples of one shard, front to back, consecutive members grouped by key. A member that is
    not a regular file, not ``KEY.FIELD`` of a ``known`` field, larger than ``max_size(field)`` or
    repeated is refused; ``wanted`` fields are read whole, the others' first ``head_bytes[field]``
    bytes (default 0)."""
    current: ShardSample | None = None
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                key, fld = _member_name(member, name, known)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    if key in seen:
                        raise TempflowError(f"{name}: sample {key!r} appears twice; the shard is damaged")
                    seen.add(key)
                    current = ShardSample(key=key, where=name)
                if fld in current.sizes:
                    raise TempflowError(f"{name}: sample {key!r} has {fld} twice; the shard is damaged")
                if member.size > max_size(fld):
                    raise TempflowError(f"{name}: {member.name} is {member.size} bytes, more than a {fld} of this "
                                        f"rollout can be ({max_size(fld)}); the rollout is damaged")
                current.sizes[fld] = member.size
                handle = tar.extractfile(member)
                if fld in wanted:
                    current.fields[fld] = handle.read() if handle else b""
                elif head_bytes.get(fld):
                    current.heads[fld] = handle.read(head_bytes[fld]) if handle else b""
    except (tarfile.TarError, EOFError, OSError) as err:
        raise TempflowError(f"{name}: unreadable tar ({err}); the rollout is damaged, re-run `tempflow rollout`") from None
    if current is not None:
        yield current


def _member_name(member: tarfile.TarInfo, name: str, known: tuple[str, ...]) -> tuple[str, str]:
    """``(key, field)`` of a member that is a plain file of a known field; anything else is refused."""
    if not member.isfile():
        raise TempflowError(f"{name}: member {member.name!r} is not a regular file; refused")
    key, dot, fld = member.name.partition(".")
    if not dot or fld not in known or not KEY.match(key):
        raise TempflowError(
            f"{name}: member {member.name!r} is not a tempflow sample field "
            f"({', '.join(known)}); refused, tempflow never unpickles or runs artifact content"
        )
    return key, fld


def allow_open_files(count: int) -> None:
    """Raise the soft limit on open files toward the hard one when a rollout has many shards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        wanted = count if hard == resource.RLIM_INFINITY else min(count, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
