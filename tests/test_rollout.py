"""The rollout stage (stages.rollout): what a rollout holds for each algorithm (branches, chained
transitions, a window), its manifest's hashes, counts and NFE, byte-identical reruns, the writer
thread, drawn branch steps and cheap finishes, two processes under torchrun, and a Ctrl-C or a broken
policy that leaves nothing behind."""

from __future__ import annotations

import hashlib
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.artifacts.rollout import ROLLOUT_SCHEMA, Rollout, check_manifest
from stages.artifacts.rollout_config import RolloutConfig
from stages.flow import inclusion_probabilities, spread_weights
from stages.score import run_score
from stages.support.errors import TempflowError
from stages.update import UpdateConfig
from tests.conftest import (
    COMPRESSIBILITY,
    PROMPTS,
    _manifest,
    _one_error,
    _partials,
    _read_rollout,
    _read_shard,
    _rollout,
    _snapshot,
    _torchrun,
    independent_next,
    invoke,
    make_rollout,
)

META_FIELDS = ("prompt", "prompt_index", "seed", "group", "step", "branch", "sigma", "sigma_next", "log_prob", "algo",
               "noise_seed", "std", "next_sha256")


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_tempflow_branches_share_state_and_differ_in_next(policy_dir, tmp_path):
    """tempflow: the K branches of one (prompt, seed, step) share x_k, stored once by branch 0 ahead of
    the others, which name it; their x_{k+1} (made from the stored mean and each noise seed, outside
    stages) match their digests and differ; meta is complete."""
    T, K = 4, 3
    rollout = _rollout(policy_dir, tmp_path / "r", num_steps=T, branches=K)
    manifest = _manifest(rollout)
    samples = _read_rollout(rollout)
    order = list(samples)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for key, fields in samples.items():
        assert "." not in key and key, key
        meta = json.loads(fields["meta.json"])
        holder = key if meta["branch"] == 0 else meta["state_key"]
        if meta["branch"] == 0:
            assert {"meta.json", "state.npy", "mean.npy", "image.png"} == set(fields) and meta["state_refs"] == K - 1
        else:
            assert {"meta.json", "image.png"} == set(fields) and "state_refs" not in meta, (key, sorted(fields))
            assert order.index(holder) < order.index(key), f"{key} comes before the sample holding its state"
        missing = [f for f in META_FIELDS if f not in meta]
        assert not missing, (key, missing)
        assert meta["algo"] == "tempflow"
        assert isinstance(meta["group"], str)
        assert 0 <= meta["step"] <= T - 2, (key, meta["step"])
        assert 0 <= meta["branch"] < K
        assert meta["prompt"] == PROMPTS[meta["prompt_index"]]
        assert meta["sigma"] == pytest.approx(manifest["sigmas"][meta["step"]])
        assert meta["sigma_next"] == pytest.approx(manifest["sigmas"][meta["step"] + 1])
        assert np.isfinite(meta["log_prob"])
        state, nxt = _npy(samples[holder]["state.npy"]), independent_next(samples[holder], meta)
        assert state.dtype == nxt.dtype == np.float32
        assert list(state.shape) == list(nxt.shape) == manifest["sample_shape"]
        groups[(meta["prompt_index"], meta["seed_index"], meta["step"])].append(
            {"meta": meta, "holder": holder, "next": nxt.tobytes()})
    N = 2 * 2  # prompts x seeds
    assert len(groups) == N * (T - 1)
    for where, members in groups.items():
        assert sorted(m["meta"]["branch"] for m in members) == list(range(K)), where
        assert len({m["holder"] for m in members}) == 1, f"{where}: branches start from different x_k"
        assert len({m["next"] for m in members}) == K, f"{where}: two branches sampled the same x_(k+1)"
        assert len({m["meta"]["group"] for m in members}) == 1, where
    assert len({members[0]["meta"]["group"] for members in groups.values()}) == len(groups)


def test_flow_grpo_transitions_chain_and_share_one_image(policy_dir, tmp_path):
    """flow-grpo: x_(k+1) of step k is state.npy of step k+1; each transition holds its own x_k; one
    image per trajectory, named by the others."""
    T = 4
    rollout = _rollout(policy_dir, tmp_path / "r", algo="flow-grpo", num_steps=T)
    trajectories: dict[tuple, dict[int, tuple[str, dict, dict]]] = defaultdict(dict)
    for key, fields in _read_rollout(rollout).items():
        meta = json.loads(fields["meta.json"])
        assert meta["algo"] == "flow-grpo"
        assert meta["step"] not in trajectories[(meta["prompt_index"], meta["seed_index"])]
        trajectories[(meta["prompt_index"], meta["seed_index"])][meta["step"]] = (key, meta, fields)
    assert len(trajectories) == 2 * 2
    for where, steps in trajectories.items():
        assert sorted(steps) == list(range(T - 1)), where
        for k in range(T - 2):
            nxt = independent_next(steps[k][2], steps[k][1])
            assert nxt.tobytes() == _npy(steps[k + 1][2]["state.npy"]).tobytes(), f"{where}: step {k} -> {k + 1} breaks"
        assert all(meta["state_refs"] == 0 and "state_key" not in meta for _, meta, _ in steps.values())
        owners = [key for key, _, fields in steps.values() if "image.png" in fields]
        assert len(owners) == 1, f"{where}: {len(owners)} samples carry image.png"
        for key, meta, fields in steps.values():
            if key != owners[0]:
                assert meta.get("image_key") == owners[0], (where, key, meta.get("image_key"))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("window", [2, 3])
def test_flow_grpo_fast_writes_only_its_window(policy_dir, tmp_path, seed, window):
    """flow-grpo-fast: each trajectory has exactly `window` consecutive steps, starting in [0, T//2 - window]."""
    T = 8
    rollout = _rollout(policy_dir, tmp_path / "r", prompts=PROMPTS[:1], algo="flow-grpo-fast",
                       num_steps=T, window=window, seed=seed)
    per_traj: dict[tuple, list[int]] = defaultdict(list)
    for fields in _read_rollout(rollout).values():
        meta = json.loads(fields["meta.json"])
        per_traj[(meta["prompt_index"], meta["seed_index"])].append(meta["step"])
    assert len(per_traj) == 2
    for where, steps in per_traj.items():
        steps.sort()
        assert len(steps) == window, (where, steps)
        assert steps == list(range(steps[0], steps[0] + window)), (where, steps)
        assert 0 <= steps[0] <= T // 2 - window, (where, steps)
        assert steps == _manifest(rollout)["trained_steps"]


@pytest.mark.parametrize("algo, T, branch_steps, K", [
    ("tempflow", 4, "all", 2),
    ("tempflow", 5, "all", 3),
    ("tempflow", 5, "1", 2),
    ("tempflow", 6, "0,2", 2),
    ("tempflow", 6, "first:2", 2),
    ("tempflow", 6, "sampled:2", 2),
    ("tempflow", 6, "weighted:3", 2),
    ("tempflow", 6, "spread:2", 2),
    ("flow-grpo", 4, "all", 2),
    ("flow-grpo-fast", 6, "all", 2),
])
def test_manifest_hashes_counts_and_nfe(policy_dir, tmp_path, algo, T, branch_steps, K):
    """The manifest's shard sha256, sample count and NFE match the shards and the documented cost."""
    rollout = _rollout(policy_dir, tmp_path / "r", algo=algo, num_steps=T, branch_steps=branch_steps,
                       branches=K, samples_per_shard=7)
    manifest = _manifest(rollout)
    assert manifest["schema"] == ROLLOUT_SCHEMA == "tempflow.rollout/5"
    listed = [s["name"] for s in manifest["shards"]]
    assert sorted(p.name for p in rollout.glob("*.tar")) == sorted(listed)
    read = 0
    for shard in manifest["shards"]:
        path = rollout / shard["name"]
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), shard["name"]
        in_shard = len(_read_shard(path))
        assert shard["samples"] == in_shard
        read += in_shard
    assert manifest["samples"] == read == len(_read_rollout(rollout))

    N = len(PROMPTS[:2]) * 2
    if algo == "tempflow":
        if branch_steps.startswith(("sampled:", "weighted:", "spread:")):  # drawn: N distinct steps, the draw recorded
            B = manifest["trained_steps"]
            assert len(B) == len(set(B)) == int(branch_steps.split(":")[1]) and B == sorted(B)
            assert sum(manifest["step_inclusion"]) == pytest.approx(len(B))
        else:
            B = list(range(T - 1)) if branch_steps == "all" else (
                list(range(int(branch_steps[6:]))) if branch_steps.startswith("first:")
                else sorted(int(s) for s in branch_steps.split(",")))
            assert manifest["trained_steps"] == B and manifest["step_inclusion"] is None
        expected = N * (max(B) + 1) + N * K * sum(T - k - 1 for k in B)
        assert read == manifest["decodes"] == N * K * len(B)
    else:
        expected = N * T
        assert manifest["decodes"] == N  # one image per trajectory
    assert manifest["nfe"] == expected


def test_same_config_gives_identical_bytes_other_seed_differs(policy_dir, tmp_path):
    """The same seed and config twice give byte-identical shards and manifest; another seed changes the shards."""
    a = _rollout(policy_dir, tmp_path / "a", seed=5)
    b = _rollout(policy_dir, tmp_path / "b", seed=5)
    files_a, files_b = _snapshot(a), _snapshot(b)
    for files in (files_a, files_b):  # the one file a rerun changes: the wall-clock seconds, beside the manifest
        assert json.loads(files.pop("timing.json"))["seconds"] > 0
    assert sorted(files_a) == sorted(files_b)
    assert "manifest.json" in files_a and len(files_a) > 2
    for name in files_a:
        assert files_a[name] == files_b[name], f"{name} differs between two identical runs"

    c = _rollout(policy_dir, tmp_path / "c", seed=6)
    files_c = _snapshot(c)
    shards = [n for n in files_a if n.endswith(".tar")]
    assert shards
    for name in shards:
        assert files_c.get(name) != files_a[name], f"{name} is the same under another seed"


@pytest.mark.parametrize("algo", ["tempflow", "flow-grpo"])
def test_the_writer_thread_writes_the_bytes_of_writing_inline(policy_dir, tmp_path, algo):
    """Samples encoded and written on the writer thread (the default) give the same shards and
    manifest, byte for byte, as writing each one on the sampling thread; several shards, images
    stored once per trajectory (flow-grpo) included."""
    inline = _snapshot(_rollout(policy_dir, tmp_path / "inline", algo=algo, background_writes=False, samples_per_shard=3))
    threaded = _snapshot(_rollout(policy_dir, tmp_path / "threaded", algo=algo, samples_per_shard=3))
    for files in (inline, threaded):
        files.pop("timing.json")
    assert sorted(inline) == sorted(threaded) and sum(n.endswith(".tar") for n in inline) > 2
    for name in inline:
        assert inline[name] == threaded[name], f"{name} differs with the writer thread"


def test_an_error_on_the_writer_thread_fails_the_rollout_and_leaves_nothing(policy_dir, tmp_path, monkeypatch):
    """A sample that cannot be encoded (here: its PNG) stops the rollout with that error, raised in the
    caller; the writer thread is gone and no output or partial folder is left."""
    import threading

    import stages.artifacts.rollout

    def broken_png(image):
        raise OSError("disk full while encoding a PNG")

    monkeypatch.setattr(stages.artifacts.rollout, "png_bytes", broken_png)
    with pytest.raises(OSError, match="disk full"):
        _rollout(policy_dir, tmp_path / "r")
    assert not (tmp_path / "r").exists() and _partials(tmp_path / "r") == []
    assert not [t for t in threading.enumerate() if t.name == "tempflow-shard-writer"]


def test_interrupted_rollout_leaves_nothing_and_rerun_succeeds(policy_dir, prompts_file, tmp_path, monkeypatch):
    """Ctrl-C after a few samples of a rollout: exit 130, 'interrupted', no output, no partial; a rerun succeeds."""
    from stages.artifacts.shards import ShardWriter

    out = tmp_path / "r"
    args = ("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", out,
            "--num-steps", 4, "--branches", 2, "--samples-per-shard", 4)
    real_write, calls = ShardWriter.write, []

    def write_then_interrupt(self, key, fields):
        calls.append(key)
        if len(calls) > 6:  # one shard closed, another half written
            raise KeyboardInterrupt
        return real_write(self, key, fields)

    with monkeypatch.context() as patch:
        patch.setattr(ShardWriter, "write", write_then_interrupt)
        result = invoke(*args)
    assert len(calls) == 7
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr
    assert not out.exists() and _partials(out) == []

    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert _manifest(out)["samples"] == len(_read_rollout(out)) and _partials(out) == []


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """Each sample's meta, image, and x_k and x_(k+1) as read back (``state``, ``next``)."""
    with Rollout(folder) as rollout:
        return {s.key: {**s.fields, "state": s.state().tobytes(), "next": s.next().tobytes()}
                for s in rollout.samples() if "image.png" in s.present}


def test_weighted_rollout_writes_the_all_steps_transitions_of_its_drawn_steps(policy_dir, tmp_path):
    """The branch noise does not depend on which steps were drawn: a weighted:2 rollout's samples are
    the all-steps rollout's samples of its two steps, byte for byte; its manifest records the draw."""
    every = make_rollout(policy_dir, tmp_path / "all", num_steps=6, seed=4)
    drawn = make_rollout(policy_dir, tmp_path / "w", num_steps=6, seed=4, branch_steps="weighted:2")
    manifest = _manifest(drawn)
    steps = manifest["trained_steps"]
    assert len(steps) == 2 and sum(manifest["step_inclusion"]) == pytest.approx(2.0)
    all_samples, drawn_samples = _samples(every), _samples(drawn)
    assert sorted(drawn_samples) == sorted(k for k in all_samples if int(k.split("_k")[1][:3]) in steps)
    for key, fields in drawn_samples.items():
        for name in ("meta.json", "state", "next"):
            assert fields[name] == all_samples[key][name], (key, name)
    T, n = 6, len(PROMPTS) * 2
    assert manifest["nfe"] == n * (steps[-1] + 1) + n * 2 * sum(T - k - 1 for k in steps)
    assert manifest["decodes"] == n * 2 * len(steps)


def test_spread_draws_follow_the_sampling_policys_measured_spread(policy_dir, tmp_path):
    """spread:2 from a base (nothing measured) draws by the noise-aware weights and records no
    spread; its update measures the two branched steps; the next rollout draws by that policy's
    spread, and the next update carries the steps it did not branch at."""
    from stages.update import run_update

    first = make_rollout(policy_dir, tmp_path / "r1", num_steps=6, branch_steps="spread:2", seed=2)
    weighted = make_rollout(policy_dir, tmp_path / "w", num_steps=6, branch_steps="weighted:2", seed=2)
    assert _manifest(first)["step_spread"] is None
    assert _manifest(first)["step_inclusion"] == _manifest(weighted)["step_inclusion"]
    run_score(first, COMPRESSIBILITY, tmp_path / "s1.parquet")
    spread = run_update(policy_dir, first, tmp_path / "s1.parquet", tmp_path / "p1", UpdateConfig(beta=0.0)).metrics[
        "step_reward_spread"]
    drawn = _manifest(first)["trained_steps"]
    assert [k for k, s in enumerate(spread) if s is not None] == drawn and all(spread[k] > 0 for k in drawn)

    second = make_rollout(tmp_path / "p1", tmp_path / "r2", num_steps=6, branch_steps="spread:2", seed=5)
    manifest = _manifest(second)
    assert manifest["step_spread"] == pytest.approx(spread_weights(spread))
    assert manifest["step_inclusion"] == pytest.approx(inclusion_probabilities(spread_weights(spread), 2))
    assert manifest["trained_steps"] == RolloutConfig(num_steps=6, branch_steps="spread:2", seed=5).step_plan(
        spread=spread).steps
    for edit in ([1.0] * 4, [0.0] + [1.0] * 4, [1.0, 2.0, 3.0, 4.0, 5.0]):  # short, a zero, other chances
        with pytest.raises(TempflowError, match="step_spread|step_inclusion"):
            check_manifest({**manifest, "step_spread": edit}, second / "manifest.json")
    with pytest.raises(TempflowError, match="step_spread"):  # a rollout that draws nothing records no weights
        check_manifest({**_manifest(make_rollout(policy_dir, tmp_path / "all", num_steps=6)), "step_spread": [1.0] * 5},
                       second / "manifest.json")
    run_score(second, COMPRESSIBILITY, tmp_path / "s2.parquet")
    carried = run_update(tmp_path / "p1", second, tmp_path / "s2.parquet", tmp_path / "p2", UpdateConfig(beta=0.0)).metrics[
        "step_reward_spread"]
    for k in range(5):
        if k in manifest["trained_steps"]:
            assert carried[k] is not None and carried[k] > 0
        else:
            assert carried[k] == spread[k]


def test_cheap_finish_counts_its_nfe_and_keeps_the_trained_transitions(policy_dir, tmp_path):
    """--finish-steps 2 at T = 6 finishes along [[1,3,6],[2,4,6],[3,5,6],[4,5,6],[5,6]]: 9 forward passes per
    branch set instead of 15. The trained transitions (x_k, x_{k+1}, log p) are those of the full finish;
    the early steps' images differ."""
    full = make_rollout(policy_dir, tmp_path / "full", num_steps=6, seed=2)
    cheap = make_rollout(policy_dir, tmp_path / "cheap", num_steps=6, seed=2, finish_steps=2)
    n, K = len(PROMPTS) * 2, 2
    assert _manifest(cheap)["nfe"] == n * 5 + n * K * 9
    assert _manifest(full)["nfe"] == n * 5 + n * K * 15
    assert _manifest(cheap)["decodes"] == _manifest(full)["decodes"] == n * K * 5
    a, b = _samples(full), _samples(cheap)
    assert sorted(a) == sorted(b)
    for key in a:
        for name in ("meta.json", "state", "next"):
            assert a[key][name] == b[key][name], (key, name)
    assert any(a[key]["image.png"] != b[key]["image.png"] for key in a if "_k000_" in key)


def test_rollout_of_a_broken_policy_stops_before_writing(policy_dir, prompts_file, tmp_path):
    """Weights of 1e30 (finite, as a learning rate of 1e30 left them): the velocity is not finite,
    the rollout says so and writes no NaN log-prob."""
    from stages.policies.base import load_policy, save_policy

    policy, record = load_policy(policy_dir)
    with torch.no_grad():
        for param in policy.trainable().parameters():
            param.mul_(1e30)
    broken = tmp_path / "broken"
    save_policy(policy, broken, record)
    out = tmp_path / "r"
    _one_error(invoke("rollout", "--policy", broken, "--prompts", prompts_file, "--out", out), "NaN or infinite")
    assert not out.exists()


def _all_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    from stages.artifacts.rollout import Rollout

    with Rollout(folder) as opened:
        return {s.key: dict(s.fields) for s in opened.samples()}


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

    a, b = _all_samples(tmp_path / "one"), _all_samples(tmp_path / "two")
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
