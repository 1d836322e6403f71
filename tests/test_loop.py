"""`tempflow loop` (stages/loop.py): many iterations in one process write what the three commands
write; what it keeps; a rerun continues (more iterations) or refuses another run; and the acceptance
run of issue 35, examples/sd3 under `dvc repro` on a toy SD3.5 folder, killed mid-iteration and
resumed, ending as an uninterrupted run with only the kept artifacts in the workspace and cache."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from tests.conftest import copy_project, invoke, tool_env

ROLLOUT = ["--num-steps", "4", "--branches", "2", "--seeds-per-prompt", "2", "--batch-size", "8"]
UPDATE = ["--beta", "0.04", "--learning-rate", "0.0001", "--batch-size", "16"]
REWARD = ["--reward", "jpeg_compressibility"]


def _comparable(folder: Path) -> dict[str, object]:
    """Every file of ``folder``: its bytes, or for JSON its content without wall-clock seconds (the
    one thing two runs of the same work write differently)."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if "seconds" not in k}
        return [clean(v) for v in value] if isinstance(value, list) else value

    return {p.relative_to(folder).as_posix(): clean(json.loads(p.read_bytes())) if p.suffix == ".json" else p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _loop(policy: Path, prompts: Path, out: Path, *options: str, evaluate: bool = False):
    tail = ["+", "eval", "--prompts", prompts, *REWARD, "--images-per-prompt", "1", "--num-steps", "4"] if evaluate else []
    return invoke("loop", "--policy", policy, "--prompts", prompts, "--out", out, *options,
                  "rollout", *ROLLOUT, "+", "score", *REWARD, "+", "update", *UPDATE, *tail)


def test_the_loop_writes_what_rollout_score_update_and_eval_write(policy_dir, prompts_file, tmp_path, monkeypatch):
    """Three iterations and their evaluations, once by the loop (models held between iterations) and
    once by the commands, each in its own folder with the same relative paths: the same files, the
    same bytes but for wall-clock seconds."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    result = _loop(policy_dir, prompts_file, Path("run"), "--iterations", "3", "--eval-every", "2", "--keep-every", "1",
                   "--keep-rollouts", "3", evaluate=True)
    assert result.exit_code == 0, result.output
    assert [line.split(":")[0] for line in result.stderr.splitlines() if line.startswith("iteration")] == \
        ["iteration 1/3", "iteration 2/3", "iteration 3/3"]
    monkeypatch.chdir(tmp_path / "b")
    evaluate = [*REWARD, "--prompts", prompts_file, "--images-per-prompt", "1", "--num-steps", "4"]
    assert invoke("eval", "--policy", policy_dir, "--out", "run/eval/it0000", *evaluate).exit_code == 0
    prev = policy_dir
    for i in (1, 2, 3):
        name = f"it000{i}"
        for args in (("rollout", "--policy", prev, "--prompts", prompts_file, "--out", f"run/rollouts/{name}",
                      "--seed", i, *ROLLOUT),
                     ("score", "--rollout", f"run/rollouts/{name}", "--out", f"run/scores/{name}.parquet", *REWARD),
                     ("update", "--policy", prev, "--rollout", f"run/rollouts/{name}", "--rewards",
                      f"run/scores/{name}.parquet", "--out", f"run/policies/{name}", "--metrics",
                      f"run/metrics/{name}.json", "--seed", i, *UPDATE)):
            assert invoke(*args).exit_code == 0
        prev = f"run/policies/{name}"
    for name in ("it0002", "it0003"):
        assert invoke("eval", "--policy", f"run/policies/{name}", "--out", f"run/eval/{name}", *evaluate).exit_code == 0
    ours, theirs = _comparable(tmp_path / "a/run"), _comparable(tmp_path / "b/run")
    assert set(ours) == set(theirs) | {"loop.json", "curve.json"} and len(theirs) > 50
    assert [f for f in theirs if theirs[f] != ours[f]] == []
    assert len(json.loads((tmp_path / "a/run/curve.json").read_text())) == 3


def test_what_the_loop_keeps(policy_dir, prompts_file, tmp_path):
    out = tmp_path / "loop"
    assert _loop(policy_dir, prompts_file, out, "--iterations", "5", "--keep-every", "2",
                 "--keep-rollouts", "1").exit_code == 0
    assert sorted(p.name for p in (out / "policies").iterdir()) == ["it0002", "it0004", "it0005"]
    assert [p.name for p in (out / "rollouts").iterdir()] == ["it0005"]
    assert [p.name for p in (out / "scores").iterdir()] == ["it0005.parquet"]
    assert len(list((out / "metrics").iterdir())) == 5 and not list((out / "eval").iterdir())
    assert json.loads((out / "loop.json").read_text())["done"] == 5
    assert not list(out.rglob(".tempflow-partial"))


def test_more_iterations_continue_a_finished_run(policy_dir, prompts_file, tmp_path, monkeypatch):
    """Two iterations, then four in the same folder: the same folder as four at once."""
    for folder in ("extended", "straight"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "extended")
    assert _loop(policy_dir, prompts_file, Path("run"), "--iterations", "2").exit_code == 0
    second = _loop(policy_dir, prompts_file, Path("run"), "--iterations", "4")
    assert second.exit_code == 0 and "iteration 1/4" not in second.stderr and "iteration 3/4" in second.stderr
    again = _loop(policy_dir, prompts_file, Path("run"), "--iterations", "4")  # nothing left to do
    assert again.exit_code == 0 and "iteration" not in again.stderr
    monkeypatch.chdir(tmp_path / "straight")
    assert _loop(policy_dir, prompts_file, Path("run"), "--iterations", "4").exit_code == 0
    assert _comparable(tmp_path / "extended/run") == _comparable(tmp_path / "straight/run")


def test_another_run_in_the_folder_is_refused_or_with_overwrite_restarted(policy_dir, prompts_file, tmp_path):
    out = tmp_path / "loop"
    assert _loop(policy_dir, prompts_file, out, "--iterations", "2").exit_code == 0
    other = invoke("loop", "--policy", policy_dir, "--prompts", prompts_file, "--out", out, "--iterations", "2",
                   "rollout", *ROLLOUT, "--shift", "2", "+", "score", *REWARD, "+", "update", *UPDATE)
    assert other.exit_code == 1 and "holds another run" in other.stderr and "--overwrite" in other.stderr
    fewer = _loop(policy_dir, prompts_file, out, "--iterations", "1")
    assert fewer.exit_code == 1 and "holds 2 iterations, more than --iterations 1" in fewer.stderr
    restarted = _loop(policy_dir, prompts_file, out, "--iterations", "1", "--overwrite")
    assert restarted.exit_code == 0 and "iteration 1/1" in restarted.stderr
    assert [p.name for p in (out / "metrics").iterdir()] == ["it0001.json"]
    (out / "loop.json").write_text((out / "loop.json").read_text().replace('"done": 1', '"done": 3'))
    edited = _loop(policy_dir, prompts_file, out, "--iterations", "4")
    assert edited.exit_code == 1 and "fingerprint" not in edited.stderr and "policies/it0003" in edited.stderr


def test_the_loop_owns_paths_seeds_and_devices_and_needs_its_three_stages(policy_dir, prompts_file, tmp_path):
    out = tmp_path / "loop"
    base = ["loop", "--policy", policy_dir, "--prompts", prompts_file, "--out", out]
    seeded = invoke(*base, "rollout", "--seed", "3", "+", "score", *REWARD, "+", "update")
    assert seeded.exit_code == 2 and "rollout --seed: the loop sets it" in seeded.stderr
    missing = invoke(*base, "rollout", "+", "update")
    assert missing.exit_code == 2 and "rollout OPTIONS + score OPTIONS + update OPTIONS" in missing.stderr
    no_eval = invoke(*base, "--eval-every", "2", "rollout", "+", "score", *REWARD, "+", "update")
    assert no_eval.exit_code == 2 and "--eval-every needs `+ eval OPTIONS`" in no_eval.stderr
    bad = invoke(*base, "--iterations", "0", "rollout", "+", "score", *REWARD, "+", "update")
    assert bad.exit_code == 1 and "loop: --iterations must be >= 1, got 0" in bad.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# The acceptance run: examples/sd3 under `dvc repro`, killed and resumed


def _sd3_project(pipelines: dict[str, Path], work: Path, iterations: int) -> Path:
    """examples/sd3 in ``work``, its params pointed at a toy SD3.5 folder on the CPU, sized to run an
    iteration in about a second."""
    copy_project(work, (), ("examples/sd3", "stages", "tempflow_cli"))
    params_path = work / "examples/sd3/params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["base"] = str(pipelines["sd3"])
    params["init"].update({"lora-rank": 4, "lora-alpha": 8})
    params["rollout"].update({"num-steps": 3, "resolution": 32, "branches": 2, "prompts-per-rollout": 2,
                              "batch-size": 8})
    params["update"].update({"clip-range": 0.2, "learning-rate": 0.01})
    params["loop"].update({"iterations": iterations, "keep-every": 10, "keep-rollouts": 1, "dtype": "fp32",
                           "device": "cpu", "threads": 1})
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    return work


def _dvc(work: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["dvc", *args], cwd=work, env=tool_env(TEMPFLOW_PROGRESS_SECONDS="600"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finished(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    return out


def _done(loop: Path) -> int:
    """The iterations a loop folder records as landed (0 before its loop.json exists)."""
    try:
        return json.loads((loop / "loop.json").read_text())["done"]
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def _cached_hashes(work: Path) -> set[str]:
    return {p.parent.name + p.name for p in (work / ".dvc/cache/files/md5").rglob("*")
            if p.is_file() and not p.name.endswith(".dir")}


def test_a_killed_dvc_loop_resumes_to_the_uninterrupted_result_keeping_only_what_it_keeps(pipelines, tmp_path):
    iterations = 30
    whole = _sd3_project(pipelines, tmp_path / "whole", iterations)
    _finished(_dvc(whole, "repro", "examples/sd3/dvc.yaml"))

    killed = _sd3_project(pipelines, tmp_path / "killed", iterations)
    proc = _dvc(killed, "repro", "examples/sd3/dvc.yaml")
    loop = killed / "examples/sd3/runs/loop"
    deadline = time.monotonic() + 600
    while _done(loop) < 12 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.4)  # inside iteration 13
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and tempflow, without a chance to clean up
    proc.wait()
    assert _done(loop) in (12, 13)
    resumed = _finished(_dvc(killed, "repro", "examples/sd3/dvc.yaml"))
    assert "Running stage 'examples/sd3/dvc.yaml:loop'" in resumed and "iteration 12/30" not in resumed and "iteration 30/30" in resumed, resumed

    runs = killed / "examples/sd3/runs/loop"
    assert _comparable(runs) == _comparable(whole / "examples/sd3/runs/loop")
    assert sorted(p.name for p in (runs / "policies").iterdir()) == ["it0010", "it0020", "it0030"]
    assert [p.name for p in (runs / "rollouts").iterdir()] == ["it0030"]
    assert len(list((runs / "metrics").iterdir())) == iterations and not list(runs.rglob(".tempflow-partial"))
    # the DVC cache holds what the workspace keeps, and no dropped rollout or policy
    kept = {hashlib.md5(p.read_bytes()).hexdigest() for p in (killed / "examples/sd3/runs").rglob("*") if p.is_file()}
    assert _cached_hashes(killed) <= kept
    assert "up to date" in _finished(_dvc(killed, "status", "examples/sd3/dvc.yaml"))

    # more iterations continue the finished run: only the new ones run
    params_path = killed / "examples/sd3/params.yaml"
    params_path.write_text(params_path.read_text().replace(f"iterations: {iterations}", f"iterations: {iterations + 2}"))
    more = _finished(_dvc(killed, "repro", "examples/sd3/dvc.yaml"))
    assert "iteration 30/32" not in more and "iteration 32/32" in more
    assert sorted(p.name for p in (runs / "policies").iterdir()) == ["it0010", "it0020", "it0030", "it0032"]
    assert json.loads((killed / "examples/sd3/runs/report/summary.json").read_text())["iterations"] == iterations + 2


def test_what_is_kept_may_change_between_reruns_without_redoing_the_run(policy_dir, prompts_file, tmp_path):
    out = tmp_path / "loop"
    assert _loop(policy_dir, prompts_file, out, "--iterations", "2", "--keep-every", "1").exit_code == 0
    more = _loop(policy_dir, prompts_file, out, "--iterations", "3", "--keep-every", "0", "--keep-rollouts", "1")
    assert more.exit_code == 0 and "iteration 3/3" in more.stderr and "iteration 1/3" not in more.stderr
    assert [p.name for p in (out / "policies").iterdir()] == ["it0003"]
    assert [p.name for p in (out / "rollouts").iterdir()] == ["it0003"]


def test_ctrl_c_says_what_landed_in_one_line_and_a_rerun_resumes(policy_dir, prompts_file, tmp_path, monkeypatch):
    import stages.loop

    out = tmp_path / "loop"
    real_update, calls = stages.loop.run_update, []

    def update_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(stages.loop, "run_update", update_then_interrupt)
        result = _loop(policy_dir, prompts_file, out, "--iterations", "4")
    assert result.exit_code == 130
    said = [line for line in result.stderr.splitlines() if line.startswith("interrupted")]
    assert len(said) == 1 and "outputs were written (the last, " in said[0] and said[0].endswith("run it again")
    assert json.loads((out / "loop.json").read_text())["done"] == 2
    again = _loop(policy_dir, prompts_file, out, "--iterations", "4")
    assert again.exit_code == 0 and "iteration 2/4" not in again.stderr and "iteration 3/4" in again.stderr
