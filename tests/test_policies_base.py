"""What every policy shares (stages.policies.base): a saved policy loads back to the same function,
its identity covers every weight, modified weights are refused, and an unusable --device is one line."""

from __future__ import annotations

import json

import pytest
import torch

from stages.policies.base import load_policy, tensor_hash
from stages.policies.tiny import build_policy
from stages.support.errors import TempflowError
from tests.conftest import _one_error_line, invoke


def test_round_trip_keeps_the_function(policy_dir):
    """A loaded policy computes exactly what the saved one did, and its identity matches config.json."""
    policy, record = load_policy(policy_dir)
    again, _ = load_policy(policy_dir)
    assert policy.identity() == record.identity == json.loads((policy_dir / "config.json").read_text())["identity"]
    x = torch.randn(3, *policy.sample_shape)
    cond = policy.encode(["a red circle", "two blue squares", "a cat"])
    with torch.no_grad():
        v1 = policy.velocity(x, torch.tensor([1.0, 0.5, 0.1]), cond)
        v2 = again.velocity(x, torch.tensor([1.0, 0.5, 0.1]), again.encode(["a red circle", "two blue squares", "a cat"]))
    assert v1.shape == x.shape and v1.dtype == torch.float32
    assert torch.equal(v1, v2)


def test_modified_weights_are_refused(policy_dir):
    """Weights edited after saving no longer match the recorded identity."""
    from safetensors.torch import load_file, save_file

    path = policy_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1.0
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(TempflowError, match="identity"):
        load_policy(policy_dir)


def test_identity_depends_on_every_weight():
    a = build_policy("tiny", seed=0, model_overrides={"image_size": 16})
    b = build_policy("tiny", seed=0, model_overrides={"image_size": 16})
    assert a.identity() == b.identity()  # seeded init is reproducible
    with torch.no_grad():
        next(b.denoiser.parameters()).view(-1)[0] += 1e-6
    assert tensor_hash(a.modules()) != tensor_hash(b.modules())


@pytest.mark.parametrize("device, needle", [("gpu7", "not supported"), ("meta", "not supported"), ("cuda:0", "CUDA")])
def test_unusable_device_is_one_line(policy_dir, prompts_file, tmp_path, device, needle):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", tmp_path / "r", "--device", device)
    assert r.exit_code == 1 and needle in _one_error_line(r)
