"""Shared fixtures: a tiny policy folder (16x16 images), a prompts file, and CLI/rollout helpers.

Everything is small so the suite runs in minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from stages.artifacts.policy import PolicyRecord
from stages.artifacts.rollout_config import RolloutConfig
from stages.policies.base import save_policy
from stages.policies.tiny import build_policy, model_config
from stages.rollout import run_rollout
from tempflow_cli.main import cli

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


@pytest.fixture(scope="session")
def _policy_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "policy"
    policy = build_policy("tiny", seed=0, model_overrides={"image_size": 16})
    save_policy(policy, path, PolicyRecord(kind="tiny", model=model_config(policy)))
    return path


@pytest.fixture
def policy_dir(_policy_template, tmp_path) -> Path:
    """A fresh copy of a saved tiny policy (16x16 RGB), safe to modify."""
    dest = tmp_path / "policy"
    shutil.copytree(_policy_template, dest)
    return dest


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def small_rollout_config(**overrides) -> RolloutConfig:
    """A rollout that takes well under a second on the 16x16 tiny policy."""
    values = dict(num_steps=4, seeds_per_prompt=2, branches=2, batch_size=8, samples_per_shard=10)
    values.update(overrides)
    return RolloutConfig(**values)


def make_rollout(policy_dir: Path, out: Path, prompts=PROMPTS, background_writes: bool = True, **overrides) -> Path:
    """Roll out the policy in ``policy_dir`` into ``out`` through the library."""
    from stages.policies.base import load_policy

    policy, record = load_policy(policy_dir)
    run_rollout(policy, list(prompts), small_rollout_config(**overrides), out,
                {"identity": record.identity, "path": str(policy_dir)}, background_writes=background_writes)
    return out


UPDATE_ROW = {"reward_std": 0.1, "loss": 0.0, "policy_loss": 0.0, "kl": 0.01, "clip_fraction": 0.0, "grad_norm": 1.0,
              "trained_samples": 10, "skipped_samples": 0, "rollout_nfe": 100}


def write_updates(folder: Path, rewards: list[float], seconds: list[tuple[float, float | None]] | None = None) -> Path:
    """``itNN.json`` update metrics with the fields the report reads, one per reward (each update's
    rollout reward), with the rollout's and the update's seconds when given."""
    folder.mkdir()
    for i, reward in enumerate(rewards):
        row = {**UPDATE_ROW, "reward_mean": reward}
        if seconds is not None:
            row.update(rollout_seconds=seconds[i][0], update_seconds=seconds[i][1])
        (folder / f"it{i + 1:02d}.json").write_text(json.dumps(row))
    return folder


def invoke(*args: str):
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
