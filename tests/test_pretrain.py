"""Pretraining in the shapes world (stages.pretrain): its batches a function of seed and step, the
flow trained on the train split only, a policy written that learned, an interrupted run resumed to
the same weights, checkpoints of another config or model not resumed and its own removed, config
errors naming the option."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from stages.policies.base import load_policy
from stages.pretrain import default_checkpoint, run_pretrain, world_batch
from stages.support.errors import TempflowError
from stages.worlds import shapes
from tests.conftest import interrupt_at, invoke, tiny_pretrain


def test_pretrain_removes_its_own_checkpoint_and_nothing_else(tmp_path, monkeypatch):
    """A run that checkpoints deletes its checkpoint folder when done, and only that."""
    monkeypatch.chdir(tmp_path)
    Path("keep.txt").write_text("a")
    result = invoke("pretrain", "--world", "shapes", "--steps", 4, "--autoencoder-steps", 2, "--batch-size", 2,
                    "--autoencoder-batch-size", 2, "--checkpoint-every", 1, "--out", "base", "--checkpoint", "ck")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "keep.txt"]
    assert (tmp_path / "base" / "config.json").is_file()


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


@pytest.mark.parametrize("bad, match", [
    ({"world": "mnist"}, "--world must be one of shapes, got 'mnist'"), ({"image_size": 24}, "multiple of 16"),
    ({"ema": 1.0}, "--ema"), ({"steps": 0}, "--steps"),
    ({"autoencoder_learning_rate": 0.0}, "--autoencoder-learning-rate must be a finite number > 0, got 0"),
    ({"warmup": -1}, "--warmup must be >= 0, got -1"),
])
def test_pretrain_config_errors_name_the_option(bad, match):
    with pytest.raises(TempflowError, match=match):
        tiny_pretrain(**bad)
