"""Policy kind ``flux``: a ``FluxPipeline`` folder (FLUX.1 dev- or schnell-shaped).

The state is the unpacked latent ``(C, H/8, W/8)``; the transformer sees it packed into 2x2 patches
with their position ids, and is fed ``timestep = sigma``. Dev-shaped models
(``guidance_embeds``) take the guidance scale as an embedding — no negative prompt, one forward;
schnell-shaped ones take none. The schedule is the pipeline's: sigmas ``linspace(1, 1/T, T)`` shifted
by the scheduler, with ``mu`` from the image's token count when it uses dynamic shifting.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from stages.policies.base import Cond
from stages.policies.pipeline import PipelinePolicy, loading
from stages.support.errors import TempflowError

# diffusers is imported where a model is built, for start-up time.

DEFAULT_GUIDANCE = 3.5  # FLUX.1-dev's pipeline default


def pack(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of :func:`pack`."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Position ids of the packed latent tokens ``(H/2 * W/2, 3)``, as the pipeline makes them."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


class FluxPolicy(PipelinePolicy):
    kind = "flux"
    pipeline_class = "FluxPipeline"
    components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    text_components = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    default_sequence_length = 512  # FLUX.1-dev's T5 length (schnell's pipeline uses 256)

    @classmethod
    def transformer_class(cls) -> type:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def default_resolution(self) -> int:
        return 128 * self.vae_factor  # FluxPipeline's default_sample_size

    def configure_sampling(self, resolution: int, guidance_scale: float, negative_prompt: str) -> dict[str, Any]:
        multiple = 2 * self.vae_factor * int(self.transformer.config.patch_size)
        self.resolution = self.check_resolution(resolution, multiple, 4096, "2 x VAE factor x patch size: "
                                                "FLUX packs 2x2 latent patches")
        if negative_prompt:
            raise TempflowError("--negative-prompt: FLUX.1 takes no negative prompt (its guidance is an embedding)")
        if not self.guidance_embeds:
            if guidance_scale not in (0.0, 1.0):
                raise TempflowError(f"--guidance-scale {guidance_scale:g}: this FLUX model is schnell-shaped (no "
                                    "guidance embedding); leave it unset")
            self.guidance_scale = None
        else:
            scale = DEFAULT_GUIDANCE if guidance_scale == 0 else float(guidance_scale)
            if not 0.0 < scale <= 100.0:
                raise TempflowError(f"--guidance-scale {guidance_scale:g}: use a value in (0, 100]; FLUX.1-dev uses 3.5")
            self.guidance_scale = scale
        return {"resolution": self.resolution, "guidance_scale": self.guidance_scale, "negative_prompt": None}

    def sigmas(self, num_steps: int, shift: float) -> Tensor:
        """The pipeline's schedule at this resolution; ``shift`` is the scheduler's, not the option's."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift


        with loading(self.base, "scheduler"):
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(self.base, subfolder="scheduler",
                                                                        local_files_only=True)
        c = scheduler.config
        tokens = (self.sample_shape[1] // 2) * (self.sample_shape[2] // 2)
        mu = calculate_shift(tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return scheduler.sigmas.to(torch.float32).cpu()

    def _encode(self, pipe: Any, prompts: list[str]) -> Cond:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                               max_sequence_length=self.model["max_sequence_length"])
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        b, _, h, w = x.shape
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(b)
        embeds = cond["prompt_embeds"].to(x.device, self.dtype)
        guidance = None
        if self.guidance_scale is not None:
            guidance = torch.full((b,), self.guidance_scale, device=x.device, dtype=torch.float32)
        with self.compute():
            out = self.transformer(
                hidden_states=pack(x).to(self.dtype), timestep=(1000 * sigma).to(self.dtype) / 1000,
                guidance=guidance, pooled_projections=cond["pooled_prompt_embeds"].to(x.device, self.dtype),
                encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=self.dtype),
                img_ids=image_ids(h, w, x.device, self.dtype), return_dict=False)[0]
        return unpack(out.float(), h, w)
