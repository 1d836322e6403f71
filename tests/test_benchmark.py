"""The benchmark script's --quick smoke run: every method trains, every figure is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_table_plot_and_measurements(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "examples/benchmark/benchmark.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    methods = {"tempflow", "flow-grpo", "flow-grpo-fast", "branch-only", "weight-only"}
    assert set(results["curves"]) == methods
    budget = results["settings"]["nfe_budget"]
    for name, curves in results["curves"].items():
        (curve,) = curves  # one seed in --quick
        assert curve[0]["nfe"] == 0 and 0 < curve[-1]["nfe"] <= budget, name  # whole iterations within the budget
        assert all(0 <= row["strict"] <= row["reward"] <= 1 for row in curve)
    memory = results["memory"]
    assert memory["8x"]["samples"] == 8 * memory["1x"]["samples"]
    assert memory["1x"]["peak_rss_mib"] >= memory["1x"]["rss_before_mib"] > 0
    efficiency = results["efficiency"]
    assert efficiency["bare_forward_per_s"] > 0 and efficiency["rollout_nfe_per_s"] > 0
    table = (out / "table.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    assert Image.open(out / "benchmark.png").size[0] > 500
