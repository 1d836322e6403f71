"""The image commands (tempflow_cli.main): help that teaches (every option documented, the registries
listed, no torch imported for --help or an option error), and missing files named in one line."""

from __future__ import annotations

import json

import click
import pytest

from tests.conftest import _one_error_line, invoke


@pytest.mark.parametrize("command", ["init", "rollout", "score", "update", "report", "pretrain", "eval", "check"])
def test_every_command_documents_its_options(command):
    """--help shows every option, and every option has a help text (check's COMMANDS argument is
    explained by its docstring's usage line)."""
    from tempflow_cli.main import cli

    result = invoke(command, "--help")
    assert result.exit_code == 0
    for param in cli.commands[command].params:
        if isinstance(param, click.Argument):
            assert param.name.upper() in result.stdout
            continue
        assert param.help, f"{command} --{param.name} has no help"
        assert param.opts[0] in result.stdout


def test_top_level_help_lists_the_stages():
    """The Commands section lists each stage with its one-line help (the group's docstring names the
    stages too, so the listing itself is what is checked)."""
    result = invoke("--help")
    assert result.exit_code == 0
    listed = result.stdout.split("Commands:", 1)[1].splitlines()
    names = {line.split()[0] for line in listed if line.startswith("  ") and len(line.split()) > 1}
    assert {"init", "rollout", "score", "update", "report", "pretrain", "eval", "make-tiny", "check"} <= names


HELP_WITHOUT_TORCH = """
import json, sys
from tempflow_cli.main import cli
answers = {}
for args in json.loads(sys.argv[1]):
    try:
        cli.main(args, prog_name="tempflow")
    except SystemExit as stop:
        answers[" ".join(args)] = stop.code
heavy = sorted(m for m in ("torch", "transformers", "diffusers", "numpy", "pyarrow", "PIL", "rich") if m in sys.modules)
print(json.dumps({"answers": answers, "heavy": heavy}))
"""


def test_help_and_option_errors_never_import_torch():
    """`tempflow --help`, every command's --help and a mistyped option answer without importing
    torch, or any of the stages' heavy libraries, or rich (a fresh interpreter, so nothing is imported yet)."""
    import subprocess
    import sys

    from tempflow_cli.main import cli

    commands = [[name] for name in cli.list_commands(None) if name != "rec"] + [["rec", name] for name in cli.get_command(None, "rec").commands]
    calls = [["--help"], ["rec", "--help"], *[[*c, "--help"] for c in commands], ["rollout", "--num-steps", "x"],
             ["update", "--kl-form", "nope"], ["rec", "train", "--algo", "nope"], ["no-such-command"]]
    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, json.dumps(calls)], capture_output=True, text=True,
                          check=True)
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["heavy"] == []
    assert len(commands) >= 13
    assert all(report["answers"][" ".join(c)] == 0 for c in calls if c[-1] == "--help")
    assert all(report["answers"][" ".join(c)] == 2 for c in calls if c[-1] != "--help")


def test_help_texts_that_list_a_registry_are_made_from_it():
    """--help lists the presets, LoRA targets, rewards and make-tiny kinds from their registries (read
    from source, without torch); every preset has its architecture."""
    from stages.policies.lora import DEFAULT_TARGETS
    from stages.policies.tiny import PRESET_MODELS, PRESETS
    from stages.rewards import MODEL_REWARDS
    from stages.rewards.builtin import REWARDS

    assert set(PRESET_MODELS) == set(PRESETS)
    assert PRESET_MODELS["shapes"]["pooled_text"] is False and "no pooled text" in PRESETS["shapes"]
    init_help = "".join(invoke("init", "--help").stdout.split())  # wrapped anywhere: compare without spaces
    assert all(f"{name}:{''.join(text.split())}" in init_help for name, text in PRESETS.items())
    assert all(",".join(targets) in init_help for targets in DEFAULT_TARGETS.values())
    score_help = " ".join(invoke("score", "--help").stdout.split())
    assert all(name in score_help for name in [*REWARDS, *MODEL_REWARDS])


def test_update_help_explains_ablation_choices():
    out = invoke("update", "--help").stdout
    assert "noise-aware" in out and "uniform" in out and "(prompt, step)" in out


def test_missing_files_are_named(tmp_path, prompts_file, policy_dir):
    """A missing policy, prompts file or rollout is named in the error."""
    r = invoke("rollout", "--policy", tmp_path / "nope", "--prompts", prompts_file, "--out", tmp_path / "r")
    assert r.exit_code == 1 and f"{tmp_path / 'nope'}: not a policy folder (no config.json)" in _one_error_line(r)
    r = invoke("rollout", "--policy", policy_dir, "--prompts", tmp_path / "none.txt", "--out", tmp_path / "r")
    assert r.exit_code == 1 and f"{tmp_path / 'none.txt'}: no such prompts file" in _one_error_line(r)
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    r = invoke("rollout", "--policy", policy_dir, "--prompts", empty, "--out", tmp_path / "r")
    assert r.exit_code == 1 and f"{empty}: no prompts found" in _one_error_line(r)
    r = invoke("score", "--rollout", tmp_path / "gone", "--reward", "jpeg_compressibility", "--out", tmp_path / "s")
    assert r.exit_code == 1 and f"{tmp_path / 'gone'}: no such rollout folder" in _one_error_line(r)
    (tmp_path / "metrics").mkdir()
    r = invoke("report", "--metrics-dir", tmp_path / "metrics", "--out", tmp_path / "rep")
    assert r.exit_code == 1 and "no update metrics files found" in _one_error_line(r)
