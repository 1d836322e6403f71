"""tempflow eval for any policy kind and any reward, and the report's trained and held-out rewards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.policies.tiny_pipelines import make_tiny_pipeline
from stages.report import write_report
from stages.rewards.models import load_model_reward
from stages.rewards.tiny import make_tiny_reward
from tests.conftest import invoke, write_updates

PROMPTS = ["a red cat on a chair", "two blue dogs", "a green tree above a house"]
SMALL = ["--num-steps", "3", "--images-per-prompt", "2", "--resolution", "32"]


@pytest.fixture(scope="module")
def sd3_policy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd3")
    make_tiny_pipeline("sd3", root / "base")
    r = invoke("init", "--from", root / "base", "--out", root / "policy", "--lora-rank", "2")
    assert r.exit_code == 0, r.output
    return root / "policy"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_tiny_reward("clip", tmp_path_factory.mktemp("clip") / "clip", seed=1)


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def test_eval_of_an_sd3_policy_with_pickscore(sd3_policy, clip, prompts, tmp_path):
    out = tmp_path / "eval"
    r = invoke("eval", "--policy", sd3_policy, "--prompts", prompts, "--reward", "pickscore",
               "--reward", "jpeg_compressibility:0.01", "--reward-model", f"pickscore={clip}", "--save-images",
               "--out", out, *SMALL)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert metrics["images"] == len(rows) == 6 and metrics["policy"]["kind"] == "sd3"
    assert "strict" not in metrics and metrics["sampling"]["guidance_scale"] == 4.5  # sd3's default CFG
    images = np.stack([np.asarray(Image.open(out / row["file"])) for row in rows])
    assert images.shape == (6, 32, 32, 3)
    direct = load_model_reward("pickscore", clip)(images, [row["prompt"] for row in rows])
    np.testing.assert_allclose([row["rewards"]["pickscore"] for row in rows], direct, rtol=1e-5)
    total = [row["rewards"]["pickscore"] + 0.01 * row["rewards"]["jpeg_compressibility"] for row in rows]
    np.testing.assert_allclose([row["reward"] for row in rows], total, rtol=1e-9)
    pick = metrics["rewards"]["pickscore"]
    assert pick["mean"] == pytest.approx(np.mean(direct), rel=1e-5)
    assert pick["std"] == pytest.approx(np.std(direct, ddof=1), rel=1e-4)
    assert pick["se"] == pytest.approx(pick["std"] / np.sqrt(6))
    assert metrics["reward"] == pytest.approx(np.mean(total)) and metrics["reward_se"] > 0
    assert (out / "grid.png").is_file()
    again = tmp_path / "again"  # the same seeds: the same images and scores
    assert invoke("eval", "--policy", sd3_policy, "--prompts", prompts, "--reward", "pickscore",
                  "--reward-model", f"pickscore={clip}", "--out", again, *SMALL).exit_code == 0
    assert json.loads((again / "metrics.json").read_text())["rewards"]["pickscore"]["mean"] == pick["mean"]


def test_the_shapes_reward_needs_the_worlds_prompts(sd3_policy, prompts, tmp_path):
    r = invoke("eval", "--policy", sd3_policy, "--prompts", prompts, "--out", tmp_path / "e", *SMALL)
    assert r.exit_code == 1
    assert f"{prompts}: prompt 1:" in r.stderr and "--reward pickscore" in r.stderr
    assert not (tmp_path / "e").exists()


def test_a_shapes_policy_scored_with_a_held_out_reward_too(policy_dir, clip, tmp_path):
    """The shapes world's verdicts stay; the extra component gets its own column and statistics."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    out = tmp_path / "e"
    r = invoke("eval", "--policy", policy_dir, "--prompts", prompts, "--reward", "shapes", "--reward", "hpsv2:2",
               "--reward-model", f"hpsv2={clip}", "--out", out, "--num-steps", "2")
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert set(metrics["rewards"]) == {"shapes", "hpsv2"} and "strict" in metrics
    shapes, hps = metrics["rewards"]["shapes"]["mean"], metrics["rewards"]["hpsv2"]["mean"]
    assert hps != 0 and metrics["reward"] == pytest.approx(shapes + 2 * hps)
    for row in rows:  # the verdict is the shapes world's, whatever else is summed into the reward
        assert row["met"] == row["rewards"]["shapes"] != row["reward"]
    for task, values in metrics["per_task"].items():
        assert values["reward"] == pytest.approx(np.mean([r["met"] for r in rows if r["task"] == task]))


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


def test_update_metrics_name_the_rewards_trained_toward(policy_dir, tmp_path):
    """Not a component of weight 0: one scored only to be watched."""
    from tests.conftest import make_rollout

    rollout = make_rollout(policy_dir, tmp_path / "r")
    assert invoke("score", "--rollout", rollout, "--reward", "jpeg_compressibility", "--reward", "shapes:0",
                  "--out", tmp_path / "s.parquet").exit_code == 0
    r = invoke("update", "--policy", policy_dir, "--rollout", rollout, "--rewards", tmp_path / "s.parquet",
               "--out", tmp_path / "new")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "new" / "metrics.json").read_text())["trained_rewards"] == ["jpeg_compressibility"]
