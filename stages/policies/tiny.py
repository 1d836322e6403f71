"""The tiny presets: a denoiser (SD3 transformer or UNet) on pixels or on a small autoencoder's
latents, a small CLIP text encoder and a word-level tokenizer, all built from a config (no downloads).
Their folder holds every weight (``transformer/`` or ``unet/``, ``text_encoder/``, ``tokenizer/``,
``vae/``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stages.artifacts.prompts import read_prompts
from stages.policies.base import Cond, Policy, hide_library_progress, save_module, tensor_hash
from stages.support.errors import TempflowError
from stages.support.limits import gib
from stages.support.rules import Rules

# diffusers, transformers and tokenizers are imported where the models are built, for start-up time.

# latents + small CLIP text encoder + word-level tokenizer.

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]  # CLIP pools at [EOS]; id 2 would trigger its legacy path
DEFAULT_WORDS = ["a", "an", "the", "and", "of", "with", "on", "in", "left", "right", "above", "below", "one", "two", "three", "four", "five", "red", "green", "blue", "yellow", "magenta", "cyan", "white", "black", "orange", "purple", "pink", "gray", "brown", "square", "squares", "circle", "circles", "triangle", "triangles", "shape", "shapes", "big", "small", "large", "tiny", "photo", "picture", "image", "drawing", "painting", "cat", "dog", "tree", "house", "car", "flower", "sky", "sea", "mountain"]


@dataclass
class TinyConfig(Rules):
    """Architecture of the tiny policies: a flow model on pixels or latents, small enough for a CPU.
    Built from a preset (with `init`'s or `pretrain`'s --image-size) or read from a policy's config.json,
    so its refusals name its fields, not options."""

    command = "tiny model"
    flag = ""

    image_size: int = 32
    """Side of the square RGB image, in pixels (the state: ``(3, image_size, image_size)`` in pixel space,
    ``(latent_channels, state_size, state_size)`` on latents)."""
    denoiser: str = "sd3"
    """``sd3``: ``diffusers.SD3Transformer2DModel`` (patch tokens, joint attention with the text);
    ``unet``: ``diffusers.UNet2DConditionModel`` (convolutions, cross-attention at the coarsest
    level), whose convolutions learn clean shape edges in far fewer steps on a CPU."""
    patch_size: int = 2
    """Transformer patch size; the state's side (``state_size``) must be a multiple of it (``sd3`` only)."""
    num_layers: int = 2
    """Joint transformer blocks (``sd3`` only)."""
    num_attention_heads: int = 2
    """Attention heads (``unet``: of its cross-attention blocks)."""
    attention_head_dim: int = 16
    text_hidden_size: int = 32
    """Width of the text encoder, also the transformer's joint-attention and pooled widths."""
    text_layers: int = 2
    max_prompt_tokens: int = 16
    """Prompts are padded/truncated to this many tokens (including [EOS])."""
    vocab: list[str] = field(default_factory=lambda: list(DEFAULT_WORDS))
    """Word-level vocabulary (lower case); other words map to [UNK]."""
    unet_channels: list[int] = field(default_factory=lambda: [24, 48, 96])
    """UNet channels per resolution level, finest first; the coarsest level cross-attends to the
    text (``unet`` only)."""
    latent_channels: int = 0
    """0: the denoiser works on RGB pixels. N > 0: on the N-channel latents of a
    ``diffusers.AutoencoderKL`` (as SD3 and FLUX do), ``2 ** (len(vae_channels) - 1)`` times smaller
    per side; the policy decodes them to images with the autoencoder's decoder."""
    vae_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Autoencoder channels per resolution level, finest first (``latent_channels > 0`` only)."""
    pooled_text: bool = True
    """``unet`` only: the pooled text embedding joins the timestep embedding (as SD3's does) besides the
    cross-attention to the token states. Without it the UNet reads the prompt through its cross-attention
    alone; on the shapes world that made held-out bases depend far less on the pretraining seed
    (BENCHMARKS.md, "The base depends on chance")."""

    @property
    def state_size(self) -> int:
        """Side of the state the denoiser works on: the image's, or its latent's."""
        return self.image_size // 2 ** (len(self.vae_channels) - 1) if self.latent_channels else self.image_size

    @property
    def state_channels(self) -> int:
        return self.latent_channels or 3

    def __post_init__(self) -> None:
        self.choice("denoiser", DENOISERS)
        self.at_least(1, "image_size", "patch_size", "num_layers", "num_attention_heads", "attention_head_dim",
                      "text_hidden_size", "text_layers", "max_prompt_tokens")
        self.at_least(0, "latent_channels")  # 0: pixel space
        self.require(isinstance(self.pooled_text, bool), "pooled_text", "true or false")
        if self.latent_channels:
            self._check_levels("vae_channels", self.image_size, "the image side")
        if self.denoiser == "unet":
            self._check_levels("unet_channels", self.state_size, "the state's side")
        else:
            self.require(self.pooled_text, "pooled_text", "true with denoiser sd3 (the transformer always takes the "
                         "pooled text)")
        self.require(self.state_size % self.patch_size == 0, "patch_size",
                     f"a divisor of the state's side {self.state_size} (sizes such as 32 and 2)")
        self.at_most("image_size", MAX_TINY_IMAGE_SIZE,
                     f"the tiny presets are CPU models; one {self.image_size}x{self.image_size} state alone takes "
                     f"{gib(4 * self.state_channels * self.state_size ** 2)} and a batch far more")

    def _check_levels(self, name: str, side: int, what: str) -> None:
        """A diffusers UNet or autoencoder: >= 2 levels, group-norm friendly widths, a side it can halve."""
        channels = getattr(self, name)
        self.require(len(channels) >= 2 and all(c >= 8 and c % 8 == 0 for c in channels), name,
                     ">= 2 levels, each a multiple of 8 (the group-norm groups)")
        self.require(side % 2 ** (len(channels) - 1) == 0, name,
                     f"levels that halve {what} {side} evenly ({len(channels)} levels need a multiple of "
                     f"{2 ** (len(channels) - 1)})")


MAX_TINY_IMAGE_SIZE = 512
DENOISERS = {"sd3": "transformer", "unet": "unet"}  # denoiser -> its folder in a policy


def _build_denoiser(config: TinyConfig) -> nn.Module:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if config.denoiser == "unet":
        levels = len(config.unet_channels)
        return UNet2DConditionModel(
            sample_size=config.state_size,
            in_channels=config.state_channels,
            out_channels=config.state_channels,
            block_out_channels=tuple(config.unet_channels),
            down_block_types=("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=config.text_hidden_size,
            attention_head_dim=config.num_attention_heads,  # diffusers' legacy name: the number of heads
            # the pooled text joins the timestep embedding, as in SD3 (velocity() passes it as class_labels)
            class_embed_type="projection" if config.pooled_text else None,
            projection_class_embeddings_input_dim=config.text_hidden_size if config.pooled_text else None,
        )
    return SD3Transformer2DModel(
        sample_size=config.state_size,
        patch_size=config.patch_size,
        in_channels=config.state_channels,
        out_channels=config.state_channels,
        num_layers=config.num_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.text_hidden_size,
        caption_projection_dim=config.num_attention_heads * config.attention_head_dim,
        pooled_projection_dim=config.text_hidden_size,
        pos_embed_max_size=config.state_size // config.patch_size,
    )


def _build_autoencoder(config: TinyConfig) -> nn.Module:
    """SD3's kind of autoencoder, small: convolutions only (no attention in its middle block).

    ``scaling_factor`` and ``shift_factor`` (latent = (mean - shift) * scale, as in SD3) keep diffusers'
    defaults here; pretraining sets them from the data once the autoencoder is trained."""
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.vae_channels),
        latent_channels=config.latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=config.image_size,
        mid_block_add_attention=False,
    )


def prompt_words(prompts: list[str]) -> list[str]:
    """The words the word-level tokenizer sees in ``prompts`` (lower case; punctuation split off)."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    return [word.lower() for prompt in prompts for word, _ in split.pre_tokenize_str(prompt)]


def build_word_tokenizer(words: list[str], max_length: int):
    """A word-level ``PreTrainedTokenizerFast``: lower-cases, splits on whitespace and punctuation,
    appends [EOS], pads with [PAD] to ``max_length``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in [*SPECIAL_TOKENS, *(w.lower() for w in words)]:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]", model_max_length=max_length
    )


class TinyPolicy(Policy):
    """A diffusers denoiser (``SD3Transformer2DModel`` or ``UNet2DConditionModel``, see
    :attr:`TinyConfig.denoiser`) on RGB pixels in [-1, 1] or on the latents of a small
    ``AutoencoderKL`` (:attr:`TinyConfig.latent_channels`), conditioned by a small
    ``transformers.CLIPTextModelWithProjection``: token states for attention, the pooled projection
    joins the timestep embedding."""

    kind = "tiny"

    def __init__(self, config: TinyConfig, denoiser=None, text_encoder=None, tokenizer=None, autoencoder=None) -> None:
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        hide_library_progress()
        self.config = config
        self.device = torch.device("cpu")
        self.tokenizer = tokenizer or build_word_tokenizer(config.vocab, config.max_prompt_tokens)
        if text_encoder is None:
            text_config = CLIPTextConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=config.text_hidden_size,
                intermediate_size=2 * config.text_hidden_size,
                num_hidden_layers=config.text_layers,
                num_attention_heads=max(1, config.text_hidden_size // 16),
                max_position_embeddings=config.max_prompt_tokens,
                projection_dim=config.text_hidden_size,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                bos_token_id=self.tokenizer.convert_tokens_to_ids("[BOS]"),
            )
            text_encoder = CLIPTextModelWithProjection(text_config)
        self.denoiser = denoiser if denoiser is not None else _build_denoiser(config)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        if config.latent_channels and autoencoder is None:
            autoencoder = _build_autoencoder(config)
        self.autoencoder = autoencoder.eval().requires_grad_(False) if autoencoder is not None else None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.config.state_channels, self.config.state_size, self.config.state_size)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        return self.encode_with_grad(prompts)

    def encode_with_grad(self, prompts: list[str]) -> Cond:
        """:meth:`encode` with autograd on, for pretraining, where the text encoder learns too."""
        backend = self.tokenizer.backend_tokenizer
        truncation, padding = backend.truncation, backend.padding
        batch = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.config.max_prompt_tokens,
            return_tensors="pt",
        )
        # the call leaves its truncation and padding set; the tokenizer is put back as it was, so that a
        # policy that has encoded prompts saves and hashes as the one loaded (tempflow loop holds it)
        backend.no_truncation() if truncation is None else backend.enable_truncation(**truncation)
        backend.no_padding() if padding is None else backend.enable_padding(**padding)
        out = self.text_encoder(input_ids=batch.input_ids.to(self.device),
                                attention_mask=batch.attention_mask.to(self.device))
        return {"hidden": out.last_hidden_state.float(), "pooled": out.text_embeds.float()}

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        timestep = (1000.0 * torch.as_tensor(sigma, dtype=torch.float32, device=x.device)).reshape(-1)
        timestep = timestep.expand(x.shape[0])  # SD3 is fed 1000 * sigma
        if self.config.denoiser == "unet":
            pooled = cond["pooled"] if self.config.pooled_text else None
            out = self.denoiser(x, timestep, encoder_hidden_states=cond["hidden"], class_labels=pooled,
                                return_dict=False)[0]
        else:
            out = self.denoiser(
                hidden_states=x, encoder_hidden_states=cond["hidden"], pooled_projections=cond["pooled"],
                timestep=timestep, return_dict=False,
            )[0]
        return out.float()

    @torch.no_grad()
    def decode(self, x: Tensor) -> np.ndarray:
        x = x.detach().float()
        if self.autoencoder is not None:
            scale, shift = self.autoencoder.config.scaling_factor, self.autoencoder.config.shift_factor or 0.0
            x = self.autoencoder.decode(x.to(self.device) / scale + shift).sample
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()

    def encode_images(self, images: Tensor) -> Tensor:
        """States of images in [-1, 1] ``(B, 3, H, W)``: the images themselves in pixel space, else the
        autoencoder's latent means, shifted and scaled as SD3 does: ``(mean - shift) * scale``."""
        if self.autoencoder is None:
            return images
        scale, shift = self.autoencoder.config.scaling_factor, self.autoencoder.config.shift_factor or 0.0
        with torch.no_grad():
            return (self.autoencoder.encode(images.to(self.device)).latent_dist.mean - shift) * scale

    trainable_attribute = "denoiser"

    def modules(self) -> dict[str, nn.Module]:
        modules = {DENOISERS[self.config.denoiser]: self.denoiser, "text_encoder": self.text_encoder}
        if self.autoencoder is not None:
            modules["vae"] = self.autoencoder
        return modules

    def identity(self) -> str:
        """A hash of every weight, the model config and the tokenizer."""
        return tensor_hash(self.modules(), self.identity_extra())

    @property
    def pixels_per_state(self) -> int:  # type: ignore[override]
        return self.config.image_size // self.config.state_size

    def identity_extra(self) -> bytes:
        config = asdict(self.config)
        latents = ""  # the latent scaling is config, not weights, and decides what decode draws
        if self.autoencoder is not None:
            latents = json.dumps([self.autoencoder.config.scaling_factor, self.autoencoder.config.shift_factor])
        else:  # pixel space: hashed as before latents existed, so older policy folders keep their identity
            del config["latent_channels"], config["vae_channels"]
        if config["pooled_text"]:  # likewise for folders made before the option existed
            del config["pooled_text"]
        return (json.dumps(config, sort_keys=True) + latents + self.tokenizer.backend_tokenizer.to_str()).encode()

    def save_weights(self, path: Path) -> None:
        for folder, module in self.modules().items():
            save_module(module, path / folder)
        self.tokenizer.save_pretrained(path / "tokenizer")

    @classmethod
    def load(cls, path: Path, model_config: dict[str, Any], dtype: torch.dtype = torch.float32) -> TinyPolicy:
        if dtype != torch.float32:
            raise TempflowError("tiny policies run in fp32 only (--dtype fp32): their identity is the hash of their "
                                "float32 weights")
        from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
        from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerFast

        hide_library_progress()
        config = TinyConfig(**model_config)
        model_class = UNet2DConditionModel if config.denoiser == "unet" else SD3Transformer2DModel
        # safetensors only: a policy folder never makes tempflow read a pickle-based weights file
        denoiser = model_class.from_pretrained(path / DENOISERS[config.denoiser], local_files_only=True,
                                               use_safetensors=True)
        text_encoder = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder", local_files_only=True,
                                                                   use_safetensors=True)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer", local_files_only=True)
        autoencoder = None
        if config.latent_channels:
            autoencoder = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True, use_safetensors=True)
        return cls(config, denoiser=denoiser, text_encoder=text_encoder, tokenizer=tokenizer, autoencoder=autoencoder)


PRESETS = {
    "tiny": "random tiny pixel-space SD3 transformer + CLIP text encoder, built from a config",
    "shapes": "the shapes world's model: a UNet (channels 32/64; the prompt enters through cross-attention "
              "at its coarsest level only, no pooled text) on the 4x8x8 latents of a small AutoencoderKL; "
              "`tempflow pretrain` trains both",
}
"""The models `tempflow init` and `tempflow pretrain` build from a config (their architectures:
``stages.policies.tiny.PRESET_MODELS``)."""
PRESET_MODELS: dict[str, dict[str, Any]] = {  # the architecture of each of PRESETS
    "tiny": {},
    # Measured on 2 CPU cores: the SD3 transformer at patch 4 (1.3M parameters, 0.23 s per batch-64
    # step) still drew shapes as scattered 4x4 fragments after 2,000 steps (held-out strict accuracy 0);
    # at patch 2 it drew ragged blobs. A UNet draws clean squares, circles and triangles after 800
    # steps; at channels 16/32/64 (0.82 s per step) about as well as at 24/48/96 (1.4 s per step):
    # held-out reward 0.44 / 0.46, strict accuracy 0.14 / 0.19 on 100 images. But GRPO could not
    # improve that pixel-space base: a gradient over 4,600 transitions lowered the ODE reward along
    # its own direction at any step size, its exploration noise spread over 3,072 pixels. On the
    # 4x8x8 latents of a small autoencoder (256 dimensions, as SD3 works on latents) the UNet runs 5x
    # faster and the same loop raises the reward. Without the pooled text in the timestep embedding
    # the held-out rewards of bases pretrained with seeds 0, 1, 2 lay within 0.027 of their mean
    # (strict accuracy 0.036), against 0.042 (0.055) with it (BENCHMARKS.md, "The base depends on chance").
    "shapes": {"denoiser": "unet", "unet_channels": [32, 64], "num_attention_heads": 4, "text_hidden_size": 64,
               "latent_channels": 4, "vae_channels": [16, 32, 64], "pooled_text": False},
}


def build_policy(preset: str, seed: int, model_overrides: dict[str, Any] | None = None) -> TinyPolicy:
    """A freshly initialised policy of a preset (weights drawn with ``torch.manual_seed(seed)``; the
    preset and the seed are checked by the config that names them)."""
    torch.manual_seed(seed)
    return TinyPolicy(TinyConfig(**{**PRESET_MODELS[preset], **(model_overrides or {})}))


def preset_policy(preset: str, seed: int, image_size: int, vocab_from: Path | None) -> TinyPolicy:
    """`tempflow init`'s preset policy: its words are :data:`DEFAULT_WORDS` and those of ``vocab_from``."""
    words = list(DEFAULT_WORDS)
    if vocab_from is not None:
        words += prompt_words(read_prompts(vocab_from))
    return build_policy(preset, seed, {"image_size": image_size, "vocab": list(dict.fromkeys(words))})


def model_config(policy: TinyPolicy) -> dict[str, Any]:
    return asdict(policy.config)
