"""Several processes under torchrun (gloo on the CPU): the ranks' shares, and a 2-process rollout
whose samples are those of one process with the same config, key for key and byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.support.distributed import Ranks, rank_device, ranks
from stages.support.errors import TempflowError
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
    from stages.artifacts.rollout import Rollout

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


def _scored_rollout(policy_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    from stages.rewards import parse_reward_spec
    from stages.score import run_score
    from tests.conftest import make_rollout

    rollout = make_rollout(policy_dir, tmp_path / "r", num_steps=4, branches=3)
    run_score(rollout, [parse_reward_spec("jpeg_compressibility")], tmp_path / "s.parquet")
    return rollout, tmp_path / "s.parquet"


def test_a_rank_without_rows_computes_one_that_weighs_nothing(policy_dir, tmp_path):
    from stages.artifacts.rollout import Rollout
    from stages.update import UpdateConfig, _rank_batch, plan_update

    rollout, scores = _scored_rollout(policy_dir, tmp_path)
    with Rollout(rollout) as opened:
        plan = plan_update(opened, scores, UpdateConfig())
        samples = list(opened.samples(fields=("meta.json", "state.npy", "next.npy")))[:3]
        whole = _rank_batch(samples, plan, opened.manifest, Ranks())
        first, second = (_rank_batch(samples, plan, opened.manifest, Ranks(r, 2)) for r in (0, 1))
        alone = [_rank_batch(samples[:1], plan, opened.manifest, Ranks(r, 2)) for r in (0, 1)]
    assert (whole.scale, whole.global_size, len(whole.prompt_index)) == (1.0, 3, 3)
    assert (first.scale, len(first.prompt_index)) == (2 * 2 / 3, 2) and (second.scale, len(second.prompt_index)) == (2 / 3, 1)
    assert torch_equal(first.state, whole.state[[0, 2]]) and torch_equal(second.state, whole.state[[1]])
    assert (alone[0].scale, alone[1].scale) == (2.0, 0.0) and len(alone[1].prompt_index) == 1


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_merged_stats_are_the_global_batchs():
    """Two ranks' sums, by hand: losses are scaled shares (their mean over ranks is the global
    mean), counts add up, extremes are the extremes, the gradient norm is the shared one."""
    from stages.update import Stats, merge_stats

    a = Stats(steps=2, loss=1.2, policy_loss=1.0, kl=0.4, clipped=1, samples=6, ratio_min=0.9, ratio_max=1.05,
              ratio_sum=6.1, grad_norms=[0.5, 0.7], first_step_ratio_deviation=1e-7)
    b = Stats(steps=2, loss=0.6, policy_loss=0.2, kl=0.2, clipped=3, samples=4, ratio_min=0.95, ratio_max=1.2,
              ratio_sum=3.9, grad_norms=[0.5, 0.7], first_step_ratio_deviation=3e-7)
    m = merge_stats([a, b])
    assert (m.steps, m.clipped, m.samples, m.grad_norms) == (2, 4, 10, [0.5, 0.7])
    assert m.loss == (1.2 + 0.6) / 2 and m.policy_loss == (1.0 + 0.2) / 2 and m.kl == (0.4 + 0.2) / 2
    assert (m.ratio_min, m.ratio_max, m.ratio_sum, m.first_step_ratio_deviation) == (0.9, 1.2, 10.0, 3e-7)


def test_two_process_update_matches_one(policy_dir, tmp_path):
    """torchrun with 2 ranks (DistributedDataParallel over gloo), uneven shares of a batch of 7, two
    inner epochs, the KL on: the new weights are the one-process update's within float tolerance,
    the metrics too; only rank 0 wrote."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    rollout, scores = _scored_rollout(policy_dir, tmp_path)
    options = ["--policy", str(policy_dir), "--rollout", str(rollout), "--rewards", str(scores), "--learning-rate", "1e-2",
               "--batch-size", "7", "--inner-epochs", "2", "--beta", "0.04"]
    one = invoke("update", *options, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    two = _torchrun("update", *options, "--out", str(tmp_path / "two"), cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    name = "transformer/diffusion_pytorch_model.safetensors"
    start, a, b = (load_file(folder / name) for folder in (policy_dir, tmp_path / "one", tmp_path / "two"))
    assert any(not torch.equal(start[k], a[k]) for k in a)  # it trained
    for key in a:  # Adam at lr 1e-2 moves a weight by up to ~1e-2 a step; float rounding differs by ~1e-6
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    apart = max(float((b[k] - a[k]).abs().max()) for k in a)
    assert apart < 1e-3 * moved, (apart, moved)
    m1, m2 = (json.loads((tmp_path / folder / "metrics.json").read_text()) for folder in ("one", "two"))
    assert m1["optimizer_steps"] == m2["optimizer_steps"] == 2 * -(-m1["trained_samples"] // 7)
    assert m2["trained_samples"] == m1["trained_samples"] and m2["first_step_ratio_deviation"] < 1e-5
    for key in ("loss", "policy_loss", "kl", "grad_norm", "ratio_mean", "ratio_min", "ratio_max", "clip_fraction"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-3, abs=1e-7), key


def test_two_process_score_gives_the_one_process_scores(policy_dir, tmp_path):
    """Each rank scores every other image; rank 0 writes the one parquet: the same table."""
    import pyarrow.parquet as pq

    from tests.conftest import make_rollout

    rollout = make_rollout(policy_dir, tmp_path / "r", num_steps=4, branches=3)
    options = ["--rollout", str(rollout), "--reward", "jpeg_compressibility", "--reward", "shapes:0.5", "--batch-size", "4"]
    one = invoke("score", *options, "--out", tmp_path / "one.parquet")
    assert one.exit_code == 0, one.output
    two = _torchrun("score", *options, "--out", str(tmp_path / "two.parquet"), cwd=tmp_path)
    assert two.returncode == 0, two.stdout + two.stderr
    assert pq.read_table(tmp_path / "one.parquet").equals(pq.read_table(tmp_path / "two.parquet"))


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
