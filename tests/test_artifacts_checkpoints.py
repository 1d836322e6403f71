"""Resumable checkpoint folders (stages.artifacts.checkpoints): a --checkpoint that is the working
folder, an existing folder, a parent of --out or --out itself is refused before any work, and
nothing there is deleted."""

from __future__ import annotations

import pytest

from tests.conftest import _one_error, _snapshot, invoke

PRETRAIN_FAST = ("--steps", 2, "--autoencoder-steps", 2, "--batch-size", 2, "--autoencoder-batch-size", 2,
                 "--checkpoint-every", 0)


@pytest.mark.parametrize("where", [".", "existing", "parent", "out"])
def test_pretrain_checkpoint_never_deletes_what_it_did_not_write(tmp_path, monkeypatch, where):
    """`--checkpoint .`, an existing folder, the parent of --out, --out itself: refused before any
    work, and every file there is kept (issue 13 item 1 emptied the working folder)."""
    sandbox = tmp_path / "sb"
    sandbox.mkdir()
    (sandbox / "keep.txt").write_text("a")
    (sandbox / "existing").mkdir()
    (sandbox / "existing" / "notes.md").write_text("mine")
    monkeypatch.chdir(sandbox)
    checkpoint = {".": ".", "existing": "existing", "parent": "runs", "out": "runs/base"}[where]
    before = _snapshot(sandbox)
    result = invoke("pretrain", "--world", "shapes", *PRETRAIN_FAST, "--out", "runs/base", "--checkpoint", checkpoint)
    _one_error(result, checkpoint if where != "." else "working folder")
    assert _snapshot(sandbox) == before
    assert not (sandbox / "runs").exists()
