"""Start-up of the command line: `tempflow --help`, each `tempflow CMD --help`, and each stage
process from its launch to its first model forward pass, on tiny inputs built here.

    python examples/benchmark/startup.py [--repeats 5] [--out docs/startup.json]

Every figure is wall-clock from before the process is spawned, so the interpreter's own start is
in it. For a stage, the process runs the real `tempflow` command line with one addition: a global
forward pre-hook (``torch.nn.modules.module.register_module_forward_pre_hook``) that notes the
time of the first forward of any module and then ends the process; what the stage would do after
that is not measured. Importing torch for the hook does not change the total (the stage imports it
anyway); it moves it ahead of the command module. The median of ``--repeats`` launches is given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMPFLOW = str(Path(sys.executable).parent / "tempflow")  # the console script of this environment

FIRST_FORWARD = """
import os, sys, time
import torch

def first(module, args):
    with open(os.environ["STARTUP_MARK"], "w") as f:
        f.write(repr(time.time()))
    os._exit(0)

torch.nn.modules.module.register_module_forward_pre_hook(first)
from tempflow_cli.main import cli
cli.main(sys.argv[1:], prog_name="tempflow")
"""


def tempflow(*args: str, cwd: Path) -> None:
    subprocess.run([TEMPFLOW, *args], cwd=cwd, check=True, capture_output=True)


def build_inputs(work: Path) -> dict[str, list[str]]:
    """Tiny artifacts for every stage, made through the command line; returns each stage's arguments."""
    (work / "prompts.txt").write_text("a red circle\ntwo blue squares\n")
    tempflow("init", "--preset", "tiny", "--image-size", "16", "--out", "policy", cwd=work)
    rollout = ["--num-steps", "4", "--seeds-per-prompt", "2", "--branches", "2", "--batch-size", "8"]
    tempflow("rollout", "--policy", "policy", "--prompts", "prompts.txt", "--out", "rollout", *rollout, cwd=work)
    tempflow("score", "--rollout", "rollout", "--reward", "shapes", "--out", "scores.parquet", cwd=work)
    tempflow("make-tiny", "clip", "--out", "clip", cwd=work)
    tempflow("rec", "prepare", "--source", "simulator", "--sim-users", "100", "--split", "time", "--out", "s.parquet", cwd=work)
    tiny_rec = ["--layers", "1", "--heads", "2", "--width", "16", "--context", "8", "--epochs", "1"]
    tempflow("rec", "pretrain", "--data", "s.parquet", "--out", "rec", *tiny_rec, cwd=work)
    return {
        "rollout": ["rollout", "--policy", "policy", "--prompts", "prompts.txt", "--out", "o", *rollout],
        "score (pickscore, tiny folder)": ["score", "--rollout", "rollout", "--reward", "pickscore",
                                           "--reward-model", "pickscore=clip", "--out", "o.parquet"],
        "update": ["update", "--policy", "policy", "--rollout", "rollout", "--rewards", "scores.parquet", "--out", "o"],
        "eval": ["eval", "--policy", "policy", "--per-task", "1", "--out", "o"],
        "pretrain": ["pretrain", "--image-size", "16", "--steps", "2", "--autoencoder-steps", "2", "--out", "o"],
        "rec pretrain": ["rec", "pretrain", "--data", "s.parquet", "--out", "o", *tiny_rec],
        "rec train": ["rec", "train", "--data", "s.parquet", "--policy", "rec", "--out", "o", "--epochs", "1"],
        "rec eval": ["rec", "eval", "--data", "s.parquet", "--policy", "rec", "--out", "o.json"],
    }


def time_help(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.time()
        subprocess.run([TEMPFLOW, *args], check=True, capture_output=True)
        times.append(time.time() - began)
    return statistics.median(times)


def time_first_forward(args: list[str], work: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        mark = work / "mark"
        mark.unlink(missing_ok=True)
        env = {**os.environ, "STARTUP_MARK": str(mark)}
        began = time.time()
        done = subprocess.run([sys.executable, "-c", FIRST_FORWARD, *args], cwd=work, env=env, capture_output=True, text=True)
        if not mark.exists():
            raise SystemExit(f"{' '.join(args)} ended before any forward (exit {done.returncode}): {done.stderr[-500:]}")
        times.append(float(mark.read_text()) - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--helps-only", action="store_true", help="Time the --help answers, not the stages.")
    args = parser.parse_args()
    from tempflow_cli.main import cli

    helps = [["--help"]] + [[name, "--help"] for name in cli.list_commands(None) if name != "rec"]
    helps += [["rec", name, "--help"] for name in cli.get_command(None, "rec").commands]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stages = {} if args.helps_only else build_inputs(work)
        report = {"help_seconds": {" ".join(h): time_help(h, args.repeats) for h in helps},
                  "first_forward_seconds": {name: time_first_forward(a, work, args.repeats) for name, a in stages.items()},
                  "python": sys.version.split()[0], "repeats": args.repeats,
                  "threads_env": os.environ.get("OMP_NUM_THREADS")}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
