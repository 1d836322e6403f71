"""AdamW's state beside a policy's weights (stages.artifacts.optimizer): saved and restored exactly,
every tensor checked first; state written before optimizer.json carried a schema still resumes."""

from __future__ import annotations

import json

import pytest
import torch

from stages.artifacts.optimizer import OPTIMIZER_JSON, OPTIMIZER_SCHEMA, load_optimizer, save_optimizer
from stages.support.errors import TempflowError


def _stepped() -> tuple[torch.nn.Module, torch.optim.Optimizer, list[str]]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer, [n for n, _ in model.named_parameters()]


def _fresh(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=0.1)


def test_the_state_is_saved_with_its_schema_and_restored_exactly(tmp_path):
    model, optimizer, names = _stepped()
    save_optimizer(optimizer, names, tmp_path)
    assert json.loads((tmp_path / OPTIMIZER_JSON).read_text())["schema"] == OPTIMIZER_SCHEMA
    again = _fresh(model)
    assert load_optimizer(again, names, tmp_path)
    saved, restored = optimizer.state_dict()["state"], again.state_dict()["state"]
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[i][k], restored[i][k]) for i in saved for k in saved[i])


def test_state_written_before_it_carried_a_schema_still_resumes(tmp_path):
    model, optimizer, names = _stepped()
    save_optimizer(optimizer, names, tmp_path)
    info = json.loads((tmp_path / OPTIMIZER_JSON).read_text())
    del info["schema"]
    (tmp_path / OPTIMIZER_JSON).write_text(json.dumps(info))
    assert load_optimizer(_fresh(model), names, tmp_path)


def test_state_of_another_schema_or_model_is_refused(tmp_path):
    model, optimizer, names = _stepped()
    save_optimizer(optimizer, names, tmp_path)
    info = json.loads((tmp_path / OPTIMIZER_JSON).read_text())
    (tmp_path / OPTIMIZER_JSON).write_text(json.dumps({**info, "schema": "tempflow.optimizer/2"}))
    with pytest.raises(TempflowError, match="schema 'tempflow.optimizer/2'"):
        load_optimizer(_fresh(model), names, tmp_path)
    (tmp_path / OPTIMIZER_JSON).write_text(json.dumps(info))
    with pytest.raises(TempflowError, match="does not match the model's parameters"):
        load_optimizer(_fresh(model), ["other", "names"], tmp_path)
    assert load_optimizer(_fresh(model), names, tmp_path / "none") is False
