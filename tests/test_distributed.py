"""Several processes under torchrun (gloo on the CPU): the ranks' shares, and a 2-process rollout
whose samples are those of one process with the same config, key for key and byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.distributed import Ranks, rank_device, ranks
from stages.errors import TempflowError
from tests.conftest import invoke

TEMPFLOW = str(Path(sys.executable).parent / "tempflow")


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


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    from stages.artifacts import Rollout

    with Rollout(folder) as opened:
        return {s.key: dict(s.fields) for s in opened.samples()}


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           TEMPFLOW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("algo", ["tempflow", "flow-grpo"])
def test_two_process_rollout_has_the_samples_of_one(policy_dir, prompts_file, tmp_path, algo):
    """torchrun with 2 ranks: the same sample keys and bytes as one process; each rank wrote its own
    shards; one manifest with the whole rollout's counts; the score stage reads it like any other."""
    import torch

    torch.set_num_threads(1)  # the ranks run one thread each: the same kernels as here
    options = ["--policy", str(policy_dir), "--prompts", str(prompts_file), "--algo", algo, "--num-steps", "4",
               "--seeds-per-prompt", "3", "--branches", "2", "--batch-size", "2", "--samples-per-shard", "5"]
    one = invoke("rollout", *options, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    two = _torchrun("rollout", *options, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("rollout ") == 1  # rank 0's summary only

    a, b = _samples(tmp_path / "one"), _samples(tmp_path / "two")
    assert sorted(a) == sorted(b)
    assert all(a[key] == b[key] for key in a), [key for key in a if a[key] != b[key]][:3]
    m1, m2 = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("one", "two"))
    for field in ("samples", "nfe", "decodes", "prompts", "trained_steps", "config", "embeddings"):
        assert m1[field] == m2[field], field
    names = [shard["name"] for shard in m2["shards"]]
    assert any(n.startswith("shard-r000-") for n in names) and any(n.startswith("shard-r001-") for n in names)
    assert sorted(p.name for p in (tmp_path / "two").glob("*.tar")) == sorted(names)
    assert not [p for p in tmp_path.iterdir() if p.name not in ("one", "two", "policy", "prompts.txt")]  # no partials
    scored = invoke("score", "--rollout", tmp_path / "two", "--reward", "jpeg_compressibility", "--out", tmp_path / "s.parquet")
    assert scored.exit_code == 0, scored.output
