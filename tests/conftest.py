"""Shared fixtures: a tiny policy folder (16x16 images), a prompts file, and CLI/rollout helpers; and
the helpers and fixtures that tests of several modules share: rollouts read with the standard
library, refusals through the CLI, torchrun, toy diffusers pipelines, tiny model reward folders, a
pretrained shapes-world base, recommender sessions.

Everything is small so the suite runs in minutes on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from stages.artifacts.policy import PolicyRecord
from stages.artifacts.rollout_config import RolloutConfig
from stages.policies.base import load_policy, save_policy
from stages.policies.flux import unpack
from stages.policies.tiny import build_policy, model_config
from stages.policies.tiny_pipelines import make_tiny_pipeline
from stages.pretrain import PretrainConfig, run_pretrain
from stages.rewards import parse_reward_spec
from stages.rewards.tiny import make_tiny_reward
from stages.rollout import run_rollout
from stages.score import run_score
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


def copy_project(work: Path, files: tuple[str, ...], folders: tuple[str, ...]) -> Path:
    """``files`` and ``folders`` of this repository in ``work``, with its DVC config but no cache: a
    project DVC runs as a user's clone (its stages depend on the code copied with it)."""
    repo = Path(__file__).resolve().parents[1]
    work.mkdir()
    for name in (".dvcignore", *files):
        shutil.copy(repo / name, work / name)
    shutil.copytree(repo / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    for folder in folders:
        shutil.copytree(repo / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__", "runs"))
    return work


def load_example(relative: str, name: str):
    """The script at ``relative`` (from the repository root, e.g. ``examples/recsys/benchmark.py``)
    loaded as a module called ``name``, registered in ``sys.modules`` while it runs (dataclasses
    look their module up there)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tool_env(**extra: str) -> dict[str, str]:
    """This environment with the test interpreter's scripts (tempflow, dvc) first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}


def invoke(*args: str):
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# --------------------------------------------------------------------------------------------
# Rollouts read with the standard library only, independent of stages.artifacts; rollouts and scores
# made through the library; the stages refused through the CLI


FIELDS = ("meta.json", "state.npy", "mean.npy", "image.png")


def independent_next(holder: dict[str, bytes], meta: dict) -> np.ndarray:
    """A sample's x_(k+1) from its group's stored mean, its std and its noise seed, made here with torch
    alone (not through stages): mean + std * N(0, 1) of a generator seeded with noise_seed."""
    mean = torch.from_numpy(np.load(io.BytesIO(holder["mean.npy"]), allow_pickle=False))
    noise = torch.randn(tuple(mean.shape), generator=torch.Generator().manual_seed(meta["noise_seed"]))
    nxt = (mean + torch.tensor(meta["std"], dtype=torch.float32) * noise).numpy()
    assert hashlib.sha256(nxt.tobytes()).hexdigest() == meta["next_sha256"], meta
    return nxt

COMPRESSIBILITY = [parse_reward_spec("jpeg_compressibility")]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _split_member(name: str) -> tuple[str, str]:
    """``key.field`` -> (key, field), the field being one of the contract's four."""
    for field in FIELDS:
        if name.endswith("." + field):
            return name[: -len(field) - 1], field
    raise AssertionError(f"member {name!r} is not a contract field")


def _read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            assert member.isfile(), member.name
            key, field = _split_member(member.name)
            samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples


def _read_rollout(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a rollout in shard order: key -> {field: raw bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in _manifest(folder)["shards"]:
        for key, fields in _read_shard(folder / shard["name"]).items():
            assert key not in samples, f"{key} appears in two shards"
            samples[key] = fields
    return samples


def _rollout(policy_dir: Path, out: Path, prompts=PROMPTS[:2], **overrides) -> Path:
    return make_rollout(policy_dir, out, prompts=prompts, **overrides)


def _scored(policy_dir: Path, tmp_path: Path, name: str = "r", **overrides) -> tuple[Path, Path]:
    """A small tempflow rollout and its scores, made through the library."""
    rollout = _rollout(policy_dir, tmp_path / name, **overrides)
    scores = tmp_path / f"{name}.parquet"
    run_score(rollout, COMPRESSIBILITY, scores)
    return rollout, scores


def _partials(out: Path) -> list[Path]:
    """Unfinished outputs beside ``out``: the slots of stages.artifacts (and the old naming scheme)."""
    return sorted((out.parent / ".tempflow-partial").glob("*")) + sorted(out.parent.glob(f".{out.name}.partial-*"))


def _assert_refused(result, out: Path, *words: str) -> str:
    """Exit 1, one non-empty stderr line 'error: ...' naming the problem, no output, no partial."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert not out.exists(), f"{out} was written despite the error"
    assert _partials(out) == [], f"partial siblings left: {_partials(out)}"
    return lines[0]


def _score_cli(rollout: Path, out: Path, *extra):
    return invoke("score", "--rollout", rollout, "--reward", "jpeg_compressibility", "--out", out, *extra)


def _update_cli(policy: Path, rollout: Path, scores: Path, out: Path, *extra):
    return invoke("update", "--policy", policy, "--rollout", rollout, "--rewards", scores, "--out", out,
                  "--beta", 0, *extra)


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class _WritesMarker:
    """Unpickling this creates the folder ``path`` (an os-level side effect)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


# --------------------------------------------------------------------------------------------
# One-line refusals, and scores made through the CLI


def _one_error(result, *words: str) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def _scored_by_cli(policy_dir: Path, tmp_path: Path, name: str = "r") -> tuple[Path, Path]:
    rollout = make_rollout(policy_dir, tmp_path / name)
    scores = tmp_path / f"{name}.parquet"
    assert invoke("score", "--rollout", rollout, "--reward", "jpeg_compressibility", "--out", scores).exit_code == 0
    return rollout, scores


# --------------------------------------------------------------------------------------------
# Several processes under torchrun (gloo on the CPU)


TEMPFLOW = str(Path(sys.executable).parent / "tempflow")


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           TEMPFLOW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# --------------------------------------------------------------------------------------------
# Toy diffusers pipelines (sd3, flux-dev, flux-schnell) built at test time, and the loop on them


PIPELINE_PROMPTS = ["a red cat", "two blue dogs on a chair", "a green tree above a house"]
PIPELINE_KINDS = ["sd3", "flux-dev", "flux-schnell"]
LOOP = ["--resolution", "32", "--num-steps", "4", "--branches", "2", "--seeds-per-prompt", "2", "--batch-size", "8"]


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: make_tiny_pipeline(kind, root / kind) for kind in PIPELINE_KINDS}


@pytest.fixture
def base(pipelines, tmp_path, request) -> Path:
    """A private copy of the toy pipeline of ``request.param``, safe to modify."""
    dest = tmp_path / "base"
    shutil.copytree(pipelines[request.param], dest)
    return dest


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PIPELINE_PROMPTS) + "\n")
    return path


def _ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def _error(*args) -> str:
    result = invoke(*args)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _iteration(policy: Path, prompts: Path, tmp: Path, name: str, *rollout_args: str) -> dict:
    _ok("rollout", "--policy", policy, "--prompts", prompts, "--out", tmp / f"r-{name}", *LOOP, *rollout_args)
    _ok("score", "--rollout", tmp / f"r-{name}", "--reward", "jpeg_compressibility", "--out", tmp / f"s-{name}.parquet")
    _ok("update", "--policy", policy, "--rollout", tmp / f"r-{name}", "--rewards", tmp / f"s-{name}.parquet",
        "--out", tmp / name, "--batch-size", "8", "--learning-rate", "0.01", "--clip-range", "0.2")
    return json.loads((tmp / name / "metrics.json").read_text())


def base_kind(base: Path) -> str:
    index = json.loads((base / "model_index.json").read_text())
    if index["_class_name"] == "StableDiffusion3Pipeline":
        return "sd3"
    transformer = json.loads((base / "transformer/config.json").read_text())
    return "flux-dev" if transformer["guidance_embeds"] else "flux-schnell"


def _policy(base: Path, tmp: Path, rank: int = 4):
    _ok("init", "--from", base, "--out", tmp / "p0", "--lora-rank", str(rank))
    policy, _ = load_policy(tmp / "p0")
    return policy


def _perturb_adapter(policy, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _pipeline_velocity(pipe, kind: str, x, sigma, cond) -> torch.Tensor:
    """The velocity the user's own diffusers pipeline object computes, through its own transformer."""
    with torch.no_grad():
        if kind == "sd3":
            return pipe.transformer(hidden_states=x, timestep=1000 * sigma, encoder_hidden_states=cond["prompt_embeds"],
                                    pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        guidance = torch.full((b,), 3.5) if pipe.transformer.config.guidance_embeds else None
        out = pipe.transformer(hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), timestep=sigma,
                               guidance=guidance, pooled_projections=cond["pooled_prompt_embeds"],
                               encoder_hidden_states=cond["prompt_embeds"],
                               txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3),
                               img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
                               return_dict=False)[0]
        return unpack(out, h, w)


# --------------------------------------------------------------------------------------------
# Tiny model reward folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rewards")
    return {kind: make_tiny_reward(kind, root / kind, seed=3) for kind in ("clip", "aesthetic")}


# --------------------------------------------------------------------------------------------
# A pretrained shapes-world base of a few seconds


def tiny_pretrain(**overrides) -> PretrainConfig:
    """A pretraining run of a few seconds: 16x16 images, their 4x4x4 latents."""
    values = {"image_size": 16, "steps": 6, "batch_size": 4, "warmup": 2, "checkpoint_every": 2,
              "autoencoder_steps": 4, "autoencoder_batch_size": 2}
    values.update(overrides)
    return PretrainConfig(**values)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "base"
    run_pretrain(tiny_pretrain(), out)
    return out


def interrupt_at(phase: str, step: int):
    """A progress listener that stops the run (like Ctrl-C) once ``step`` steps of ``phase`` are done."""
    done: dict[str, int] = {}

    def listen(task: str, advance: int, total: int) -> None:
        done[task] = done.get(task, 0) + advance
        if task == phase and done[task] >= step:
            raise KeyboardInterrupt

    return listen


# --------------------------------------------------------------------------------------------
# One-line errors


def _one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, repr(result.stderr)  # no blank line from an idle progress bar either
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


# --------------------------------------------------------------------------------------------
# Recommender sessions, events and a GPT-2 folder


TINY = ["--layers", "1", "--heads", "2", "--width", "16", "--context", "8", "--epochs", "2", "--batch-size", "16"]


def _retailrocket(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "events.csv"
    path.write_text("timestamp,visitorid,event,itemid,transactionid\n" + "\n".join(rows) + "\n")
    return path


MINUTE = 60_000  # RetailRocket's timestamps are milliseconds


def _sessions_file(tmp_path) -> Path:
    rows = [f"{t * MINUTE},{v},view,{(v + t) % 4}," for v in range(6) for t in range(4)]
    data = tmp_path / "s.parquet"
    assert invoke("rec", "prepare", "--source", "retailrocket", "--events", _retailrocket(tmp_path, rows),
                  "--out", data).exit_code == 0
    return data


def _gpt2_folder(tmp_path: Path, **shape) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(vocab_size=50, n_positions=64, **{"n_layer": 1, "n_head": 2, "n_embd": 16, **shape})
    folder = tmp_path / "distilgpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)  # the layout of DistilGPT2's hub folder
    return folder
