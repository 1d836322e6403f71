"""Each DVC stage depends on the files it runs (DESIGN.md §9), not on the whole package: an edit to
the recommender leaves the image loop up to date, and the reverse.

The files a stage runs are the import closure of the library modules its command calls, each followed
through every import (a policy's kind is loaded through its registry, so the stages that load a
policy name every kind). The command line is not among them: it turns the options dvc.yaml passes
(every one, from params.yaml, so the command line recorded in dvc.lock is the whole config) into the
stage's config, and the ``check`` stage, which depends on it, builds those configs the same way. So
an edit to the loop's code leaves pretraining cached. This test holds each ``dvc.yaml`` to that list:
a new import fails here until the stages that run it name it.
"""

from __future__ import annotations

import shlex

import pytest
import yaml

from tests.test_imports import ROOT, imports, modules

SHARED_CLI = ["tempflow_cli.entry", "tempflow_cli.command", "tempflow_cli.options", "tempflow_cli.ui"]
KINDS = ["stages.policies.tiny", "stages.policies.sd3", "stages.policies.flux"]
COMMANDS = {
    "check": ["stages.init", "stages.pretrain", "stages.artifacts.rollout_config", "stages.score", "stages.update",
              "stages.evaluate", "stages.rewards", "stages.loop"],
    "init": ["stages.init", *KINDS],
    "pretrain": ["stages.pretrain"],
    "rollout": ["stages.rollout", "stages.artifacts.prompts", *KINDS],
    "score": ["stages.score"],
    "update": ["stages.update", *KINDS],
    "eval": ["stages.evaluate", *KINDS],
    "report": ["stages.report"],
    "loop": ["stages.loop", "stages.artifacts.prompts", *KINDS],
    "rec": ["stages.recsys.stages"],
}
"""The library modules each command calls (the CLI imports them inside the command, when it runs)."""
DVC_FILES = ["dvc.yaml", "examples/recsys/dvc.yaml", "examples/sd3/dvc.yaml"]


def closure(roots: list[str]) -> set[str]:
    """Every module ``roots`` import, at their top and (in ``stages``) inside functions, with the
    packages they sit in; the CLI's function-level imports are the other commands' stages and are
    not followed, nor is the other command group."""
    known = modules()
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        at_top, inside = imports(name, known[name], known)
        follow = at_top if name.startswith("tempflow_cli") else at_top | inside
        todo += [t for t in follow if t not in seen and t not in ("tempflow_cli.rec", "tempflow_cli.main")]
    packages = {".".join(name.split(".")[:i]) for name in seen for i in range(1, name.count(".") + 1)}
    return seen | {p for p in packages if p in known}


def files_of(command: str) -> set[str]:
    """The files (relative to the repository) that the command ``tempflow COMMAND`` runs: its library
    code, and for ``check`` the command line too (its output is the command line's verdict)."""
    cli = [*SHARED_CLI, "tempflow_cli.main"] if command == "check" else []
    known = modules()
    return {known[name].relative_to(ROOT).as_posix() for name in closure([*cli, *COMMANDS[command]])}


def stages_of(dvc_file: str) -> list[tuple[str, str, list[str]]]:
    """``(stage, command, code deps)`` of every stage of a dvc.yaml that runs tempflow; deps relative
    to the repository."""
    path = ROOT / dvc_file
    found = []
    for name, stage in yaml.safe_load(path.read_text())["stages"].items():
        body = stage.get("do", stage)
        words = shlex.split(body["cmd"].replace("${", "X").replace("}", "X"))
        if words[0] != "tempflow":
            continue
        deps = [(path.parent / dep).resolve().relative_to(ROOT).as_posix() for dep in body.get("deps", [])
                if not str(dep).startswith("$")]
        found.append((name, words[1], [dep for dep in deps if dep.split("/")[0] in ("stages", "tempflow_cli")]))
    return found


@pytest.mark.parametrize("dvc_file", DVC_FILES)
def test_each_stage_depends_on_the_files_its_command_runs(dvc_file):
    for name, command, deps in stages_of(dvc_file):
        wanted = files_of(command)
        assert set(deps) == wanted, (f"{dvc_file} stage {name}: add {sorted(wanted - set(deps))}, "
                                     f"remove {sorted(set(deps) - wanted)}")


def test_the_image_loop_and_the_recommender_share_no_system_code():
    """What the recommender alone runs is no image stage's dependency, and the reverse: only the
    shared command machinery, support modules and file formats are common to both."""
    image = set().union(*(files_of(c) for c in COMMANDS if c != "rec"))
    recsys = files_of("rec")
    assert not any(f.startswith("stages/recsys/") or f == "tempflow_cli/rec.py" for f in image)
    common = image & recsys
    assert all(f.startswith(("stages/support/", "stages/artifacts/")) or f == "stages/__init__.py"
               for f in common), sorted(common)
    assert not any(f.endswith(("sessions.py", "rec_model.py", "rec_checkpoint.py")) for f in image)
    assert "stages/recsys/losses.py" in recsys and "stages/rollout.py" not in recsys
