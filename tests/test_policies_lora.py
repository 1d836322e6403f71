"""LoRA adapters (stages.policies.lora): an exported adapter loads into the user's own diffusers
pipeline and computes what the policy does, its alpha read from the file's metadata."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import (
    PIPELINE_KINDS,
    PIPELINE_PROMPTS,
    _perturb_adapter,
    _pipeline_velocity,
    _policy,
    base_kind,
)


@pytest.mark.parametrize("base", PIPELINE_KINDS, indirect=True)
def test_exported_adapter_loads_into_the_users_pipeline_with_its_alpha(base, tmp_path):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file, save_file

    policy = _policy(base, tmp_path, rank=4)  # alpha 8: scale 2, which diffusers only knows from the metadata
    _perturb_adapter(policy)
    (tmp_path / "export").mkdir()
    policy.save_weights(tmp_path / "export")
    kind = base_kind(base)
    policy.configure_sampling(32, 3.5 if kind == "flux-dev" else 1.0, "")
    cond = policy.encode(PIPELINE_PROMPTS[:2])
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
