"""Options generated from config dataclasses (tempflow_cli.options): the fields, defaults, docstrings
and registries read from source without importing the stages, and the source reading itself."""

from __future__ import annotations

import pytest


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


@pytest.fixture
def fresh_readings(tmp_path, monkeypatch):
    """The options module reading sources afresh, its kept readings in a file of this test's."""
    from tempflow_cli import options

    def clear():
        for cached in (options._cache, options._module_file, options._source_lines, options._heads,
                       options._statement, options.config_fields, options.literal, options.literal_keys):
            cached.cache_clear()

    monkeypatch.setattr(options, "CACHE_FILE", tmp_path / "kept" / "tempflow-options.json")
    clear()
    yield clear
    clear()


def test_options_find_one_statement_among_column_0_strings_brackets_and_comments(tmp_path, monkeypatch, fresh_readings):
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


def test_what_is_read_is_kept_and_read_again_when_its_source_changes(tmp_path, monkeypatch, fresh_readings):
    """A second start takes the fields from the kept readings, without parsing the source; an edited
    source (another size or time) is read again, as Python does with a .pyc."""
    from tempflow_cli import options

    source = tmp_path / "kept_config.py"
    source.write_text('import dataclasses\n\n\n@dataclasses.dataclass\nclass C:\n    n: int = 1\n    """One."""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [(f.name, f.default, f.doc, f.kind) for f in options.config_fields("kept_config:C")] == [("n", 1, "One.", int)]
    options.save_readings()
    assert options.CACHE_FILE.is_file()
    fresh_readings()

    def no_parsing(*args):
        raise AssertionError("the source was parsed although its reading was kept")

    parse = options._statement
    monkeypatch.setattr(options, "_statement", no_parsing)
    assert [(f.name, f.default) for f in options.config_fields("kept_config:C")] == [("n", 1)]
    monkeypatch.setattr(options, "_statement", parse)
    source.write_text(source.read_text().replace("n: int = 1", "n: int = 22"))
    fresh_readings()
    assert [(f.name, f.default) for f in options.config_fields("kept_config:C")] == [("n", 22)]


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
    assert literal_keys("stages.rewards.builtin:REWARDS") == tuple(REWARDS)
