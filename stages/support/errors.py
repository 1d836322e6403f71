"""The one exception type for mistakes a user can make: bad input, bad artifacts, bad config; and
the one place that says in a line what an operating-system error means for the user.

The CLI turns both into one line on stderr and a non-zero exit; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno


class TempflowError(Exception):
    """A user-facing error. The message names the file or value, what was expected, and the fix."""


_FIXES = {
    errno.ENOSPC: "the disk is full; free space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free space or write elsewhere",
    errno.EACCES: "no permission; fix the permissions or choose another path",
    errno.EPERM: "not permitted; fix the permissions or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder where a file was expected; check the path",
    errno.EEXIST: "it already exists; remove it or choose another path",
    errno.ENOTEMPTY: "the folder is not empty; remove it or choose another path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) or use fewer, larger shards",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.EIO: "the disk reported an input/output error; check the device",
}


def os_error_line(err: OSError) -> str:
    """``path: what happened; the fix`` for an error raised by the operating system."""
    where = err.filename if err.filename is not None else "a file"
    if err.filename2 is not None:
        where = f"{err.filename} -> {err.filename2}"
    what = err.strerror or type(err).__name__
    fix = _FIXES.get(err.errno or -1, "check the path and the disk")
    return f"{where}: {what} ({fix})"
