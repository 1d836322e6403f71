"""The tiny and shapes presets (stages.policies.tiny): the word-level tokenizer, decoding to uint8,
the UNet denoiser and the latent autoencoder saved and loaded back, the latent scaling in the
identity, and bad model configs explained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.policies.base import load_policy
from stages.policies.tiny import build_policy
from stages.support.errors import TempflowError


def test_tokenizer_is_word_level_with_unknowns_and_eos(policy_dir):
    policy, _ = load_policy(policy_dir)
    tok = policy.tokenizer
    ids = tok(["A Red circle zebra"]).input_ids[0]
    words = tok.convert_ids_to_tokens(ids)
    assert words == ["a", "red", "circle", "[UNK]", "[EOS]"]
    cond = policy.encode(["a red circle", "A RED CIRCLE", "a blue circle"])
    assert torch.equal(cond["pooled"][0], cond["pooled"][1])  # lower-cased
    assert not torch.equal(cond["pooled"][0], cond["pooled"][2])


def test_decode_maps_minus_one_to_one_onto_uint8(policy_dir):
    policy, _ = load_policy(policy_dir)
    x = torch.stack([torch.full(policy.sample_shape, -1.0), torch.full(policy.sample_shape, 2.0)])
    images = policy.decode(x)
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    assert images[0].max() == 0 and images[1].min() == 255


def test_bad_model_config_is_explained():
    with pytest.raises(TempflowError, match="patch_size must be a divisor of the state's side 15"):
        build_policy("tiny", seed=0, model_overrides={"image_size": 15})


@pytest.mark.parametrize("pooled_text", [True, False])
def test_unet_policy_round_trip_in_its_own_folder(tmp_path, pooled_text):
    """The shapes preset's UNet saves under unet/ (its autoencoder under vae/), loads back to the same
    function and identity, with or without the pooled text in its timestep embedding."""
    from stages.artifacts.policy import PolicyRecord
    from stages.policies.base import save_policy
    from stages.policies.tiny import model_config

    policy = build_policy("shapes", seed=0, model_overrides={"image_size": 16, "pooled_text": pooled_text})
    assert (policy.denoiser.class_embedding is not None) == pooled_text
    # folders made before the option existed (pooled, no such key) keep their identity
    assert (b'"pooled_text"' in policy.identity_extra()) == (not pooled_text)
    save_policy(policy, tmp_path / "p", PolicyRecord(kind=policy.kind, model=model_config(policy)))
    assert (tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "p" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / "p" / "transformer").exists()
    again, record = load_policy(tmp_path / "p")
    assert record.identity == policy.identity() == again.identity()
    x = torch.randn(2, *policy.sample_shape)
    sigma = torch.tensor([0.9, 0.2])
    prompts = ["a red circle", "two blue squares"]
    with torch.no_grad():
        v1 = policy.velocity(x, sigma, policy.encode(prompts))
        v2 = again.velocity(x, sigma, again.encode(prompts))
        v3 = again.velocity(x, sigma, again.encode(["a green circle", "two blue squares"]))
    assert v1.shape == x.shape and torch.equal(v1, v2)
    assert not torch.equal(v1[0], v3[0]) and torch.equal(v1[1], v3[1])  # the text conditions each row


@pytest.mark.parametrize("overrides, match", [
    ({"denoiser": "vit"}, "denoiser must be one of sd3, unet, got 'vit'"),
    ({"denoiser": "unet", "unet_channels": [24]}, ">= 2 levels"),
    ({"denoiser": "unet", "unet_channels": [24, 44]}, "multiple of 8"),
    ({"denoiser": "unet", "unet_channels": [8, 8, 8, 8, 8], "image_size": 24}, "need a multiple of 16"),
    ({"denoiser": "sd3", "pooled_text": False}, "pooled_text must be true with denoiser sd3"),
    ({"pooled_text": "false"}, "pooled_text must be true or false"),
])
def test_bad_unet_config_is_explained(overrides, match):
    with pytest.raises(TempflowError, match=match):
        build_policy("tiny", seed=0, model_overrides=overrides)


def _latent_policy():
    """A 16x16 policy on the 4x4x4 latents of a 3-level autoencoder, like the shapes preset."""
    return build_policy("tiny", seed=0, model_overrides={"image_size": 16, "latent_channels": 4,
                                                          "vae_channels": [8, 8, 16], "denoiser": "unet",
                                                          "unet_channels": [8, 16]})


def test_latent_policy_round_trip_keeps_states_decoding_and_scaling(tmp_path):
    from stages.artifacts.policy import PolicyRecord
    from stages.policies.base import save_policy
    from stages.policies.tiny import model_config

    policy = _latent_policy()
    assert policy.sample_shape == (4, 4, 4)
    policy.autoencoder.register_to_config(shift_factor=0.25, scaling_factor=2.0)
    save_policy(policy, tmp_path / "p", PolicyRecord(kind="tiny", model=model_config(policy)))
    again, record = load_policy(tmp_path / "p")
    assert record.identity == policy.identity()
    assert (again.autoencoder.config.shift_factor, again.autoencoder.config.scaling_factor) == (0.25, 2.0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = again.encode_images(images)
    assert latents.shape == (2, *again.sample_shape)
    raw = policy.autoencoder.encode(images).latent_dist.mean
    torch.testing.assert_close(latents, (raw - 0.25) * 2.0)  # SD3's convention: (mean - shift) * scale
    decoded = again.decode(latents)
    assert decoded.dtype == np.uint8 and decoded.shape == (2, 16, 16, 3)
    expected = ((policy.autoencoder.decode(raw).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    np.testing.assert_array_equal(decoded, expected.permute(0, 2, 3, 1).numpy())


def test_latent_scaling_is_part_of_the_identity():
    a, b = _latent_policy(), _latent_policy()
    assert a.identity() == b.identity()
    b.autoencoder.register_to_config(scaling_factor=1.5)  # same weights, another decoding of the states
    assert a.identity() != b.identity()


@pytest.mark.parametrize("overrides, match", [
    ({"latent_channels": -1}, "latent_channels"),
    ({"latent_channels": 4, "vae_channels": [16]}, "vae_channels"),
    ({"latent_channels": 4, "vae_channels": [8] * 6}, "halve the image side 16 evenly"),
])
def test_latent_config_errors_name_the_field(overrides, match):
    with pytest.raises(TempflowError, match=match):
        build_policy("tiny", seed=0, model_overrides={"image_size": 16, **overrides})


def test_encoding_prompts_leaves_the_tokenizer_and_the_identity_as_loaded(policy_dir, tmp_path):
    """The tokenizer call sets truncation and padding on the tokenizer; they are put back, so a policy
    that has encoded prompts (held by `tempflow loop`) hashes and saves as the folder it came from."""
    from stages.artifacts.policy import PolicyRecord
    from stages.policies.base import save_policy

    policy, record = load_policy(policy_dir)
    before = policy.tokenizer.backend_tokenizer.to_str()
    policy.encode(["a red circle", "two blue squares"])
    assert policy.tokenizer.backend_tokenizer.to_str() == before and policy.identity() == record.identity
    save_policy(policy, tmp_path / "again", PolicyRecord(kind=record.kind, model=record.model))
    assert (tmp_path / "again/tokenizer/tokenizer.json").read_bytes() == (policy_dir / "tokenizer/tokenizer.json").read_bytes()
    assert load_policy(tmp_path / "again")[1].identity == record.identity
