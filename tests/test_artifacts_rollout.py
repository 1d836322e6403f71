"""The rollout artifact as its readers see it (stages.artifacts.rollout): shards checked against the
manifest's sha256 and read as the bytes that were checked, manifests of another schema or with
impossible step records refused, every sample's meta.json and array headers checked."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stages.artifacts.rollout import check_manifest, check_meta
from stages.score import run_score
from stages.support.errors import TempflowError
from tests.conftest import (
    COMPRESSIBILITY,
    _assert_refused,
    _manifest,
    _one_error,
    _read_rollout,
    _rollout,
    _score_cli,
    _scored,
    _scored_by_cli,
    _update_cli,
    _WritesMarker,
    invoke,
    make_rollout,
)


def test_truncated_shard_is_refused(policy_dir, tmp_path):
    """A shard cut in half: score and update refuse (sha256), writing nothing."""
    rollout, scores = _scored(policy_dir, tmp_path)
    shard = rollout / _manifest(rollout)["shards"][0]["name"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])

    _assert_refused(_score_cli(rollout, tmp_path / "s.parquet"), tmp_path / "s.parquet", "sha256", shard.name)
    _assert_refused(_update_cli(policy_dir, rollout, scores, tmp_path / "new"), tmp_path / "new", "sha256", shard.name)


def test_flipped_byte_is_refused(policy_dir, tmp_path):
    """One byte flipped in a shard (same length): score and update refuse on the sha256."""
    rollout, scores = _scored(policy_dir, tmp_path)
    shard = rollout / _manifest(rollout)["shards"][-1]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))

    _assert_refused(_score_cli(rollout, tmp_path / "s.parquet"), tmp_path / "s.parquet", "sha256", shard.name)
    _assert_refused(_update_cli(policy_dir, rollout, scores, tmp_path / "new"), tmp_path / "new", "sha256")


@pytest.mark.parametrize("schema", ["tempflow.rollout/999", "tempflow.rollout/4"])
def test_rollout_of_another_schema_is_refused(policy_dir, tmp_path, schema):
    """A manifest of another schema (one from the future; the last one before states were stored once
    per branch group): score and update refuse, naming the schema found and the way out."""
    rollout, scores = _scored(policy_dir, tmp_path)
    manifest = _manifest(rollout)
    manifest["schema"] = schema
    (rollout / "manifest.json").write_text(json.dumps(manifest, indent=2))
    out = tmp_path / "s.parquet"
    _assert_refused(_score_cli(rollout, out), out, "schema", schema, "re-run `tempflow rollout`")
    new = tmp_path / "new"
    _assert_refused(_update_cli(policy_dir, rollout, scores, new), new, "schema", schema)


def test_pickled_npy_field_is_refused_without_unpickling(policy_dir, tmp_path):
    """A state.npy replaced by an object (pickle) array, hashes fixed: score refuses it from its header
    although it reads no arrays, and so does update with scores made to match; nothing is unpickled."""
    marker = tmp_path / "unpickled-marker"
    rollout = _rollout(policy_dir, tmp_path / "r")
    scores = tmp_path / "r.parquet"
    run_score(rollout, COMPRESSIBILITY, scores)
    key = "p00000_s000_k000_b00"
    # swap the sample's state.npy for a pickled object array
    manifest = _manifest(rollout)
    for shard in manifest["shards"]:
        path = rollout / shard["name"]
        with tarfile.open(path, mode="r:") as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        if not any(m.name == f"{key}.state.npy" for m, _ in members):
            continue
        buf = io.BytesIO()
        evil = np.empty(1, dtype=object)
        evil[0] = _WritesMarker(marker)
        np.save(buf, evil, allow_pickle=True)
        rebuilt = []
        for member, data in members:
            if member.name == f"{key}.state.npy":
                data = buf.getvalue()
                member.size = len(data)
            rebuilt.append((member, data))
        with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for member, data in rebuilt:
                tar.addfile(member, io.BytesIO(data))
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (rollout / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(TempflowError, match=f"{key} state.npy: not a plain float32"):
        run_score(rollout, COMPRESSIBILITY, tmp_path / "again.parquet")  # it reads meta and images only
    _rescore_for(scores, rollout)

    out = tmp_path / "new"
    _assert_refused(_update_cli(policy_dir, rollout, scores, out), out, ".npy", key)
    assert not marker.exists(), "state.npy was unpickled"


def _rescore_for(scores: Path, rollout: Path) -> None:
    """Point a scores file at the rollout's current manifest (as a forger who fixed every hash would)."""
    table = pq.read_table(scores)
    meta = json.loads(table.schema.metadata[b"tempflow"])
    meta["rollout_manifest_sha256"] = hashlib.sha256((rollout / "manifest.json").read_bytes()).hexdigest()
    pq.write_table(table.replace_schema_metadata({"tempflow": json.dumps(meta, sort_keys=True)}), scores)


def test_meta_without_required_fields_is_refused(policy_dir, tmp_path):
    """A meta.json that lost a field (hashes fixed): score refuses, naming the field, no traceback."""
    rollout = _rollout(policy_dir, tmp_path / "r")
    manifest = _manifest(rollout)
    path = rollout / manifest["shards"][0]["name"]
    with tarfile.open(path, mode="r:") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    index = next(i for i, (m, _) in enumerate(members) if m.name.endswith(".meta.json"))
    member, data = members[index]
    meta = json.loads(data)
    del meta["step"]
    data = json.dumps(meta).encode()
    member.size = len(data)
    members[index] = (member, data)
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m, d in members:
            tar.addfile(m, io.BytesIO(d))
    manifest["shards"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (rollout / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "s.parquet"
    _assert_refused(_score_cli(rollout, out), out, "lacks step")


def _good_meta(rollout: Path) -> tuple[dict, dict]:
    manifest = _manifest(rollout)
    first = next(iter(_read_rollout(rollout).values()))
    return json.loads(first["meta.json"]), manifest


def test_check_meta_refuses_a_step_the_rollout_did_not_train(policy_dir, tmp_path):
    meta, manifest = _good_meta(_rollout(policy_dir, tmp_path / "r", num_steps=4))
    manifest["trained_steps"] = [k for k in manifest["trained_steps"] if k != meta["step"]]
    with pytest.raises(TempflowError, match="not among the manifest's trained steps"):
        check_meta("k", meta, manifest)


@pytest.mark.parametrize("edit, problem", [
    ({"step": 3}, "not a trainable step"),  # T = 4: steps 0..2 are trained, 3 is the last
    ({"step": True}, "not a trainable step"),
    ({"prompt_index": 7}, "does not name its prompt"),
    ({"prompt": "another prompt"}, "does not name its prompt"),
    ({"sigma": 0.123}, "are not step"),
    ({"log_prob": float("nan")}, "not a finite number"),
    ({"log_prob": "0.5"}, "not a finite number"),
    ({"seed": 1.5}, "seed and branch"),
    ({"branch": "0"}, "seed and branch"),
    ({"group": 3}, "seed and branch"),
    ({"algo": "flow-grpo"}, "is not the manifest's"),
    ({"image_key": "a.b"}, "is not a sample key"),
    ({"noise_seed": "7"}, "noise_seed must be an integer"),
    ({"std": None}, "std a number"),
    ({"next_sha256": 0}, "next_sha256 a string"),
])
def test_check_meta_refuses_each_kind_of_damage(policy_dir, tmp_path, edit, problem):
    """Each branch of check_meta on its own: one field edited in an otherwise valid meta."""
    meta, manifest = _good_meta(_rollout(policy_dir, tmp_path / "r", num_steps=4))
    check_meta("k", meta, manifest)  # the untouched meta passes
    with pytest.raises(TempflowError, match=f"sample k: .*{problem}"):
        check_meta("k", {**meta, **edit}, manifest)


def test_fixed_branch_steps_record_no_chances(policy_dir, tmp_path):
    rollout = make_rollout(policy_dir, tmp_path / "r", num_steps=6, branch_steps="0,3")
    manifest = _manifest(rollout)
    manifest["step_inclusion"] = [0.4] * 5
    with pytest.raises(TempflowError, match="draws nothing"):
        check_manifest(manifest, rollout / "manifest.json")


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.update(step_inclusion=[0.5] * 5), "step_inclusion"),  # sums to 2.5 for 2 steps
    (lambda m: m.update(step_inclusion=[1.0, 1.0, 0.0, 0.0, 0.0]), "step_inclusion"),
    (lambda m: m.update(step_inclusion=[0.4] * 4), "step_inclusion"),
    (lambda m: m.update(trained_steps=[3, 1]), "trained_steps"),
    (lambda m: m.update(trained_steps=[0, 5]), "trained_steps"),
    (lambda m: m.update(decodes=-1), "decodes"),
    (lambda m: m.update(step_inclusion=[1.0, 0.25, 0.25, 0.25, 0.25], trained_steps=[1, 2]), "step_inclusion"),
    (lambda m: m.update(step_inclusion=None), "step_inclusion"),  # sampled:2 drew its steps
    (lambda m: m.update(step_spread=[1.0] * 5), "step_spread"),  # sampled:2 does not draw by spread
])
def test_manifest_with_bad_step_records_is_refused(policy_dir, tmp_path, edit, field):
    rollout = make_rollout(policy_dir, tmp_path / "r", num_steps=6, branch_steps="sampled:2")
    manifest = _manifest(rollout)
    check_manifest(manifest, rollout / "manifest.json")
    edit(manifest)
    with pytest.raises(TempflowError, match=field):
        check_manifest(manifest, rollout / "manifest.json")


def test_update_racing_rollout_overwrite_trains_on_the_verified_rollout(policy_dir, tmp_path, monkeypatch):
    """`rollout --overwrite` replaces the rollout while an update is reading it: the update's new
    policy equals one trained on an untouched copy of the old rollout (issue 13 item 4 mixed both)."""
    from safetensors.torch import load_file

    import stages.update

    rollout, scores = _scored_by_cli(policy_dir, tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(rollout, copy)
    reference_out = tmp_path / "reference"
    assert invoke("update", "--policy", policy_dir, "--rollout", copy, "--rewards", scores, "--out", reference_out,
                  "--beta", 0).exit_code == 0
    real_plan = stages.update.plan_update

    def plan_then_race(opened, scores_path, config):
        plan = real_plan(opened, scores_path, config)
        make_rollout(policy_dir, tmp_path / "r2", seed=7)
        shutil.rmtree(rollout)  # what `rollout --overwrite` does to the old folder once the new one is in place
        shutil.move(tmp_path / "r2", rollout)
        return plan

    monkeypatch.setattr(stages.update, "plan_update", plan_then_race)
    out = tmp_path / "new"
    result = invoke("update", "--policy", policy_dir, "--rollout", rollout, "--rewards", scores, "--out", out, "--beta", 0)
    assert result.exit_code == 0, result.output
    weights = "transformer/diffusion_pytorch_model.safetensors"
    new, expected = load_file(out / weights), load_file(reference_out / weights)
    assert new.keys() == expected.keys() and all(torch.equal(new[k], expected[k]) for k in new)


def test_a_shard_changed_in_place_while_training_stops_the_update(policy_dir, tmp_path, monkeypatch):
    """A shard rewritten in place (same file) after the update verified it: the update stops, writes nothing."""
    import stages.update

    rollout, scores = _scored_by_cli(policy_dir, tmp_path)
    real_plan = stages.update.plan_update
    shard = rollout / "shard-000000.tar"

    def plan_then_tamper(opened, scores_path, config):
        plan = real_plan(opened, scores_path, config)
        with open(shard, "r+b") as f:
            f.seek(-1000, os.SEEK_END)
            f.write(b"\x01" * 10)  # in the padding after the end-of-archive blocks: still a readable tar
        return plan

    monkeypatch.setattr(stages.update, "plan_update", plan_then_tamper)
    out = tmp_path / "new"
    _one_error(invoke("update", "--policy", policy_dir, "--rollout", rollout, "--rewards", scores, "--out", out,
                      "--beta", 0), "changed while it was being read")
    assert not out.exists()
