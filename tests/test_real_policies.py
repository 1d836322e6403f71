"""The sd3 and flux policy kinds on genuine diffusers folders built at test time (toy sizes, the real
classes, tokenizer files generated on the fly), loaded through the same ``from_pretrained`` path a
user's downloaded SD3.5 or FLUX.1 folder takes."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.artifacts.rollout import Rollout
from stages.policies.base import load_policy
from stages.policies.flux import pack, unpack
from stages.policies.tiny_pipelines import make_tiny_pipeline
from tests.conftest import invoke

PROMPTS = ["a red cat", "two blue dogs on a chair", "a green tree above a house"]
KINDS = ["sd3", "flux-dev", "flux-schnell"]
LOOP = ["--resolution", "32", "--num-steps", "4", "--branches", "2", "--seeds-per-prompt", "2", "--batch-size", "8"]
ADAPTER_FILES = {"config.json", "pytorch_lora_weights.safetensors"}
UPDATE_FILES = ADAPTER_FILES | {"optimizer.json", "optimizer.safetensors", "metrics.json", "update.json"}


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: make_tiny_pipeline(kind, root / kind) for kind in KINDS}


@pytest.fixture
def base(pipelines, tmp_path, request) -> Path:
    """A private copy of the toy pipeline of ``request.param``, safe to modify."""
    dest = tmp_path / "base"
    shutil.copytree(pipelines[request.param], dest)
    return dest


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
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


def _iteration(policy: Path, prompts: Path, tmp: Path, name: str, *rollout_args: str) -> dict:
    _ok("rollout", "--policy", policy, "--prompts", prompts, "--out", tmp / f"r-{name}", *LOOP, *rollout_args)
    _ok("score", "--rollout", tmp / f"r-{name}", "--reward", "jpeg_compressibility", "--out", tmp / f"s-{name}.parquet")
    _ok("update", "--policy", policy, "--rollout", tmp / f"r-{name}", "--rewards", tmp / f"s-{name}.parquet",
        "--out", tmp / name, "--batch-size", "8", "--learning-rate", "0.01", "--clip-range", "0.2")
    return json.loads((tmp / name / "metrics.json").read_text())


# --------------------------------------------------------------------------------------------
# The toy folders are genuine pipelines


@pytest.mark.parametrize("kind", KINDS)
def test_toy_folders_are_real_pipelines_loaded_offline(pipelines, kind):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(pipelines[kind], local_files_only=True)
    expected = "StableDiffusion3Pipeline" if kind == "sd3" else "FluxPipeline"
    assert type(pipe).__name__ == expected
    t5 = pipe.tokenizer_3 if kind == "sd3" else pipe.tokenizer_2
    assert type(t5).__name__.startswith("T5Tokenizer") and type(pipe.tokenizer).__name__.startswith("CLIPTokenizer")
    assert len(pipe.tokenizer) > 256 and len(t5) > 32  # byte-level BPE: every byte is a token
    assert pipe.tokenizer.tokenize("a red cat") == ["a</w>", "red</w>", "cat</w>"]
    if kind == "sd3":
        assert pipe.transformer.config.dual_attention_layers == [0] and pipe.transformer.config.qk_norm == "rms_norm"
    else:
        assert pipe.transformer.config.guidance_embeds == (kind == "flux-dev")


# --------------------------------------------------------------------------------------------
# The loop on each kind


@pytest.mark.parametrize("base", KINDS, indirect=True)
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


def base_kind(base: Path) -> str:
    index = json.loads((base / "model_index.json").read_text())
    if index["_class_name"] == "StableDiffusion3Pipeline":
        return "sd3"
    transformer = json.loads((base / "transformer/config.json").read_text())
    return "flux-dev" if transformer["guidance_embeds"] else "flux-schnell"


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


# --------------------------------------------------------------------------------------------
# What the policies compute


def _policy(base: Path, tmp: Path, rank: int = 4):
    _ok("init", "--from", base, "--out", tmp / "p0", "--lora-rank", str(rank))
    policy, _ = load_policy(tmp / "p0")
    return policy


def _perturb_adapter(policy, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("base", KINDS, indirect=True)
def test_fresh_adapter_reproduces_the_base_exactly(base, tmp_path):
    policy = _policy(base, tmp_path)
    policy.configure_sampling(32, 1.0 if base_kind(base) != "flux-dev" else 3.5, "")
    cond = policy.encode(PROMPTS[:2])
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


@pytest.mark.parametrize("base", KINDS, indirect=True)
def test_exported_adapter_loads_into_the_users_pipeline_with_its_alpha(base, tmp_path):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file, save_file

    policy = _policy(base, tmp_path, rank=4)  # alpha 8: scale 2, which diffusers only knows from the metadata
    _perturb_adapter(policy)
    (tmp_path / "export").mkdir()
    policy.save_weights(tmp_path / "export")
    kind = base_kind(base)
    policy.configure_sampling(32, 3.5 if kind == "flux-dev" else 1.0, "")
    cond = policy.encode(PROMPTS[:2])
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.3])
    ours = policy.velocity(x, sigma, cond)

    pipe = DiffusionPipeline.from_pretrained(base, local_files_only=True)
    pipe.load_lora_weights(tmp_path / "export")
    torch.testing.assert_close(_pipeline_velocity(pipe, kind, x, sigma, cond), ours, rtol=1e-4, atol=1e-5)

    # the same tensors without the metadata: diffusers falls back to alpha = rank, and the outputs differ
    tensors = load_file(tmp_path / "export" / "pytorch_lora_weights.safetensors")
    (tmp_path / "bare").mkdir()
    save_file(tensors, tmp_path / "bare" / "pytorch_lora_weights.safetensors")
    pipe = DiffusionPipeline.from_pretrained(base, local_files_only=True)
    pipe.load_lora_weights(tmp_path / "bare")
    assert not torch.allclose(_pipeline_velocity(pipe, kind, x, sigma, cond), ours, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("base", ["sd3"], indirect=True)
def test_sd3_guidance_is_the_cfg_formula_and_its_unconditional_half_has_no_gradient(base, tmp_path):
    policy = _policy(base, tmp_path)
    _perturb_adapter(policy)
    settings = policy.configure_sampling(32, 4.5, "blurry")
    assert settings == {"resolution": 32, "guidance_scale": 4.5, "negative_prompt": "blurry"}
    pos, neg = policy.encode(PROMPTS[:2]), policy.encode(["blurry"])
    cond = {**pos, **{f"negative.{k}": v.expand(2, *v.shape[1:]) for k, v in neg.items()}}
    x = torch.randn(2, *policy.sample_shape, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.8, 0.5])
    guided = policy.velocity(x, sigma, cond)
    policy.configure_sampling(32, 1.0, "")
    v_c = policy.velocity(x, sigma, pos)
    v_u = policy.velocity(x, sigma, {k: cond[f"negative.{k}"] for k in pos})
    torch.testing.assert_close(guided, v_u + 4.5 * (v_c - v_u), rtol=1e-4, atol=1e-5)

    params = [p for _, p in policy.trainable_parameters()]
    policy.configure_sampling(32, 4.5, "blurry")
    grads = torch.autograd.grad(policy.velocity(x, sigma, cond).sum(), params)
    policy.configure_sampling(32, 1.0, "")
    grads_cond = torch.autograd.grad(policy.velocity(x, sigma, pos).sum(), params)
    for g, gc in zip(grads, grads_cond):  # d/dθ [v_u + g (v_c - v_u)] with v_u detached = g dv_c/dθ
        torch.testing.assert_close(g, 4.5 * gc, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("base", ["flux-dev", "flux-schnell"], indirect=True)
def test_flux_schedule_is_the_pipelines_resolution_dependent_shift(base, tmp_path):
    policy = _policy(base, tmp_path)
    policy.configure_sampling(32, 0.0, "")
    sigmas = policy.sigmas(6, shift=3.0).double()  # --shift does not apply to FLUX
    s = np.linspace(1.0, 1 / 6, 6)
    if base_kind(base) == "flux-dev":
        tokens = (policy.sample_shape[1] // 2) ** 2  # 64 packed tokens at 32 px
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)  # FLUX's linear map of the token count
        expected = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    else:
        expected = s  # schnell: a static shift of 1
    torch.testing.assert_close(sigmas[:-1], torch.from_numpy(expected), rtol=1e-6, atol=1e-6)
    assert float(sigmas[-1]) == 0.0


def test_flux_packing_matches_the_pipeline_and_inverts():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 8, 6)
    torch.testing.assert_close(pack(x), FluxPipeline._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(unpack(pack(x), 8, 6), x)


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
    assert {t.shape[0] for t in cond.values()} == {len(PROMPTS)} and {t.shape[0] for t in negative.values()} == {1}

    def no_text_encoders(self):
        raise AssertionError("the update loaded the text encoders")

    monkeypatch.setattr(PipelinePolicy, "text_pipeline", no_text_encoders)
    result = run_update(tmp_path / "p0", tmp_path / "r", tmp_path / "s.parquet", tmp_path / "p1",
                        UpdateConfig(batch_size=8))
    assert result.metrics["first_step_ratio_deviation"] <= 1e-5


# --------------------------------------------------------------------------------------------
# Bad input: one line that names it


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
def test_sd3_without_t5_encodes_with_zeros_in_its_place(base, prompts, tmp_path):
    index = json.loads((base / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (base / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(base / "text_encoder_3")
    shutil.rmtree(base / "tokenizer_3")
    _ok("init", "--from", base, "--out", tmp_path / "p0", "--lora-rank", "2")
    metrics = _iteration(tmp_path / "p0", prompts, tmp_path, "p1")
    assert metrics["first_step_ratio_deviation"] <= 1e-5
    with Rollout(tmp_path / "r-p1") as rollout:
        embeds = rollout.embeddings()[0]["prompt_embeds"]
    assert embeds.shape[1] == 77 + 256 and not embeds[:, 77:].any()  # the CLIP tokens, then T5's zeros


@pytest.mark.parametrize("base", ["sd3"], indirect=True)
def test_outputs_may_not_replace_or_land_in_the_base_folder(base, prompts, tmp_path):
    _ok("init", "--from", base, "--out", tmp_path / "p0", "--lora-rank", "2")
    before = _folder_digest(base)
    for out in (base, base / "transformer" / "r"):
        line = _error("rollout", "--policy", tmp_path / "p0", "--prompts", prompts, "--out", out, "--overwrite", *LOOP)
        assert str(base) in line
    assert _folder_digest(base) == before


@pytest.mark.parametrize("base", ["sd3"], indirect=True)
def test_a_negative_prompt_without_guidance_is_refused(base, prompts, tmp_path):
    _ok("init", "--from", base, "--out", tmp_path / "p0", "--lora-rank", "2")
    line = _error("rollout", "--policy", tmp_path / "p0", "--prompts", prompts, "--out", tmp_path / "r", *LOOP,
                  "--guidance-scale", "1", "--negative-prompt", "ugly")
    assert "--negative-prompt needs classifier-free guidance" in line


@pytest.mark.parametrize("base", ["flux-schnell"], indirect=True)
def test_guidance_a_model_does_not_take_is_refused(base, prompts, tmp_path):
    _ok("init", "--from", base, "--out", tmp_path / "p0", "--lora-rank", "2")
    common = ("rollout", "--policy", tmp_path / "p0", "--prompts", prompts, "--out", tmp_path / "r", "--resolution", "32")
    assert "schnell-shaped" in _error(*common, "--guidance-scale", "2")
    assert "no negative prompt" in _error(*common, "--negative-prompt", "ugly")


def test_lora_options_without_from_and_preset_options_with_it_are_refused(pipelines, tmp_path):
    result = invoke("init", "--out", tmp_path / "p", "--lora-rank", "8")
    assert result.exit_code == 1 and "init: --lora-rank must be left out without --from" in result.stderr
    result = invoke("init", "--from", pipelines["sd3"], "--out", tmp_path / "p", "--image-size", "64")
    assert result.exit_code == 1 and "init: --image-size must be left out with --from" in result.stderr
    assert "--lora-targets attn.nope" in _error("init", "--from", pipelines["sd3"], "--out", tmp_path / "p",
                                                "--lora-targets", "attn.nope")


def test_the_bring_your_own_model_dvc_loop_runs_on_a_pipeline_folder(pipelines, tmp_path):
    """examples/sd3 under `dvc repro`, its params pointed at a toy SD3.5 folder on the CPU."""
    import os
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    work = tmp_path / "project"
    work.mkdir()
    shutil.copy(repo / ".dvcignore", work / ".dvcignore")
    shutil.copytree(repo / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    for folder in ("examples/sd3", "stages", "tempflow_cli"):
        shutil.copytree(repo / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__", "runs"))
    params_path = work / "examples/sd3/params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["base"] = str(pipelines["sd3"])
    params["init"].update({"lora-rank": 4, "lora-alpha": 8})
    params["rollout"].update({"num-steps": 4, "resolution": 32, "branches": 2, "prompts-per-rollout": 3,
                              "batch-size": 8, "dtype": "fp32", "device": "cpu"})
    params["update"].update({"device": "cpu", "clip-range": 0.2, "learning-rate": 0.01})
    params["loop"] = params["loop"][:2]
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    proc = subprocess.run(["dvc", "repro", "examples/sd3/dvc.yaml"], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = work / "examples/sd3/runs"
    second = json.loads((runs / "metrics/it02.json").read_text())
    assert second["optimizer_resumed"] and second["step"] == 2 and second["first_step_ratio_deviation"] <= 1e-5
    assert {p.name for p in (runs / "policies/it02").iterdir()} == UPDATE_FILES
    assert json.loads((runs / "report/summary.json").read_text())["iterations"] == 2


def test_eval_takes_a_real_policy_on_the_worlds_prompts(pipelines, tmp_path):
    """Any policy kind is evaluated: an sd3 policy on the shapes world's held-out prompts, with its
    reward and strict accuracy (tests/test_evaluate.py covers other prompts and rewards)."""
    _ok("init", "--from", pipelines["sd3"], "--out", tmp_path / "p0", "--lora-rank", "2")
    _ok("eval", "--policy", tmp_path / "p0", "--out", tmp_path / "e", "--per-task", "1", "--num-steps", "2",
        "--images-per-prompt", "1")
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["policy"]["kind"] == "sd3" and 0 <= metrics["strict"] <= 1 and metrics["per_task"]
