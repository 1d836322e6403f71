"""The report stage (stages.report): base and final evaluations compared, an --eval-dir ordered by
policy step, trained and held-out rewards drawn, and rewards.png always written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from stages.evaluate import EvalConfig, run_eval
from stages.report import write_report
from tests.conftest import invoke, write_updates


def test_report_compares_base_and_final_evals(pretrained, tmp_path):
    config = EvalConfig(num_steps=2, images_per_prompt=1)
    run_eval(pretrained, ["a red circle", "two blue squares"], tmp_path / "base", config)
    run_eval(pretrained, ["a red circle", "two blue squares"], tmp_path / "final", config)
    metrics = write_updates(tmp_path / "metrics", [0.6, 0.7])
    result = invoke("report", "--metrics-dir", metrics, "--eval", f"base={tmp_path / 'base'}",
                    "--eval", f"final={tmp_path / 'final'}", "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.stderr
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["reward_gain"] == 0.0 and summary["base_reward"] == summary["final_reward"]  # one policy twice
    assert Image.open(tmp_path / "rep" / "curve.png").format == "PNG"
    bad = invoke("report", "--metrics-dir", metrics, "--eval", "base", "--out", tmp_path / "rep2")
    assert bad.exit_code == 2 and "NAME=DIR" in bad.stderr


def test_report_takes_an_eval_dir_in_the_order_of_policy_steps(pretrained, tmp_path):
    """--eval-dir reads every eval folder in it and orders them by the step of the policy each
    measured, whatever their names: the first is the before, the last the after."""
    evals, metrics = tmp_path / "evals", write_updates(tmp_path / "metrics", [0.5, 0.5])
    config = EvalConfig(num_steps=2, images_per_prompt=1)
    for name, step, reward in (("final", 2, 0.75), ("base", 0, 0.25), ("mid", 1, 0.5)):
        run_eval(pretrained, ["a red circle"], evals / name, config)
        path = evals / name / "metrics.json"
        written = json.loads(path.read_text())  # stand-ins for the policies of later steps
        path.write_text(json.dumps({**written, "reward": reward, "policy": {**written["policy"], "step": step,
                                                                                   "identity": f"stand-in-{step}"}}))
    (evals / "notes").mkdir()  # not an eval folder: ignored
    result = invoke("report", "--metrics-dir", metrics, "--eval-dir", evals, "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.stderr
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["reward_gain"] == pytest.approx(0.5)  # final (step 2) minus base (step 0)
    header = next(line for line in result.stdout.splitlines() if all(n in line for n in ("base", "mid", "final")))
    assert header.index("base") < header.index("mid") < header.index("final")
    empty = invoke("report", "--metrics-dir", metrics, "--eval-dir", evals / "notes", "--out", tmp_path / "rep2")
    assert empty.exit_code == 1 and "no `tempflow eval` folders" in empty.stderr
    twice = invoke("report", "--metrics-dir", metrics, "--eval", f"base={evals / 'mid'}", "--eval-dir", evals,
                   "--out", tmp_path / "rep3")
    assert twice.exit_code == 1 and "base given twice" in twice.stderr
    shutil.copytree(evals / "final", evals / "it02")  # a stale folder left after renaming `final` in evals:
    stale = invoke("report", "--metrics-dir", metrics, "--eval-dir", evals, "--out", tmp_path / "rep4")
    assert stale.exit_code == 1 and "final and it02 measured the same policy (step 2)" in stale.stderr
    shutil.rmtree(evals / "it02")
    unchanged = json.loads((evals / "final" / "metrics.json").read_text())  # every update skipped: the
    unchanged["policy"]["identity"] = "stand-in-0"  # final policy has the base's weights at a later step
    (evals / "final" / "metrics.json").write_text(json.dumps(unchanged))
    same_weights = invoke("report", "--metrics-dir", metrics, "--eval-dir", evals, "--out", tmp_path / "rep5")
    assert same_weights.exit_code == 0, same_weights.stderr


def _eval_metrics(folder: Path, step: int, components: dict[str, tuple[float, float]]) -> Path:
    folder.mkdir(parents=True)
    rewards = {c: {"name": c, "weight": 1.0, "mean": m, "std": s, "se": s / 10} for c, (m, s) in components.items()}
    (folder / "metrics.json").write_text(json.dumps({
        "reward": components["pickscore"][0], "policy": {"step": step, "identity": f"id{step}"}, "rewards": rewards}))
    return folder


def test_report_draws_trained_and_held_out_rewards(tmp_path, monkeypatch):
    """pickscore trained, aesthetic held out: each drawn as its change in units of the first
    evaluation's image std, labelled; evals.json carries every component."""
    metrics = write_updates(tmp_path / "metrics", [0.1, 0.2])
    for path in metrics.glob("*.json"):
        path.write_text(json.dumps({**json.loads(path.read_text()), "trained_rewards": ["pickscore"]}))
    evals = {"base": _eval_metrics(tmp_path / "e0", 0, {"pickscore": (20.0, 2.0), "aesthetic": (5.0, 0.5)}),
             "final": _eval_metrics(tmp_path / "e2", 2, {"pickscore": (21.0, 2.0), "aesthetic": (4.5, 0.4)})}
    drawn = {}

    def capture(path, series, **labels):
        drawn[Path(path).name] = series

    monkeypatch.setattr("stages.report.line_chart", capture)
    summary = write_report(metrics, tmp_path / "report", evals=evals)
    series = drawn["rewards.png"]
    assert series["pickscore (trained)"][1] == [0.0, 0.5]  # (21 - 20) / 2
    assert series["aesthetic (held out)"][1] == [0.0, -1.0]  # (4.5 - 5) / 0.5
    assert series["pickscore (trained)"][0] == [0, 200]  # the NFE spent before each policy
    points = json.loads((tmp_path / "report" / "evals.json").read_text())
    assert points[1]["reward_aesthetic"] == 4.5 and "strict" not in points[1]
    assert summary["reward_gain"] == 1.0 and "strict_gain" not in summary


def test_report_without_evaluations_still_draws_rewards_png(tmp_path):
    """dvc.yaml declares the file: it is always written."""
    write_report(write_updates(tmp_path / "metrics", [0.1]), tmp_path / "report")
    assert Image.open(tmp_path / "report" / "rewards.png").format == "PNG"
