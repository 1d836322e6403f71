"""Operating-system errors in one line (stages.support.errors): a full disk, a read-only file system
or no permission while writing names the file and the fix, and leaves no output."""

from __future__ import annotations

import os

import pytest

from stages.support.outputs import PARTIALS
from tests.conftest import _one_error, invoke, make_rollout


@pytest.mark.parametrize("errno_, needle", [(28, "disk is full"), (30, "read-only"), (13, "no permission")])
def test_an_os_error_while_writing_is_one_line_naming_the_file(policy_dir, tmp_path, monkeypatch, errno_, needle):
    """Disk full, a read-only file system, no permission (simulated: tests run as root): one line
    naming the file and the fix, no output, no slot."""
    import stages.score

    rollout = make_rollout(policy_dir, tmp_path / "r")

    def failing_write(path, *args):
        raise OSError(errno_, os.strerror(errno_), str(path))

    monkeypatch.setattr(stages.score, "write_scores", failing_write)
    out = tmp_path / "s.parquet"
    line = _one_error(invoke("score", "--rollout", rollout, "--reward", "jpeg_compressibility", "--out", out), needle)
    assert PARTIALS in line or "s.parquet" in line
    assert not out.exists() and not (tmp_path / PARTIALS).exists()
