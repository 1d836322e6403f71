"""``tempflow rec ...``: the recommender's stages (prepare, pretrain, train, eval), each leaving an
artifact on disk, like the image stages. This module imports the shared command machinery
(:mod:`tempflow_cli.command`), never :mod:`tempflow_cli.main`, which adds this group to ``tempflow``.
Its stages are imported inside the commands when they run, for start-up time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tempflow_cli.command import DEVICE, OVERWRITE, THREADS, CommandGroup, config
from tempflow_cli.options import config_options, literal, save_readings
from tempflow_cli.ui import progress_bars, summary


@click.group(cls=CommandGroup)
def rec() -> None:
    """Offline RL for sequential recommendation (CRR-Transformer, arXiv:2307.14450).

    prepare turns logged events into sessions (parquet), pretrain fits the causal transformer by
    next-item cross-entropy (the supervised baseline), train fine-tunes it offline with CRR (or BC,
    SQN, SA2C), eval ranks all items for held-out events.
    """


FILES = config("stages.recsys.data:PrepareFiles", reads={"source": "source", "events": "events", "clicks": "clicks",
                                                          "buys": "buys"})


@rec.command(configs={"files": FILES, "config": config("stages.recsys.data:PrepareConfig")}, outputs={"out": "file"})
@config_options("stages.recsys.data:PrepareConfig", choices={"source": "stages.recsys.data:SOURCES",
                                                             "split": "stages.recsys.data:SPLITS"})
@click.option("--events", type=click.Path(path_type=Path), default=None, help="retailrocket: its events.csv.")
@click.option("--clicks", type=click.Path(path_type=Path), default=None, help="yoochoose: its clicks file.")
@click.option("--buys", type=click.Path(path_type=Path), default=None, help="yoochoose: its buys file.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Sessions parquet to write.")
@OVERWRITE
def prepare(events: Path | None, clicks: Path | None, buys: Path | None, out: Path, overwrite: bool, config: Any,
            files: Any) -> None:
    """Read logged events, check every row, and write sessions with their splits."""
    from stages.recsys.stages import run_prepare

    summary(f"sessions {out}", run_prepare(config, out, files, overwrite=overwrite))


def _algo_option(fn):
    algos = literal("stages.recsys.losses:ALGOS")
    return click.option("--algo", type=click.Choice(list(algos)), default="crr", show_default=True,
                        help="; ".join(f"{k}: {v}" for k, v in algos.items()))(fn)


def _train_options(fn):
    return config_options("stages.recsys.train:TrainConfig", choices={"weight": "stages.recsys.losses:WEIGHTS",
                                                                      "baseline": "stages.recsys.losses:BASELINES"})(fn)


CHECKPOINT = click.option(
    "--checkpoint", type=click.Path(path_type=Path), default=None,
    help="Resumable checkpoint folder, written every --checkpoint-every steps. Default: OUT.ckpt beside OUT. "
         "A rerun with the same options and inputs continues from it; it is deleted once OUT is written.")
TRAIN = config("stages.recsys.train:TrainConfig")


@rec.command(configs={"model": config("stages.recsys.model:RecModelConfig"), "config": TRAIN})
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Sessions parquet of `rec prepare`.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model folder to create.")
@click.option("--init-from", type=click.Path(path_type=Path), default=None,
              help="A local GPT-2 folder (e.g. DistilGPT2's) whose blocks and position embeddings start the "
                   "transformer; --layers, --heads and --width must be its shape. Default: random weights.")
@config_options("stages.recsys.model:RecModelConfig")
@_train_options
@CHECKPOINT
@DEVICE
@THREADS
@OVERWRITE
def pretrain(data: Path, out: Path, init_from: Path | None, checkpoint: Path | None, device: str, overwrite: bool,
             model: Any, config: Any) -> None:
    """Fit the transformer by next-item cross-entropy on the train events (the supervised baseline).
    An interrupted run resumes from its checkpoint and ends with the same weights."""
    from stages.recsys.stages import Run, run_pretrain

    with progress_bars("steps") as progress:
        metrics = run_pretrain(data, Run(out, checkpoint, overwrite), model, config, device=device,
                               progress=progress, init_from=init_from)
    summary(f"model {out}", _headline(metrics))


@rec.command(configs={"config": TRAIN})
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Sessions parquet of `rec prepare`.")
@click.option("--policy", "policy_dir", type=click.Path(path_type=Path), required=True,
              help="Model folder to start from (usually `rec pretrain`'s).")
@_algo_option
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Model folder to create.")
@_train_options
@CHECKPOINT
@DEVICE
@THREADS
@OVERWRITE
def train(data: Path, policy_dir: Path, algo: str, out: Path, checkpoint: Path | None, device: str, overwrite: bool,
          config: Any) -> None:
    """Fine-tune a model offline on the logged sessions with CRR, BC, SQN or SA2C. An interrupted run
    resumes from its checkpoint and ends with the same weights."""
    from stages.recsys.stages import Run, run_train

    with progress_bars("steps") as progress:
        metrics = run_train(data, policy_dir, Run(out, checkpoint, overwrite), algo, config, device=device,
                            progress=progress)
    summary(f"model {out} ({algo})", _headline(metrics))


@rec.command(name="eval", configs={"config": config("stages.recsys.stages:RecEvalConfig")}, outputs={"out": "file"})
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Sessions parquet of `rec prepare`.")
@click.option("--policy", "policy_dir", type=click.Path(path_type=Path), default=None,
              help="Model folder to evaluate (or --popularity).")
@click.option("--popularity", is_flag=True,
              help="Evaluate the most-popular floor instead of a model: items ranked by their train events.")
@config_options("stages.recsys.stages:RecEvalConfig", choices={"split": {
    "validation": "choose settings on these", "test": "report these"}, "protocol": "stages.recsys.metrics:PROTOCOLS"})
@click.option("--out", type=click.Path(path_type=Path), required=True, help="metrics.json to write.")
@DEVICE
@THREADS
@OVERWRITE
def eval_(data: Path, policy_dir: Path | None, popularity: bool, out: Path, device: str, overwrite: bool,
          config: Any) -> None:
    """Rank the candidate items for each held-out event (by default every item the user has not
    interacted with before it): HR@k and NDCG@k (k = 5, 10, 20) over all targets and for clicks and
    purchases apart, the reward of hits, each with its standard error, and every target's rank (for
    paired comparisons); on the simulator's sessions also the policy's return, session length and
    purchases online. --popularity gives the floor a model must beat."""
    from stages.recsys.stages import run_eval

    if (policy_dir is None) == (not popularity):
        raise click.UsageError("give exactly one of --policy and --popularity")
    metrics = run_eval(data, policy_dir, out, config, device=device, overwrite=overwrite)
    rows = {k: v for k, v in metrics.items() if k.endswith("@10") or k.endswith("targets")}
    rows.update({f"online {k}": v for k, v in metrics.get("online", {}).items()})
    summary(f"eval {out} ({config.split})", rows)


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """A training's summary rows: its windows, the last epoch's losses, validation HR@10, seconds."""
    last = metrics["epochs"][-1] if metrics.get("epochs") else {}
    return {"train windows": metrics["windows"], "epochs": len(metrics.get("epochs", [])),
            **{f"final {k}": v for k, v in last.items() if k != "epoch"},
            "validation purchase hr@10": metrics["validation"].get("purchase_hr@10"),
            "validation click hr@10": metrics["validation"].get("click_hr@10"), "seconds": round(metrics["seconds"], 1)}


save_readings()  # what the options above read from the stages' sources, for the next start
