"""Genuine diffusers pipeline folders at toy size: the real model and tokenizer classes of SD3.5 and
FLUX.1 with small configs and random weights, saved with ``save_pretrained``.

They load through exactly the path a user's downloaded folder takes (``model_index.json``,
``from_pretrained``, offline), so the sd3 and flux policy kinds are exercised end to end on a CPU.
The tokenizer files are generated here: a byte-level BPE (vocab.json + merges.txt) for CLIP and a
small sentencepiece model for T5 — nothing is downloaded. ``tempflow make-tiny`` writes one.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections import Counter
from pathlib import Path

import torch

from stages.policies.base import hide_library_progress

# diffusers, transformers and sentencepiece are imported where a folder is written, for start-up time.

KINDS = {
    "sd3": "StableDiffusion3Pipeline, SD3.5-shaped: joint blocks with dual attention and RMS qk-norm, CLIP-L, "
           "CLIP-G and a T5 encoder",
    "flux-dev": "FluxPipeline, dev-shaped: double and single-stream blocks with a guidance embedding, dynamic shift",
    "flux-schnell": "FluxPipeline, schnell-shaped: no guidance embedding, static shift 1",
}

_CORPUS = [
    "a photo of a red cat sitting on a blue chair", "two green apples and one yellow banana on the table",
    "a painting of a mountain above the sea at sunset", "three small dogs running left of a large house",
    "an orange circle right of a purple square", "a black and white drawing of a tree below the sky",
    "the magenta triangle and the cyan circle", "a picture of a brown horse in a green field",
    "a pink flower with a gray stone", "one big white car on the road in the city at night",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which byte-level BPE vocabularies use."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def clip_tokenizer_files(folder: Path, merges: int = 120) -> None:
    """``vocab.json`` and ``merges.txt`` in CLIP's format (``</w>`` marks a word's end), learned by
    counting pair frequencies over a small corpus; every byte is in the vocabulary, so any text encodes."""
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    words = Counter(w for line in _CORPUS for w in line.lower().split())
    split = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merge_list: list[tuple[str, str]] = []
    for _ in range(merges):
        pairs: Counter = Counter()
        for w, parts in split.items():
            pairs.update({(a, b): words[w] for a, b in zip(parts, parts[1:])})
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merge_list.append((a, b))
        vocab.append(a + b)
        for w, parts in split.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[w] = out
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merge_list))


def t5_sentencepiece(path: Path, vocab_size: int = 160) -> None:
    """A unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2, no bos)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def make_tokenizers(scratch: Path):
    """A CLIP tokenizer (byte-level BPE) and a T5 tokenizer (sentencepiece), their files written under
    ``scratch`` and loaded from them alone."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    # loaded from the files alone, as transformers reads a folder that has no tokenizer.json
    clip_tokenizer_files(scratch / "clip")
    clip = CLIPTokenizer.from_pretrained(scratch / "clip", model_max_length=77, local_files_only=True)
    (scratch / "t5").mkdir()
    t5_sentencepiece(scratch / "t5/spiece.model")
    t5 = T5TokenizerFast.from_pretrained(scratch / "t5", extra_ids=8, local_files_only=True)
    return clip, t5


def _clip(vocab: int, width: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=width,
                            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(vocab: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_kv=8, d_ff=2 * width, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0))


def _vae(shift: float, scale: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         layers_per_block=1, norm_num_groups=4, sample_size=32, shift_factor=shift,
                         scaling_factor=scale, use_quant_conv=False, use_post_quant_conv=False)


def build_sd3(clip, t5):
    """SD3.5-shaped: 2 joint blocks, the first with dual attention, RMS qk-norm; latents 4 channels,
    VAE factor 2, patch 2 (so images are a multiple of 4 pixels, up to 64)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(0.0609, 1.5305), text_encoder=_clip(len(clip), 16, True), tokenizer=clip,
        text_encoder_2=_clip(len(clip), 16, True), tokenizer_2=clip, text_encoder_3=_t5(len(t5), 32), tokenizer_3=t5,
    )


def build_flux(clip, t5, guidance: bool):
    """FLUX.1-shaped: one double-stream and one single-stream block; dev-shaped (guidance embedding,
    dynamic shift) or schnell-shaped (neither)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    if guidance:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(scheduler=scheduler, vae=_vae(0.1159, 0.3611), text_encoder=_clip(len(clip), 16, False),
                        tokenizer=clip, text_encoder_2=_t5(len(t5), 32), tokenizer_2=t5, transformer=transformer)


def make_tiny_pipeline(kind: str, out: Path, seed: int = 0) -> Path:
    """Write a toy diffusers folder of ``kind`` (see :data:`KINDS`) into ``out`` (which must not exist)."""
    hide_library_progress()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        clip, t5 = make_tokenizers(Path(scratch))
        pipe = build_sd3(clip, t5) if kind == "sd3" else build_flux(clip, t5, guidance=kind == "flux-dev")
        pipe.save_pretrained(out, safe_serialization=True)
    return out
