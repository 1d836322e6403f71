"""The toy diffusers folders (stages.policies.tiny_pipelines): genuine SD3 and FLUX pipelines that
diffusers loads offline, with real tokenizers."""

from __future__ import annotations

import pytest

from tests.conftest import PIPELINE_KINDS


@pytest.mark.parametrize("kind", PIPELINE_KINDS)
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
