"""The sd3 policy kind (stages.policies.sd3): classifier-free guidance and its gradient, a negative
prompt only with guidance, and an SD3 folder without T5."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from stages.artifacts.rollout import Rollout
from tests.conftest import LOOP, PIPELINE_PROMPTS, _error, _iteration, _ok, _perturb_adapter, _policy


@pytest.mark.parametrize("base", ["sd3"], indirect=True)
def test_sd3_guidance_is_the_cfg_formula_and_its_unconditional_half_has_no_gradient(base, tmp_path):
    policy = _policy(base, tmp_path)
    _perturb_adapter(policy)
    settings = policy.configure_sampling(32, 4.5, "blurry")
    assert settings == {"resolution": 32, "guidance_scale": 4.5, "negative_prompt": "blurry"}
    pos, neg = policy.encode(PIPELINE_PROMPTS[:2]), policy.encode(["blurry"])
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
def test_a_negative_prompt_without_guidance_is_refused(base, prompts, tmp_path):
    _ok("init", "--from", base, "--out", tmp_path / "p0", "--lora-rank", "2")
    line = _error("rollout", "--policy", tmp_path / "p0", "--prompts", prompts, "--out", tmp_path / "r", *LOOP,
                  "--guidance-scale", "1", "--negative-prompt", "ugly")
    assert "--negative-prompt needs classifier-free guidance" in line
