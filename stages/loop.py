"""`tempflow loop`: many GRPO iterations in one process, each writing what `tempflow rollout`, `score`
and `update` (and every ``eval_every`` iterations, `eval`) write, byte for byte but for wall-clock
seconds, with the models loaded once.

The loop folder:

    loop.json                 the run and how many iterations have landed (stages.artifacts.loop_state)
    policies/it0001 ...       the policy after each iteration: the last one, and every keep_every-th
    rollouts/it0001, scores/it0001.parquet
                              an iteration's rollout and rewards, deleted once its update has landed
                              (but the last keep_rollouts)
    metrics/it0001.json ...   every update's metrics (what `tempflow report` draws)
    eval/it0000 ...           the start policy's evaluation, and every eval_every-th iteration's
    curve.json                the reward curve so far (`dvc plots show` draws it while the loop runs)

Iteration ``i`` samples with the policy of iteration ``i - 1`` (the start policy for the first) and
seed ``seed + i`` for its rollout and update, so a run of N iterations is a prefix of a run of more:
a loop rerun with more iterations continues where it ended, and one killed anywhere redoes at most
the iteration it was in. What it keeps and how often it evaluates may change between reruns (from
then on). A rerun whose other settings differ is another run: it is refused, or with ``overwrite``
started afresh; so is a folder made by other code.

This module is the one stage that calls the others (as the command line does), so that the files an
iteration writes are exactly theirs; the models stay loaded between iterations: the policy (trained
in place, then sampled with), its KL reference, the text encoders, the reward models.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from stages.artifacts.codecs import write_json
from stages.artifacts.loop_state import LOOP_FILE, LoopState, read_loop_state, write_loop_state
from stages.artifacts.policy import PolicyRecord, read_policy_record
from stages.artifacts.rollout_config import RolloutConfig
from stages.evaluate import EvalConfig, run_eval
from stages.policies.base import Policy, load_policy
from stages.report import build_curve
from stages.rewards import RewardRuntime, RewardSpec, load_rewards
from stages.rollout import run_rollout
from stages.score import ScoreConfig, run_score
from stages.support.distributed import ranks
from stages.support.errors import TempflowError
from stages.support.outputs import atomic_output, clean_partials
from stages.support.progress import Progress, no_progress
from stages.support.rules import Rules
from stages.update import UpdateConfig, load_reference, resolve_reference, run_update

FOLDERS = ("policies", "rollouts", "scores", "metrics", "eval")


@dataclass
class LoopConfig(Rules):
    """How long the loop runs and what it keeps. Every field is also a ``tempflow loop`` option."""

    command = "loop"

    iterations: int = 16
    """GRPO iterations in all. A rerun with more continues from the last one that landed."""
    eval_every: int = 0
    """Evaluate the start policy, every N-th iteration's and the last one's; 0: never."""
    keep_every: int = 0
    """Keep every N-th iteration's policy besides the last one; 0: only the last."""
    keep_rollouts: int = 0
    """Keep the rollouts and scores of the last N iterations, for inspection; older ones are deleted once
    their update has landed."""
    seed: int = 0
    """Iteration i rolls out and updates with seed + i."""
    release_text_encoders: bool = False
    """Free the text encoders after each rollout has encoded its prompts: less memory during the
    update, at the cost of loading them again every iteration."""

    def __post_init__(self) -> None:
        self.at_least(1, "iterations")
        self.at_least(0, "eval_every", "keep_every", "keep_rollouts")
        self.seeds("seed")
        self.at_most("iterations", 10**6 - 1, "iteration folders are named it0001 .. it999999")


@dataclass
class EvalPlan:
    """What an evaluation of the loop runs: the options of `tempflow eval`."""

    config: EvalConfig
    prompts: list[str]
    source: str
    rewards: list[RewardSpec]
    runtime: RewardRuntime
    save_images: bool = False

    def record(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "prompts": self.prompts, "source": self.source,
                "rewards": [s.record() for s in self.rewards], "save_images": self.save_images}


@dataclass
class LoopPlan:
    """What every iteration runs: the options of `tempflow rollout`, `score` and `update` (their seeds
    are the loop's), and of `eval` when the loop evaluates."""

    policy: Path
    prompts: list[str]
    rollout: RolloutConfig
    rewards: list[RewardSpec]
    score: ScoreConfig
    update: UpdateConfig
    runtime: RewardRuntime = RewardRuntime()
    dtype: str = "fp32"
    device: str = "cpu"
    eval: EvalPlan | None = None

    def record(self, loop: LoopConfig, start: PolicyRecord) -> dict[str, Any]:
        """The run, for loop.json: everything an iteration's bytes depend on. Not the number of
        iterations, nor what is kept or how often it evaluates (a rerun may change those), nor the
        device and threads."""
        return {
            "code": code_fingerprint(),
            "start": {"path": str(self.policy), "identity": start.identity},
            "prompts": self.prompts, "dtype": self.dtype,
            "seed": loop.seed,
            "rollout": asdict(replace(self.rollout, seed=0)), "rewards": [s.record() for s in self.rewards],
            "score": asdict(self.score), "update": asdict(replace(self.update, seed=0)),
            "eval": self.eval.record() if self.eval else None,
        }


@dataclass
class IterationReport:
    """What the loop tells its caller after each iteration."""

    iteration: int
    iterations: int
    metrics: dict[str, Any]
    seconds: float
    eval: dict[str, Any] | None = None


@dataclass
class LoopResult:
    resumed_from: int
    done: int
    kept: list[str]


def code_fingerprint() -> str:
    """sha256 of the library's source, every module of ``stages/`` but the recommender's: a loop folder
    made by other code is another run (as DVC, which reruns a stage whose code changed, has it)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if not relative.startswith("recsys/"):
            digest.update(relative.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def name(iteration: int) -> str:
    """``it0001``: an iteration's files' name (``it0000``: the start policy's evaluation)."""
    return f"it{iteration:04d}"


class Held:
    """The models the loop keeps loaded: the policy (its folder's weights, trained in place by each
    update), the KL reference, the rewards of score and eval."""

    def __init__(self, plan: LoopPlan, loop: LoopConfig) -> None:
        self.plan, self.loop = plan, loop
        self.policy: Policy | None = None
        self.record: PolicyRecord | None = None
        self.reference: Policy | None = None
        self.rewards: dict[str, list] = {}

    def load(self, folder: Path) -> tuple[Policy, PolicyRecord]:
        """The policy of ``folder``: loaded the first time, after that the held one, which must be
        that folder's (the last one an update wrote)."""
        if self.policy is None:
            self.policy, self.record = load_policy(folder, self.plan.device, self.plan.dtype)
            self.policy.keep_text_encoders = not self.loop.release_text_encoders
        assert self.record is not None
        if read_policy_record(folder).identity != self.record.identity:
            raise TempflowError(f"{folder} is not the policy the loop holds; its folder changed while the loop ran")
        return self.policy, self.record

    def trained(self, record: PolicyRecord) -> None:
        """The held policy is now the one the update wrote with ``record``."""
        self.record = record
        for param in self.policy.trainable().parameters():  # no gradient is kept through the next rollout
            param.grad = None

    def kl_reference(self, start: Path, start_record: PolicyRecord) -> Policy | None:
        """The frozen KL reference every update of the run compares with (loaded once, after the
        policy), or None when it needs none (beta 0, or a LoRA policy's built-in one)."""
        assert self.policy is not None
        if self.reference is None and self.plan.update.beta > 0 and self.policy.builtin_reference() is None:
            path, identity = resolve_reference(start, start_record, None)
            self.reference = load_reference(path, identity, start, self.plan.device, self.plan.dtype)
        return self.reference

    def reward_fns(self, specs: list[RewardSpec], runtime: RewardRuntime) -> list:
        key = repr(([s.record() for s in specs], asdict(runtime)))
        if key not in self.rewards:
            self.rewards[key] = load_rewards(specs, runtime)
        return self.rewards[key]


def run_loop(loop: LoopConfig, plan: LoopPlan, out: Path, progress: Progress = no_progress,
             on_iteration: Callable[[IterationReport], None] = lambda report: None,
             overwrite: bool = False) -> LoopResult:
    """Run the loop into the folder ``out`` up to ``loop.iterations``, resuming what it holds."""
    if ranks().world > 1:
        raise TempflowError("tempflow loop runs in one process; under torchrun, run rollout, score and update "
                            "(each takes several processes)")
    out, start = Path(out), Path(plan.policy)
    start_record = read_policy_record(start)
    run = plan.record(loop, start_record)
    done = _resume(out, run, loop, overwrite)
    held = Held(plan, loop)
    if plan.eval is not None and loop.eval_every and not (out / "eval" / name(0)).is_dir():
        _evaluate(held, plan.eval, start, out / "eval" / name(0), plan.device, progress)
    resumed_from = done
    for i in range(done + 1, loop.iterations + 1):
        began = time.perf_counter()
        prev = start if i == 1 else out / "policies" / name(i - 1)
        held.load(prev)
        reference = held.kl_reference(start, start_record)
        metrics = _iterate(i, held, plan, loop, prev, out, reference, progress)
        evaluation = None
        if plan.eval is not None and loop.eval_every and (i % loop.eval_every == 0 or i == loop.iterations):
            evaluation = _evaluate(held, plan.eval, out / "policies" / name(i), out / "eval" / name(i),
                                   plan.device, progress)
        _commit_state(out, LoopState(run=run, done=i))
        _retain(out, i, loop)
        on_iteration(IterationReport(i, loop.iterations, metrics, time.perf_counter() - began, evaluation))
    _retain(out, loop.iterations, loop)
    kept = sorted(p.name for p in (out / "policies").iterdir())
    return LoopResult(resumed_from=resumed_from, done=loop.iterations, kept=kept)


def _iterate(i: int, held: Held, plan: LoopPlan, loop: LoopConfig, prev: Path, out: Path,
             reference: Policy | None, progress: Progress) -> dict[str, Any]:
    """Iteration ``i``'s rollout, score and update, as the three commands would write them."""
    policy, record = held.policy, held.record
    seed = loop.seed + i
    rollout, scores = out / "rollouts" / name(i), out / "scores" / f"{name(i)}.parquet"
    new, metrics = out / "policies" / name(i), out / "metrics" / f"{name(i)}.json"
    run_rollout(policy, plan.prompts, replace(plan.rollout, seed=seed), rollout,
                {"identity": record.identity, "path": str(prev), "step": record.step},
                progress=progress, overwrite=True)
    run_score(rollout, plan.rewards, scores, plan.score, progress=progress, overwrite=True, runtime=plan.runtime,
              fns=held.reward_fns(plan.rewards, plan.runtime))
    result = run_update(prev, rollout, scores, new, replace(plan.update, seed=seed), metrics_path=metrics,
                        device=plan.device, progress=progress, overwrite=True, held_policy=policy,
                        held_reference=reference)
    held.trained(result.record)
    with atomic_output(out / "curve.json", overwrite=True, kind="file") as tmp:
        write_json(tmp, build_curve(sorted((out / "metrics").glob("*.json"))))
    return result.metrics


def _evaluate(held: Held, spec: EvalPlan, policy_dir: Path, out: Path, device: str,
              progress: Progress) -> dict[str, Any]:
    """`tempflow eval` of ``policy_dir`` (the held policy's folder) into ``out``."""
    result = run_eval(policy_dir, spec.prompts, out, spec.config, device=device, progress=progress, overwrite=True,
                      source=spec.source, rewards=spec.rewards, runtime=spec.runtime, dtype=held.plan.dtype,
                      save_images=spec.save_images, held=held.load(policy_dir),
                      fns=held.reward_fns(spec.rewards, spec.runtime))
    return result.metrics


def _resume(out: Path, run: dict[str, Any], loop: LoopConfig, overwrite: bool) -> int:
    """How many iterations ``out`` already holds of this run (0 for a new folder, which is made). A
    folder of another run, or one further than ``loop.iterations``, is refused, or with ``overwrite``
    emptied."""
    if out.exists() and not out.is_dir():
        raise TempflowError(f"--out {out} is a file; the loop writes a folder")
    state = read_loop_state(out) if out.is_dir() else None
    problem = None
    if state is None and out.is_dir() and any(out.iterdir()):
        problem = f"--out {out} exists and is no loop folder (it has no {LOOP_FILE})"
    elif state is not None and state.run.get("code") != run["code"]:
        problem = f"--out {out} was made by other tempflow code (the library's source has changed since)"
    elif state is not None and state.run != run:
        problem = f"--out {out} holds another run (its {LOOP_FILE} records other settings or another start policy)"
    elif state is not None and state.done > loop.iterations:
        problem = f"--out {out} holds {state.done} iterations, more than --iterations {loop.iterations}"
    elif state is not None and state.done and not (out / "policies" / name(state.done)).is_dir():
        problem = f"--out {out}: the policy of its last iteration, policies/{name(state.done)}, is missing"
    if problem is not None:
        if not overwrite:
            raise TempflowError(f"{problem}; pass --overwrite to start it afresh, or give another --out")
        shutil.rmtree(out)
        state = None
    for sub in FOLDERS:
        (out / sub).mkdir(parents=True, exist_ok=True)
        clean_partials(out / sub)  # what a killed iteration left half-written
    if state is None:
        _commit_state(out, LoopState(run=run, done=0))
        return 0
    return state.done


def _commit_state(out: Path, state: LoopState) -> None:
    with atomic_output(out / LOOP_FILE, overwrite=True, kind="file") as tmp:
        write_loop_state(tmp, state)


def _retain(out: Path, done: int, loop: LoopConfig) -> None:
    """Delete what iteration ``done`` no longer needs: older policies off the keep cadence, rollouts and
    scores older than the last ``keep_rollouts`` (never anything a later iteration reads)."""
    for folder in sorted((out / "policies").iterdir()):
        i = _number(folder.name)
        if i is not None and i < done and not (loop.keep_every and i % loop.keep_every == 0):
            shutil.rmtree(folder)
    for path in [*(out / "rollouts").iterdir(), *(out / "scores").iterdir()]:
        i = _number(path.name.split(".")[0])
        if i is not None and i <= done - loop.keep_rollouts:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def _number(text: str) -> int | None:
    return int(text[2:]) if text.startswith("it") and text[2:].isdigit() else None
