"""The pipeline's overhead over the model's own compute, for the default run's rollout and update.

    python examples/benchmark/overhead.py --policy runs/base [--threads 1] [--repeats 3] [--out docs/overhead.json]

Rollout: one `tempflow`-style rollout with params.yaml's settings (16 prompts, batch 64) is timed
whole (text encoding, sampling, decoding, encoding and writing the samples, hashes, manifest), once
with the writer thread and once writing on the sampling thread. Every denoiser forward and VAE
decode it makes is recorded (batch size, in order) and then replayed bare on random inputs of the
same shapes: that replay is "the model's own compute", and overhead = rollout / replay - 1.

Update: one update (params.yaml's `update` group) on that rollout, scored by `shapes`, timed whole
(loading and verifying, streaming the shards, log-probs, KL, AdamW, writing the policy), with and
without the prefetch thread, against bare forward + backward (+ the reference's forward when beta > 0)
at the update's own batch sizes. The training loop alone (``_train``) is timed too, so the fixed
costs (load, verify, write) and the per-batch ones can be told apart.

Each figure is the median of ``--repeats``. Run nothing else meanwhile, or give every process one
thread; the setup (threads, CPU) is recorded in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import stages.rollout  # noqa: E402
import stages.update  # noqa: E402
from stages.artifacts.policy import PolicyRecord  # noqa: E402
from stages.artifacts.rollout_config import RolloutConfig  # noqa: E402
from stages.policies.base import index_cond, load_policy, save_policy  # noqa: E402
from stages.policies.tiny import build_policy, model_config  # noqa: E402
from stages.rewards import parse_reward_spec  # noqa: E402
from stages.rollout import run_rollout  # noqa: E402
from stages.score import run_score  # noqa: E402
from stages.update import UpdateConfig, run_update  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import load_params  # noqa: E402


class Timed:
    """Wraps ``module.name`` so that each call's seconds are added to :attr:`seconds`."""

    def __init__(self, module: Any, name: str) -> None:
        self.module, self.name, self.real, self.seconds = module, name, getattr(module, name), 0.0

    def __enter__(self) -> Timed:
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return self.real(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - began
        setattr(self.module, self.name, timed)
        return self

    def __exit__(self, *_: Any) -> None:
        setattr(self.module, self.name, self.real)


def record_calls(policy: Any) -> list[tuple[str, int]]:
    """From now on, append ``("velocity" | "decode", batch)`` for each model call of ``policy``."""
    calls: list[tuple[str, int]] = []
    velocity, decode = policy.velocity, policy.decode

    def recorded_velocity(x, sigma, cond):
        calls.append(("velocity", x.shape[0]))
        return velocity(x, sigma, cond)

    def recorded_decode(x):
        calls.append(("decode", x.shape[0]))
        return decode(x)

    policy.velocity, policy.decode = recorded_velocity, recorded_decode
    return calls


@torch.no_grad()
def replay(policy: Any, calls: list[tuple[str, int]], cond: dict[str, torch.Tensor]) -> float:
    """Seconds for the same model calls, bare, on random inputs (inputs made before the clock starts)."""
    inputs = {b: (torch.randn(b, *policy.sample_shape), torch.rand(b), index_cond(cond, [0] * b, policy.device))
              for b in {b for _, b in calls}}
    began = time.perf_counter()
    for kind, b in calls:
        x, sigma, c = inputs[b]
        if kind == "velocity":
            policy.velocity(x, sigma, c)
        else:
            policy.decode(x)
    return time.perf_counter() - began


def bare_update(policy_dir: Path, sizes: list[int], reference: bool) -> float:
    """Seconds for forward + backward (+ a no-grad reference forward) at each batch size in ``sizes``."""
    policy, _ = load_policy(policy_dir)
    ref = load_policy(policy_dir)[0] if reference else None
    with torch.no_grad():  # the update trains on the rollout's stored conditioning, not through the text encoder
        cond = policy.encode(["a red circle left of a blue square"])
    policy.prepare_training()
    policy.trainable().train()
    params = [p for _, p in policy.trainable_parameters()]
    inputs = {b: (torch.randn(b, *policy.sample_shape), torch.rand(b), index_cond(cond, [0] * b, policy.device))
              for b in set(sizes)}
    began = None
    for b in [sizes[0], *sizes]:  # the first one warms up and is not timed
        x, sigma, c = inputs[b]
        v = policy.velocity(x, sigma, c)
        if ref is not None:
            with torch.no_grad():
                ref.velocity(x, sigma, c)
        for p in params:
            p.grad = None
        v.square().mean().backward()
        began = began or time.perf_counter()
    return time.perf_counter() - began


def update_sizes(metrics: dict[str, Any], config: UpdateConfig) -> list[int]:
    """The update's batch sizes, in order: full batches, then each inner epoch's remainder."""
    per_epoch = metrics["trained_samples"]
    sizes = [config.batch_size] * (per_epoch // config.batch_size)
    if per_epoch % config.batch_size:
        sizes.append(per_epoch % config.batch_size)
    sizes = sizes * config.inner_epochs
    assert len(sizes) == metrics["optimizer_steps"], (len(sizes), metrics["optimizer_steps"])
    return sizes


def measure(policy_dir: Path, work: Path, repeats: int) -> dict[str, Any]:
    from stages.worlds import shapes

    rollout_base, update_base, _ = load_params()
    config = RolloutConfig(**{**rollout_base, "algo": "tempflow", "seeds_per_prompt": 2, "branches": 4,
                              "branch_steps": "all", "prompts_per_rollout": 16, "seed": 7})
    prompts = shapes.train_prompts()
    policy, record = load_policy(policy_dir)
    info = {"identity": record.identity, "path": str(policy_dir)}
    rows: dict[str, list[float]] = {k: [] for k in ("rollout_threaded", "rollout_inline", "rollout_loop_threaded",
                                                    "rollout_model", "update_threaded", "update_inline",
                                                    "update_loop_threaded", "update_loop_inline", "update_model")}
    update_config = UpdateConfig(**update_base)
    calls: list[tuple[str, int]] = []
    for _ in range(repeats):
        for threaded in (True, False):
            out = work / f"rollout-{threaded}"
            shutil.rmtree(out, ignore_errors=True)
            recorded = record_calls(policy)
            with Timed(stages.rollout, "_tempflow") as loop:
                began = time.perf_counter()
                run_rollout(policy, prompts, config, out, info, background_writes=threaded)
                rows[f"rollout_{'threaded' if threaded else 'inline'}"].append(time.perf_counter() - began)
            if threaded:
                rows["rollout_loop_threaded"].append(loop.seconds)
            del policy.velocity, policy.decode  # the instance's wrappers; the class's methods again
            calls = recorded
        cond = {k: v[:1] for k, v in stages.rollout.encode_prompts(policy, prompts[:1])[0].items()}
        rows["rollout_model"].append(replay(policy, calls, cond))

        scores = work / "scores.parquet"
        if not scores.exists():
            run_score(work / "rollout-True", [parse_reward_spec("shapes")], scores)
        for prefetch in (True, False):
            out = work / f"policy-{prefetch}"
            shutil.rmtree(out, ignore_errors=True)
            with Timed(stages.update, "_train") as loop:
                began = time.perf_counter()
                metrics = run_update(policy_dir, work / "rollout-True", scores, out, update_config, prefetch=prefetch)
                rows[f"update_{'threaded' if prefetch else 'inline'}"].append(time.perf_counter() - began)
            rows[f"update_loop_{'threaded' if prefetch else 'inline'}"].append(loop.seconds)
        sizes = update_sizes(metrics.metrics, update_config)
        rows["update_model"].append(bare_update(policy_dir, sizes, reference=update_config.beta > 0))

    med = {k: statistics.median(v) for k, v in rows.items()}
    velocity_calls = sum(1 for kind, _ in calls if kind == "velocity")
    return {
        "seconds_median": med, "seconds_all": rows,
        "rollout": {"nfe": sum(b for kind, b in calls if kind == "velocity"), "forward_calls": velocity_calls,
                    "decodes": sum(b for kind, b in calls if kind == "decode"),
                    "overhead_pct_threaded": 100 * (med["rollout_threaded"] / med["rollout_model"] - 1),
                    "overhead_pct_inline": 100 * (med["rollout_inline"] / med["rollout_model"] - 1),
                    "loop_overhead_pct_threaded": 100 * (med["rollout_loop_threaded"] / med["rollout_model"] - 1)},
        "update": {"batches": len(sizes), "samples": sum(sizes), "beta": update_config.beta,
                   "overhead_pct_threaded": 100 * (med["update_threaded"] / med["update_model"] - 1),
                   "overhead_pct_inline": 100 * (med["update_inline"] / med["update_model"] - 1),
                   "loop_overhead_pct_threaded": 100 * (med["update_loop_threaded"] / med["update_model"] - 1),
                   "loop_overhead_pct_inline": 100 * (med["update_loop_inline"] / med["update_model"] - 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", type=Path, default=None,
                        help="A policy folder (e.g. runs/base); default: a fresh `shapes` preset (same compute, random weights).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policy_dir = args.policy
        if policy_dir is None:
            policy_dir = work / "policy"
            policy = build_policy("shapes", seed=0, model_overrides={"image_size": 32})
            save_policy(policy, policy_dir, PolicyRecord(kind=policy.kind, model=model_config(policy)))
        report = measure(policy_dir, work, args.repeats)
    report.update(torch_threads=torch.get_num_threads(), repeats=args.repeats, policy=str(args.policy or "shapes preset"),
                  cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(), command=" ".join(sys.argv))
    print(json.dumps({k: report[k] for k in ("rollout", "update", "seconds_median", "torch_threads")}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
