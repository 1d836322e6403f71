"""Policy kind ``sd3``: a ``StableDiffusion3Pipeline`` folder (SD3, SD3.5 Medium/Large).

Text: CLIP-L and CLIP-G (pooled and token states) plus T5 where the folder has it, encoded by the
pipeline's own ``encode_prompt``. The transformer is fed ``timestep = 1000 * sigma``. Classifier-free
guidance ``v = v_u + g * (v_c - v_u)`` runs ``[negative, positive]`` in one batched forward; when
training, the unconditional half carries no gradient and the guided ``v`` is what the SDE step
scores, so the first update step reproduces the rollout's log-probs (DESIGN §6).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stages.policies.base import Cond
from stages.policies.pipeline import PipelinePolicy
from stages.support.errors import TempflowError

# diffusers is imported where a model is built, for start-up time.

DEFAULT_GUIDANCE = 4.5  # Flow-GRPO's on SD3.5


class SD3Policy(PipelinePolicy):
    kind = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    optional_components = ("text_encoder_3", "tokenizer_3")
    text_components = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))
    default_sequence_length = 256  # the pipeline's T5 length

    @classmethod
    def transformer_class(cls) -> type:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def default_resolution(self) -> int:
        return int(self.transformer.config.sample_size) * self.vae_factor

    def configure_sampling(self, resolution: int, guidance_scale: float, negative_prompt: str) -> dict[str, Any]:
        config = self.transformer.config
        multiple = self.vae_factor * int(config.patch_size)
        self.resolution = self.check_resolution(resolution, multiple, int(config.pos_embed_max_size) * multiple,
                                                "VAE factor x patch size")
        scale = DEFAULT_GUIDANCE if guidance_scale == 0 else float(guidance_scale)
        if not 1.0 <= scale <= 100.0:
            raise TempflowError(f"--guidance-scale {guidance_scale:g}: use 1 (no guidance) up to 100; Flow-GRPO "
                                f"samples SD3.5 at {DEFAULT_GUIDANCE}")
        if scale == 1.0 and negative_prompt:
            raise TempflowError("--negative-prompt needs classifier-free guidance; --guidance-scale 1 turns it off")
        self.guidance_scale = scale
        self._negative = negative_prompt if scale > 1.0 else None
        return {"resolution": self.resolution, "guidance_scale": scale, "negative_prompt": self._negative}

    def _encode(self, pipe: Any, prompts: list[str]) -> Cond:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.model["max_sequence_length"])
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        batch = x.shape[0]
        timestep = (1000.0 * torch.as_tensor(sigma, dtype=torch.float32, device=x.device)).reshape(-1).expand(batch)
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        guided = self.guidance_scale is not None and self.guidance_scale > 1.0
        if guided:  # [negative, positive] in one forward, as the diffusers pipeline batches them
            x = torch.cat([x, x])
            timestep = torch.cat([timestep, timestep])
            embeds = torch.cat([cond["negative.prompt_embeds"], embeds])
            pooled = torch.cat([cond["negative.pooled_prompt_embeds"], pooled])
        with self.compute():
            out = self.transformer(hidden_states=x.to(self.dtype), timestep=timestep,
                                   encoder_hidden_states=embeds.to(x.device, self.dtype),
                                   pooled_projections=pooled.to(x.device, self.dtype), return_dict=False)[0]
        out = out.float()
        if not guided:
            return out
        uncond, text = out.chunk(2)
        uncond = uncond.detach()  # the unconditional branch carries no gradient (Flow-GRPO)
        return uncond + self.guidance_scale * (text - uncond)
