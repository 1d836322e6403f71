"""The recommender's model folder (stages.artifacts.rec_model): a damaged config.json is one line."""

from __future__ import annotations

import json

from tests.conftest import TINY, _sessions_file, invoke


def test_a_damaged_model_config_is_one_line(tmp_path):
    data = _sessions_file(tmp_path)
    assert invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "m", *TINY).exit_code == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "n_items": "abc"}))
    r = invoke("rec", "eval", "--data", data, "--policy", tmp_path / "m", "--out", tmp_path / "e.json")
    assert r.exit_code == 1 and "n_items is not a count" in r.stderr and len(r.stderr.splitlines()) == 1
