"""The flux policy kind (stages.policies.flux): the packing of latents, the schedule's
resolution-dependent shift, and the guidance a FLUX model does not take."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.policies.flux import pack, unpack
from tests.conftest import _error, _ok, _policy, base_kind


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


@pytest.mark.parametrize("base", ["flux-schnell"], indirect=True)
def test_guidance_a_model_does_not_take_is_refused(base, prompts, tmp_path):
    _ok("init", "--from", base, "--out", tmp_path / "p0", "--lora-rank", "2")
    common = ("rollout", "--policy", tmp_path / "p0", "--prompts", prompts, "--out", tmp_path / "r", "--resolution", "32")
    assert "schnell-shaped" in _error(*common, "--guidance-scale", "2")
    assert "no negative prompt" in _error(*common, "--negative-prompt", "ugly")
