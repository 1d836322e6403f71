"""Pretraining's checkpoint (stages.artifacts.pretrain_checkpoint): saved with its schema and read
back; one written when the version key was ``format`` resumes; another run's is stale; one holding a
weight the model lacks is damaged."""

from __future__ import annotations

import json

import pytest
import torch

from stages.artifacts.pretrain_checkpoint import PRETRAIN_SCHEMA, PretrainCheckpoint, PretrainState
from stages.pretrain import default_checkpoint, run_pretrain
from stages.support.errors import TempflowError
from tests.conftest import interrupt_at, tiny_pretrain

MODEL, CONFIG = {"image_size": 16}, {"steps": 4}


def _state() -> PretrainState:
    tensors = {"param": {"w": torch.ones(2)}, "ema": {"w": torch.zeros(2)}, "frozen": {},
               "adam": {"w/exp_avg": torch.ones(2), "w/exp_avg_sq": torch.ones(2), "w/step": torch.tensor(1.0)}}
    return PretrainState("flow", 3, [0.5, 0.4, 0.3], {"latent_scaling": {"shift_factor": 0.1, "scaling_factor": 2.0}},
                         tensors)


def test_a_checkpoint_is_saved_with_its_schema_and_read_back(tmp_path):
    ckpt = PretrainCheckpoint(tmp_path / "ck", MODEL, CONFIG)
    ckpt.save(_state())
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["schema"] == PRETRAIN_SCHEMA
    saved = ckpt.load()
    assert (saved.phase, saved.step, saved.losses, saved.extra) == ("flow", 3, [0.5, 0.4, 0.3], _state().extra)
    assert torch.equal(saved.tensors["adam"]["w/exp_avg"], torch.ones(2))
    ckpt.check_fits(saved, {"param": {"w": (2,)}, "ema": {"w": (2,)}, "frozen": {}})
    with pytest.raises(Exception, match="param/w is missing, misshapen or not finite"):
        ckpt.check_fits(saved, {"param": {"w": (3,)}, "ema": {"w": (3,)}, "frozen": {}})


def test_a_checkpoint_of_the_format_key_days_resumes(tmp_path):
    ckpt = PretrainCheckpoint(tmp_path / "ck", MODEL, CONFIG)
    ckpt.save(_state())
    info = json.loads((tmp_path / "ck" / "state.json").read_text())
    info["format"] = info.pop("schema")
    (tmp_path / "ck" / "state.json").write_text(json.dumps(info))
    assert ckpt.is_ours() and ckpt.load().step == 3


def test_another_runs_checkpoint_is_stale_and_a_foreign_folder_is_not_ours(tmp_path):
    PretrainCheckpoint(tmp_path / "ck", MODEL, CONFIG).save(_state())
    assert PretrainCheckpoint(tmp_path / "ck", MODEL, {"steps": 5}).load() is None
    assert PretrainCheckpoint(tmp_path / "ck", {"image_size": 32}, CONFIG).load() is None
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    assert not PretrainCheckpoint(tmp_path / "mine", MODEL, CONFIG).is_ours()


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
