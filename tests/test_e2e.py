"""End to end on the CPU with the tiny preset: the pipeline trains, the loop raises the reward,
the on-policy ratio is 1, and the DVC loop runs and is cached."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages.artifacts.rollout_config import RolloutConfig
from stages.policies.base import load_policy
from stages.policies.tiny import TinyPolicy
from stages.rewards import parse_reward_spec
from stages.rollout import run_rollout
from stages.score import run_score
from stages.support.errors import TempflowError
from stages.update import UpdateConfig, run_update
from tests.conftest import PROMPTS, copy_project, invoke, make_rollout, tool_env

COMPRESSIBILITY = [parse_reward_spec("jpeg_compressibility")]


def _weights(policy: Path) -> dict[str, torch.Tensor]:
    return load_file(policy / "transformer" / "diffusion_pytorch_model.safetensors")


def test_cli_pipeline_changes_parameters_with_ratio_one(policy_dir, prompts_file, tmp_path):
    """init -> rollout -> score -> update through the CLI: weights move, the first ratio is 1."""
    rollout, scores, new = tmp_path / "rollout", tmp_path / "scores.parquet", tmp_path / "new"
    assert invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", rollout,
                  "--num-steps", 4, "--branches", 3, "--batch-size", 8).exit_code == 0
    assert invoke("score", "--rollout", rollout, "--reward", "jpeg_compressibility", "--out", scores).exit_code == 0
    result = invoke("update", "--policy", policy_dir, "--rollout", rollout, "--rewards", scores, "--out", new,
                    "--learning-rate", 1e-3, "--batch-size", 16, "--metrics", tmp_path / "m.json")
    assert result.exit_code == 0, result.output

    before, after = _weights(policy_dir), _weights(new)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} tensors changed"

    metrics = json.loads((new / "metrics.json").read_text())
    assert metrics == json.loads((tmp_path / "m.json").read_text())
    assert metrics["first_step_ratio_deviation"] < 1e-5  # on-policy: exp(log p_new - log p_old) = 1
    assert metrics["ratio_min"] <= 1.0 <= metrics["ratio_max"]
    assert metrics["trained_samples"] + metrics["skipped_samples"] == metrics["samples"]
    assert metrics["optimizer_steps"] == -(-metrics["trained_samples"] // 16)
    config = json.loads((new / "config.json").read_text())
    assert config["step"] == 1
    assert config["reference"]["identity"] == json.loads((policy_dir / "config.json").read_text())["identity"]
    assert (new / "optimizer.safetensors").is_file() and (new / "update.json").is_file()
    assert "first_step_ratio_deviation" in result.stdout


def test_kl_forms_differ_by_the_step_size(policy_dir, tmp_path):
    """On one branch step k, the flow-grpo form's KL is the exact form's times s_k - s_{k+1} (beta so
    small that both updates move the weights alike); metrics.json names the form and beta."""
    rollout = make_rollout(policy_dir, tmp_path / "r", branch_steps="1")
    run_score(rollout, COMPRESSIBILITY, tmp_path / "s.parquet")
    run_update(policy_dir, rollout, tmp_path / "s.parquet", tmp_path / "p1", UpdateConfig(beta=0.0, learning_rate=1e-2))
    rollout2 = make_rollout(tmp_path / "p1", tmp_path / "r2", seed=1, branch_steps="1")
    run_score(rollout2, COMPRESSIBILITY, tmp_path / "s2.parquet")
    kl = {}
    for form in ("exact", "flow-grpo"):
        metrics = run_update(tmp_path / "p1", rollout2, tmp_path / "s2.parquet", tmp_path / form,
                             UpdateConfig(beta=1e-9, kl_form=form)).metrics
        assert (metrics["kl_form"], metrics["beta"]) == (form, 1e-9)
        kl[form] = metrics["kl"]
    sigmas = json.loads((rollout2 / "manifest.json").read_text())["sigmas"]
    assert kl["exact"] > 0
    assert kl["flow-grpo"] == pytest.approx(kl["exact"] * (sigmas[1] - sigmas[2]), rel=1e-4)


def _paired_eval(policy: Path, out: Path) -> float:
    """Mean reward on fixed noise: the same seeds before and after training, so the noise cancels."""
    model, record = load_policy(policy)
    run_rollout(model, PROMPTS, RolloutConfig(num_steps=6, seeds_per_prompt=4, branches=2, seed=999), out,
                {"identity": record.identity})
    return run_score(out, COMPRESSIBILITY, out.with_suffix(".parquet")).mean["reward"]


def test_short_loop_raises_jpeg_compressibility(policy_dir, tmp_path):
    """Eight TempFlow-GRPO iterations raise the mean jpeg_compressibility on a fixed prompt set."""
    policies = [policy_dir]
    for i in range(8):
        rollout = make_rollout(policies[-1], tmp_path / f"r{i}", num_steps=6, seeds_per_prompt=2, branches=4, seed=i)
        run_score(rollout, COMPRESSIBILITY, tmp_path / f"s{i}.parquet")
        policies.append(tmp_path / f"p{i + 1}")
        run_update(policies[-2], rollout, tmp_path / f"s{i}.parquet", policies[-1],
                   UpdateConfig(learning_rate=3e-3, clip_range=0.01, seed=i))
    before = _paired_eval(policies[0], tmp_path / "eval0")
    after = _paired_eval(policies[-1], tmp_path / "eval8")
    # measured: -0.9494 -> -0.9374; within-rollout reward std is ~0.005
    assert after - before > 0.005, (before, after)


def test_first_step_ratio_drift_fails_loudly(policy_dir, tmp_path, monkeypatch):
    """A trainer whose velocity differs from the sampler's stops on the first step, naming the cause."""
    rollout = make_rollout(policy_dir, tmp_path / "r")
    run_score(rollout, COMPRESSIBILITY, tmp_path / "s.parquet")
    original = TinyPolicy.velocity
    monkeypatch.setattr(TinyPolicy, "velocity", lambda self, x, s, c: original(self, x, s, c) + 0.05)
    with pytest.raises(TempflowError, match="first-step importance ratio"):
        run_update(policy_dir, rollout, tmp_path / "s.parquet", tmp_path / "new", UpdateConfig())
    assert not (tmp_path / "new").exists()


def test_update_refuses_rollout_of_another_policy(policy_dir, prompts_file, tmp_path):
    """The rollout's manifest names the sampling policy; updating a different one is refused."""
    rollout = make_rollout(policy_dir, tmp_path / "r")
    run_score(rollout, COMPRESSIBILITY, tmp_path / "s.parquet")
    other = tmp_path / "other"
    assert invoke("init", "--out", other, "--seed", 1, "--image-size", 16).exit_code == 0
    result = invoke("update", "--policy", other, "--rollout", rollout, "--rewards", tmp_path / "s.parquet",
                    "--out", tmp_path / "new")
    assert result.exit_code == 1
    assert "sampled by policy" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("algo", ["flow-grpo", "flow-grpo-fast"])
def test_baselines_train(policy_dir, tmp_path, algo):
    """The Flow-GRPO baselines go through the same update with trajectory advantages."""
    rollout = make_rollout(policy_dir, tmp_path / "r", algo=algo, num_steps=6, seeds_per_prompt=3)
    run_score(rollout, COMPRESSIBILITY, tmp_path / "s.parquet")
    metrics = run_update(policy_dir, rollout, tmp_path / "s.parquet", tmp_path / "new",
                         UpdateConfig()).metrics
    assert metrics["weighting"] == "uniform"  # Flow-GRPO weighs every step equally
    assert metrics["groups"] == len(PROMPTS)  # one advantage group per prompt
    assert metrics["first_step_ratio_deviation"] < 1e-5
    assert metrics["trained_samples"] > 0
    with pytest.raises(TempflowError, match="adv-group seed"):
        run_update(policy_dir, rollout, tmp_path / "s.parquet", tmp_path / "new2", UpdateConfig(adv_group="seed"))


def test_adv_std_global_through_run_update(policy_dir, tmp_path):
    """--adv-std global: each prompt's mean, the whole rollout's std, by hand from the scores file."""
    import pyarrow.parquet as pq

    from stages.artifacts.rollout import Rollout
    from stages.update import plan_update

    rollout = make_rollout(policy_dir, tmp_path / "r", algo="flow-grpo", num_steps=4, seeds_per_prompt=3)
    run_score(rollout, COMPRESSIBILITY, tmp_path / "s.parquet")
    table = pq.read_table(tmp_path / "s.parquet").to_pydict()
    reward = dict(zip(table["key"], table["reward"]))
    prompt = {key: int(key[1:6]) for key in reward}
    values = list(reward.values())
    mean_all = sum(values) / len(values)
    std_all = (sum((r - mean_all) ** 2 for r in values) / len(values)) ** 0.5
    with Rollout(rollout) as opened:
        plan = plan_update(opened, tmp_path / "s.parquet", UpdateConfig(adv_std="global"))
    for key, r in reward.items():
        group = [v for k, v in reward.items() if prompt[k] == prompt[key]]
        assert plan.advantage[key] == pytest.approx((r - sum(group) / len(group)) / (std_all + 1e-4), rel=1e-9)
    metrics = run_update(policy_dir, rollout, tmp_path / "s.parquet", tmp_path / "p", UpdateConfig(adv_std="global")).metrics
    assert metrics["trained_samples"] > 0 and metrics["first_step_ratio_deviation"] < 1e-5


def test_inner_epochs_make_more_steps_off_policy(policy_dir, tmp_path):
    """Two inner epochs: twice the optimizer steps, the first still on-policy, later ratios off 1,
    and other weights than one epoch gives."""
    rollout = make_rollout(policy_dir, tmp_path / "r", num_steps=4, branches=3)
    run_score(rollout, COMPRESSIBILITY, tmp_path / "s.parquet")
    config = dict(learning_rate=1e-2, batch_size=16, beta=0.0)
    one = run_update(policy_dir, rollout, tmp_path / "s.parquet", tmp_path / "one", UpdateConfig(**config)).metrics
    two = run_update(policy_dir, rollout, tmp_path / "s.parquet", tmp_path / "two",
                     UpdateConfig(**config, inner_epochs=2)).metrics
    assert two["optimizer_steps"] == 2 * one["optimizer_steps"] == 2 * -(-one["trained_samples"] // 16)
    assert two["first_step_ratio_deviation"] < 1e-5
    assert two["ratio_max"] - two["ratio_min"] > one["ratio_max"] - one["ratio_min"] > 0
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert any(not torch.equal(a[name], b[name]) for name in a)


def test_prefetching_batches_trains_the_same_weights(policy_dir, tmp_path):
    """Batches read and decoded on the prefetch thread (the default) train exactly the weights, and
    give the metrics, of reading each batch when it is needed: same batches, same order, two inner
    epochs and a last short batch included."""
    rollout = make_rollout(policy_dir, tmp_path / "r", num_steps=4, branches=3)
    run_score(rollout, COMPRESSIBILITY, tmp_path / "s.parquet")
    config = UpdateConfig(learning_rate=1e-2, batch_size=7, inner_epochs=2, shuffle_buffer=5)
    results = {prefetch: run_update(policy_dir, rollout, tmp_path / "s.parquet", tmp_path / f"p{prefetch}", config,
                                    prefetch=prefetch).metrics for prefetch in (True, False)}
    a, b = _weights(tmp_path / "pTrue"), _weights(tmp_path / "pFalse")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    for metrics in results.values():
        metrics.pop("update_seconds")
    assert results[True] == results[False] and results[True]["trained_samples"] % 7 != 0


def _small_loop_params(path: Path) -> None:
    params = yaml.safe_load(path.read_text())
    params["pretrain"].update({"image-size": 16, "steps": 4, "batch-size": 4, "warmup": 1, "checkpoint-every": 2,
                               "autoencoder-steps": 2, "autoencoder-batch-size": 2})
    params["rollout"].update({"num-steps": 4, "seeds-per-prompt": 1, "branches": 2, "prompts-per-rollout": 3})
    params["eval"].update({"per-task": 1, "num-steps": 2, "images-per-prompt": 1})
    params["loop"].update({"iterations": 2, "eval-every": 2, "keep-every": 0})
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _project_copy(tmp_path: Path) -> Path:
    """The project's DVC pipeline, code and params (on a tiny loop) in a fresh folder."""
    work = copy_project(tmp_path / "project", ("dvc.yaml", "params.yaml", ".gitignore"),
                        ("examples", "stages", "tempflow_cli"))
    _small_loop_params(work / "params.yaml")
    return work


def _runner(work: Path, env: dict[str, str]):
    """``run(*cmd, ok=True)`` in ``work``: its output, after checking it succeeded (ok=False: failed;
    None: either)."""
    def run(*cmd: str, ok: bool | None = True) -> str:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        assert ok is None or (proc.returncode == 0) == ok, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr
    return run


def test_dvc_repro_runs_loop_then_has_nothing_to_do(tmp_path):
    """dvc repro on a copy of the project's dvc.yaml runs every stage; a second repro runs none."""
    work = _project_copy(tmp_path)
    run = _runner(work, tool_env(PYTHONPATH=str(work)))  # the stages run the copy's code, which is edited below

    run("git", "init", "-q")
    first = run("dvc", "repro")
    for stage in ("check", "pretrain", "loop", "report"):
        assert f"Running stage '{stage}'" in first
    assert "iteration 2/2" in first
    summary = json.loads((work / "runs/report/summary.json").read_text())
    assert summary["iterations"] == 2 and {"base_strict", "final_strict", "reward_gain"} <= set(summary)
    assert (work / "runs/report/curve.png").is_file() and (work / "runs/loop/eval/it0002/grid.png").is_file()
    second_metrics = json.loads((work / "runs/loop/metrics/it0002.json").read_text())
    assert second_metrics["optimizer_resumed"] is True  # AdamW moments carried across iterations
    second = run("dvc", "repro")
    assert "Running stage" not in second and "up to date" in second
    losses = work / "stages" / "recsys" / "losses.py"  # the recommender's code is none of the loop's
    losses.write_text(losses.read_text() + "\n# changed\n")
    assert "up to date" in run("dvc", "status", "dvc.yaml")
    (work / "stages" / "flow.py").write_text((work / "stages" / "flow.py").read_text() + "\n# changed\n")
    changed = run("dvc", "status", "dvc.yaml")
    assert "loop" in changed and "pretrain" in changed  # every stage whose library imports the math
    rerun = run("dvc", "repro", "--single-item", "loop")  # code is a dependency: the loop starts afresh
    assert "Running stage 'loop'" in rerun and "iteration 1/2" in rerun
    shown = run("dvc", "metrics", "show")
    assert "final_reward" in shown and "reward_mean" not in shown  # the summary only; iterations are plots
    assert "runs/report/summary.json" in shown and "runs/metrics" not in shown and "runs/eval" not in shown
    run("dvc", "plots", "show", "-o", "plots")
    page = (work / "plots" / "index.html").read_text()
    assert all(title in page for title in ("held-out reward and strict accuracy", "mean reward of the rollout"))


def test_a_bad_params_value_fails_the_experiment_in_its_first_stage(tmp_path):
    """`dvc exp run -S` with a value the command refuses: the check stage fails with the command's
    error, before any other stage runs. In the workspace no experiment is recorded (the changed
    params.yaml stays, as DVC leaves it); from the queue the experiment is listed as failed, and
    `dvc queue remove --failed` deletes it."""
    work = _project_copy(tmp_path)
    run = _runner(work, {**tool_env(), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                         "GIT_COMMITTER_EMAIL": "t@t"})  # DVC commits and stashes through git: a machine may have no identity

    for cmd in (("git", "init", "-q"), ("git", "add", "-A"), ("git", "commit", "-qm", "project")):
        run(*cmd)
    said = run("dvc", "exp", "run", "-S", "update.beta=-1", ok=False)
    assert "error: update: --beta must be a finite number >= 0, got -1" in said
    assert "Running stage 'check'" in said and "Running stage 'pretrain'" not in said
    assert run("dvc", "exp", "list", "--name-only").strip() == ""
    assert "beta: -1" in (work / "params.yaml").read_text()

    run("git", "checkout", "params.yaml")
    run("dvc", "exp", "run", "--queue", "-S", "update.beta=-2")
    run("dvc", "queue", "start")
    for _ in range(240):  # the worker starts in the background
        status = run("dvc", "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(0.5)
    assert "Failed" in status
    failed = next(line.split()[1] for line in status.splitlines() if "Failed" in line)  # Task, Name, Created, Status
    assert "update: --beta must be a finite number >= 0, got -2" in run("dvc", "queue", "logs", failed, ok=None)
    run("dvc", "queue", "remove", "--failed")
    assert "Failed" not in run("dvc", "queue", "status")


def test_reference_is_recorded_relative_and_checked(policy_dir, tmp_path, monkeypatch):
    """The new policy names its KL reference relative to itself (so a moved run still finds it), a
    --reference of another architecture is refused, and an explicit reference is kept with beta 0."""
    rollout = make_rollout(policy_dir, tmp_path / "r")
    run_score(rollout, COMPRESSIBILITY, tmp_path / "s.parquet")
    run_update(policy_dir, rollout, tmp_path / "s.parquet", tmp_path / "p1", UpdateConfig(beta=0.0))
    record = json.loads((tmp_path / "p1" / "config.json").read_text())
    assert record["reference"]["path"] == "../policy"

    # the second update reads the recorded reference from another working folder
    rollout2 = make_rollout(tmp_path / "p1", tmp_path / "r2", seed=1)
    run_score(rollout2, COMPRESSIBILITY, tmp_path / "s2.parquet")
    monkeypatch.chdir(tmp_path / "r")
    metrics = run_update(tmp_path / "p1", rollout2, tmp_path / "s2.parquet", tmp_path / "p2", UpdateConfig(beta=0.1)).metrics
    assert metrics["kl"] > 0  # measured against the first policy, not against itself
    assert json.loads((tmp_path / "p2" / "config.json").read_text())["reference"] == {
        "path": "../policy", "identity": record["reference"]["identity"]}

    assert invoke("init", "--out", tmp_path / "big", "--image-size", 32).exit_code == 0
    with pytest.raises(TempflowError, match="another model"):
        run_update(tmp_path / "p1", rollout2, tmp_path / "s2.parquet", tmp_path / "p3", UpdateConfig(),
                   reference_dir=tmp_path / "big")
