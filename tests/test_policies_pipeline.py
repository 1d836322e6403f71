"""Policies on genuine diffusers folders (stages.policies.pipeline), built at test time (toy sizes,
the real classes, tokenizer files generated on the fly) and loaded through the same
``from_pretrained`` path a user's SD3.5 or FLUX.1 folder takes: the loop trains only the adapter (or
the whole transformer with --full) and leaves the base untouched, a fresh adapter is the base
exactly, the rollout stores the text embeddings once (examples/sd3's DVC loop runs on such a folder in
test_loop.py);
a folder that is not a usable pipeline, a base that changed or moved, a resolution the model cannot
take and an output inside the base are refused in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from stages.artifacts.rollout import Rollout
from stages.policies.base import load_policy
from tests.conftest import (
    LOOP,
    PIPELINE_KINDS,
    PIPELINE_PROMPTS,
    _error,
    _iteration,
    _ok,
    _perturb_adapter,
    _pipeline_velocity,
    _policy,
    base_kind,
    invoke,
)

ADAPTER_FILES = {"config.json", "pytorch_lora_weights.safetensors"}
UPDATE_FILES = ADAPTER_FILES | {"optimizer.json", "optimizer.safetensors", "metrics.json", "update.json"}


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _adapter(policy: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(policy / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("base", PIPELINE_KINDS, indirect=True)
def test_loop_trains_only_the_adapter_and_leaves_the_base_untouched(base, prompts, tmp_path):
    before = _folder_digest(base)
    _ok("init", "--from", base, "--out", tmp_path / "p0", "--lora-rank", "4")
    assert {p.name for p in (tmp_path / "p0").iterdir()} == ADAPTER_FILES
    first = _iteration(tmp_path / "p0", prompts, tmp_path, "p1")
    assert first["first_step_ratio_deviation"] <= 1e-5
    assert first["trained_samples"] > 0 and not first["optimizer_resumed"]
    assert {p.name for p in (tmp_path / "p1").iterdir()} == UPDATE_FILES  # no transformer, no text encoder
    a0, a1 = _adapter(tmp_path / "p0"), _adapter(tmp_path / "p1")
    assert a0.keys() == a1.keys() and any(not torch.equal(a0[k], a1[k]) for k in a0)
    assert _size(tmp_path / "p1") < 0.25 * _size(base)
    manifest = json.loads((tmp_path / "r-p1" / "manifest.json").read_text())
    assert manifest["sampling"]["guidance_scale"] == {"sd3": 4.5, "flux-dev": 3.5, "flux-schnell": None}[base_kind(base)]
    # the second iteration samples with the first one's adapter and resumes its optimizer
    second = _iteration(tmp_path / "p1", prompts, tmp_path, "p2")
    assert second["optimizer_resumed"] and second["step"] == 2 and second["first_step_ratio_deviation"] <= 1e-5
    assert second["kl"] > 0  # to the base, the adapter disabled: p1's adapter is no longer zero
    assert json.loads((tmp_path / "r-p2" / "manifest.json").read_text())["policy"]["identity"] == \
        json.loads((tmp_path / "p1" / "config.json").read_text())["identity"]
    a2 = _adapter(tmp_path / "p2")
    assert any(not torch.equal(a1[k], a2[k]) for k in a1)
    assert _folder_digest(base) == before


@pytest.mark.parametrize("base", ["sd3", "flux-dev"], indirect=True)
@pytest.mark.parametrize("algo", ["flow-grpo", "flow-grpo-fast"])
def test_baseline_rollouts_train_real_kinds(base, prompts, tmp_path, algo):
    _ok("init", "--from", base, "--out", tmp_path / "p0", "--lora-rank", "2")
    metrics = _iteration(tmp_path / "p0", prompts, tmp_path, "p1", "--algo", algo, "--window", "1")
    assert metrics["algo"] == algo and metrics["first_step_ratio_deviation"] <= 1e-5 and metrics["trained_samples"] > 0


@pytest.mark.parametrize("base", ["sd3"], indirect=True)
def test_bf16_rollout_and_update_keep_the_first_step_ratio(base, prompts, tmp_path):
    _ok("init", "--from", base, "--out", tmp_path / "p0", "--lora-rank", "4")
    metrics = _iteration(tmp_path / "p0", prompts, tmp_path, "p1", "--dtype", "bf16")
    assert json.loads((tmp_path / "r-p1" / "manifest.json").read_text())["dtype"] == "bf16"
    assert metrics["dtype"] == "bf16"  # the update ran in the rollout's dtype, without being told
    assert metrics["first_step_ratio_deviation"] <= 1e-5  # measured 0 on CPU: same kernels, same rows


@pytest.mark.parametrize("base", ["sd3", "flux-dev"], indirect=True)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_full_fine_tuning_writes_the_transformer_and_keeps_its_reference(base, prompts, tmp_path, dtype):
    result = invoke("init", "--from", base, "--out", tmp_path / "x", "--full", "--lora-rank", "4")
    assert result.exit_code == 1 and "init: --lora-rank must be left out with --full" in result.stderr
    _ok("init", "--from", base, "--out", tmp_path / "p0", "--full")
    assert {p.name for p in (tmp_path / "p0").iterdir()} == {"config.json"}  # the base, by reference
    for prev, name in (("p0", "p1"), ("p1", "p2")):
        _ok("rollout", "--policy", tmp_path / prev, "--prompts", prompts, "--out", tmp_path / f"r-{name}", *LOOP,
            "--dtype", dtype)
        _ok("score", "--rollout", tmp_path / f"r-{name}", "--reward", "jpeg_compressibility",
            "--out", tmp_path / f"s-{name}.parquet")
        _ok("update", "--policy", tmp_path / prev, "--rollout", tmp_path / f"r-{name}", "--rewards",
            tmp_path / f"s-{name}.parquet", "--out", tmp_path / name, "--batch-size", "8", "--beta", "0.01",
            "--learning-rate", "0.001")
    first, second = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("p1", "p2"))
    assert (tmp_path / "p2" / "transformer").is_dir() and second["optimizer_resumed"]
    assert max(first["first_step_ratio_deviation"], second["first_step_ratio_deviation"]) <= 1e-5
    assert second["kl"] > 0  # p2 is measured against the base, loaded as the reference policy (p0)
    _, record = load_policy(tmp_path / "p2")
    assert (tmp_path / "p2" / record.reference["path"]).resolve() == (tmp_path / "p0").resolve()


@pytest.mark.parametrize("base", PIPELINE_KINDS, indirect=True)
def test_fresh_adapter_reproduces_the_base_exactly(base, tmp_path):
    policy = _policy(base, tmp_path)
    policy.configure_sampling(32, 1.0 if base_kind(base) != "flux-dev" else 3.5, "")
    cond = policy.encode(PIPELINE_PROMPTS[:2])
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([1.0, 0.4])
    v = policy.velocity(x, sigma, cond)
    v_base = _pipeline_velocity_of_base(base, base_kind(base), x, sigma, cond)
    assert torch.equal(v, v_base)  # the fresh adapter adds exactly zero to the base model's output
    _perturb_adapter(policy)
    v_trained = policy.velocity(x, sigma, cond)
    with policy.builtin_reference():  # the KL reference: the adapter disabled is the base again
        assert torch.equal(policy.velocity(x, sigma, cond), v_base)
    assert not torch.allclose(v_trained, v_base)
    assert torch.equal(policy.velocity(x, sigma, cond), v_trained)  # and the adapter is back afterwards


def _pipeline_velocity_of_base(base: Path, kind: str, x, sigma, cond) -> torch.Tensor:
    from diffusers import DiffusionPipeline

    return _pipeline_velocity(DiffusionPipeline.from_pretrained(base, local_files_only=True), kind, x, sigma, cond)


@pytest.mark.parametrize("base", ["sd3"], indirect=True)
def test_rollout_stores_embeddings_once_and_update_never_loads_a_text_encoder(base, prompts, tmp_path, monkeypatch):
    from stages.policies.pipeline import PipelinePolicy
    from stages.update import UpdateConfig, run_update

    _ok("init", "--from", base, "--out", tmp_path / "p0", "--lora-rank", "2")
    _ok("rollout", "--policy", tmp_path / "p0", "--prompts", prompts, "--out", tmp_path / "r", *LOOP,
        "--negative-prompt", "ugly")
    _ok("score", "--rollout", tmp_path / "r", "--reward", "jpeg_compressibility", "--out", tmp_path / "s.parquet")
    with Rollout(tmp_path / "r") as rollout:
        cond, negative = rollout.embeddings()
        assert rollout.manifest["sampling"]["negative_prompt"] == "ugly"
    assert {t.shape[0] for t in cond.values()} == {len(PIPELINE_PROMPTS)} and {t.shape[0] for t in negative.values()} == {1}

    def no_text_encoders(self):
        raise AssertionError("the update loaded the text encoders")

    monkeypatch.setattr(PipelinePolicy, "text_pipeline", no_text_encoders)
    result = run_update(tmp_path / "p0", tmp_path / "r", tmp_path / "s.parquet", tmp_path / "p1",
                        UpdateConfig(batch_size=8))
    assert result.metrics["first_step_ratio_deviation"] <= 1e-5


def test_init_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "notapipe").mkdir()
    assert "no model_index.json" in _error("init", "--from", tmp_path / "notapipe", "--out", tmp_path / "p")
    assert "no such folder" in _error("init", "--from", tmp_path / "missing", "--out", tmp_path / "p")


@pytest.mark.parametrize("base", ["sd3"], indirect=True)
def test_init_refuses_an_unsupported_pipeline_class(base, tmp_path):
    index = json.loads((base / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (base / "model_index.json").write_text(json.dumps(index))
    line = _error("init", "--from", base, "--out", tmp_path / "p")
    assert "StableDiffusionXLPipeline" in line and "not supported" in line


@pytest.mark.parametrize("base", ["flux-dev"], indirect=True)
def test_init_refuses_a_missing_component(base, tmp_path):
    shutil.rmtree(base / "vae")
    assert "vae/ is missing" in _error("init", "--from", base, "--out", tmp_path / "p")


@pytest.mark.parametrize("base", ["sd3"], indirect=True)
@pytest.mark.parametrize("tokenizer", ["tokenizer", "tokenizer_3"])
def test_init_refuses_a_tokenizer_that_loaded_with_a_handful_of_tokens(base, tmp_path, tokenizer):
    (base / tokenizer / "tokenizer.json").unlink()  # transformers 5 still loads the folder, nearly empty
    line = _error("init", "--from", base, "--out", tmp_path / "p")
    assert f"{tokenizer}: the tokenizer loaded with only" in line


@pytest.mark.parametrize("base", ["sd3", "flux-dev"], indirect=True)
def test_rollout_refuses_a_resolution_the_model_cannot_take(base, prompts, tmp_path):
    _ok("init", "--from", base, "--out", tmp_path / "p0", "--lora-rank", "2")
    for side in ("30", "4096" if base_kind(base) == "sd3" else "4100"):
        line = _error("rollout", "--policy", tmp_path / "p0", "--prompts", prompts, "--out", tmp_path / "r",
                      "--resolution", side)
        assert f"--resolution {side}" in line and "multiples of" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("base", ["sd3"], indirect=True)
def test_a_base_folder_that_changed_or_moved_is_refused_naming_it(base, prompts, tmp_path):
    _ok("init", "--from", base, "--out", tmp_path / "p0", "--lora-rank", "2")
    config = base / "vae" / "config.json"
    original = config.read_bytes()
    config.write_bytes(original + b" ")
    line = _error("rollout", "--policy", tmp_path / "p0", "--prompts", prompts, "--out", tmp_path / "r")
    assert "changed since `tempflow init`: vae/config.json differs" in line
    config.write_bytes(original)
    base.rename(tmp_path / "moved")
    assert "is gone" in _error("rollout", "--policy", tmp_path / "p0", "--prompts", prompts, "--out", tmp_path / "r")


@pytest.mark.parametrize("base", ["sd3"], indirect=True)
def test_outputs_may_not_replace_or_land_in_the_base_folder(base, prompts, tmp_path):
    _ok("init", "--from", base, "--out", tmp_path / "p0", "--lora-rank", "2")
    before = _folder_digest(base)
    for out in (base, base / "transformer" / "r"):
        line = _error("rollout", "--policy", tmp_path / "p0", "--prompts", prompts, "--out", out, "--overwrite", *LOOP)
        assert str(base) in line
    assert _folder_digest(base) == before
