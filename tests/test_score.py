"""The score stage (stages.score): the weighted total and one column per reward, two processes under
torchrun that give the one-process table, and a Ctrl-C that leaves nothing behind."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import _manifest, _partials, _rollout, _score_cli, _torchrun, invoke, make_rollout


@pytest.mark.parametrize("target", ["score_batch", "write_scores"])
def test_interrupted_score_leaves_nothing_and_rerun_succeeds(policy_dir, tmp_path, monkeypatch, target):
    """Ctrl-C in a reward call or while the parquet is being written: no output, no partial; a rerun succeeds."""
    import stages.score

    rollout = _rollout(policy_dir, tmp_path / "r")
    out = tmp_path / "s.parquet"
    real = getattr(stages.score, target)
    seen = []

    def interrupted(*args, **kwargs):
        seen.append(1)
        if target == "write_scores":
            real(*args, **kwargs)  # the temporary file is complete on disk, then Ctrl-C
            assert _partials(out), "write_scores did not write into a partial sibling"
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(stages.score, target, interrupted)
        result = _score_cli(rollout, out)
    assert seen
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr
    assert not out.exists() and _partials(out) == []

    result = _score_cli(rollout, out)
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == _manifest(rollout)["samples"]


def test_two_process_score_gives_the_one_process_scores(policy_dir, tmp_path):
    """Each rank scores every other image; rank 0 writes the one parquet: the same table."""
    import pyarrow.parquet as pq

    from tests.conftest import make_rollout

    rollout = make_rollout(policy_dir, tmp_path / "r", num_steps=4, branches=3)
    options = ["--rollout", str(rollout), "--reward", "jpeg_compressibility", "--reward", "shapes:0.5", "--batch-size", "4"]
    one = invoke("score", *options, "--out", tmp_path / "one.parquet")
    assert one.exit_code == 0, one.output
    two = _torchrun("score", *options, "--out", str(tmp_path / "two.parquet"), cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    assert pq.read_table(tmp_path / "one.parquet").equals(pq.read_table(tmp_path / "two.parquet"))


def test_user_reward_module_and_weighted_sum(policy_dir, tmp_path, monkeypatch):
    """module:function rewards are imported; the total is the weighted sum; each component has a column."""
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import numpy as np
        def brightness(images, prompts):
            return images.reshape(len(images), -1).mean(axis=1) / 255.0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    rollout = make_rollout(policy_dir, tmp_path / "r")
    out = tmp_path / "s.parquet"
    r = invoke("score", "--rollout", rollout, "--reward", "my_rewards:brightness:0.5",
               "--reward", "jpeg_compressibility:2", "--out", out)
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    cols = {name: table.column(name).to_numpy() for name in table.column_names}
    assert set(cols) == {"key", "reward", "reward_my_rewards.brightness", "reward_jpeg_compressibility"}
    np.testing.assert_allclose(cols["reward"], 0.5 * cols["reward_my_rewards.brightness"]
                               + 2 * cols["reward_jpeg_compressibility"])
    assert np.all(cols["reward_jpeg_compressibility"] < 0)
    meta = json.loads(table.schema.metadata[b"tempflow"])
    assert meta["rewards"] == [{"name": "my_rewards:brightness", "weight": 0.5},
                               {"name": "jpeg_compressibility", "weight": 2.0}]
