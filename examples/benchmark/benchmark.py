"""TempFlow-GRPO against Flow-GRPO in the shapes world, at equal forward-pass (NFE) budgets.

    python examples/benchmark/benchmark.py --base runs/base --out runs/benchmark   # full: hours on 2 cores
    python examples/benchmark/benchmark.py --quick --out runs/benchmark-quick       # smoke test: ~2 min

Every method starts from the same pretrained base and trains with the same update hyper-parameters
(params.yaml's `update` group) until it has spent the same NFE on rollouts. Along the way each policy
is evaluated by `tempflow eval`'s deterministic ODE sampler on the two disjoint halves of the held-out
prompts, every method on the same prompts and initial noises: the validation half chooses the point
to report (each seed's best validation reward) and decides when flow-grpo's final reward is reached;
the test half gives the reported figures, and its per-image rewards the differences from flow-grpo,
paired over images and training seeds (stats.py). Costs are counted three ways (rollout NFE,
optimizer steps, seconds per stage) plus VAE decodes, one reward call each. The stages run in-process
through the library functions the CLI calls, artifacts on disk included, so the timings are the
pipeline's. Writes OUT/results.json, OUT/table.md and OUT/benchmark.png. Each finished (method, seed)
run is kept in OUT/runs/ with its per-image test rewards: run the same command again after an
interruption and it goes on from there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from stages.artifacts.rollout_config import RolloutConfig  # noqa: E402
from stages.artifacts.update_record import read_step_spread  # noqa: E402
from stages.evaluate import EvalConfig, run_eval  # noqa: E402
from stages.policies.base import load_policy  # noqa: E402
from stages.pretrain import PretrainConfig, run_pretrain  # noqa: E402
from stages.rewards import parse_reward_spec  # noqa: E402
from stages.rollout import planned_nfe, policy_sigmas, run_rollout  # noqa: E402
from stages.score import run_score  # noqa: E402
from stages.support.outputs import atomic_output  # noqa: E402
from stages.update import UpdateConfig, run_update  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402  (this folder's statistics)
from base_spread import options  # noqa: E402  (params.yaml read one way)


@dataclass(frozen=True)
class Method:
    description: str
    rollout: dict[str, Any]
    weighting: str


METHODS: dict[str, Method] = {
    "tempflow": Method("branching + noise-aware weighting (TempFlow-GRPO)",
                       {"algo": "tempflow", "seeds_per_prompt": 2, "branches": 4, "branch_steps": "all"}, "noise-aware"),
    "flow-grpo": Method("SDE at every step, trajectory advantage, uniform weights",
                        {"algo": "flow-grpo", "seeds_per_prompt": 8}, "uniform"),
    "flow-grpo-fast": Method("ODE + an SDE window of 2 steps, trajectory advantage",
                             {"algo": "flow-grpo-fast", "seeds_per_prompt": 8, "window": 2}, "uniform"),
    "branch-only": Method("ablation: tempflow branching, uniform weights",
                          {"algo": "tempflow", "seeds_per_prompt": 2, "branches": 4, "branch_steps": "all"}, "uniform"),
    "weight-only": Method("ablation: flow-grpo trajectories, noise-aware weights",
                          {"algo": "flow-grpo", "seeds_per_prompt": 8}, "noise-aware"),
    "tempflow-k6": Method("the official code's shape: branches at every step, K = 6",
                          {"algo": "tempflow", "seeds_per_prompt": 2, "branches": 6, "branch_steps": "all"}, "noise-aware"),
    "tempflow-finish3": Method("tempflow, each branch finished in at most 3 ODE steps",
                               {"algo": "tempflow", "seeds_per_prompt": 2, "branches": 4, "branch_steps": "all",
                                "finish_steps": 3}, "noise-aware"),
    "tempflow-weighted3": Method("tempflow, 3 branch steps drawn by noise-aware weight, loss reweighted by 1/chance",
                                 {"algo": "tempflow", "seeds_per_prompt": 2, "branches": 4, "branch_steps": "weighted:3"},
                                 "noise-aware"),
    "tempflow-spread3": Method("tempflow, 3 branch steps drawn by the last update's within-group reward spread, "
                               "loss reweighted by 1/chance",
                               {"algo": "tempflow", "seeds_per_prompt": 2, "branches": 4, "branch_steps": "spread:3"},
                               "noise-aware"),
}


@dataclass
class Settings:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    nfe_budget: int = 96_768
    """Rollout forward passes each method may spend (whole iterations only, never more): 16 TempFlow-GRPO
    iterations of 6,048, a third more than the default loop's 12, so that the curves flatten."""
    evals: int = 8
    """Evaluations along the budget (plus one of the base)."""
    prompts_per_rollout: int = 16
    val_per_task: int = 1000
    """Validation prompts per task (the held-out split's validation half; 1000: all 333)."""
    val_images: int = 2
    test_per_task: int = 1000
    """Test prompts per task (the other half; 1000: all 335)."""
    test_images: int = 3
    """Images per test prompt: 1,005 images, so a paired difference has a standard error near 0.01."""
    eval_steps: int = 20
    pretrain: PretrainConfig | None = None
    """Pretraining of the base when no --base is given (None: params.yaml's `pretrain` group)."""
    memory_prompts: int = 8
    """Prompts of the 1x rollout of the memory check (8x: eight times as many)."""


def quick_settings() -> Settings:
    return Settings(seeds=[0], nfe_budget=2_500, evals=1, prompts_per_rollout=2, val_per_task=2, val_images=1,
                    test_per_task=2, test_images=1, eval_steps=6, pretrain=PretrainConfig(steps=20, batch_size=16, checkpoint_every=0,
                                                           autoencoder_steps=10, autoencoder_batch_size=4),
                    memory_prompts=1)


def load_params() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The default run's rollout, update and pretrain options from params.yaml, as dataclass field names."""
    rollout = options("rollout", RolloutConfig)
    keep = ("num_steps", "shift", "noise_level", "batch_size")
    kept = {k: v for k, v in rollout.items() if k in keep}
    return kept, options("update", UpdateConfig), options("pretrain", PretrainConfig)


def prompts_file(out: Path) -> Path:
    from stages.worlds import shapes

    path = out / "train-prompts.txt"
    path.write_text("\n".join(shapes.train_prompts()) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# One training run: a method, a seed, the NFE budget


def evaluate(policy: Path, out: Path, settings: Settings) -> dict[str, Any]:
    """Validation and test figures of ``policy``, and the test split's per-image rewards (in a fixed
    order of prompts and seeds, the same for every method: what paired differences are taken over)."""
    from stages.worlds import shapes

    row: dict[str, Any] = {}
    for half, per_task, images in (("val", settings.val_per_task, settings.val_images),
                                   ("test", settings.test_per_task, settings.test_images)):
        prompts = shapes.eval_prompts("validation" if half == "val" else "test", per_task=per_task, seed=0)
        config = EvalConfig(num_steps=settings.eval_steps, images_per_prompt=images, grid_prompts=0)
        metrics = run_eval(policy, prompts, out / half, config, overwrite=True).metrics
        row.update({f"{half}_reward": metrics["reward"], f"{half}_strict": metrics["strict"]})
        if half == "test":
            lines = (out / half / "results.jsonl").read_text().splitlines()
            row["test_images"] = [json.loads(line)["reward"] for line in lines]
    return row


def train_run(name: str, seed: int, base: Path, prompts: list[str], work: Path, settings: Settings,
              rollout_base: dict[str, Any], update_base: dict[str, Any]) -> list[dict[str, Any]]:
    """Iterate rollout -> score -> update until the budget is spent; a curve row per evaluation, with
    the costs spent so far: rollout NFE, decodes (one reward call each), optimizer steps, seconds per stage."""
    method = METHODS[name]
    run_dir = work / f"{name}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    policy, iteration = base, 0
    spent = {"nfe": 0, "decodes": 0, "optimizer_steps": 0, "seconds": 0.0,
             "seconds_rollout": 0.0, "seconds_score": 0.0, "seconds_update": 0.0}
    curve = [{**spent, "iteration": 0, **evaluate(base, run_dir / "eval", settings)}]
    next_eval = settings.nfe_budget / settings.evals
    specs = [parse_reward_spec("shapes")]

    def rollout_config(iteration: int) -> RolloutConfig:
        return RolloutConfig(**{**rollout_base, **method.rollout, "seed": 1000 * seed + iteration,
                                "prompts_per_rollout": settings.prompts_per_rollout})

    sigmas = policy_sigmas(load_policy(base)[0], rollout_config(1))  # the schedule run_rollout draws with

    def cost(iteration: int, sampler: Path) -> int:  # drawn branch steps make an iteration's NFE vary
        config = rollout_config(iteration)
        spread = read_step_spread(sampler, config.num_steps) if config.draws_by_spread else None
        return planned_nfe(config, settings.prompts_per_rollout, config.step_plan(sigmas, spread).steps)

    while spent["nfe"] + cost(iteration + 1, policy) <= settings.nfe_budget:  # no method spends more than the budget
        iteration += 1
        it = run_dir / f"it{iteration:03d}"
        update_config = UpdateConfig(**{**update_base, "weighting": method.weighting, "seed": 1000 * seed + iteration})
        clock = time.perf_counter()
        model, record = load_policy(policy)
        result = run_rollout(model, prompts, rollout_config(iteration), it / "rollout",
                             {"identity": record.identity, "path": str(policy), "step": record.step})
        spent["seconds_rollout"] += time.perf_counter() - clock
        clock = time.perf_counter()
        run_score(it / "rollout", specs, it / "scores.parquet")
        spent["seconds_score"] += time.perf_counter() - clock
        clock = time.perf_counter()
        metrics = run_update(policy, it / "rollout", it / "scores.parquet", it / "policy", update_config,
                             reference_dir=base).metrics
        spent["seconds_update"] += time.perf_counter() - clock
        spent["seconds"] = spent["seconds_rollout"] + spent["seconds_score"] + spent["seconds_update"]
        spent["nfe"] += result.nfe
        spent["decodes"] += result.decodes
        spent["optimizer_steps"] += metrics["optimizer_steps"]
        if policy != base:
            shutil.rmtree(policy.parent)  # the previous iteration's artifacts: only the new policy is needed
        policy = it / "policy"
        shutil.rmtree(it / "rollout")
        last = spent["nfe"] + cost(iteration + 1, policy) > settings.nfe_budget
        if spent["nfe"] >= next_eval or last:
            curve.append({**spent, "iteration": iteration, **evaluate(policy, run_dir / "eval", settings)})
            next_eval += settings.nfe_budget / settings.evals
        print(f"  {name} seed {seed} it {iteration}: NFE {spent['nfe']} / {settings.nfe_budget}, "
              f"{spent['seconds']:.0f} s, validation reward {curve[-1]['val_reward']:.3f}", flush=True)
    shutil.rmtree(run_dir)
    return curve


def folder_digest(folder: Path, pattern: str = "*") -> str:
    """sha256 over the names and bytes of a folder's files matching ``pattern``: the identity of a
    base policy (all its files) or of the code that trains it (``*.py``)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob(pattern) if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def code_digest() -> str:
    """The library and this script: a run trained by other code is not reused."""
    return hashlib.sha256((folder_digest(ROOT / "stages", "*.py") + Path(__file__).read_text()).encode()).hexdigest()


class RunStore:
    """Finished training runs, one JSON file each, so that an interrupted benchmark resumes where it
    stopped. A file is reused only when it was written with the same settings, base and params."""

    def __init__(self, folder: Path, key: dict[str, Any]) -> None:
        self.folder = folder
        self.key = json.loads(json.dumps(key, default=str))

    def path(self, name: str, seed: int) -> Path:
        return self.folder / f"{name}-s{seed}.json"

    def load(self, name: str, seed: int) -> list[dict[str, Any]] | None:
        path = self.path(name, seed)
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        return saved["curve"] if saved.get("key") == self.key else None

    def save(self, name: str, seed: int, curve: list[dict[str, Any]]) -> None:
        with atomic_output(self.path(name, seed), overwrite=True, kind="file") as tmp:
            tmp.write_text(json.dumps({"key": self.key, "curve": curve}, indent=1, default=float) + "\n")


# --------------------------------------------------------------------------------------------
# Stage efficiency and update memory


def bare_throughput(policy_dir: Path, batch: int, backward: bool, reference: bool, reps: int = 10) -> float:
    """Images per second of the bare model at ``batch``: forward only, or forward + backward (+ the
    KL reference's forward), on random states; no artifacts, no sampler, no optimizer."""
    model, _ = load_policy(policy_dir)
    ref = load_policy(policy_dir)[0] if reference else None
    cond = model.encode(["a red circle left of a blue square"] * batch)
    x, sigma = torch.randn(batch, *model.sample_shape), torch.rand(batch)
    model.trainable().requires_grad_(backward)

    def once() -> None:
        with torch.set_grad_enabled(backward):
            v = model.velocity(x, sigma, cond)
            if ref is not None:
                with torch.no_grad():
                    ref.velocity(x, sigma, cond)
            if backward:
                v.square().mean().backward()

    once()
    began = time.perf_counter()
    for _ in range(reps):
        once()
    return batch * reps / (time.perf_counter() - began)


def stage_efficiency(base: Path, prompts: list[str], work: Path, rollout_base: dict[str, Any],
                     update_base: dict[str, Any], settings: Settings) -> dict[str, Any]:
    it = work / "efficiency"
    shutil.rmtree(it, ignore_errors=True)
    config = RolloutConfig(**{**rollout_base, **METHODS["tempflow"].rollout, "seed": 7,
                              "prompts_per_rollout": settings.prompts_per_rollout})
    model, record = load_policy(base)
    began = time.perf_counter()
    result = run_rollout(model, prompts, config, it / "rollout", {"identity": record.identity, "path": str(base)})
    rollout_rate = result.nfe / (time.perf_counter() - began)
    began = time.perf_counter()
    run_score(it / "rollout", [parse_reward_spec("shapes")], it / "scores.parquet")
    score_rate = result.samples / (time.perf_counter() - began)
    update_config = UpdateConfig(**update_base)
    began = time.perf_counter()
    run_update(base, it / "rollout", it / "scores.parquet", it / "policy", update_config)
    update_rate = result.samples / (time.perf_counter() - began)
    shutil.rmtree(it)
    forward = bare_throughput(base, config.batch_size, backward=False, reference=False)
    fwd_bwd = bare_throughput(base, update_config.batch_size, backward=True, reference=False)
    fwd_bwd_ref = bare_throughput(base, update_config.batch_size, backward=True, reference=update_config.beta > 0)
    return {
        "rollout_nfe_per_s": rollout_rate, "bare_forward_per_s": forward,
        "rollout_overhead_pct": 100 * (1 - rollout_rate / forward),
        "score_images_per_s": score_rate,
        "update_samples_per_s": update_rate, "bare_fwd_bwd_per_s": fwd_bwd, "bare_fwd_bwd_ref_per_s": fwd_bwd_ref,
        "update_overhead_pct": 100 * (1 - update_rate / fwd_bwd),
        "update_overhead_vs_fwd_bwd_ref_pct": 100 * (1 - update_rate / fwd_bwd_ref),
        "rollout_batch": config.batch_size, "update_batch": update_config.batch_size, "rollout_samples": result.samples,
    }


def update_memory(base: Path, prompts: list[str], work: Path, rollout_base: dict[str, Any],
                  update_base: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Peak resident memory of `run_update` on a rollout of 1x and 8x the size, each in a fresh process."""
    rows = {}
    for scale in (1, 8):
        it = work / f"memory-{scale}x"
        shutil.rmtree(it, ignore_errors=True)
        config = RolloutConfig(**{**rollout_base, **METHODS["tempflow"].rollout, "seed": 11,
                                  "prompts_per_rollout": settings.memory_prompts * scale})
        model, record = load_policy(base)
        result = run_rollout(model, prompts, config, it / "rollout", {"identity": record.identity, "path": str(base)})
        run_score(it / "rollout", [parse_reward_spec("shapes")], it / "scores.parquet")
        (it / "update.json").write_text(json.dumps(update_base))
        out = subprocess.run([sys.executable, __file__, "--measure-update", str(base), str(it)],
                             check=True, capture_output=True, text=True).stdout
        rows[f"{scale}x"] = {"samples": result.samples, **json.loads(out.strip().splitlines()[-1])}
        shutil.rmtree(it)
    return rows


def _status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident peak) of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_update(base: Path, it: Path) -> None:
    """(Child process) run one update; print resident memory before it and its peak during it, in MiB.

    The peak is reset just before the update (``/proc/self/clear_refs``), so it is the update's own,
    not the import's or the model load's."""
    config = UpdateConfig(**json.loads((it / "update.json").read_text()))
    load_policy(base)  # libraries resident and warmed up before the update starts
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_mib("VmRSS")
    run_update(base, it / "rollout", it / "scores.parquet", it / "policy", config)
    peak = _status_mib("VmHWM")
    print(json.dumps({"rss_before_mib": round(before, 1), "peak_rss_mib": round(peak, 1),
                      "update_peak_increase_mib": round(peak - before, 1)}))


# --------------------------------------------------------------------------------------------
# Summaries


def mean_curve(curves: list[list[dict[str, Any]]], x: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeds aligned by evaluation index: the mean ``x`` (nfe, optimizer_steps, seconds), the mean
    and std over seeds of ``key``."""
    n = min(len(c) for c in curves)
    xs = np.mean([[row[x] for row in c[:n]] for c in curves], axis=0)
    values = np.array([[row[key] for row in c[:n]] for c in curves])
    return xs, values.mean(axis=0), values.std(axis=0)


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([row[key] for row in rows]))


def summarise(results: dict[str, list[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per method: test figures at the point each seed's validation reward chose and at the end of the
    budget; the paired test difference from flow-grpo at both; the NFE to reach flow-grpo's final
    validation reward; the costs spent."""
    baseline = results.get("flow-grpo")
    target = _mean([c[-1] for c in baseline], "val_reward") if baseline else None
    rows = []
    for name, curves in results.items():
        chosen = [c[stats.chosen_index(c)] for c in curves]
        final = [c[-1] for c in curves]
        row: dict[str, Any] = {
            "method": name, "seeds": len(curves),
            "base_test_reward": _mean([c[0] for c in curves], "test_reward"),
            "base_test_strict": _mean([c[0] for c in curves], "test_strict"),
            "chosen_test_reward": stats.mean_ci([r["test_reward"] for r in chosen]),
            "chosen_test_strict": stats.mean_ci([r["test_strict"] for r in chosen]),
            "chosen_nfe": _mean(chosen, "nfe"),
            "final_test_reward": stats.mean_ci([r["test_reward"] for r in final]),
            "final_test_strict": stats.mean_ci([r["test_strict"] for r in final]),
            **{key: _mean(final, key) for key in ("nfe", "decodes", "optimizer_steps", "seconds", "seconds_rollout",
                                                  "seconds_score", "seconds_update")},
        }
        if baseline is not None:
            row["nfe_to_reach"] = stats.reach_summary(curves, target)
            base_chosen = [c[stats.chosen_index(c)] for c in baseline]
            row["diff_chosen"] = stats.paired_difference([r["test_images"] for r in chosen],
                                                         [r["test_images"] for r in base_chosen])
            row["diff_final"] = stats.paired_difference([r["test_images"] for r in final],
                                                        [r["test_images"] for r in (c[-1] for c in baseline)])
        rows.append(row)
    return rows


def _ci(summary: dict[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    if not summary or summary["mean"] is None:
        return "–"
    mean = f"{summary['mean']:+.{digits}f}" if signed else f"{summary['mean']:.{digits}f}"
    return mean if math.isnan(summary["ci95"]) else f"{mean} ± {summary['ci95']:.{digits}f}"  # NaN: one seed


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """Test figures at the validation-chosen point; differences from flow-grpo paired over images and seeds."""
    lines = ["| method | test reward: base → chosen (95 % CI) | Δ vs flow-grpo at chosen (image SE) | "
             "Δ vs flow-grpo at end | test strict at chosen | NFE to reach flow-grpo's final val reward | "
             "NFE | decodes | optimizer steps | seconds (rollout / score / update) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = r.get("nfe_to_reach")
        reach_text = "–" if reach is None else (
            f"{_ci(reach, 0)}" + (f" ({reach['not_reached']} of {r['seeds']} seeds never)" if reach["not_reached"] else ""))
        diff = r.get("diff_chosen")
        diff_text = "–" if diff is None or r["method"] == "flow-grpo" else f"{_ci(diff, signed=True)} ({diff['image_se']:.3f})"
        end_text = "–" if diff is None or r["method"] == "flow-grpo" else _ci(r["diff_final"], signed=True)
        lines.append(
            f"| {r['method']} | {r['base_test_reward']:.3f} → {_ci(r['chosen_test_reward'])} | {diff_text} | {end_text} | "
            f"{_ci(r['chosen_test_strict'])} | {reach_text} | {r['nfe']:,.0f} | {r['decodes']:,.0f} | "
            f"{r['optimizer_steps']:,.0f} | {r['seconds']:.0f} ({r['seconds_rollout']:.0f} / {r['seconds_score']:.0f} / "
            f"{r['seconds_update']:.0f}) |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[list[dict[str, Any]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_x = (("nfe", "rollout NFE"), ("optimizer_steps", "optimizer steps"), ("seconds", "training wall-clock (s, 2 CPU cores)"))
    axes_y = (("test_reward", "test reward"), ("test_strict", "test strict accuracy"))
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), dpi=100)
    for name, curves in results.items():
        for row, (key, _) in enumerate(axes_y):
            for col, (x, _) in enumerate(axes_x):
                xs, mean, std = mean_curve(curves, x, key)
                line, = axes[row][col].plot(xs, mean, marker="o", markersize=3, label=name)
                axes[row][col].fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.12)
    for row, (_, ylabel) in enumerate(axes_y):
        for col, (_, xlabel) in enumerate(axes_x):
            axes[row][col].set_xlabel(xlabel)
            axes[row][col].set_ylabel(ylabel)
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("shapes world, test half of the held-out prompts: mean ± std over training seeds, equal rollout NFE budget")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    parser.add_argument("--base", type=Path, default=None,
                        help="Pretrained base policy (e.g. runs/base of `dvc repro`); default: pretrain one here.")
    parser.add_argument("--quick", action="store_true", help="Tiny budget, one seed: a smoke test of the whole script.")
    parser.add_argument("--seeds", type=str, default=None, help="Comma list of training seeds (default 0,1,2).")
    parser.add_argument("--nfe-budget", type=int, default=None)
    parser.add_argument("--methods", type=str, default=",".join(METHODS))
    parser.add_argument("--runs-only", action="store_true",
                        help="Train and keep the runs, then stop: no efficiency and memory measurements, no report. "
                             "For several invocations side by side (one thread each); run once more without it, "
                             "on a quiet machine, to measure and report from the kept runs.")
    parser.add_argument("--measure-update", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.measure_update:
        measure_update(*args.measure_update)
        return
    settings = quick_settings() if args.quick else Settings()
    if args.seeds:
        settings = replace(settings, seeds=[int(s) for s in args.seeds.split(",")])
    if args.nfe_budget:
        settings = replace(settings, nfe_budget=args.nfe_budget)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    rollout_base, update_base, pretrain_params = load_params()
    pretrain = settings.pretrain or PretrainConfig(**pretrain_params)
    from stages.worlds import shapes

    prompts = shapes.train_prompts()
    base = args.base
    if base is None:
        base = out / "base"
        if not base.exists():
            print(f"pretraining a base policy into {base} ...", flush=True)
            run_pretrain(pretrain, base)
        elif json.loads((base / "pretrain.json").read_text())["config"] != asdict(pretrain):
            sys.exit(f"{base} was pretrained with other settings (a --quick run's?); delete it or choose another --out")
    began = time.perf_counter()
    results: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in methods}
    runs = RunStore(out / "runs", {"settings": asdict(replace(settings, seeds=[])), "base": folder_digest(base),
                                   "code": code_digest(), "rollout": rollout_base, "update": update_base})
    reused = []
    for seed in settings.seeds:
        for name in methods:
            curve = runs.load(name, seed)
            if curve is None:
                curve = train_run(name, seed, base, prompts, work, settings, rollout_base, update_base)
                runs.save(name, seed, curve)
            else:
                print(f"  {name} seed {seed}: kept from {runs.path(name, seed)}", flush=True)
                reused.append(f"{name}-s{seed}")
            results[name].append(curve)
    if args.runs_only:
        print(f"kept {len(settings.seeds) * len(methods)} runs in {runs.folder}; no report (--runs-only)")
        return
    print("measuring stage efficiency and update memory ...", flush=True)
    efficiency = stage_efficiency(base, prompts, work, rollout_base, update_base, settings)
    memory = update_memory(base, prompts, work, rollout_base, update_base, settings)
    rows = summarise(results)
    curves = {m: [[{k: v for k, v in row.items() if k != "test_images"} for row in c] for c in cs] for m, cs in results.items()}
    report = {"settings": {**asdict(settings), "pretrain": asdict(pretrain) if args.base is None else None,
                           "base": str(base)}, "methods": {
        m: asdict(METHODS[m]) for m in methods}, "rollout": rollout_base, "update": update_base,
        "curves": curves, "summary": rows, "efficiency": efficiency, "memory": memory,
        "seconds_total": time.perf_counter() - began, "runs_reused": reused,
        "seconds_training_all_runs": sum(c[-1]["seconds"] for curves in results.values() for c in curves),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join(sys.argv)}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out / "table.md").write_text(table_markdown(rows))
    plot(results, out / "benchmark.png")
    shutil.rmtree(work, ignore_errors=True)
    print(table_markdown(rows))
    print(json.dumps({"efficiency": efficiency, "memory": memory}, indent=2, default=float))
    print(f"wrote {out}/results.json, table.md, benchmark.png; this invocation took {report['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
