"""examples/recsys/recbole_sasrec.py's steps that run in tempflow's environment: the sessions
exported as RecBole's atomic file in tempflow's order, and saved scores ranked under tempflow's
protocol by hand. (Its train step needs RecBole's own environment; BENCHMARKS.md says how it was run,
and that its ranks under `all-items` reproduce RecBole's own test metrics.)"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages.artifacts.sessions import write_sessions
from stages.recsys.data import Events, PrepareConfig, build_sessions
from tests.conftest import load_example

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples/recsys/recbole_sasrec.py"


def _step(*args) -> str:
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _sessions(tmp_path: Path) -> Path:
    """u1 rates a b c d at one second (ties: file order), u2 b a e c: items a 1, b 2, c 3, d 4, e 5."""
    events = Events()
    for item in "abcd":
        events.add("u1", item, item == "d", 100.0)
    for t, item in enumerate("baec"):
        events.add("u2", item, False, 200.0 + t)
    path = tmp_path / "s.parquet"
    write_sessions(path, build_sessions(events, PrepareConfig(split="user", min_session_length=3)), {})
    return path


def test_export_writes_positions_as_timestamps_in_tempflow_order(tmp_path):
    data = _sessions(tmp_path)
    _step("export", "--data", data, "--out", tmp_path / "rb")
    lines = (tmp_path / "rb/tempflow-sessions/tempflow-sessions.inter").read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    assert [line.split("\t") for line in lines[1:]] == [
        ["0", "1", "0"], ["0", "2", "1"], ["0", "3", "2"], ["0", "4", "3"],  # u1's ties kept in file order
        ["1", "2", "0"], ["1", "1", "1"], ["1", "5", "2"], ["1", "3", "3"]]


def test_rank_ranks_saved_scores_under_either_protocol_by_hand(tmp_path):
    data = _sessions(tmp_path)
    folder = tmp_path / "rb"
    folder.mkdir()
    inf = -math.inf
    # test targets: d (4) for u1, who saw a b c; c (3) for u2, who saw b a e
    np.save(folder / "scores-s0.npy", np.array([[inf, 5, 4, 3, 2, 1], [inf, 1, 2, 3, 4, 5]], dtype=np.float32))
    (folder / "train-s0.json").write_text(json.dumps({"epochs_run": 3, "seconds": 9.5, "selected_epoch": 2}))
    for protocol, expected in (("all-items", [3, 2]), ("seen-removed", [0, 1])):
        out = tmp_path / f"{protocol}.json"
        _step("rank", "--data", data, "--dir", folder, "--protocol", protocol, "--out", out)
        record = json.loads(out.read_text())
        assert record["ranks"] == expected and record["protocol"] == protocol and record["algo"] == "recbole-sasrec"
        assert record["training"] == {"selected_epoch": 2, "epochs_run": 3, "seconds": 9.5}
        assert record["ndcg@5"] == np.mean([1 / math.log2(r + 2) for r in expected])
    np.save(folder / "scores-s0.npy", np.zeros((3, 6), dtype=np.float32))
    refused = subprocess.run([sys.executable, str(SCRIPT), "rank", "--data", str(data), "--dir", str(folder),
                              "--out", str(tmp_path / "x.json")], capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "one row per test target" in refused.stderr


def _benchmark():
    return load_example("examples/recsys/benchmark.py", "recsys_benchmark")


def test_benchmark_chooses_each_crr_option_on_validation_by_hand():
    choose = _benchmark().choose_crr
    assert choose({"crr-exp": 0.10}) == {"weight": "exp"}
    scores = {"crr-exp": 0.10, "crr-exp-beta-0.3": 0.09, "crr-exp-beta-3": 0.11, "crr-exp-gamma-0.5": 0.12,
              "crr-exp-gamma-0": 0.13, "crr-exp-cql": 0.10, "crr-exp-negatives": 0.101, "crr-exp-no-warmup": 0.05}
    # beta 3 beats 1 and 0.3; gamma 0 beats 0.5 and 0.9; cql only ties crr-exp, so it stays off
    assert choose(scores) == {"weight": "exp", "beta": 3.0, "critic_negatives": True, "gamma": 0.0}


def test_benchmark_tune_crr_trains_the_combination_and_keeps_the_best_on_validation(monkeypatch, tmp_path):
    """Two options win on validation (beta 3, gamma 0.5): their combination is trained for every
    seed with those settings, and crr-tuned is whichever of all scores best on validation."""
    bench = _benchmark()
    scores = {"crr-exp": [0.10, 0.12], "crr-exp-beta-3": [0.11, 0.13], "crr-exp-gamma-0.5": [0.12, 0.12],
              "crr-exp-cql": [0.09, 0.11]}
    per_seed = [{name: {"training": {"validation_ndcg@10": v[i]}, "ranks": [name]} for name, v in scores.items()}
                for i in (0, 1)]
    trained = []

    def fake_trained_eval(data, folder, name, algo, overrides, shared):
        trained.append((folder.name, name, algo, overrides, shared["seed"]))
        return {"training": {"validation_ndcg@10": 0.2 if shared["seed"] == 0 else 0.1}, "ranks": ["combined"]}

    monkeypatch.setattr(bench, "trained_eval", fake_trained_eval)
    tuned = bench.tune_crr(tmp_path, tmp_path / "d.parquet", [0, 1], per_seed, quick=True)
    combined = {"weight": "exp", "beta": 3.0, "gamma": 0.5}
    assert trained == [("s0", "crr-combined", "crr", combined, 0), ("s1", "crr-combined", "crr", combined, 1)]
    assert tuned["combined"] == combined and tuned["validation_ndcg@10"]["crr-combined"] == pytest.approx(0.15)
    assert tuned["chosen"] == "crr-combined" and all(seed["crr-tuned"]["ranks"] == ["combined"] for seed in per_seed)
    scores["crr-exp-gamma-0.5"] = [0.2, 0.2]  # now one variant beats the combination on validation
    per_seed = [{name: {"training": {"validation_ndcg@10": v[i]}, "ranks": [name]} for name, v in scores.items()}
                for i in (0, 1)]
    assert bench.tune_crr(tmp_path, tmp_path / "d.parquet", [0, 1], per_seed, quick=True)["chosen"] == "crr-exp-gamma-0.5"


def test_benchmark_quick_run_pairs_each_model_with_bc_target_by_target(tmp_path):
    """benchmark.py --quick (120 users, one epoch): the table's means and paired differences are
    those of the eval records' ranks, crr-tuned is the variant validation prefers, and a rerun
    reuses every model."""
    out = tmp_path / "bench"
    args = [sys.executable, str(REPO / "examples/recsys/benchmark.py"), "--out", str(out), "--quick", "--seeds", "0,1",
            "--variants", "bc,crr-exp,crr-exp-gamma-0", "--threads", "1"]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    results, tuned = report["results"], report["crr_tuned"]
    assert set(results) == {"popularity", "bc", "crr-exp", "crr-exp-gamma-0", "crr-tuned"}
    validation = {m: np.mean([json.loads((out / f"s{s}" / m / "metrics.json").read_text())["validation"]["ndcg@10"]
                              for s in (0, 1)]) for m in ("crr-exp", "crr-exp-gamma-0")}
    preferred = "crr-exp-gamma-0" if validation["crr-exp-gamma-0"] > validation["crr-exp"] else "crr-exp"
    assert tuned["validation_ndcg@10"] == validation and tuned["chosen"] == preferred
    assert results["crr-tuned"]["ndcg@10"] == results[preferred]["ndcg@10"]
    ranks = {s: {m: np.asarray(json.loads((out / "eval" / f"s{s}-{m}.json").read_text())["ranks"]) for m in ("bc", "crr-exp")}
             for s in (0, 1)}
    hit = {s: {m: (r < 10).astype(float) for m, r in models.items()} for s, models in ranks.items()}
    assert results["crr-exp"]["hr@10"]["per_seed"] == [hit[s]["crr-exp"].mean() for s in (0, 1)]
    paired = results["crr-exp"]["hr@10"]["vs_bc"]
    assert paired["mean"] == np.mean([hit[s]["crr-exp"] - hit[s]["bc"] for s in (0, 1)])
    assert paired["low"] <= paired["mean"] <= paired["high"] and paired["targets"] == len(ranks[0]["bc"])
    assert "| crr-exp |" in (out / "table.md").read_text()
    again = subprocess.run(args, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "pretraining" not in again.stdout and json.loads(
        (out / "results.json").read_text())["results"] == results
