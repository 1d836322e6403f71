"""The ``tempflow`` command line: parse, build a stage config, call one stage function, render.

    tempflow init    --preset tiny --out POLICY
    tempflow rollout --policy POLICY --prompts FILE --out ROLLOUT
    tempflow score   --rollout ROLLOUT --reward jpeg_compressibility --out SCORES.parquet
    tempflow update  --policy POLICY --rollout ROLLOUT --rewards SCORES.parquet --out NEW_POLICY
    tempflow report  --metrics-dir DIR --out DIR
    tempflow pretrain --world shapes --out POLICY
    tempflow eval    --policy POLICY --out DIR
    tempflow check   rollout --branches 4 + update --beta 0.004
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click

from stages.errors import TempflowError
from tempflow_cli.options import config_options, pop_config
from tempflow_cli.ui import comparison, progress_bars, summary

# diffusers and transformers load inside the stage functions; stages are imported inside commands.

PRESET_HELP = {  # mirrors stages.policies.PRESETS, which would import torch just to print --help (tests/test_cli.py checks)
    "tiny": "random tiny pixel-space SD3 transformer + CLIP text encoder, built from a config",
    "shapes": "the shapes world's model: a UNet (channels 32/64; the prompt enters through cross-attention "
              "at its coarsest level only, no pooled text) on the 4x8x8 latents of a small AutoencoderKL; "
              "`tempflow pretrain` trains both",
}
OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (it is replaced only once complete).")
DEVICE = click.option("--device", default="cpu", show_default=True, help="torch device to run the model on, e.g. cuda:0.")
THREADS = click.option(
    "--threads", type=click.IntRange(min=1, max=4096), default=None,
    help="CPU threads torch may use (torch.set_num_threads). Default: torch's, one per core. Give each of "
         "several stages run side by side its share of the cores: on 2 cores, two processes of 2 threads "
         "each ran a UNet batch about 60x slower than two of 1 thread each.")


OUTPUT_KINDS = {"score": {"out": "file"}, "update": {"out": "dir", "metrics_path": "file"}, "check": {"out": "file"}}
"""What each command writes, by option: a folder unless said here; ``--checkpoint`` is pretrain's own."""
OUTPUT_OPTIONS = ("out", "metrics_path", "checkpoint")


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every partial output is removed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StageCommand(click.Command):
    """Runs a stage with every path it reads protected: an output that would replace, or lie inside,
    any input (whatever option names it) is refused before any work, and again when it is written."""

    def invoke(self, ctx: click.Context) -> Any:
        from stages.artifacts import check_out_free, protected_inputs

        paths = {p.name: ctx.params.get(p.name) for p in self.params if isinstance(p.type, click.Path)}
        inputs = tuple(v for name, v in paths.items() if v is not None and name not in OUTPUT_OPTIONS)
        kinds = {"out": "dir", **OUTPUT_KINDS.get(self.name or "", {})}
        outputs = {paths[name]: kind for name, kind in kinds.items() if paths.get(name) is not None}
        for path, kind in outputs.items():
            folders = tuple(other for other, k in outputs.items() if other != path and k == "dir")
            check_out_free(path, bool(ctx.params.get("overwrite")), inputs, kind, outputs=folders)
        threads = ctx.params.pop("threads", None)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        with protected_inputs(inputs):
            return super().invoke(ctx)


class TempflowGroup(click.Group):
    """Turns user errors into one line on stderr and a non-zero exit; --debug keeps the traceback."""

    command_class = StageCommand

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        extra.pop("standalone_mode", None)
        previous = _on_sigterm_raise()
        try:
            code = super().main(args=args, prog_name=prog_name or "tempflow", standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:  # bare `tempflow`: the help is the answer
            click.echo(err.ctx.get_help() if err.ctx else "")
            sys.exit(0)
        except click.UsageError as err:  # bad option or value: one line, naming it, then --help
            where = f"tempflow {err.ctx.info_name} --help" if err.ctx and err.ctx.parent else "tempflow --help"
            click.echo(f"error: {err.format_message()} (see `{where}`)", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        committed = len(_committed_outputs())
        try:
            return super().invoke(ctx)
        except (TempflowError, OSError, MemoryError) as err:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {_error_line(err)}", err=True)
            ctx.exit(1)
        except RuntimeError as err:  # torch.OutOfMemoryError (CUDA), without importing torch here
            if type(err).__name__ != "OutOfMemoryError" or ctx.params.get("debug"):
                raise
            click.echo(f"error: out of GPU memory ({' '.join(str(err).split())[:160]}); lower --batch-size, or use "
                       "--dtype bf16", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as err:
            kept = _committed_outputs()[committed:]
            done = f"{', '.join(map(str, kept))} was written, the rest was not" if kept else "the stage's output was not written"
            click.echo(f"interrupted: {done}; run it again", err=True)
            ctx.exit(128 + (err.signum if isinstance(err, Interrupted) else signal.SIGINT))


def _committed_outputs() -> list[Path]:
    """The outputs stages.artifacts has committed so far; none before it is imported (importing it
    here would load numpy for every --help)."""
    artifacts = sys.modules.get("stages.artifacts")
    return artifacts.committed_outputs() if artifacts is not None else []


def _error_line(err: BaseException) -> str:
    from stages.errors import os_error_line

    if isinstance(err, OSError):
        return os_error_line(err)
    if isinstance(err, MemoryError):
        return "out of memory; lower --batch-size (or the sizes of the model or rollout)"
    return " ".join(str(err).split())  # one line, whatever the message held


def _on_sigterm_raise() -> Any:
    """Make SIGTERM raise :class:`Interrupted` (main thread only); returns the handler it replaced."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    return signal.signal(signal.SIGTERM, handler)


@click.group(cls=TempflowGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.version_option(package_name="tempflow")
def cli(debug: bool) -> None:
    """TempFlow-GRPO: fine-tune flow-matching text-to-image models toward a reward.

    Each stage reads and writes artifacts on disk: init makes a policy, rollout samples branched
    trajectories into webdataset shards, score writes rewards to parquet, update takes one GRPO
    step and writes a new policy. `dvc repro` chains them (dvc.yaml + params.yaml).

    The built-in shapes world needs no downloads: pretrain trains a small text-to-image model on
    rendered shapes, eval scores a policy on prompts it never trained on.
    """


LORA_TARGETS_HELP = {  # mirrors stages.policies.lora.DEFAULT_TARGETS (importing it would load torch for --help)
    "sd3": "attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,attn.add_v_proj,attn.to_add_out",
    "flux": "sd3's plus ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2",
}
DTYPE_CHOICES = ["fp32", "bf16", "fp16"]


def dtype_option(help_text: str, name: str = "--dtype"):
    """A ``--dtype``-like choice of fp32 (the default), bf16 or fp16; each command says what it sets."""
    return click.option(name, type=click.Choice(DTYPE_CHOICES), default="fp32", show_default=True, help=help_text)


@cli.command()
@click.option("--preset", type=click.Choice(list(PRESET_HELP)), default="tiny", show_default=True,
              help="Model to build (without --from). " + "; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()))
@click.option("--from", "base_dir", type=click.Path(path_type=Path), default=None,
              help="A diffusers pipeline folder to fine-tune instead of a preset: StableDiffusion3Pipeline (SD3, "
                   "SD3.5; kind sd3) or FluxPipeline (FLUX.1 dev or schnell; kind flux), as model_index.json names "
                   "it. The policy refers to it by absolute path and a fingerprint of its files, never copies it; "
                   "a base folder that later moves or changes is refused.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Policy folder to create.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random initial weights (a preset's model, or the LoRA adapter's A matrices).")
@click.option("--image-size", type=int, default=32, show_default=True, help="Image side in pixels (the tiny and shapes presets).")
@click.option("--vocab-from", type=click.Path(path_type=Path), default=None,
              help="Prompts file whose words join the tokenizer's vocabulary (presets; words outside it become [UNK]).")
@click.option("--lora-rank", type=int, default=32, show_default=True,
              help="With --from: rank r of the LoRA adapter that training changes (Flow-GRPO: 32 on SD3, 64 on FLUX).")
@click.option("--lora-alpha", type=float, default=None,
              help="With --from: LoRA alpha; the adapter's output is scaled by alpha / r. Default: twice the rank.")
@click.option("--lora-targets", default=None,
              help="With --from: comma-separated module-name suffixes the adapter wraps. Default: Flow-GRPO's for "
                   "the kind; " + "; ".join(f"{k}: {v}" for k, v in LORA_TARGETS_HELP.items()) + ".")
@click.option("--full", is_flag=True,
              help="With --from: fine-tune the whole transformer instead of a LoRA adapter (float32 master weights; "
                   "each update then writes the full transformer into its policy folder).")
@click.option("--max-sequence-length", type=int, default=0, show_default=True,
              help="With --from: T5 tokens per prompt; 0: the pipeline's own (sd3 256, flux 512).")
@dtype_option("With --from: dtype the transformer is loaded in to attach the adapter (the adapter itself is "
                   "drawn in float32 either way, so this saves memory without changing it).")
@OVERWRITE
def init(preset: str, base_dir: Path | None, out: Path, seed: int, image_size: int, vocab_from: Path | None,
         lora_rank: int, lora_alpha: float | None, lora_targets: str | None, full: bool, max_sequence_length: int,
         dtype: str, overwrite: bool) -> None:
    """Create a policy folder: from a preset (config.json + safetensors weights), or on a diffusers
    pipeline folder with --from (config.json + a LoRA adapter that reproduces the base exactly)."""
    from stages.artifacts import atomic_output
    from stages.policies import PolicyRecord, save_policy

    ctx = click.get_current_context()
    if base_dir is not None:
        _refuse_with_from(ctx, ("preset", "image_size", "vocab_from"))
        if full:
            _refuse_given(ctx, ("lora_rank", "lora_alpha", "lora_targets"), "describes a LoRA adapter; --full trains "
                          "the whole transformer")
        from stages.policies.pipeline import init_from

        policy = init_from(base_dir, seed=seed, lora=None if full else (lora_rank, lora_alpha, lora_targets),
                           max_sequence_length=max_sequence_length, dtype=dtype)
        rows: dict[str, Any] = {"kind": policy.kind, "base": policy.model["base"]["path"],
                                "training": "full transformer" if full else f"LoRA r{policy.lora.rank} alpha {policy.lora.alpha:g}"}
    else:
        _refuse_without_from(ctx, ("lora_rank", "lora_alpha", "lora_targets", "full", "max_sequence_length", "dtype"))
        policy = _preset_policy(preset, seed, image_size, vocab_from)
        rows = {"preset": preset}
    record = PolicyRecord(kind=policy.kind, model=policy.model if base_dir is not None else _model_config(policy))
    with atomic_output(out, overwrite=overwrite) as tmp:
        save_policy(policy, tmp, record)
    trained = policy.trainable().parameters() if full else (p for _, p in policy.trainable_parameters())
    rows.update({"trainable parameters": sum(p.numel() for p in trained),
                 "state (sampled)": "x".join(map(str, policy.sample_shape)), "folder size": _size(out),
                 "identity": record.identity[:16]})
    summary(f"policy {out}", rows)


def _preset_policy(preset: str, seed: int, image_size: int, vocab_from: Path | None) -> Any:
    from stages.policies import DEFAULT_WORDS, build_policy, prompt_words
    from stages.prompts import read_prompts

    words = list(DEFAULT_WORDS)
    if vocab_from is not None:
        words += prompt_words(read_prompts(vocab_from))
    return build_policy(preset, seed, {"image_size": image_size, "vocab": list(dict.fromkeys(words))})


def _model_config(policy: Any) -> dict[str, Any]:
    from stages.policies import model_config

    return model_config(policy)


def _refuse_given(ctx: click.Context, names: tuple[str, ...], why: str) -> None:
    given = [n for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"--{given[0].replace('_', '-')} {why}")


def _refuse_with_from(ctx: click.Context, names: tuple[str, ...]) -> None:
    _refuse_given(ctx, names, "describes a preset; with --from the model is the folder's")


def _refuse_without_from(ctx: click.Context, names: tuple[str, ...]) -> None:
    _refuse_given(ctx, names, "applies to a diffusers folder given with --from")


def _size(folder: Path) -> str:
    total = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    return f"{total / 2**20:.2f} MiB"


TINY_KINDS = {"sd3": "pipeline", "flux-dev": "pipeline", "flux-schnell": "pipeline", "clip": "reward model",
              "aesthetic": "reward model"}
"""What ``make-tiny`` writes, by kind (stages.policies.tiny_pipelines and stages.rewards.tiny describe each)."""


@cli.command(name="make-tiny")
@click.argument("kind", type=click.Choice(list(TINY_KINDS)))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to create.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@OVERWRITE
def make_tiny(kind: str, out: Path, seed: int, overwrite: bool) -> None:
    """Write a toy model folder with random weights, in the layout of a real release: a diffusers
    pipeline with the real classes of SD3.5 (sd3) or FLUX.1 (flux-dev, flux-schnell), or a reward
    model (clip: for --reward-model pickscore/clipscore/hpsv2=DIR; aesthetic: CLIP plus the
    predictor's head), at a size a CPU runs in seconds, tokenizer files generated on the spot. Try
    `init --from`, `score --reward-model` and the whole loop on them before your own models."""
    from stages.artifacts import atomic_output
    from stages.limits import check_seed

    check_seed("seed", seed)
    with atomic_output(out, overwrite=overwrite) as tmp:
        if TINY_KINDS[kind] == "pipeline":
            from stages.policies.tiny_pipelines import make_tiny_pipeline

            make_tiny_pipeline(kind, tmp, seed)
        else:
            from stages.rewards.tiny import make_tiny_reward

            make_tiny_reward(kind, tmp, seed)
    summary(f"{TINY_KINDS[kind]} {out}", {"kind": kind, "folder size": _size(out)})


def _rollout_options(fn):
    return config_options("stages.rollout:RolloutConfig", choices={"algo": "stages.rollout:ALGORITHMS"})(fn)


@cli.command()
@click.option("--policy", "policy_dir", type=click.Path(path_type=Path), required=True, help="Policy folder to sample with.")
@click.option("--prompts", type=click.Path(path_type=Path), required=True, help="Text file, one prompt per line ('#' comments).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Rollout folder to create.")
@_rollout_options
@DEVICE
@THREADS
@dtype_option("dtype the models (transformer, text encoders, VAE) compute in; the SDE math, log-probs and "
                   "stored states stay float32. bf16 on a GPU for SD3.5/FLUX; tiny policies run in fp32 only.")
@OVERWRITE
def rollout(policy_dir: Path, prompts: Path, out: Path, device: str, dtype: str, overwrite: bool, **kwargs: Any) -> None:
    """Sample trajectories and write trained transitions to webdataset shards.

    The text encoders run once: every prompt's embeddings (and the negative prompt's) are stored in
    the rollout, so the update never loads them. The manifest records the resolution, guidance,
    schedule and dtype; the update samples with exactly those.

    Several processes: `torchrun --nproc_per_node N $(which tempflow) rollout ...` gives each rank
    whole batches of the prompt x seed trajectories (round robin) and its own shards
    (shard-rNNN-*.tar); rank 0 writes the manifest once all have finished. The samples, keys and
    bytes, are those of one process with the same config.
    """
    from stages.distributed import rank_device
    from stages.policies import load_policy
    from stages.prompts import read_prompts
    from stages.rollout import RolloutConfig, run_rollout

    config = pop_config(RolloutConfig, kwargs)
    prompt_list = read_prompts(prompts)
    policy, record = load_policy(policy_dir, rank_device(device), dtype)
    start = time.perf_counter()
    with progress_bars("NFE") as progress:
        result = run_rollout(policy, prompt_list, config, out,
                             {"identity": record.identity, "path": str(policy_dir), "step": record.step},
                             progress=progress, overwrite=overwrite)
    seconds = time.perf_counter() - start
    summary(f"rollout {out}", {
        "algo": config.algo, "prompts": result.prompts, "samples": result.samples, "shards": result.shards,
        "steps trained": ",".join(map(str, result.trained_steps)), "NFE": result.nfe, "decodes": result.decodes,
        "seconds": round(seconds, 2), "NFE/s": round(result.nfe / max(seconds, 1e-9), 1),
    })


def _reward_help() -> str:
    return ("Reward component, repeatable; the total is the weighted sum. Built-in: jpeg_compressibility, "
            "jpeg_incompressibility, shapes, shapes_strict; model rewards (need --reward-model): pickscore, "
            "clipscore, hpsv2, aesthetic; a server's name from --reward-url; or module:function taking "
            "(images uint8 (N,H,W,3), prompts) and returning N floats.")


def _sources(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    """``NAME=DIR`` / ``NAME=URL`` options as a dict (parsed before --reward, which needs them)."""
    from stages.rewards import parse_source

    found: dict[str, str] = {}
    for value in values:
        try:
            name, source = parse_source(value, param.opts[0])
        except TempflowError as err:
            raise click.BadParameter(str(err), ctx, param) from None
        if name in found:
            raise click.BadParameter(f"{name} is given twice", ctx, param)
        found[name] = source
    return found


def _plan_rewards(ctx: click.Context, param: click.Parameter, texts: tuple[str, ...]) -> list[Any]:
    """--reward's components with their folders and URLs, checked before anything runs."""
    from stages.rewards import plan_rewards

    try:
        return plan_rewards(texts, ctx.params.get("reward_models"), ctx.params.get("reward_urls"))
    except TempflowError as err:
        raise click.BadParameter(str(err), ctx, param) from None


def _reward_options(default: tuple[str, ...] = ()):
    """--reward and where its model and remote components come from; shared by score and eval
    (score has no default reward; eval's is the shapes world's)."""
    shown = f" Default: {', '.join(default)}." if default else ""
    return lambda fn: _add_reward_options(fn, click.option(
        "--reward", "rewards", metavar="NAME[:WEIGHT]", multiple=True, required=not default, default=default,
        callback=_plan_rewards, help=_reward_help() + shown))


def _add_reward_options(fn, reward_option):
    options = [
        reward_option,
        click.option("--reward-model", "reward_models", metavar="NAME=DIR", multiple=True, is_eager=True,
                     callback=_sources, help="Local folder of a model reward, e.g. pickscore=~/models/PickScore_v1 "
                     "(a transformers CLIP folder; see README, Rewards); repeatable."),
        click.option("--reward-url", "reward_urls", metavar="NAME=URL", multiple=True, is_eager=True,
                     callback=_sources, help="A reward server: NAME becomes a --reward that POSTs each batch to URL "
                     "(protocol in README, Rewards); repeatable."),
        click.option("--reward-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
                     help="Seconds a reward server may stay silent on a batch before the try counts as failed."),
        click.option("--reward-retries", type=click.IntRange(min=0, max=20), default=3, show_default=True,
                     help="Tries after the first when a reward server is down, times out or answers 5xx/429 "
                     "(waiting 1, 2, 4 ... s)."),
        dtype_option("dtype model rewards compute in (bf16 or fp16 on a GPU).", "--reward-dtype"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@cli.command()
@click.option("--rollout", "rollout_dir", type=click.Path(path_type=Path), required=True, help="Rollout folder to score.")
@_reward_options()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Parquet file to write.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per reward call.")
@DEVICE
@THREADS
@OVERWRITE
def score(rollout_dir: Path, rewards: list, out: Path, batch_size: int, device: str, overwrite: bool,
          reward_models: dict, reward_urls: dict, reward_timeout: float, reward_retries: int, reward_dtype: str) -> None:
    """Compute rewards for a rollout's images; one parquet row per sample.

    Model rewards load once from the folders --reward-model names and run on --device, in batches of
    --batch-size:

        tempflow score --rollout r --reward pickscore --reward-model pickscore=PickScore_v1 --out s.parquet

    Under `torchrun --nproc_per_node N $(which tempflow) score ...` each rank scores every N-th image
    (on its own GPU with --device cuda); rank 0 writes the parquet.
    """
    from stages.rewards import RewardRuntime
    from stages.score import run_score

    runtime = RewardRuntime(device, reward_dtype, reward_timeout, reward_retries)
    with progress_bars("samples") as progress:
        result = run_score(rollout_dir, rewards, out, batch_size=batch_size, progress=progress, overwrite=overwrite,
                           runtime=runtime)
    rows: dict[str, Any] = {"samples": result.samples, "images scored": result.images}
    rows.update({f"{c} mean": m for c, m in result.mean.items()})
    rows.update({f"{c} std": s for c, s in result.std.items()})
    summary(f"scores {out}", rows)


def _update_options(fn):
    return config_options("stages.update:UpdateConfig", choices={
        "weighting": "stages.update:WEIGHTINGS", "adv_group": "stages.update:ADV_GROUPS", "kl_form": "stages.flow:KL_FORMS",
        "adv_std": {"group": "the group's std", "global": "the rollout's std"}})(fn)


@cli.command()
@click.option("--policy", "policy_dir", type=click.Path(path_type=Path), required=True, help="Policy that sampled the rollout.")
@click.option("--rollout", "rollout_dir", type=click.Path(path_type=Path), required=True, help="Rollout folder.")
@click.option("--rewards", "scores", type=click.Path(path_type=Path), required=True, help="Scores parquet of that rollout.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New policy folder to create.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="KL reference policy. Default: the one recorded in --policy, or --policy itself on the first "
                   "update. A LoRA policy's reference is always its base (the adapter disabled).")
@click.option("--metrics", "metrics_path", type=click.Path(path_type=Path), default=None,
              help="Also write the update's metrics JSON here (it is always written into OUT/metrics.json).")
@_update_options
@DEVICE
@THREADS
@OVERWRITE
def update(policy_dir: Path, rollout_dir: Path, scores: Path, out: Path, reference: Path | None,
           metrics_path: Path | None, device: str, overwrite: bool, **kwargs: Any) -> None:
    """Take one GRPO iteration (inner epochs of minibatch steps) and write the new policy.

    The models run in the dtype the rollout recorded (so the first-step ratio is 1), with the
    prompts' conditioning the rollout stored (no text encoder is loaded). A LoRA policy's KL
    reference is its base with the adapter disabled (no second model); a LoRA policy folder holds
    only the new adapter and its optimizer state.

    Under `torchrun --nproc_per_node N $(which tempflow) update ...` it trains with
    DistributedDataParallel (gloo on the CPU, nccl with --device cuda): every rank draws the same
    global batches of --batch-size, decodes and trains its own rows of each, and checks its own
    first-step ratio; the new policy is the one-process update's within float rounding. Rank 0
    writes it.
    """
    from stages.update import UpdateConfig, run_update

    config = pop_config(UpdateConfig, kwargs)
    with progress_bars("samples") as progress:
        result = run_update(policy_dir, rollout_dir, scores, out, config, reference_dir=reference,
                            metrics_path=metrics_path, device=device, progress=progress, overwrite=overwrite)
    m = result.metrics
    summary(f"policy {out} (step {m['step']})", {
        k: m[k] for k in ("reward_mean", "trained_samples", "skipped_samples", "optimizer_steps", "loss", "policy_loss",
                          "kl", "clip_fraction", "ratio_min", "ratio_mean", "ratio_max", "first_step_ratio_deviation",
                          "grad_norm")
    })


class EvalParam(click.ParamType):
    """``NAME=DIR``: a `tempflow eval` output folder and the name the report gives it."""

    name = "NAME=DIR"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if not isinstance(value, str):
            return value
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            self.fail(f"{value!r} is not NAME=DIR, e.g. base=runs/eval/base", param, ctx)
        return name, Path(folder)


@cli.command()
@click.option("--metrics-dir", type=click.Path(path_type=Path), required=True, help="Folder of update metrics JSON files.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Folder for curve.json, evals.json, curve.png, rewards.png and summary.json.")
@click.option("--eval", "evals", type=EvalParam(), multiple=True,
              help="A `tempflow eval` folder to compare, as NAME=DIR; repeat, first = before, last = after.")
@click.option("--eval-dir", type=click.Path(path_type=Path), default=None,
              help="A folder of `tempflow eval` folders, each named for the policy it measured; taken in the "
                   "order of their policies' steps (after any --eval).")
@OVERWRITE
def report(metrics_dir: Path, out: Path, evals: tuple, eval_dir: Path | None, overwrite: bool) -> None:
    """Gather a loop's update metrics into a reward curve (curve.json for `dvc plots`, curve.png) and a
    summary; with evaluations, a table of them from first to last."""
    from stages.report import eval_folders, read_evals, write_report

    named = list(evals) + (list(eval_folders(eval_dir).items()) if eval_dir is not None else [])
    evals = dict(named)
    twice = sorted(name for name, count in Counter(name for name, _ in named).items() if count > 1)
    if twice:
        raise TempflowError(f"report: eval name(s) {', '.join(twice)} given twice (--eval and --eval-dir share one "
                            "namespace); rename one")
    summary(f"report {out}", write_report(metrics_dir, out, overwrite=overwrite, evals=evals))
    if evals:
        columns = {name: {"step": m["step"], "reward": m["reward"],
                          **({"strict accuracy": m["strict"]} if m["strict"] is not None else {}),
                          **{f"reward_{c}": mean for c, (mean, _) in m["components"].items() if len(m["components"]) > 1},
                          **{f"strict: {task}": v for task, v in m["per_task"].items()}}
                   for name, m in read_evals(evals).items()}
        comparison("eval (deterministic ODE samples)", columns)


def _pretrain_options(fn):
    return config_options("stages.pretrain:PretrainConfig", choices={"world": "stages.pretrain:WORLDS",
                                                                     "preset": PRESET_HELP})(fn)


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Policy folder to create.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Resumable checkpoint folder. Default: OUT.ckpt beside OUT. A rerun with the same options "
                   "continues from it; it is deleted once OUT is written.")
@_pretrain_options
@DEVICE
@THREADS
@OVERWRITE
def pretrain(out: Path, checkpoint: Path | None, device: str, overwrite: bool, **kwargs: Any) -> None:
    """Pretrain a text-to-image policy on a built-in world's rendered images: for a latent preset
    (shapes) first its autoencoder, then flow matching on the latents.

    The shapes world draws its scenes on the fly: the autoencoder learns images of every scene,
    held-out pairings included (a codec that never saw a yellow triangle could not draw one); flow
    matching learns the train prompts only. An interrupted run resumes from its checkpoint, in
    either phase, and ends with the same weights.
    """
    from stages.pretrain import PretrainConfig, run_pretrain

    config = pop_config(PretrainConfig, kwargs)
    with progress_bars("steps") as progress:
        result = run_pretrain(config, out, checkpoint=checkpoint, device=device, progress=progress, overwrite=overwrite)
    summary(f"pretrained policy {out}", {
        "world": config.world, "flow-matching steps": result.steps, "resumed from": result.resumed or "-",
        "final loss (last 100 steps)": result.final_loss, "seconds": round(result.seconds, 1),
        "images/s": round(result.images / max(result.seconds, 1e-9), 1),
    })


def _eval_options(fn):
    return config_options("stages.evaluate:EvalConfig")(fn)


@cli.command(name="eval")
@click.option("--policy", "policy_dir", type=click.Path(path_type=Path), required=True, help="Policy folder to evaluate.")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="Prompts file, one per line (default: a balanced subset of the shapes world's --split); with "
              "the shapes reward they must follow its grammar.")
@click.option("--split", type=click.Choice(["heldout", "validation", "test", "train"]), default="heldout", show_default=True,
              help="World split to draw prompts from when --prompts is not given; validation and test are disjoint halves "
              "of heldout (choose settings on one, report the other).")
@click.option("--per-task", type=click.IntRange(min=1), default=16, show_default=True,
              help="Prompts per task type drawn from --split.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for metrics.json, results.jsonl, grid.png.")
@_reward_options(default=("shapes",))
@click.option("--save-images", is_flag=True, help="Also write every image, as out/images/NNNNN.png (named in results.jsonl).")
@_eval_options
@DEVICE
@THREADS
@dtype_option("dtype the policy's models compute in, as for rollout.")
@OVERWRITE
def eval_(policy_dir: Path, prompts: Path | None, split: str, per_task: int, out: Path, device: str, overwrite: bool,
          rewards: list, reward_models: dict, reward_urls: dict, reward_timeout: float, reward_retries: int,
          reward_dtype: str, save_images: bool, dtype: str, **kwargs: Any) -> None:
    """Evaluate a policy: deterministic ODE samples of fixed seeds, scored by every --reward.

    In the shapes world (the default reward), also strict accuracy per task; prompts must then follow
    the world's grammar: `a red circle`, `two blue squares`, `a red circle and a blue square`, `a red
    circle left of a blue square` (also right of, above, below). Any policy kind takes any prompts
    with other rewards, including ones it was not trained on (a held-out "gold" reward):

        tempflow eval --policy p --prompts my.txt --reward pickscore --reward-model pickscore=DIR --out e

    Under `torchrun --nproc_per_node N $(which tempflow) eval ...` each rank samples and scores whole
    batches, round robin; the images and figures are one process's, and rank 0 writes them.
    """
    from stages.evaluate import EvalConfig, read_eval_prompts, run_eval
    from stages.rewards import RewardRuntime

    config = pop_config(EvalConfig, kwargs)
    prompt_list, source = read_eval_prompts(prompts, split, per_task, config.seed)
    runtime = RewardRuntime(device, reward_dtype, reward_timeout, reward_retries)
    with progress_bars("NFE") as progress:
        result = run_eval(policy_dir, prompt_list, out, config, device=device, progress=progress, overwrite=overwrite,
                          source=source, rewards=rewards, runtime=runtime, dtype=dtype, save_images=save_images)
    m = result.metrics
    rows: dict[str, Any] = {"prompts": f"{m['prompts']} ({source})", "images": m["images"],
                            "reward": f"{m['reward']:.4g} (SE {m['reward_se']:.2g})"}
    if len(m["rewards"]) > 1:
        rows.update({f"reward_{c}": f"{v['mean']:.4g} (SE {v['se']:.2g})" for c, v in m["rewards"].items()})
    if "strict" in m:
        rows["strict accuracy"] = m["strict"]
        rows.update({f"{task}: reward / strict": f"{v['reward']:.3f} / {v['strict']:.3f}" for task, v in m["per_task"].items()})
    summary(f"eval {out} (policy step {m['policy']['step']})", rows)


CHECKED_CONFIGS = {"pretrain": ("stages.pretrain", "PretrainConfig"), "rollout": ("stages.rollout", "RolloutConfig"),
                   "score": None, "update": ("stages.update", "UpdateConfig"), "eval": ("stages.evaluate", "EvalConfig")}
"""The commands `tempflow check` checks, and the config each builds from its options (score builds none)."""


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Also write a one-line record of what was checked here (what a DVC stage depends on).")
@OVERWRITE
@click.argument("commands", nargs=-1, type=click.UNPROCESSED, required=True)
def check(out: Path | None, overwrite: bool, commands: tuple[str, ...]) -> None:
    """Check stage options without running anything: COMMAND OPTIONS... [+ COMMAND OPTIONS...].

    Each COMMAND (pretrain, rollout, score, update, eval) parses its OPTIONS and builds its config
    as it would when run, so that a value it would refuse fails here, with the error it would give,
    the command named in front. Paths it needs but is not given are left unchecked, as are
    conflicts between commands (an update option that does not suit the rollout's algorithm). The
    default DVC run starts with this, so that a bad `dvc exp run -S` value fails before any stage
    runs. check's own options come before the first COMMAND.

        tempflow check rollout --branches 1 + update --beta 0.04
    """
    from stages.artifacts import atomic_output

    parts: list[list[str]] = [[]]
    for arg in commands:
        parts.append([]) if arg == "+" else parts[-1].append(arg)
    checked = [_check_command(click.get_current_context(), part) for part in parts]
    if out is not None:
        with atomic_output(out, overwrite=overwrite, kind="file") as tmp:
            tmp.write_text(f"options valid: {' '.join(checked)}\n")  # the same text for any valid values
    summary("check", {name: "options valid" for name in checked})


def _check_command(ctx: click.Context, args: list[str]) -> str:
    """Parse ``args`` (``COMMAND OPTIONS...``) as that command would and build its config; its name."""
    import importlib

    if not args or args[0] not in CHECKED_CONFIGS:
        raise click.UsageError(f"expected one of {', '.join(CHECKED_CONFIGS)} before its options, got "
                               f"{args[0] if args else 'nothing'!r} (separate commands with +)", ctx)
    name, options = args[0], args[1:]
    command = cli.get_command(ctx, name)
    assert command is not None
    if any(opt in ("-h", "--help") for opt in options):
        raise click.UsageError(f"{name} --help: check runs nothing; see `tempflow {name} --help`", ctx)
    given = {opt.split("=", 1)[0] for opt in options if opt.startswith("--")}
    paths = [param for param in command.params  # required paths it is not given: placeholders, never opened
             if isinstance(param, click.Option) and param.required and isinstance(param.type, click.Path)
             and not given & set(param.opts)]
    options = [arg for param in paths for arg in (param.opts[0], "-")] + options
    with command.make_context(name, options, parent=ctx) as sub:
        if CHECKED_CONFIGS[name] is not None:
            module, cls = CHECKED_CONFIGS[name]
            try:
                pop_config(getattr(importlib.import_module(module), cls), dict(sub.params))
            except TempflowError as err:  # named once: some configs name their command already
                raise TempflowError(str(err) if str(err).startswith(f"{name}: ") else f"{name}: {err}") from err
    return name


from tempflow_cli.rec import rec  # noqa: E402  (the recommender's group; it imports this module's helpers)

cli.add_command(rec)


def main() -> None:  # pragma: no cover - console entry point
    cli(prog_name="tempflow")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
