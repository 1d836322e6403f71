"""GPU figures for the sd3 policy kind at SD3.5-Medium shape (issue 14, item 9).

Builds a diffusers folder whose transformer has SD3.5 Medium's published configuration (24 joint
blocks, width 1536, dual attention in blocks 0-12, RMS qk-norm; random bf16 weights) with small text
encoders and VAE of the right output shapes, then measures, at 512 px in bf16 with LoRA r32:

* rollout: tempflow's rollout NFE/s (CFG 4.5, K = 4 branches at every step of T = 10) against the
  bare batched transformer forward at the same rows (each NFE is one guided velocity = 2 rows);
* update: samples/s of `run_update` against a bare forward + backward through the LoRA transformer;
* peak GPU memory of each, and the first-step ratio deviation in bf16.

    python examples/benchmark/gpu_sd35.py --out DIR          # on a GPU machine, a few minutes
    python examples/benchmark/gpu_sd35.py --out DIR --smoke  # a toy shape on the CPU: checks the script

Writes DIR/gpu_sd35.json and prints it. Text encoders and VAE are toy-sized on purpose: the figures
are the transformer's, which is where rollout and update spend their time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SD35_MEDIUM = dict(  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SMOKE = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=32,
             pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")


def build_base(folder: Path, config: dict, dtype: torch.dtype) -> None:
    """A StableDiffusion3Pipeline folder: the given transformer, toy CLIP-L/G and T5 whose widths give the
    transformer its 2048-wide pooled and 4096-wide token inputs, and a 16-channel VAE with factor 8."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from stages.policies.tiny_pipelines import make_tokenizers

    clip, t5 = make_tokenizers(folder.parent / "tokenizer-scratch")
    pooled, joint = config["pooled_projection_dim"], config["joint_attention_dim"]

    def clip_model(width: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip), hidden_size=width, intermediate_size=width, num_hidden_layers=1,
            num_attention_heads=max(1, width // 64), max_position_embeddings=77, projection_dim=width,
            bos_token_id=len(clip) - 2, eos_token_id=len(clip) - 1, pad_token_id=len(clip) - 1))

    t5_model = T5EncoderModel(T5Config(vocab_size=len(t5), d_model=joint, d_kv=64, d_ff=256, num_layers=1,
                                       num_heads=max(1, joint // 512), decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                        latent_channels=16, layers_per_block=1, norm_num_groups=8, shift_factor=0.0609,
                        scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        transformer = SD3Transformer2DModel(**config)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.to(dtype), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_model(pooled * 3 // 8), tokenizer=clip, text_encoder_2=clip_model(pooled * 5 // 8),
        tokenizer_2=clip, text_encoder_3=t5_model, tokenizer_3=t5)
    pipe.save_pretrained(folder, safe_serialization=True)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - start) / repeats


def bare_figures(policy, rows: int, update_rows: int, repeats: int) -> dict:
    """The transformer alone: a guided batched forward of ``rows`` velocities (2 x rows inputs), and
    a forward + backward of ``update_rows`` guided velocities through the LoRA parameters."""
    device, shape = policy.device, policy.sample_shape
    cond = {k: v.to(device) for k, v in policy.encode(["a photo of a cat"] * rows).items()}
    negative = policy.encode([""])
    cond.update({f"negative.{k}": v.to(device).expand(rows, *v.shape[1:]) for k, v in negative.items()})
    x, sigma = torch.randn(rows, *shape, device=device), torch.full((rows,), 0.7, device=device)
    with torch.no_grad():
        forward = _timed(lambda: policy.velocity(x, sigma, cond), repeats)
    sub = {k: v[:update_rows] for k, v in cond.items()}
    params = [p for _, p in policy.trainable_parameters()]

    def step():
        v = policy.velocity(x[:update_rows], sigma[:update_rows], sub)
        torch.autograd.grad(v.float().square().mean(), params)

    backward = _timed(step, repeats)
    return {"bare_forward_velocities_per_s": rows / forward, "bare_fwd_bwd_samples_per_s": update_rows / backward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="toy shape on the CPU, to check the script runs")
    args = parser.parse_args()
    from stages.artifacts.policy import PolicyRecord
    from stages.artifacts.rollout_config import RolloutConfig
    from stages.policies.base import load_policy, save_policy
    from stages.policies.pipeline import init_from
    from stages.rewards import parse_reward_spec
    from stages.rollout import run_rollout
    from stages.score import run_score
    from stages.update import UpdateConfig, run_update

    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", "bf16") if cuda else ("cpu", "bf16" if args.smoke else "fp32")
    resolution = 64 if args.smoke else 512
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    base = work / "sd35m-shaped"
    t0 = time.perf_counter()
    if not (base / "model_index.json").exists():
        build_base(base, SMOKE if args.smoke else SD35_MEDIUM, torch.bfloat16)
    built = time.perf_counter() - t0
    policy = init_from(base, seed=0, lora=(32 if not args.smoke else 4, None, None), dtype=dtype)
    save_policy(policy, work / "p0", PolicyRecord(kind="sd3", model=policy.model))
    prompts = [f"a photo of object {i} on a table" for i in range(8 if not args.smoke else 2)]
    rollout_cfg = RolloutConfig(num_steps=10, branches=4, seeds_per_prompt=2, batch_size=16, resolution=resolution,
                                guidance_scale=4.5, samples_per_shard=128)

    loaded, record = load_policy(work / "p0", device, dtype)
    loaded.configure_sampling(resolution, 4.5, "")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    bare = bare_figures(loaded, rows=16, update_rows=8, repeats=5 if cuda else 1)
    bare_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = run_rollout(loaded, prompts, rollout_cfg, work / "rollout",
                         {"identity": record.identity, "path": str(work / "p0")}, overwrite=True)
    _sync()
    rollout_s = time.perf_counter() - start
    rollout_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del loaded
    run_score(work / "rollout", [parse_reward_spec("jpeg_compressibility:1.0")], work / "scores.parquet", overwrite=True)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    update = run_update(work / "p0", work / "rollout", work / "scores.parquet", work / "p1",
                        UpdateConfig(batch_size=8, shuffle_buffer=64), device=device, overwrite=True)
    _sync()
    update_s = time.perf_counter() - start
    figures = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "dtype": dtype, "resolution": resolution,
        "transformer": "SD3.5-Medium config, random weights" if not args.smoke else "toy",
        "lora_rank": 32 if not args.smoke else 4, "base_build_s": built,
        **bare, "bare_peak_gib": bare_peak,
        "rollout_nfe": result.nfe, "rollout_s": rollout_s, "rollout_nfe_per_s": result.nfe / rollout_s,
        "rollout_peak_gib": rollout_peak,
        "update_samples": update.metrics["trained_samples"], "update_s_incl_loading": update_s,
        "update_samples_per_s": update.metrics["trained_samples"] / update_s,
        "update_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "first_step_ratio_deviation": update.metrics["first_step_ratio_deviation"],
    }
    (args.out / "gpu_sd35.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
