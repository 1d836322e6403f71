"""The eval stage (stages.evaluate): deterministic evaluation in the shapes world, prompts outside
its grammar refused, any policy kind (sd3 included) with any reward, and two processes under torchrun
that give the one-process evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.evaluate import EvalConfig, run_eval
from stages.policies.tiny_pipelines import make_tiny_pipeline
from stages.rewards.models import load_model_reward
from stages.rewards.tiny import make_tiny_reward
from tests.conftest import _ok, _torchrun, invoke

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


def test_two_process_eval_gives_the_one_process_evaluation(policy_dir, tmp_path):
    """Each rank samples and scores whole batches of the (prompt, seed) pairs; rank 0 writes: the
    same per-image results, metrics (but the seconds) and grid as one process."""
    import torch

    torch.set_num_threads(1)
    options = ["--policy", str(policy_dir), "--per-task", "2", "--images-per-prompt", "2", "--num-steps", "3",
               "--batch-size", "3"]
    one = invoke("eval", *options, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    two = _torchrun("eval", *options, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = tmp_path / "one", tmp_path / "two"
    assert (a / "results.jsonl").read_bytes() == (b / "results.jsonl").read_bytes()
    assert (a / "grid.png").read_bytes() == (b / "grid.png").read_bytes()
    m1, m2 = (json.loads((folder / "metrics.json").read_text()) for folder in (a, b))
    for m in (m1, m2):
        m.pop("sampling_seconds")
        m["policy"].pop("path", None)
    assert m1 == m2 and m1["images"] % 3 != 0  # a last, short batch


def test_eval_takes_a_real_policy_on_the_worlds_prompts(pipelines, tmp_path):
    """Any policy kind is evaluated: an sd3 policy on the shapes world's held-out prompts, with its
    reward and strict accuracy (tests/test_evaluate.py covers other prompts and rewards)."""
    _ok("init", "--from", pipelines["sd3"], "--out", tmp_path / "p0", "--lora-rank", "2")
    _ok("eval", "--policy", tmp_path / "p0", "--out", tmp_path / "e", "--per-task", "1", "--num-steps", "2",
        "--images-per-prompt", "1")
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["policy"]["kind"] == "sd3" and 0 <= metrics["strict"] <= 1 and metrics["per_task"]


def test_eval_is_deterministic_and_writes_its_report(pretrained, tmp_path):
    prompts = ["a red circle", "two blue squares", "a green triangle and a white circle",
               "a cyan square left of a yellow circle"]
    config = EvalConfig(num_steps=4, images_per_prompt=2, grid_prompts=4)
    first = run_eval(pretrained, prompts, tmp_path / "e1", config).metrics
    second = run_eval(pretrained, prompts, tmp_path / "e2", config).metrics
    assert first["reward"] == second["reward"] and first["per_task"] == second["per_task"]
    assert set(first["per_task"]) == {"single", "counting", "two_objects", "position"}
    assert first["images"] == 8 and first["nfe"] == 32 and 0 <= first["strict"] <= first["reward"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "e1" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["requirements"]
    assert np.mean([r["reward"] for r in rows]) == pytest.approx(first["reward"])
    grid = Image.open(tmp_path / "e1" / "grid.png")
    assert grid.width > 4 * 16 and grid.height > 16 * 4  # four enlarged images with captions under them


def test_eval_cli_refuses_a_prompt_outside_the_grammar(pretrained, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na purple circle\n")
    result = invoke("eval", "--policy", pretrained, "--prompts", prompts, "--out", tmp_path / "e")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "prompt 2" in result.stderr and "purple" in result.stderr
    assert not (tmp_path / "e").exists()


def test_eval_cli_on_the_held_out_split(pretrained, tmp_path):
    result = invoke("eval", "--policy", pretrained, "--out", tmp_path / "e", "--per-task", 1, "--num-steps", 2,
                    "--images-per-prompt", 1)
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["prompts"] == 4 and metrics["prompts_source"] == "shapes:heldout:1-per-task"
    assert "strict accuracy" in result.stdout
