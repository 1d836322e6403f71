"""The benchmark script's --quick smoke run: every method trains, every figure is written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import load_example

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_table_plot_and_measurements(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "examples/benchmark/benchmark.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    methods = {"tempflow", "flow-grpo", "flow-grpo-fast", "branch-only", "weight-only", "tempflow-k6",
               "tempflow-finish3", "tempflow-weighted3", "tempflow-spread3"}
    assert set(results["curves"]) == methods
    budget = results["settings"]["nfe_budget"]
    for name, curves in results["curves"].items():
        (curve,) = curves  # one seed in --quick
        assert curve[0]["nfe"] == 0 and 0 < curve[-1]["nfe"] <= budget, name  # whole iterations within the budget
        assert all(0 <= row[f"{half}_strict"] <= row[f"{half}_reward"] <= 1 for row in curve for half in ("val", "test"))
        assert all(row["decodes"] > 0 for row in curve[1:])
        assert "test_images" not in curve[-1]  # the per-image rewards stay in the kept runs
    kept = json.loads((out / "runs" / "tempflow-s0.json").read_text())["curve"]
    assert len(kept[-1]["test_images"]) == 8  # 2 test prompts per task x 4 tasks x 1 image
    summary = {row["method"]: row for row in results["summary"]}
    baseline = json.loads((out / "runs" / "flow-grpo-s0.json").read_text())["curve"]
    by_hand = sum(a - b for a, b in zip(kept[-1]["test_images"], baseline[-1]["test_images"])) / 8
    assert summary["tempflow"]["diff_final"]["mean"] == pytest.approx(by_hand)  # paired image by image
    decodes = {name: curves[0][-1]["decodes"] for name, curves in results["curves"].items()}
    assert decodes["tempflow"] > decodes["flow-grpo"]  # a branch decodes one image, a trajectory one per G
    memory = results["memory"]
    assert memory["8x"]["samples"] == 8 * memory["1x"]["samples"]
    assert memory["1x"]["peak_rss_mib"] >= memory["1x"]["rss_before_mib"] > 0
    efficiency = results["efficiency"]
    assert efficiency["bare_forward_per_s"] > 0 and efficiency["rollout_nfe_per_s"] > 0
    table = (out / "table.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    assert Image.open(out / "benchmark.png").size[0] > 500
    assert sorted(f.name for f in (out / "runs").iterdir()) == sorted(f"{m}-s0.json" for m in methods)
    assert results["runs_reused"] == []

    again = subprocess.run([sys.executable, str(REPO / "examples/benchmark/benchmark.py"), "--quick", "--out", str(out),
                            "--methods", "tempflow"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    assert "tempflow seed 0: kept from" in again.stdout  # an interrupted benchmark goes on where it stopped
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["runs_reused"] == ["tempflow-s0"] and rerun["curves"]["tempflow"] == results["curves"]["tempflow"]

    record = json.loads((out / "base" / "pretrain.json").read_text())
    record["config"]["seed"] += 1  # as if OUT/base came from another recipe
    (out / "base" / "pretrain.json").write_text(json.dumps(record))
    stale = subprocess.run([sys.executable, str(REPO / "examples/benchmark/benchmark.py"), "--quick", "--out", str(out)],
                           capture_output=True, text=True, cwd=tmp_path, check=False)
    assert stale.returncode == 1 and "pretrained with other settings" in stale.stderr


def _benchmark_module():
    return load_example("examples/benchmark/benchmark.py", "benchmark")


def test_finished_runs_are_kept_only_for_the_same_settings(tmp_path):
    bench = _benchmark_module()
    settings = bench.Settings(nfe_budget=1000)
    store = bench.RunStore(tmp_path, {"settings": asdict(settings), "base": "/b", "rollout": {}, "update": {}})
    curve = [{"nfe": 0, "seconds": 0.0, "iteration": 0, "reward": 0.5, "strict": 0.25}]
    assert store.load("tempflow", 0) is None
    store.save("tempflow", 0, curve)
    assert store.load("tempflow", 0) == curve
    assert store.load("tempflow", 1) is None and store.load("flow-grpo", 0) is None
    other = bench.RunStore(tmp_path, {"settings": asdict(replace(settings, nfe_budget=2000)), "base": "/b",
                                      "rollout": {}, "update": {}})
    assert other.load("tempflow", 0) is None  # another budget: rerun, never mix


def test_base_digest_follows_contents_not_path(tmp_path):
    bench = _benchmark_module()
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "w.bin").write_bytes(b"weights")
    assert bench.folder_digest(a) == bench.folder_digest(b)
    (b / "sub" / "w.bin").write_bytes(b"retrained")
    assert bench.folder_digest(a) != bench.folder_digest(b)


def _stats_module():
    return load_example("examples/benchmark/stats.py", "stats")


def test_paired_difference_hand_computed():
    """Seed 0 differs by [1, 0, 0], seed 1 by [0, 1, 1]: means 1/3 and 2/3, image SE sqrt(1/3)/sqrt(3) = 1/3
    each; over the two seeds the mean is 1/2, sd sqrt(2)/6, and the interval t(1) = 12.706 times sd/sqrt(2)."""
    stats = _stats_module()
    diff = stats.paired_difference([[1, 0, 1], [1, 1, 1]], [[0, 0, 1], [1, 0, 0]])
    assert diff["per_seed"] == pytest.approx([1 / 3, 2 / 3])
    assert diff["mean"] == pytest.approx(0.5) and diff["n"] == 2
    assert diff["image_se"] == pytest.approx(1 / 3)
    assert diff["ci95"] == pytest.approx(12.706 * (math.sqrt(2) / 6) / math.sqrt(2))
    with pytest.raises(ValueError, match="same images"):
        stats.paired_difference([[1, 0]], [[1, 0, 1]])
    one = stats.paired_difference([[1.0, 0.0]], [[0.0, 0.0]])
    assert one["mean"] == 0.5 and math.isnan(one["ci95"])  # one training seed: no interval over seeds


def test_paired_bootstrap_by_hand_and_against_the_normal_interval():
    stats = _stats_module()
    same = stats.paired_bootstrap([[1, 0, 1], [0, 1, 1]], [[1, 0, 1], [0, 1, 1]])
    assert (same["mean"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    shifted = stats.paired_bootstrap([[0.5, 1.5], [2.5, 3.5]], [[0.0, 1.0], [2.0, 3.0]])
    assert shifted["mean"] == shifted["low"] == shifted["high"] == 0.5 and shifted["per_seed"] == [0.5, 0.5]
    # one seed, 2000 targets whose differences are +1 for 30 % and 0 otherwise: the interval is the
    # normal one over targets, 0.3 +- 1.96 sqrt(0.21 / 2000) = 0.3 +- 0.020
    diff = [1.0] * 600 + [0.0] * 1400
    wide = stats.paired_bootstrap([diff], [[0.0] * 2000], resamples=2000)
    assert wide["mean"] == pytest.approx(0.3) and wide["high"] - wide["low"] == pytest.approx(0.040, abs=0.004)
    # two seeds that disagree widen it: their spread is sampled too
    apart = stats.paired_bootstrap([diff, [0.0] * 2000], [[0.0] * 2000] * 2, resamples=2000)
    assert apart["low"] <= 1e-9 and apart["high"] >= 0.29
    with pytest.raises(ValueError):
        stats.paired_bootstrap([[1, 0]], [[1, 0, 1]])


def test_t_quantiles_and_curve_choices():
    stats = _stats_module()
    assert stats.t_975(2) == 4.303 and stats.t_975(11) == 2.228 and stats.t_975(500) == 1.96
    curve = [{"nfe": 0, "val_reward": 0.5}, {"nfe": 10, "val_reward": 0.7}, {"nfe": 20, "val_reward": 0.7},
             {"nfe": 30, "val_reward": 0.6}]
    assert stats.chosen_index(curve) == 1  # the earliest of the best
    assert stats.nfe_to_reach(curve, 0.65) == 10.0 and stats.nfe_to_reach(curve, 0.8) is None
    reach = stats.reach_summary([curve, curve[:1]], 0.65)
    assert reach["per_seed"] == [10.0, None] and reach["not_reached"] == 1 and reach["mean"] == 10.0


def test_reach_reads_kept_runs_and_finds_each_target_by_hand(tmp_path):
    """Two seeds of flow-grpo and of tempflow, hand-made curves: the targets are flow-grpo's mean
    final and mean last-three validation rewards, and each seed reaches them where the curve first
    gets there."""
    reach = load_example("examples/benchmark/reach.py", "reach")

    def curve(vals, step):
        return [{"nfe": i * step, "val_reward": v, "test_images": [v, v + 0.1]} for i, v in enumerate(vals)]

    curves = {"flow-grpo-s0": curve([0.5, 0.7, 0.6, 0.6], 100), "flow-grpo-s1": curve([0.5, 0.6, 0.7, 0.6], 100),
              "tempflow-s0": curve([0.5, 0.62, 0.66, 0.7], 50), "tempflow-s1": curve([0.5, 0.55, 0.58, 0.59], 50)}
    for name, c in curves.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"key": {}, "curve": c}))
    result = reach.analyse(reach.load_runs(tmp_path))
    assert result["targets"]["final"] == pytest.approx(0.6)
    assert result["targets"]["plateau"] == pytest.approx((0.7 + 0.6 + 0.6 + 0.6 + 0.7 + 0.6) / 6)
    tf = result["methods"]["tempflow"]
    assert tf["reach_final"]["per_seed"] == [50.0, None] and tf["reach_final"]["not_reached"] == 1
    assert tf["reach_final"]["fraction_of_budget"] == pytest.approx(50 / 300)
    assert tf["reach_plateau"]["per_seed"] == [100.0, None]
    fg = result["methods"]["flow-grpo"]["reach_final"]
    assert fg["per_seed"] == [100.0, 100.0]  # flow-grpo passes its own final value early
    assert tf["diff_final"]["mean"] == pytest.approx(((0.7 - 0.6) + (0.59 - 0.6)) / 2)
    assert tf["half_budget_nfe"] == 150  # the evaluation nearest 150 NFE: each seed's at 150
    assert tf["diff_at_reach_vs_flow_grpo_final"] is None  # seed 1 never reached it
    at_reach = result["methods"]["flow-grpo"]["diff_at_reach_vs_flow_grpo_final"]  # each seed's point at 100 NFE
    assert at_reach["per_seed"] == pytest.approx([0.7 - 0.6, 0.6 - 0.6])
    assert "| tempflow | 2 |" in reach.markdown(result) and "a seed never reached it" in reach.markdown(result)
