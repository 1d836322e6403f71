"""A policy folder's record (stages.artifacts.policy): written with its schema, read back checked; a
record of the days its version key was ``format`` still reads; a missing, damaged or foreign
config.json and a policy without identity refused."""

from __future__ import annotations

import json

import pytest

from stages.artifacts.policy import POLICY_SCHEMA, PolicyRecord, read_policy_record, write_policy_record
from stages.policies.base import load_policy
from stages.support.errors import TempflowError
from tests.conftest import _one_error, invoke

IDENTITY = "ab" * 32


def test_a_record_is_written_with_its_schema_and_read_back(tmp_path):
    write_policy_record(tmp_path, PolicyRecord(kind="tiny", model={"image_size": 16}, step=3, identity=IDENTITY))
    assert json.loads((tmp_path / "config.json").read_text())["schema"] == POLICY_SCHEMA
    assert read_policy_record(tmp_path) == PolicyRecord(kind="tiny", model={"image_size": 16}, step=3, identity=IDENTITY)


def test_a_policy_written_before_the_key_was_schema_still_loads(policy_dir):
    config = json.loads((policy_dir / "config.json").read_text())
    config["format"] = config.pop("schema")
    (policy_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    policy, record = load_policy(policy_dir)
    assert record.identity == config["identity"] == policy.identity()


@pytest.mark.parametrize("edit, says", [
    (lambda c: c.update(schema="tempflow.policy/2"), "schema 'tempflow.policy/2', this tempflow reads 'tempflow.policy/1'"),
    (lambda c: c.update(kind="gan"), "unknown policy kind 'gan'"),
    (lambda c: c.update(step=-1), "step -1 is not a count of updates"),
    (lambda c: c.update(identity="abc"), "is not the sha256 of its weights"),
    (lambda c: c.update(colour="red"), "unexpected policy fields"),
])
def test_a_record_of_another_shape_is_refused(tmp_path, edit, says):
    write_policy_record(tmp_path, PolicyRecord(kind="tiny", model={}, identity=IDENTITY))
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TempflowError, match=says):
        read_policy_record(tmp_path)


def test_a_policy_without_identity_is_refused(policy_dir, prompts_file, tmp_path):
    config = json.loads((policy_dir / "config.json").read_text())
    config["identity"] = ""
    (policy_dir / "config.json").write_text(json.dumps(config))
    _one_error(invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", tmp_path / "r"), "identity")


def test_damaged_or_foreign_config_is_refused(policy_dir, tmp_path):
    with pytest.raises(TempflowError, match="not a policy folder"):
        load_policy(tmp_path)
    (policy_dir / "config.json").write_text("{not json")
    with pytest.raises(TempflowError, match="not valid JSON"):
        load_policy(policy_dir)
    (policy_dir / "config.json").write_text(json.dumps({"format": "tempflow.policy/99", "kind": "tiny"}))
    with pytest.raises(TempflowError, match="schema 'tempflow.policy/99', this tempflow reads 'tempflow.policy/1'"):
        load_policy(policy_dir)
