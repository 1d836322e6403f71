"""Pretrain, eval and report in the shapes world: resumable pretraining, deterministic evaluation,
prompts outside the grammar refused, the before/after report."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.evaluate import EvalConfig, run_eval
from stages.policies.base import load_policy
from stages.pretrain import PretrainConfig, default_checkpoint, run_pretrain, world_batch
from stages.support.errors import TempflowError
from stages.worlds import shapes
from tests.conftest import invoke, write_updates

REPO = Path(__file__).resolve().parents[1]


def tiny_pretrain(**overrides) -> PretrainConfig:
    """A pretraining run of a few seconds: 16x16 images, their 4x4x4 latents."""
    values = {"image_size": 16, "steps": 6, "batch_size": 4, "warmup": 2, "checkpoint_every": 2,
              "autoencoder_steps": 4, "autoencoder_batch_size": 2}
    values.update(overrides)
    return PretrainConfig(**values)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "base"
    run_pretrain(tiny_pretrain(), out)
    return out


def test_world_batch_is_a_function_of_seed_and_step():
    config = tiny_pretrain()
    prompts, x0 = world_batch(config, 3)
    again, x0_again = world_batch(config, 3)
    assert prompts == again and np.array_equal(x0.numpy(), x0_again.numpy())
    assert x0.shape == (4, 3, 16, 16) and float(x0.min()) >= -1 and float(x0.max()) <= 1
    assert world_batch(config, 4)[0] != prompts or not np.array_equal(world_batch(config, 4)[1], x0)
    held_out = set(shapes.heldout_prompts())
    assert not held_out & set(prompts)  # the flow never learns a held-out prompt


def test_the_autoencoder_learns_images_of_both_splits_and_the_flow_of_train_only():
    """The codec is trained on every scene (a held-out pairing must still be representable); the
    text-to-image flow sees train prompts only."""
    config = replace(tiny_pretrain(), batch_size=64, autoencoder_batch_size=64)
    held_out = set(shapes.heldout_prompts())
    seen = {phase: {p for step in range(4) for p in world_batch(config, step, phase)[0]}
            for phase in ("flow", "autoencoder")}
    assert not seen["flow"] & held_out
    assert seen["autoencoder"] & held_out and seen["autoencoder"] - held_out


def test_pretrain_writes_a_policy_and_learns(pretrained, tmp_path):
    policy, record = load_policy(pretrained)
    assert record.step == 0 and policy.sample_shape == (4, 4, 4)  # 16x16 images, 4x smaller latents
    report = json.loads((pretrained / "pretrain.json").read_text())
    assert len(report["losses"]) == 6 and report["resumed_from"] == 0
    assert len(report["autoencoder"]["losses"]) == 4
    assert not default_checkpoint(pretrained).exists()  # removed once the policy is written
    # a longer run lowers the flow-matching loss: the model learns the world, not noise
    losses = run_pretrain(tiny_pretrain(steps=40, checkpoint_every=0, learning_rate=3e-3), tmp_path / "longer")
    curve = json.loads((tmp_path / "longer" / "pretrain.json").read_text())["losses"]
    assert np.mean(curve[-8:]) < 0.8 * np.mean(curve[:8]), (losses, curve)


def interrupt_at(phase: str, step: int):
    """A progress listener that stops the run (like Ctrl-C) once ``step`` steps of ``phase`` are done."""
    done: dict[str, int] = {}

    def listen(task: str, advance: int, total: int) -> None:
        done[task] = done.get(task, 0) + advance
        if task == phase and done[task] >= step:
            raise KeyboardInterrupt

    return listen


@pytest.mark.parametrize("phase, step, saved", [("autoencoder", 3, 2), ("pretrain", 1, 0), ("pretrain", 5, 4)])
def test_interrupted_pretrain_resumes_to_the_same_weights(pretrained, tmp_path, phase, step, saved):
    """Stopped in the autoencoder phase or in flow matching, a rerun continues from the checkpoint
    and ends bit for bit where an uninterrupted run ends (latent scaling included)."""
    out = tmp_path / "base"
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(tiny_pretrain(), out, progress=interrupt_at(phase, step))
    assert not out.exists()
    state = json.loads((default_checkpoint(out) / "state.json").read_text())
    assert state["step"] == saved  # the last multiple of checkpoint_every reached (flow step 0: the autoencoder's end)
    assert state["phase"] == {"autoencoder": "autoencoder", "pretrain": "flow"}[phase]
    result = run_pretrain(tiny_pretrain(), out)
    assert result.resumed_from == (saved if phase == "pretrain" else 0)
    assert result.resumed == f"{state['phase']} step {saved}"
    assert load_policy(out)[1].identity == load_policy(pretrained)[1].identity  # bit for bit
    report = json.loads((out / "pretrain.json").read_text())
    assert report["autoencoder"] == json.loads((pretrained / "pretrain.json").read_text())["autoencoder"]


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    out = tmp_path / "base"
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(tiny_pretrain(), out, progress=interrupt_at("pretrain", 3))
    assert default_checkpoint(out).exists()
    assert run_pretrain(tiny_pretrain(learning_rate=5e-4), out).resumed_from == 0


def test_checkpoint_of_another_model_is_not_resumed(tmp_path, monkeypatch):
    """The same options on a preset that has changed since (here: the pooled text put back) start
    afresh instead of loading weights of another architecture."""
    from stages.policies.tiny import PRESET_MODELS

    out = tmp_path / "base"
    with monkeypatch.context() as patch:
        patch.setitem(PRESET_MODELS["shapes"], "pooled_text", True)
        with pytest.raises(KeyboardInterrupt):
            run_pretrain(tiny_pretrain(), out, progress=interrupt_at("pretrain", 3))
    assert json.loads((default_checkpoint(out) / "state.json").read_text())["model"]["pooled_text"] is True
    result = run_pretrain(tiny_pretrain(), out)
    assert (result.resumed_from, result.resumed) == (0, "")


def test_checkpoint_with_a_weight_the_model_lacks_is_refused_as_damaged(tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "base"
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(tiny_pretrain(), out, progress=interrupt_at("pretrain", 3))
    tensors_path = default_checkpoint(out) / "state.safetensors"
    tensors = load_file(tensors_path)
    save_file({**tensors, "param/unet.class_embedding.linear_1.weight": torch.zeros(2, 2)}, tensors_path)
    with pytest.raises(TempflowError, match="damaged .*class_embedding.linear_1.weight is not a weight of this model"):
        run_pretrain(tiny_pretrain(), out)


@pytest.mark.parametrize("bad, match", [
    ({"world": "mnist"}, "--world must be one of shapes, got 'mnist'"), ({"image_size": 24}, "multiple of 16"),
    ({"ema": 1.0}, "--ema"), ({"steps": 0}, "--steps"),
    ({"autoencoder_learning_rate": 0.0}, "--autoencoder-learning-rate must be a finite number > 0, got 0"),
    ({"warmup": -1}, "--warmup must be >= 0, got -1"),
])
def test_pretrain_config_errors_name_the_option(bad, match):
    with pytest.raises(TempflowError, match=match):
        tiny_pretrain(**bad)


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


def test_the_shipped_train_prompts_are_the_world_train_split():
    shipped = (REPO / "examples" / "prompts" / "shapes-train.txt").read_text().splitlines()
    assert [p for p in shipped if p and not p.startswith("#")] == shapes.train_prompts()


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
