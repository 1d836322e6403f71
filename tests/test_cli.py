"""The command line: help that teaches, one-line errors for bad input, rewards by name and module."""

from __future__ import annotations

import json
import textwrap

import click
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import invoke, make_rollout


def _one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, repr(result.stderr)  # no blank line from an idle progress bar either
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


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

    commands = [[name] for name in cli.commands if name != "rec"] + [["rec", name] for name in cli.commands["rec"].commands]
    calls = [["--help"], ["rec", "--help"], *[[*c, "--help"] for c in commands], ["rollout", "--num-steps", "x"],
             ["update", "--kl-form", "nope"], ["rec", "train", "--algo", "nope"], ["no-such-command"]]
    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, json.dumps(calls)], capture_output=True, text=True,
                          check=True)
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["heavy"] == []
    assert len(commands) >= 13
    assert all(report["answers"][" ".join(c)] == 0 for c in calls if c[-1] == "--help")
    assert all(report["answers"][" ".join(c)] == 2 for c in calls if c[-1] != "--help")


@pytest.mark.parametrize("ref", ["stages.artifacts.rollout_config:RolloutConfig", "stages.update:UpdateConfig",
                                 "stages.pretrain:PretrainConfig", "stages.evaluate:EvalConfig",
                                 "stages.evaluate:EvalPrompts", "stages.score:ScoreConfig",
                                 "stages.init:InitConfig", "stages.init:MakeTinyConfig",
                                 "stages.recsys.data:PrepareConfig", "stages.recsys.model:RecModelConfig",
                                 "stages.recsys.train:TrainConfig", "stages.recsys.stages:RecEvalConfig"])
def test_options_read_from_source_are_the_dataclass_fields(ref):
    """The CLI reads each config from its module's source (so --help needs no torch): the names,
    defaults and order it reads are the imported dataclass's."""
    import dataclasses
    import importlib

    from tempflow_cli.options import config_fields

    module, name = ref.split(":")
    cls = getattr(importlib.import_module(module), name)
    real = [(f.name, f.default) for f in dataclasses.fields(cls)]
    assert [(f.name, f.default) for f in config_fields(ref)] == real
    assert all(f.doc for f in config_fields(ref)), "every field has its docstring"


TRICKY_SOURCE = '''"""A module docstring naming
class Config in column 0, which is prose, not code, and an example that is code:

class Example:
    size: int = 99
"""
import dataclasses

NAMES = {
    "a": "first",
}
NAMES_TOO: dict = {"b": "second"}
ALIAS = CHAINED = {"c": "third"}


class Example:
    size: int = 3
    """The real one."""


@dataclasses.dataclass
class Config:
    text: str = """a default whose second line
starts in column 0"""
    """Its docstring."""
    size: int = 3
# a comment in column 0 inside the class
    """Size's docstring."""


class ConfigAfter:
    pass
'''


def test_options_find_one_statement_among_column_0_strings_brackets_and_comments(tmp_path, monkeypatch):
    """Lines of a string, of brackets or comments starting in column 0 do not end a statement; prose
    or an example in a docstring is not taken for the class; a chained assignment is found."""
    from tempflow_cli import options

    (tmp_path / "tricky_config.py").write_text(TRICKY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    fields = options.config_fields("tricky_config:Config")
    assert [(f.name, f.default, f.doc) for f in fields] == [
        ("text", "a default whose second line\nstarts in column 0", "Its docstring."), ("size", 3, "Size's docstring.")]
    assert options.literal("tricky_config:NAMES") == {"a": "first"}
    assert options.literal("tricky_config:NAMES_TOO") == {"b": "second"}
    assert options.literal("tricky_config:CHAINED") == {"c": "third"}
    assert [(f.name, f.default) for f in options.config_fields("tricky_config:Example")] == [("size", 3)]
    with pytest.raises(ImportError, match="no class Missing"):
        options.config_fields("tricky_config:Missing")
    with pytest.raises(ImportError, match="no literal ConfigAfter"):
        options.literal("tricky_config:ConfigAfter")


def test_choices_read_from_source_are_the_registries():
    from stages.artifacts.rollout_config import ALGORITHMS
    from stages.flow import KL_FORMS
    from stages.policies.lora import DEFAULT_TARGETS
    from stages.policies.tiny import PRESETS
    from stages.policies.tiny_pipelines import KINDS as PIPELINE_KINDS
    from stages.recsys.data import SOURCES, SPLITS
    from stages.recsys.losses import ALGOS
    from stages.rewards import MODEL_REWARDS
    from stages.rewards.builtin import REWARDS
    from stages.rewards.tiny import KINDS as REWARD_KINDS
    from stages.support.dtypes import DTYPES
    from stages.update import ADV_GROUPS, ADV_STDS, WEIGHTINGS
    from stages.worlds import WORLDS
    from stages.worlds.shapes import EVAL_SPLITS
    from tempflow_cli.options import literal, literal_keys

    for name, value in {"stages.flow:KL_FORMS": KL_FORMS, "stages.worlds:WORLDS": WORLDS,
                        "stages.recsys.data:SOURCES": SOURCES, "stages.recsys.data:SPLITS": SPLITS,
                        "stages.recsys.losses:ALGOS": ALGOS, "stages.artifacts.rollout_config:ALGORITHMS": ALGORITHMS,
                        "stages.update:ADV_GROUPS": ADV_GROUPS, "stages.update:WEIGHTINGS": WEIGHTINGS,
                        "stages.update:ADV_STDS": ADV_STDS, "stages.policies.tiny:PRESETS": PRESETS,
                        "stages.support.dtypes:DTYPES": DTYPES, "stages.worlds.shapes:EVAL_SPLITS": EVAL_SPLITS,
                        "stages.policies.lora:DEFAULT_TARGETS": DEFAULT_TARGETS, "stages.rewards:MODEL_REWARDS": MODEL_REWARDS,
                        "stages.policies.tiny_pipelines:KINDS": PIPELINE_KINDS, "stages.rewards.tiny:KINDS": REWARD_KINDS,
                        }.items():
        assert literal(name) == value, name
    assert literal_keys("stages.rewards.builtin:REWARDS") == list(REWARDS)


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


@pytest.mark.parametrize("args, needle", [
    (["--algo", "grpo"], "'--algo'"),
    (["--branch-steps", "9"], "branch-steps"),
    (["--branch-steps", "first:x"], "branch-steps"),
    (["--num-steps", "1"], "rollout: --num-steps must be >= 2, got 1"),
    (["--branches", "1"], "--branches must be >= 2 with --algo tempflow"),
    (["--algo", "flow-grpo-fast", "--window", "4", "--num-steps", "6"], "window"),
    (["--noise-level", "0"], "rollout: --noise-level must be a finite number > 0, got 0"),
])
def test_rollout_bad_options(policy_dir, prompts_file, tmp_path, args, needle):
    """Bad option values exit non-zero with one line naming the option; nothing is written."""
    out = tmp_path / "r"
    result = invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", out, *args)
    assert result.exit_code != 0
    assert needle in _one_error_line(result)
    assert not out.exists()


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


def test_unknown_reward_fails_at_parse_time(tmp_path):
    r = invoke("score", "--rollout", tmp_path, "--reward", "jpeg_compresibility", "--out", tmp_path / "s.parquet")
    assert r.exit_code == 2
    assert "jpeg_compressibility" in _one_error_line(r)  # the message lists the real names


def test_user_reward_module_and_weighted_sum(policy_dir, tmp_path, monkeypatch):
    """module:function rewards are imported; the total is the weighted sum; each component has a column."""
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import numpy as np
        def brightness(images, prompts):
            return images.reshape(len(images), -1).mean(axis=1) / 255.0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    rollout = make_rollout(policy_dir, tmp_path / "r")
    out = tmp_path / "s.parquet"
    r = invoke("score", "--rollout", rollout, "--reward", "my_rewards:brightness:0.5",
               "--reward", "jpeg_compressibility:2", "--out", out)
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    cols = {name: table.column(name).to_numpy() for name in table.column_names}
    assert set(cols) == {"key", "reward", "reward_my_rewards.brightness", "reward_jpeg_compressibility"}
    np.testing.assert_allclose(cols["reward"], 0.5 * cols["reward_my_rewards.brightness"]
                               + 2 * cols["reward_jpeg_compressibility"])
    assert np.all(cols["reward_jpeg_compressibility"] < 0)
    meta = json.loads(table.schema.metadata[b"tempflow"])
    assert meta["rewards"] == [{"name": "my_rewards:brightness", "weight": 0.5},
                               {"name": "jpeg_compressibility", "weight": 2.0}]


def test_threads_sets_torchs_threads_for_every_compute_stage(policy_dir, tmp_path, monkeypatch):
    """--threads N reaches torch.set_num_threads before the stage runs; every command that takes
    --device takes --threads; 0 is refused by its config, in the one form."""
    import torch

    from tempflow_cli.main import cli

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    rollout = make_rollout(policy_dir, tmp_path / "r")
    r = invoke("score", "--rollout", rollout, "--reward", "shapes", "--out", tmp_path / "s.parquet", "--threads", "3")
    assert r.exit_code == 0, r.output
    assert calls == [3]
    assert invoke("score", "--rollout", rollout, "--reward", "shapes", "--out", tmp_path / "t.parquet").exit_code == 0
    assert calls == [3]  # without it, torch keeps its own
    r = invoke("score", "--rollout", rollout, "--reward", "shapes", "--out", tmp_path / "u.parquet", "--threads", "0")
    assert r.exit_code == 1 and "score: --threads must be >= 1, got 0" in r.output
    commands = [*cli.commands.values(), *cli.commands["rec"].commands.values()]
    with_device = [c for c in commands if any(p.name == "device" for p in c.params)]
    with_threads = [c for c in commands if any(p.name == "threads" for p in c.params)]
    assert with_device == with_threads and len(with_device) == 8  # rollout score update pretrain eval; rec's 3


def test_user_reward_import_errors(policy_dir, tmp_path):
    rollout = make_rollout(policy_dir, tmp_path / "r")
    r = invoke("score", "--rollout", rollout, "--reward", "no_such_module_xyz:f", "--out", tmp_path / "s.parquet")
    assert r.exit_code == 1 and "no_such_module_xyz" in _one_error_line(r)
    r = invoke("score", "--rollout", rollout, "--reward", "json:no_such_function", "--out", tmp_path / "s.parquet")
    assert r.exit_code == 1 and "no_such_function" in _one_error_line(r)
    assert not (tmp_path / "s.parquet").exists()


def test_debug_shows_the_traceback(tmp_path, prompts_file):
    from click.testing import CliRunner

    from tempflow_cli.main import cli

    result = CliRunner().invoke(cli, ["--debug", "rollout", "--policy", str(tmp_path / "nope"),
                                      "--prompts", str(prompts_file), "--out", str(tmp_path / "r")])
    assert result.exception is not None and type(result.exception).__name__ == "TempflowError"


def test_init_vocab_from_prompts(tmp_path):
    """--vocab-from adds a prompts file's words to the tokenizer; the preset builds and reports."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a zebra on a skateboard\n")
    r = invoke("init", "--out", tmp_path / "pol", "--image-size", 16, "--vocab-from", prompts)
    assert r.exit_code == 0, r.output
    assert "trainable parameters" in r.stdout
    config = json.loads((tmp_path / "pol" / "config.json").read_text())
    assert "zebra" in config["model"]["vocab"] and "skateboard" in config["model"]["vocab"]
    assert config["model"]["image_size"] == 16


@pytest.mark.parametrize("device, needle", [("gpu7", "not supported"), ("meta", "not supported"), ("cuda:0", "CUDA")])
def test_unusable_device_is_one_line(policy_dir, prompts_file, tmp_path, device, needle):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", tmp_path / "r", "--device", device)
    assert r.exit_code == 1 and needle in _one_error_line(r)
