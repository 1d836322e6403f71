"""What `dvc exp show` and `dvc plots` read: the report's compact summary and its curves, dvc.yaml's
one metrics file, and `tempflow check`, the default run's first stage, which fails a bad params value
with the command's own error before anything runs."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from stages.report import write_report
from tests.conftest import invoke, write_updates

REPO = Path(__file__).resolve().parents[1]
SUMMARY_WITH_EVALS = {"iterations", "base_reward", "base_strict", "final_reward", "final_strict", "reward_gain",
                      "strict_gain", "best_reward", "best_step", "nfe", "seconds"}


def write_eval(folder: Path, step: int, reward: float, strict: float) -> Path:
    """The fields of a `tempflow eval` metrics.json that the report reads."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "reward": reward, "strict": strict, "per_task": {"single": {"reward": reward, "strict": strict}},
        "policy": {"step": step, "identity": f"policy-{step}"}}))
    return folder


def test_summary_holds_the_headline_figures_and_the_curves_the_rest(tmp_path):
    metrics = write_updates(tmp_path / "metrics", [0.5, 0.6, 0.7, 0.8], [(2.0, 3.0), (2.5, 3.5), (1.0, 1.0), (1.0, 2.0)])
    evals = {"base": write_eval(tmp_path / "e/base", 0, 0.40, 0.10),
             "it02": write_eval(tmp_path / "e/it02", 2, 0.65, 0.30),
             "final": write_eval(tmp_path / "e/final", 4, 0.60, 0.35)}
    summary = write_report(metrics, tmp_path / "rep", evals=evals)
    assert set(summary) == SUMMARY_WITH_EVALS
    assert summary == json.loads((tmp_path / "rep/summary.json").read_text())
    assert summary["base_reward"] == 0.40 and summary["final_strict"] == 0.35
    assert summary["reward_gain"] == pytest.approx(0.20) and summary["strict_gain"] == pytest.approx(0.25)
    assert (summary["best_reward"], summary["best_step"]) == (0.65, 2)  # the middle one, not the last
    assert summary["nfe"] == 400 and summary["seconds"] == pytest.approx(16.0) and summary["iterations"] == 4
    curve = json.loads((tmp_path / "rep/curve.json").read_text())
    assert [row["seconds"] for row in curve] == pytest.approx([5.0, 11.0, 13.0, 16.0])
    assert [row["nfe"] for row in curve] == [100, 200, 300, 400]
    points = json.loads((tmp_path / "rep/evals.json").read_text())
    assert [(p["name"], p["step"], p["nfe"]) for p in points] == [("base", 0, 0), ("it02", 2, 200), ("final", 4, 400)]


def test_without_evaluations_or_recorded_times_the_summary_says_only_what_it_has(tmp_path):
    metrics = write_updates(tmp_path / "metrics", [0.5, 0.7])  # updates from before they recorded seconds
    summary = write_report(metrics, tmp_path / "rep")
    assert summary == {"iterations": 2, "rollout_reward_first": 0.5, "rollout_reward_last": 0.7, "nfe": 200}
    assert "seconds" not in json.loads((tmp_path / "rep/curve.json").read_text())[0]
    assert json.loads((tmp_path / "rep/evals.json").read_text()) == []


def test_one_evaluation_is_base_and_final_and_ties_go_to_the_earlier(tmp_path):
    metrics = write_updates(tmp_path / "metrics", [0.5, 0.6], [(1.0, 1.0), (1.0, None)])  # one update untimed
    one = write_report(metrics, tmp_path / "rep1", evals={"final": write_eval(tmp_path / "e/final", 2, 0.6, 0.3)})
    assert one["base_reward"] == one["final_reward"] == 0.6 and "reward_gain" not in one
    assert "seconds" not in one  # not every update recorded its time: no partial sum
    tied = write_report(metrics, tmp_path / "rep2", evals={"base": write_eval(tmp_path / "e/base", 0, 0.6, 0.1),
                                                           "final": tmp_path / "e/final"})
    assert (tied["best_reward"], tied["best_step"]) == (0.6, 0)


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_the_summary_is_the_only_metrics_file_of_the_default_run(tmp_path):
    """`dvc exp show` makes a column of every field of every metrics file: one file, a dozen fields."""
    declared = [(name, m) for name, stage in dvc_stages()["stages"].items()
                for m in (stage.get("do", stage).get("metrics") or [])]
    assert declared == [("report", "runs/report/summary.json")]
    metrics = write_updates(tmp_path / "metrics", [0.5] * 16, [(1.0, 1.0)] * 16)
    evals = {name: write_eval(tmp_path / "e" / name, step, 0.5, 0.2)
             for name, step in (("base", 0), ("it04", 4), ("it08", 8), ("it12", 12), ("final", 16))}
    summary = write_report(metrics, tmp_path / "rep", evals=evals)  # the default run's shape
    assert 2 + len(summary) + 1 <= 15  # Experiment, Created, the summary, one swept param


def test_every_plot_reads_fields_the_report_writes(tmp_path):
    metrics = write_updates(tmp_path / "metrics", [0.5, 0.6], [(1.0, 1.0), (1.0, 1.0)])
    write_report(metrics, tmp_path / "rep", evals={"base": write_eval(tmp_path / "e/base", 0, 0.4, 0.1),
                                                   "final": write_eval(tmp_path / "e/final", 2, 0.5, 0.2)})
    plots = dvc_stages()["plots"]
    assert len(plots) == 4
    for plot in plots:
        (definition,) = plot.values()
        for path, fields in definition["y"].items():
            assert path.startswith("runs/report/")
            rows = json.loads((tmp_path / "rep" / Path(path).name).read_text())
            for field in [definition["x"], *([fields] if isinstance(fields, str) else fields)]:
                assert rows and all(field in row for row in rows), (path, field)


def check_command(tmp_path: Path, params: dict) -> list[str]:
    """The check stage's command line as DVC renders it from dvc.yaml with ``params``."""
    from dvc.repo import Repo

    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    (project / ".dvc" / "config").write_text((REPO / ".dvc" / "config").read_text().replace(
        "[core]", "[core]\n    no_scm = true", 1))
    (project / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (stage,) = Repo(str(project)).stage.collect(f"{project / 'dvc.yaml'}:check")  # a target is read from the cwd
    args = shlex.split(stage.cmd)
    assert args[:2] == ["tempflow", "check"]
    return args[2:]


def test_check_covers_every_params_group_the_stages_take():
    text = (REPO / "dvc.yaml").read_text()
    check = dvc_stages()["stages"]["check"]["cmd"]
    taken = set(re.findall(r"\$\{(\w+)\}", text)) - {"prompts"}
    assert taken == set(re.findall(r"\$\{(\w+)\}", check)) == {"pretrain", "rollout", "score", "update", "eval", "loop"}


def checked_groups(args: list[str]) -> list[str]:
    """The rendered check command after its own options (`--out FILE --overwrite`)."""
    return args[args.index("--overwrite") + 1:]


def test_check_passes_the_default_params_and_records_the_same_line_for_any_valid_values(tmp_path):
    """The record the pipeline's stages depend on reads the same for other valid values, so that a
    sweep reruns only what its values reach."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out = tmp_path / "checked.txt"
    result = invoke("check", "--out", out, *checked_groups(check_command(tmp_path / "a", params)))
    assert result.exit_code == 0, result.stderr
    record = out.read_text()
    assert record == "options valid: pretrain rollout score update eval loop\n"
    assert params["update"]["beta"] != 0.004 and params["rollout"]["branches"] != 6  # other values
    params["update"]["beta"], params["rollout"]["branches"] = 0.004, 6
    again = invoke("check", "--out", out, "--overwrite", *checked_groups(check_command(tmp_path / "b", params)))
    assert again.exit_code == 0 and out.read_text() == record


@pytest.mark.parametrize("group, key, value, says", [
    ("update", "beta", -1, "error: update: --beta must be a finite number >= 0, got -1"),
    ("rollout", "branches", 1, "error: rollout: --branches must be >= 2 with --algo tempflow"),
    ("pretrain", "steps", 0, "error: pretrain: --steps must be >= 1, got 0"),
    ("eval", "num-steps", 0, "error: eval: --num-steps must be >= 1, got 0"),
    ("score", "batch-size", 0, "error: score: --batch-size must be >= 1, got 0"),
    ("loop", "iterations", 0, "error: loop: --iterations must be >= 1, got 0"),
    ("pretrain", "stepz", 5, "error: No such option '--stepz'"),
])
def test_check_refuses_a_bad_value_with_the_commands_error(tmp_path, group, key, value, says):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params[group][key] = value
    out = tmp_path / "checked.txt"
    result = invoke("check", "--out", out, *checked_groups(check_command(tmp_path, params)))
    assert result.exit_code != 0 and result.stderr.startswith(says) and len(result.stderr.splitlines()) == 1
    assert not out.exists()


def test_the_command_itself_gives_the_same_error(tmp_path):
    """check builds the command's configs as the command does: the same one line, the command named."""
    result = invoke("update", "--policy", tmp_path / "p", "--rollout", tmp_path / "r", "--rewards", tmp_path / "s.parquet",
                    "--out", tmp_path / "new", "--beta", "-1")
    assert result.exit_code == 1 and result.stderr == "error: update: --beta must be a finite number >= 0, got -1\n"
    checked = invoke("check", "update", "--beta", "-1")
    assert checked.exit_code == 1 and checked.stderr == result.stderr


def test_check_leaves_its_own_options_and_help_out_of_the_commands(tmp_path):
    """Options after COMMAND are that command's: rollout's --out is not check's, and --help there is refused."""
    out = tmp_path / "checked.txt"
    result = invoke("check", "rollout", "--out", out, "--branches", "4")
    assert result.exit_code == 0 and not out.exists()
    helped = invoke("check", "rollout", "--help")
    assert helped.exit_code == 2 and "see `tempflow rollout --help`" in helped.stderr


def test_check_needs_a_command_before_its_options():
    for args in (("--beta", "0.1"), ("rollout", "+", "--beta", "0.1")):
        result = invoke("check", *args)
        assert result.exit_code == 2 and "expected one of init, make-tiny, pretrain, rollout, score, update, eval, loop" in result.stderr
