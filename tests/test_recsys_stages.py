"""The `tempflow rec` stages (stages.recsys.stages): prepare, pretrain, train and eval end to end, a
training resumed and its checkpoint removed, the GPT-2 start recorded, a model of other data refused."""

from __future__ import annotations

import json

import pytest

from tests.conftest import MINUTE, TINY, _gpt2_folder, _retailrocket, _sessions_file, invoke


def test_prepare_pretrain_train_eval_end_to_end(tmp_path):
    rows = []
    for visitor in range(40):
        for t in range(6):
            item = (visitor + t) % 9
            rows.append(f"{(visitor * 1000 + t) * MINUTE},{visitor},{'transaction' if t == 5 else 'view'},{item},")
    events = _retailrocket(tmp_path, rows)
    data = tmp_path / "sessions.parquet"
    r = invoke("rec", "prepare", "--source", "retailrocket", "--events", events, "--split", "user", "--out", data)
    assert r.exit_code == 0, r.output
    r = invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "pre", *TINY)
    assert r.exit_code == 0, r.output
    for algo in ("crr", "bc", "sqn", "sa2c"):
        r = invoke("rec", "train", "--data", data, "--policy", tmp_path / "pre", "--algo", algo, "--out",
                   tmp_path / algo, "--epochs", "1", "--batch-size", "16")
        assert r.exit_code == 0, r.output
        metrics = json.loads((tmp_path / algo / "metrics.json").read_text())
        assert metrics["algo"] == algo and metrics["started_from"]["path"] == str(tmp_path / "pre")
    r = invoke("rec", "eval", "--data", data, "--policy", tmp_path / "crr", "--out", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["targets"] == 40 and metrics["purchase_targets"] == 40
    hits = [metrics[f"purchase_hr@{k}"] for k in (5, 10, 20)]
    assert hits == sorted(hits) and metrics["purchase_ndcg@10"] <= metrics["purchase_hr@10"]  # a longer list hits more
    assert metrics["purchase_hr@10_se"] == pytest.approx(  # the standard error of a mean of 40 hits
        (metrics["purchase_hr@10"] * (1 - metrics["purchase_hr@10"]) / 39) ** 0.5, abs=1e-9)
    assert metrics["protocol"] == "seen-removed" and len(metrics["ranks"]) == 40
    r = invoke("rec", "eval", "--data", data, "--popularity", "--protocol", "all-items", "--out", tmp_path / "pop.json")
    assert r.exit_code == 0, r.output
    floor = json.loads((tmp_path / "pop.json").read_text())
    assert floor["algo"] == "popularity" and floor["policy"] is None and floor["protocol"] == "all-items"
    assert floor["hr@10"] == pytest.approx(sum(r < 10 for r in floor["ranks"]) / 40)


def test_rec_train_resumes_through_the_cli_and_removes_its_checkpoint(tmp_path, monkeypatch):
    data = _sessions_file(tmp_path)
    assert invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "pre", *TINY).exit_code == 0
    args = ["rec", "train", "--data", data, "--policy", tmp_path / "pre", "--algo", "crr", "--epochs", "3",
            "--batch-size", "2", "--checkpoint-every", "2"]
    assert invoke(*args, "--out", tmp_path / "whole").exit_code == 0
    import stages.recsys.train as train

    real = train._train_step
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "_train_step", failing)
    assert invoke(*args, "--out", tmp_path / "again").exit_code != 0
    assert (tmp_path / "again.ckpt" / "state.json").is_file() and not (tmp_path / "again").exists()
    monkeypatch.setattr(train, "_train_step", real)
    assert invoke(*args, "--out", tmp_path / "again").exit_code == 0
    assert not (tmp_path / "again.ckpt").exists()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = invoke(*args, "--out", tmp_path / "third", "--checkpoint", tmp_path / "mine")
    assert r.exit_code != 0 and "not a tempflow recommender training checkpoint" in r.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_rec_pretrain_init_from_records_its_start(tmp_path):
    data, folder = _sessions_file(tmp_path), _gpt2_folder(tmp_path)
    r = invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "m", "--init-from", folder, *TINY)
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["init_from"]["path"] == str(folder) and config["init_from"]["width"] == 16
    r = invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "n", "--init-from", folder, *TINY, "--width", "32")
    assert r.exit_code != 0 and "pass --width 16" in r.output


def test_eval_refuses_a_model_of_other_data(tmp_path):
    rows = [f"{t * MINUTE},{v},view,{(v + t) % 4},"for v in range(6) for t in range(4)]
    data = tmp_path / "a.parquet"
    assert invoke("rec", "prepare", "--source", "retailrocket", "--events", _retailrocket(tmp_path, rows),
                  "--out", data).exit_code == 0
    assert invoke("rec", "pretrain", "--data", data, "--out", tmp_path / "m", *TINY).exit_code == 0
    other = tmp_path / "b.parquet"
    rows = [f"{t * MINUTE},{v},view,{(v + t) % 7},"for v in range(6) for t in range(4)]
    (tmp_path / "other").mkdir()
    assert invoke("rec", "prepare", "--source", "retailrocket", "--events", _retailrocket(tmp_path / "other", rows),
                  "--out", other).exit_code == 0
    r = invoke("rec", "eval", "--data", other, "--policy", tmp_path / "m", "--out", tmp_path / "x.json")
    assert r.exit_code == 1 and "number their items differently" in r.stderr
