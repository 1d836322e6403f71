"""The ``tempflow`` command line: parse, build a stage's configs, call one stage function, render.

    tempflow init    --preset tiny --out POLICY
    tempflow rollout --policy POLICY --prompts FILE --out ROLLOUT
    tempflow score   --rollout ROLLOUT --reward jpeg_compressibility --out SCORES.parquet
    tempflow update  --policy POLICY --rollout ROLLOUT --rewards SCORES.parquet --out NEW_POLICY
    tempflow report  --metrics-dir DIR --out DIR
    tempflow pretrain --world shapes --out POLICY
    tempflow eval    --policy POLICY --out DIR
    tempflow check   rollout --branches 4 + update --beta 0.004
    tempflow rec ... (the recommender's commands, tempflow_cli.rec)

Each command's options are generated from its config dataclass (the stage's own, read from source, so
``--help`` imports no torch); the command builds the configs, which validate themselves.
Stages are imported inside the commands when they run, for start-up time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from stages.support.errors import TempflowError
from tempflow_cli.command import DEVICE, OVERWRITE, THREADS, CommandGroup, config, dtype_option, size_of
from tempflow_cli.options import config_options, literal, literal_keys, save_readings
from tempflow_cli.ui import comparison, iteration_line, progress_bars, summary


def _rec() -> click.Command:
    from tempflow_cli.rec import rec  # made when asked for, for start-up time: no image command reads its options

    return rec


@click.group(cls=CommandGroup, lazy={"rec": _rec},
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show the full traceback on errors, and the libraries' own log lines.")
@click.version_option(package_name="tempflow")
def cli(debug: bool) -> None:
    """TempFlow-GRPO: fine-tune flow-matching text-to-image models toward a reward.

    Each stage reads and writes artifacts on disk: init makes a policy, rollout samples branched
    trajectories into webdataset shards, score writes rewards to parquet, update takes one GRPO
    step and writes a new policy. `dvc repro` chains them (dvc.yaml + params.yaml).

    The built-in shapes world needs no downloads: pretrain trains a small text-to-image model on
    rendered shapes, eval scores a policy on prompts it never trained on.
    """



# --------------------------------------------------------------------------------------------
# init, make-tiny


@cli.command(configs={"spec": config("stages.init:InitConfig", base="base_dir")})
@click.option("--from", "base_dir", type=click.Path(path_type=Path), default=None,
              help="A diffusers pipeline folder to fine-tune instead of a preset: StableDiffusion3Pipeline (SD3, "
                   "SD3.5; kind sd3) or FluxPipeline (FLUX.1 dev or schnell; kind flux), as model_index.json names "
                   "it. The policy refers to it by absolute path and a fingerprint of its files, never copies it; "
                   "a base folder that later moves or changes is refused.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Policy folder to create.")
@click.option("--vocab-from", type=click.Path(path_type=Path), default=None,
              help="Prompts file whose words join the tokenizer's vocabulary (presets; words outside it become [UNK]).")
@config_options("stages.init:InitConfig", skip=("base", "vocab_from"),
                choices={"preset": "stages.policies.tiny:PRESETS", "dtype": "stages.support.dtypes:DTYPES"},
                listed={"lora_targets": "stages.policies.lora:DEFAULT_TARGETS"})
@OVERWRITE
def init(out: Path, overwrite: bool, spec: Any) -> None:
    """Create a policy folder: from a preset (config.json + safetensors weights), or on a diffusers
    pipeline folder with --from (config.json + a LoRA adapter that reproduces the base exactly)."""
    from stages.init import run_init

    policy, record = run_init(spec, out, overwrite=overwrite)
    if spec.base is not None:
        training = "full transformer" if spec.full else f"LoRA r{policy.lora.rank} alpha {policy.lora.alpha:g}"
        rows: dict[str, Any] = {"kind": policy.kind, "base": policy.model["base"]["path"], "training": training}
    else:
        rows = {"preset": spec.preset}
    trained = policy.trainable().parameters() if spec.full else (p for _, p in policy.trainable_parameters())
    rows.update({"trainable parameters": sum(p.numel() for p in trained),
                 "state (sampled)": "x".join(map(str, policy.sample_shape)), "folder size": size_of(out),
                 "identity": record.identity[:16]})
    summary(f"policy {out}", rows)


PIPELINE_KINDS = "stages.policies.tiny_pipelines:KINDS"
REWARD_KINDS = "stages.rewards.tiny:KINDS"


@cli.command(name="make-tiny", configs={"make": config("stages.init:MakeTinyConfig")})
@click.argument("kind", type=click.Choice([*literal(PIPELINE_KINDS), *literal(REWARD_KINDS)]))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to create.")
@config_options("stages.init:MakeTinyConfig")
@OVERWRITE
def make_tiny(kind: str, out: Path, overwrite: bool, make: Any) -> None:
    """Write a toy model folder with random weights, in the layout of a real release: a diffusers
    pipeline with the real classes of SD3.5 (sd3) or FLUX.1 (flux-dev, flux-schnell), or a reward
    model (clip: for --reward-model pickscore/clipscore/hpsv2=DIR; aesthetic: CLIP plus the
    predictor's head), at a size a CPU runs in seconds, tokenizer files generated on the spot. Try
    `init --from`, `score --reward-model` and the whole loop on them before your own models."""
    from stages.init import run_make_tiny

    what = run_make_tiny(kind, make, out, overwrite=overwrite)
    summary(f"{what} {out}", {"kind": kind, "folder size": size_of(out)})


# --------------------------------------------------------------------------------------------
# rollout, score, update, report


@cli.command(configs={"config": config("stages.artifacts.rollout_config:RolloutConfig")})
@click.option("--policy", "policy_dir", type=click.Path(path_type=Path), required=True, help="Policy folder to sample with.")
@click.option("--prompts", type=click.Path(path_type=Path), required=True, help="Text file, one prompt per line ('#' comments).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Rollout folder to create.")
@config_options("stages.artifacts.rollout_config:RolloutConfig", choices={"algo": "stages.artifacts.rollout_config:ALGORITHMS"})
@DEVICE
@THREADS
@dtype_option("dtype the models (transformer, text encoders, VAE) compute in; the SDE math, log-probs and "
              "stored states stay float32. bf16 on a GPU for SD3.5/FLUX; tiny policies run in fp32 only.")
@OVERWRITE
def rollout(policy_dir: Path, prompts: Path, out: Path, device: str, dtype: str, overwrite: bool, config: Any) -> None:
    """Sample trajectories and write trained transitions to webdataset shards.

    The text encoders run once: every prompt's embeddings (and the negative prompt's) are stored in
    the rollout, so the update never loads them. The manifest records the resolution, guidance,
    schedule and dtype; the update samples with exactly those.

    Several processes: `torchrun --nproc_per_node N $(which tempflow) rollout ...` gives each rank
    whole batches of the prompt x seed trajectories (round robin) and its own shards
    (shard-rNNN-*.tar); rank 0 writes the manifest once all have finished. The samples, keys and
    bytes, are those of one process with the same config.
    """
    from stages.artifacts.prompts import read_prompts
    from stages.policies.base import load_policy
    from stages.rollout import run_rollout
    from stages.support.distributed import rank_device

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
    return (f"Reward component, repeatable; the total is the weighted sum. Built-in: "
            f"{', '.join(literal_keys('stages.rewards.builtin:REWARDS'))}; model rewards (need --reward-model): "
            f"{', '.join(literal('stages.rewards:MODEL_REWARDS'))}; a server's name from --reward-url; or "
            "module:function taking (images uint8 (N,H,W,3), prompts) and returning N floats.")


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
    """--reward's components with their folders and URLs (parsed into specs before anything runs)."""
    from stages.rewards import plan_rewards

    try:
        return plan_rewards(texts, ctx.params.get("reward_models"), ctx.params.get("reward_urls"),
                            ctx.params.get("reward_processors"))
    except TempflowError as err:
        raise click.BadParameter(str(err), ctx, param) from None


RUNTIME = config("stages.rewards:RewardRuntime", reads={"device": "device"}, dtype="reward_dtype",
                 timeout="reward_timeout", retries="reward_retries")
"""The reward runtime of score and eval, from their --device and --reward-* options."""


def _reward_options(default: tuple[str, ...] = ()):
    """--reward and where its model and remote components come from; shared by score and eval
    (score has no default reward; eval's is the shapes world's)."""
    shown = f" Default: {', '.join(default)}." if default else ""
    options = [
        click.option("--reward", "rewards", metavar="NAME[:WEIGHT]", multiple=True, required=not default,
                     default=default, callback=_plan_rewards, help=_reward_help() + shown),
        click.option("--reward-model", "reward_models", metavar="NAME=DIR", multiple=True, is_eager=True,
                     callback=_sources, help="Local folder of a model reward, e.g. pickscore=~/models/PickScore_v1 "
                     "(a transformers CLIP folder; see README, Rewards); repeatable."),
        click.option("--reward-processor", "reward_processors", metavar="NAME=DIR", multiple=True, is_eager=True,
                     callback=_sources, help="Folder of a model reward's tokenizer and image processor when its own "
                     "folder lacks them, e.g. pickscore=~/models/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore's "
                     "release uses that CLIP's); repeatable."),
        click.option("--reward-url", "reward_urls", metavar="NAME=URL", multiple=True, is_eager=True,
                     callback=_sources, help="A reward server: NAME becomes a --reward that POSTs each batch to URL "
                     "(protocol in README, Rewards); repeatable."),
        click.option("--reward-timeout", type=float, default=120.0, show_default=True,
                     help="Seconds a reward server may stay silent on a batch before the try counts as failed."),
        click.option("--reward-retries", type=int, default=3, show_default=True,
                     help="Tries after the first (at most 20) when a reward server is down, times out or answers "
                     "5xx/429 (waiting 1, 2, 4 ... s)."),
        dtype_option("dtype model rewards compute in (bf16 or fp16 on a GPU).", "--reward-dtype"),
    ]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


@cli.command(configs={"config": config("stages.score:ScoreConfig"), "runtime": RUNTIME}, outputs={"out": "file"})
@click.option("--rollout", "rollout_dir", type=click.Path(path_type=Path), required=True, help="Rollout folder to score.")
@_reward_options()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Parquet file to write.")
@config_options("stages.score:ScoreConfig")
@DEVICE
@THREADS
@OVERWRITE
def score(rollout_dir: Path, rewards: list, out: Path, device: str, overwrite: bool, reward_models: dict,
          reward_urls: dict, reward_processors: dict, config: Any, runtime: Any) -> None:
    """Compute rewards for a rollout's images; one parquet row per sample.

    Model rewards load once from the folders --reward-model names and run on --device, in batches of
    --batch-size:

        tempflow score --rollout r --reward pickscore --reward-model pickscore=PickScore_v1 --out s.parquet

    Under `torchrun --nproc_per_node N $(which tempflow) score ...` each rank scores every N-th image
    (on its own GPU with --device cuda); rank 0 writes the parquet.
    """
    from stages.score import run_score

    with progress_bars("samples") as progress:
        result = run_score(rollout_dir, rewards, out, config, progress=progress, overwrite=overwrite, runtime=runtime)
    rows: dict[str, Any] = {"samples": result.samples, "images scored": result.images}
    rows.update({f"{c} mean": m for c, m in result.mean.items()})
    rows.update({f"{c} std": s for c, s in result.std.items()})
    summary(f"scores {out}", rows)


@cli.command(configs={"config": config("stages.update:UpdateConfig")}, outputs={"metrics_path": "file"})
@click.option("--policy", "policy_dir", type=click.Path(path_type=Path), required=True, help="Policy that sampled the rollout.")
@click.option("--rollout", "rollout_dir", type=click.Path(path_type=Path), required=True, help="Rollout folder.")
@click.option("--rewards", "scores", type=click.Path(path_type=Path), required=True, help="Scores parquet of that rollout.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New policy folder to create.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="KL reference policy. Default: the one recorded in --policy, or --policy itself on the first "
                   "update. A LoRA policy's reference is always its base (the adapter disabled).")
@click.option("--metrics", "metrics_path", type=click.Path(path_type=Path), default=None,
              help="Also write the update's metrics JSON here (it is always written into OUT/metrics.json).")
@config_options("stages.update:UpdateConfig", choices={
    "weighting": "stages.update:WEIGHTINGS", "adv_group": "stages.update:ADV_GROUPS", "kl_form": "stages.flow:KL_FORMS",
    "adv_std": "stages.update:ADV_STDS"})
@DEVICE
@THREADS
@OVERWRITE
def update(policy_dir: Path, rollout_dir: Path, scores: Path, out: Path, reference: Path | None,
           metrics_path: Path | None, device: str, overwrite: bool, config: Any) -> None:
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
    from stages.update import run_update

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
    from stages.report import gather_evals, read_evals, write_report

    named = gather_evals(list(evals), eval_dir)
    summary(f"report {out}", write_report(metrics_dir, out, overwrite=overwrite, evals=named))
    if named:
        columns = {name: {"step": m["step"], "reward": m["reward"],
                          **({"strict accuracy": m["strict"]} if m["strict"] is not None else {}),
                          **{f"reward_{c}": mean for c, (mean, _) in m["components"].items() if len(m["components"]) > 1},
                          **{f"strict: {task}": v for task, v in m["per_task"].items()}}
                   for name, m in read_evals(named).items()}
        comparison("eval (deterministic ODE samples)", columns)


# --------------------------------------------------------------------------------------------
# pretrain, eval: the built-in world


@cli.command(configs={"config": config("stages.pretrain:PretrainConfig")})
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Policy folder to create.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Resumable checkpoint folder. Default: OUT.ckpt beside OUT. A rerun with the same options "
                   "continues from it; it is deleted once OUT is written.")
@config_options("stages.pretrain:PretrainConfig", choices={"world": "stages.worlds:WORLDS",
                                                          "preset": "stages.policies.tiny:PRESETS"})
@DEVICE
@THREADS
@OVERWRITE
def pretrain(out: Path, checkpoint: Path | None, device: str, overwrite: bool, config: Any) -> None:
    """Pretrain a text-to-image policy on a built-in world's rendered images: for a latent preset
    (shapes) first its autoencoder, then flow matching on the latents.

    The shapes world draws its scenes on the fly: the autoencoder learns images of every scene,
    held-out pairings included (a codec that never saw a yellow triangle could not draw one); flow
    matching learns the train prompts only. An interrupted run resumes from its checkpoint, in
    either phase, and ends with the same weights.
    """
    from stages.pretrain import run_pretrain

    with progress_bars("steps") as progress:
        result = run_pretrain(config, out, checkpoint=checkpoint, device=device, progress=progress, overwrite=overwrite)
    summary(f"pretrained policy {out}", {
        "world": config.world, "flow-matching steps": result.steps, "resumed from": result.resumed or "-",
        "final loss (last 100 steps)": result.final_loss, "seconds": round(result.seconds, 1),
        "images/s": round(result.images / max(result.seconds, 1e-9), 1),
    })


@cli.command(name="eval", configs={"config": config("stages.evaluate:EvalConfig"),
                                   "choice": config("stages.evaluate:EvalPrompts"), "runtime": RUNTIME})
@click.option("--policy", "policy_dir", type=click.Path(path_type=Path), required=True, help="Policy folder to evaluate.")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="Prompts file, one per line (default: a balanced subset of the shapes world's --split); with "
              "the shapes reward they must follow its grammar.")
@config_options("stages.evaluate:EvalPrompts", choices={"split": "stages.worlds.shapes:EVAL_SPLITS"})
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for metrics.json, results.jsonl, grid.png.")
@_reward_options(default=("shapes",))
@click.option("--save-images", is_flag=True, help="Also write every image, as out/images/NNNNN.png (named in results.jsonl).")
@config_options("stages.evaluate:EvalConfig")
@DEVICE
@THREADS
@dtype_option("dtype the policy's models compute in, as for rollout.")
@OVERWRITE
def eval_(policy_dir: Path, prompts: Path | None, out: Path, device: str, overwrite: bool, rewards: list,
          reward_models: dict, reward_urls: dict, reward_processors: dict, save_images: bool, dtype: str, config: Any,
          choice: Any, runtime: Any) -> None:
    """Evaluate a policy: deterministic ODE samples of fixed seeds, scored by every --reward.

    In the shapes world (the default reward), also strict accuracy per task; prompts must then follow
    the world's grammar: `a red circle`, `two blue squares`, `a red circle and a blue square`, `a red
    circle left of a blue square` (also right of, above, below). Any policy kind takes any prompts
    with other rewards, including ones it was not trained on (a held-out "gold" reward):

        tempflow eval --policy p --prompts my.txt --reward pickscore --reward-model pickscore=DIR --out e

    Under `torchrun --nproc_per_node N $(which tempflow) eval ...` each rank samples and scores whole
    batches, round robin; the images and figures are one process's, and rank 0 writes them.
    """
    from stages.evaluate import read_eval_prompts, run_eval

    prompt_list, source = read_eval_prompts(prompts, choice, config.seed)
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


# --------------------------------------------------------------------------------------------
# check


CHECKED = ("init", "make-tiny", "pretrain", "rollout", "score", "update", "eval", "loop")
"""The commands `tempflow check` checks: it builds each one's configs from its options, as the command would."""


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
             outputs={"out": "file"})
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Also write a one-line record of what was checked here (what a DVC stage depends on).")
@OVERWRITE
@click.argument("commands", nargs=-1, type=click.UNPROCESSED, required=True)
def check(out: Path | None, overwrite: bool, commands: tuple[str, ...]) -> None:
    """Check stage options without running anything: COMMAND OPTIONS... [+ COMMAND OPTIONS...].

    Each COMMAND (init, make-tiny, pretrain, rollout, score, update, eval, loop) parses its OPTIONS and
    builds its configs as it would when run, so that a value it would refuse fails here, with the
    error it would give. Paths it needs but is not given are left unchecked, as are conflicts
    between commands (an update option that does not suit the rollout's algorithm). The default DVC
    run starts with this, so that a bad `dvc exp run -S` value fails before any stage runs. check's
    own options come before the first COMMAND.

        tempflow check rollout --branches 1 + update --beta 0.04
    """
    from stages.support.outputs import atomic_output

    checked = [_check_command(click.get_current_context(), part) for part in _split_commands(commands)]
    if out is not None:
        with atomic_output(out, overwrite=overwrite, kind="file") as tmp:
            tmp.write_text(f"options valid: {' '.join(checked)}\n")  # the same text for any valid values
    summary("check", {name: "options valid" for name in checked})


def _check_command(ctx: click.Context, args: list[str]) -> str:
    """Parse ``args`` (``COMMAND OPTIONS...``) as that command would and build its configs; its name."""
    if not args or args[0] not in CHECKED:
        raise click.UsageError(f"expected one of {', '.join(CHECKED)} before its options, got "
                               f"{args[0] if args else 'nothing'!r} (separate commands with +)", ctx)
    _command_configs(ctx, args[0], args[1:], "check runs nothing")
    return args[0]


def _split_commands(args: tuple[str, ...]) -> list[list[str]]:
    """``COMMAND OPTIONS... + COMMAND OPTIONS...`` as one list per command."""
    parts: list[list[str]] = [[]]
    for arg in args:
        parts.append([]) if arg == "+" else parts[-1].append(arg)
    return parts


def _command_configs(ctx: click.Context, name: str, options: list[str], why: str,
                     owned: tuple[str, ...] = ()) -> dict[str, Any]:
    """Parse ``options`` as command ``name`` would and build its configs: its parameters, configs built.
    Required paths it is not given get placeholders (never opened); ``owned`` options (the caller's
    own) may not be given."""
    command = cli.get_command(ctx, name)
    if any(opt in ("-h", "--help") for opt in options):
        raise click.UsageError(f"{name} --help: {why}; see `tempflow {name} --help`", ctx)
    given = {opt.split("=", 1)[0] for opt in options if opt.startswith("--")}
    taken = [opt for param in command.params if param.name in owned for opt in param.opts if opt in given]
    if taken:
        raise click.UsageError(f"{name} {taken[0]}: {why}", ctx)
    needed = [param for param in command.params  # required paths and arguments it is not given: placeholders, never opened
              if param.required and not given & set(param.opts) and isinstance(param, click.Option)
              and isinstance(param.type, click.Path)]
    options = [arg for param in needed for arg in (param.opts[0], "-")] + options
    with command.make_context(name, options, parent=ctx) as sub:
        return command.build_configs(sub, dict(sub.params))


# --------------------------------------------------------------------------------------------
# loop


LOOP_STAGES = ("rollout", "score", "update", "eval")
_RUN = ("out", "device", "threads", "dtype", "overwrite")
LOOP_OWNED = {"rollout": ("policy_dir", "prompts", "seed", *_RUN), "score": ("rollout_dir", *_RUN),
              "update": ("policy_dir", "rollout_dir", "scores", "reference", "metrics_path", "seed", *_RUN),
              "eval": ("policy_dir", *_RUN)}
"""Options of each stage that the loop gives itself (eval keeps its --seed and --prompts)."""


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
             configs={"loop": config("stages.loop:LoopConfig")}, outputs={"out": "resumable"})
@click.option("--policy", "policy_dir", type=click.Path(path_type=Path), required=True, help="Policy to start from.")
@click.option("--prompts", type=click.Path(path_type=Path), required=True, help="Text file, one prompt per line ('#' comments).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Loop folder: created, or continued when it holds the same run (more --iterations extend it).")
@config_options("stages.loop:LoopConfig")
@DEVICE
@THREADS
@dtype_option("dtype the models compute in, as for rollout (the updates run in it too).")
@click.option("--overwrite", is_flag=True,
              help="When OUT holds another run (other settings, start policy or code), delete it and start afresh; "
                   "without it, such a folder is refused. A folder of this run is continued either way.")
@click.argument("stages", nargs=-1, type=click.UNPROCESSED)
def loop(policy_dir: Path, prompts: Path, out: Path, device: str, dtype: str, overwrite: bool, stages: tuple,
         loop: Any) -> None:
    """Run GRPO iterations in one process: rollout OPTIONS + score OPTIONS + update OPTIONS [+ eval OPTIONS].

    Each iteration writes what `tempflow rollout`, `score` and `update` would (and every
    --eval-every iterations, `eval`), byte for byte but for wall-clock seconds, with the models loaded
    once. Each stage takes its own command's options, but for the paths, seeds, device, threads and
    dtype, which are the loop's. Iteration i samples with the policy before it and seed --seed + i.

    \b
        tempflow loop --policy runs/base --prompts p.txt --out runs/loop \\
            --iterations 100 --eval-every 10 --keep-every 10 \\
            rollout --branches 4 + score --reward shapes + update --beta 0.04 + eval --split test

    A rerun continues the folder: after a kill, from the last iteration that landed; with more
    --iterations, from where it ended; --keep-every, --keep-rollouts and --eval-every may change on the
    way. Other settings are another run: refused, or started afresh with --overwrite. Rollouts and
    scores are deleted once their update has landed (but the last --keep-rollouts), policies but every
    --keep-every-th and the last; every update's metrics stay, and curve.json holds the reward curve
    so far.
    """
    from stages.artifacts.prompts import read_prompts
    from stages.evaluate import read_eval_prompts
    from stages.loop import EvalPlan, LoopPlan, run_loop

    ctx = click.get_current_context()
    groups = [part for part in _split_commands(stages) if part]
    names = [part[0] for part in groups]
    if names not in (list(LOOP_STAGES[:3]), list(LOOP_STAGES)):
        raise click.UsageError(f"expected rollout OPTIONS + score OPTIONS + update OPTIONS [+ eval OPTIONS] after the "
                               f"loop's own options, got {' '.join(names) or 'none'}", ctx)
    parsed = {part[0]: _command_configs(ctx, part[0], part[1:], "the loop sets it", LOOP_OWNED[part[0]])
              for part in groups}
    if loop.eval_every and "eval" not in parsed:
        raise click.UsageError("--eval-every needs `+ eval OPTIONS` (`+ eval` for its defaults)", ctx)
    evaluation = None
    if "eval" in parsed:
        e = parsed["eval"]
        eval_prompts, source = read_eval_prompts(e["prompts"], e["choice"], e["config"].seed)
        evaluation = EvalPlan(e["config"], eval_prompts, source, e["rewards"], _on_device(e["runtime"], device),
                              e["save_images"])
    score_parsed = parsed["score"]
    plan = LoopPlan(policy=policy_dir, prompts=read_prompts(prompts), rollout=parsed["rollout"]["config"],
                    rewards=score_parsed["rewards"], score=score_parsed["config"],
                    runtime=_on_device(score_parsed["runtime"], device), update=parsed["update"]["config"],
                    dtype=dtype, device=device, eval=evaluation)
    with progress_bars("") as progress:
        result = run_loop(loop, plan, out, progress=progress, on_iteration=iteration_line, overwrite=overwrite)
    summary(f"loop {out}", {"iterations": result.done, "resumed after": result.resumed_from or "-",
                            "policies kept": ", ".join(result.kept), "folder size": size_of(out)})


def _on_device(runtime: Any, device: str) -> Any:
    from dataclasses import replace

    return replace(runtime, device=device)


save_readings()  # what the options above read from the stages' sources, for the next start


def main() -> None:  # pragma: no cover - console entry point
    cli(prog_name="tempflow")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
