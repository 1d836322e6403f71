"""The recommender's transformer (stages.recsys.model): Polyak averaging, the start token never an
action, and initialisation from a local GPT-2 folder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages.recsys import losses
from stages.recsys.model import RecModelConfig, RecTransformer, polyak
from stages.support.errors import TempflowError
from tests.conftest import _gpt2_folder


def test_polyak():
    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    before = a.weight.detach().clone()
    polyak(a, b, 0.25)
    torch.testing.assert_close(a.weight, 0.75 * before + 0.25 * b.weight)


def test_the_start_token_is_never_an_action():
    model = RecTransformer(5, RecModelConfig(layers=1, heads=1, width=8, context=4, dropout=0.0))
    logits, q = model(torch.tensor([[0, 1, 2]]))
    assert logits.shape == q.shape == (1, 3, 6) and torch.isinf(logits[..., 0]).all()
    assert (q.argmax(-1) > 0).all() and (q[..., 0] < q[..., 1:].min()).all()  # no max or argmax picks it
    assert torch.isfinite(losses.expected_value(F.softmax(logits, -1), q)).all()  # pi(0) Q(0) = 0, not NaN


def test_init_from_a_local_gpt2_folder(tmp_path):
    from transformers import GPT2Model

    from stages.recsys.model import init_from_gpt2

    folder = _gpt2_folder(tmp_path)
    model = RecTransformer(7, RecModelConfig(layers=1, heads=2, width=16, context=8))
    record = init_from_gpt2(model, folder)
    source = GPT2Model.from_pretrained(folder).state_dict()
    mine = model.transformer.state_dict()
    assert record["loaded"] == len(source) - 1  # all but the word embeddings
    torch.testing.assert_close(mine["wpe.weight"], source["wpe.weight"][:9])
    for name in ("h.0.attn.c_attn.weight", "h.0.mlp.c_proj.bias", "ln_f.weight"):
        assert torch.equal(mine[name], source[name]), name
    with pytest.raises(TempflowError, match="pass --width 16"):
        init_from_gpt2(RecTransformer(7, RecModelConfig(layers=1, heads=2, width=32, context=8)), folder)
    with pytest.raises(TempflowError, match="64 positions"):
        init_from_gpt2(RecTransformer(7, RecModelConfig(layers=1, heads=2, width=16, context=100)), folder)
    with pytest.raises(TempflowError, match="no config.json"):
        init_from_gpt2(model, tmp_path)
