"""The ranks of a torchrun job (stages.support.distributed): one process without torchrun, the ranks
read from its environment, an impossible environment refused, shares that cover every item once."""

from __future__ import annotations

import pytest

from stages.support.distributed import Ranks, rank_device, ranks
from stages.support.errors import TempflowError


def test_one_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert ranks() == Ranks(0, 1, 0) and ranks().main
    assert rank_device("cuda") == "cuda"


def test_ranks_from_torchruns_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    here = ranks()
    assert here == Ranks(2, 4, 1) and not here.main
    assert here.share(list(range(10))) == [2, 6]
    assert rank_device("cuda") == "cuda:1" and rank_device("cpu") == "cpu"


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "0"}, {"RANK": "x"}])
def test_an_impossible_environment_is_refused(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(TempflowError, match="RANK|WORLD_SIZE"):
        ranks()


def test_shares_cover_everything_once():
    items = list(range(11))
    parts = [Ranks(r, 3).share(items) for r in range(3)]
    assert sorted(x for part in parts for x in part) == items
