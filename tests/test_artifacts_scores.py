"""The scores file (stages.artifacts.scores): keys that do not match the rollout, rewards that are
not finite and a schema of another version are refused; an unchanged rewrite still reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import _assert_refused, _scored, _update_cli


def _rewrite_parquet(src: Path, dst: Path, edit) -> None:
    """Rewrite a scores file through ``edit(table) -> table``, keeping its file metadata."""
    table = pq.read_table(src)
    metadata = table.schema.metadata
    pq.write_table(edit(table).replace_schema_metadata(metadata), dst)


@pytest.mark.parametrize("edit, what", [
    (lambda t: t.slice(1), "a dropped row"),
    (lambda t: t.set_column(0, "key", pa.array(["p99999_s000_k000_b00"] + t.column("key").to_pylist()[1:])),
     "a renamed key"),
    (lambda t: pa.concat_tables([t, t.slice(0, 1)]), "a duplicated row"),
])
def test_scores_keys_not_matching_the_rollout_are_refused(policy_dir, tmp_path, edit, what):
    """A scores file rewritten with the same metadata but different keys: update refuses, never joins."""
    rollout, scores = _scored(policy_dir, tmp_path)
    edited = tmp_path / "edited.parquet"
    _rewrite_parquet(scores, edited, edit)
    out = tmp_path / "new"
    line = _assert_refused(_update_cli(policy_dir, rollout, edited, out), out)
    assert "does not match" in line or "duplicate" in line, (what, line)


def test_unedited_rewrite_of_scores_is_accepted(policy_dir, tmp_path):
    """Control for the edits above: a scores file rewritten unchanged, metadata kept, still updates."""
    rollout, scores = _scored(policy_dir, tmp_path)
    copy = tmp_path / "copy.parquet"
    _rewrite_parquet(scores, copy, lambda t: t)
    result = _update_cli(policy_dir, rollout, copy, tmp_path / "new")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "metrics.json").is_file()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_reward_in_parquet_is_refused(policy_dir, tmp_path, bad):
    """A scores file whose reward column holds inf or NaN (metadata kept): update refuses."""
    rollout, scores = _scored(policy_dir, tmp_path)
    edited = tmp_path / "edited.parquet"

    def poison(table):
        rewards = table.column("reward").to_numpy().copy()
        rewards[3] = bad
        return table.set_column(table.column_names.index("reward"), "reward", pa.array(rewards, type=pa.float64()))

    _rewrite_parquet(scores, edited, poison)
    out = tmp_path / "new"
    _assert_refused(_update_cli(policy_dir, rollout, edited, out), out, "NaN or infinite")


def test_scores_of_another_schema_are_refused(policy_dir, tmp_path):
    """A scores file whose metadata schema is tempflow.scores/999: update refuses, naming the schema."""
    rollout, scores = _scored(policy_dir, tmp_path)
    table = pq.read_table(scores)
    meta = json.loads(table.schema.metadata[b"tempflow"])
    assert meta["schema"] == "tempflow.scores/1"
    meta["schema"] = "tempflow.scores/999"
    pq.write_table(table.replace_schema_metadata({"tempflow": json.dumps(meta)}), scores)
    out = tmp_path / "new"
    _assert_refused(_update_cli(policy_dir, rollout, scores, out), out, "schema", "tempflow.scores/999")
