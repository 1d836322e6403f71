"""What a stage promises about the files around it (issue 13): it deletes nothing it did not write,
an --overwrite swap never loses both outputs, a reader trains on exactly the bytes it verified,
nothing non-finite is published, refusals come before the work, and leftovers cannot accumulate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from stages.support.outputs import PARTIALS, clean_partials
from tests.conftest import PROMPTS, invoke, make_rollout


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _one_error(result, *words: str) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def _scored(policy_dir: Path, tmp_path: Path, name: str = "r") -> tuple[Path, Path]:
    rollout = make_rollout(policy_dir, tmp_path / name)
    scores = tmp_path / f"{name}.parquet"
    assert invoke("score", "--rollout", rollout, "--reward", "jpeg_compressibility", "--out", scores).exit_code == 0
    return rollout, scores


# --------------------------------------------------------------------------------------------
# 1. pretrain --checkpoint deletes only a checkpoint of its own

PRETRAIN_FAST = ("--steps", 2, "--autoencoder-steps", 2, "--batch-size", 2, "--autoencoder-batch-size", 2,
                 "--checkpoint-every", 0)


@pytest.mark.parametrize("where", [".", "existing", "parent", "out"])
def test_pretrain_checkpoint_never_deletes_what_it_did_not_write(tmp_path, monkeypatch, where):
    """`--checkpoint .`, an existing folder, the parent of --out, --out itself: refused before any
    work, and every file there is kept (issue 13 item 1 emptied the working folder)."""
    sandbox = tmp_path / "sb"
    sandbox.mkdir()
    (sandbox / "keep.txt").write_text("a")
    (sandbox / "existing").mkdir()
    (sandbox / "existing" / "notes.md").write_text("mine")
    monkeypatch.chdir(sandbox)
    checkpoint = {".": ".", "existing": "existing", "parent": "runs", "out": "runs/base"}[where]
    before = _snapshot(sandbox)
    result = invoke("pretrain", "--world", "shapes", *PRETRAIN_FAST, "--out", "runs/base", "--checkpoint", checkpoint)
    _one_error(result, checkpoint if where != "." else "working folder")
    assert _snapshot(sandbox) == before
    assert not (sandbox / "runs").exists()


def test_pretrain_removes_its_own_checkpoint_and_nothing_else(tmp_path, monkeypatch):
    """A run that checkpoints deletes its checkpoint folder when done, and only that."""
    monkeypatch.chdir(tmp_path)
    Path("keep.txt").write_text("a")
    result = invoke("pretrain", "--world", "shapes", "--steps", 4, "--autoencoder-steps", 2, "--batch-size", 2,
                    "--autoencoder-batch-size", 2, "--checkpoint-every", 1, "--out", "base", "--checkpoint", "ck")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "keep.txt"]
    assert (tmp_path / "base" / "config.json").is_file()


# --------------------------------------------------------------------------------------------
# 2. every path a stage reads is protected from --overwrite


def test_overwrite_never_deletes_prompts_or_vocab_files(policy_dir, tmp_path):
    """An --out that is the folder of --prompts (rollout, eval) or of --vocab-from (init) is refused."""
    user = tmp_path / "userdata"
    user.mkdir()
    prompts = user / "prompts.txt"
    prompts.write_text("a red circle\n")
    (user / "neighbour.txt").write_text("precious")
    before = _snapshot(user)
    runs = [
        ("rollout", "--policy", policy_dir, "--prompts", prompts, "--out", user, "--overwrite"),
        ("eval", "--policy", policy_dir, "--prompts", prompts, "--out", user, "--overwrite", "--num-steps", 2),
        ("init", "--vocab-from", prompts, "--out", user, "--overwrite"),
        ("rollout", "--policy", policy_dir, "--prompts", prompts, "--out", policy_dir / "inside"),
    ]
    for args in runs:
        line = _one_error(invoke(*args), "input")
        assert str(user) in line or str(policy_dir) in line
    assert _snapshot(user) == before
    assert not (policy_dir / "inside").exists()


def test_refusals_come_before_any_work(policy_dir, prompts_file, tmp_path, monkeypatch):
    """An --out of the wrong kind, or --metrics inside --out, is refused before the policy is even loaded."""
    import stages.policies.base

    def no_work(*args, **kwargs):
        raise AssertionError("the stage started working before refusing its output")

    monkeypatch.setattr(stages.policies.base, "load_policy", no_work)
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"mine")
    _one_error(invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", a_file, "--overwrite"),
               "is a file")
    folder = tmp_path / "folder"
    folder.mkdir()
    _one_error(invoke("score", "--rollout", tmp_path / "r", "--reward", "shapes", "--out", folder, "--overwrite"),
               "is a folder")
    _one_error(invoke("update", "--policy", policy_dir, "--rollout", tmp_path / "r", "--rewards", a_file,
                      "--out", tmp_path / "new", "--metrics", tmp_path / "new" / "m.json"), "inside")
    assert a_file.read_bytes() == b"mine" and folder.is_dir()


# --------------------------------------------------------------------------------------------
# 3. the --overwrite swap: at every instant the old or the new output is whole


def _run_script(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_killed_mid_swap_keeps_the_old_output_and_the_next_run_restores_it(tmp_path):
    """SIGKILL between the two renames of the portable swap (no renameat2): the old output waits in
    the slot, the next stage writing beside it puts it back, byte for byte."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "data.txt").write_text("old and whole")
    result = _run_script(f"""
        import os, signal
        from pathlib import Path
        import stages.support.outputs as a
        a._exchange = lambda new, path: False  # the portable path: move the old aside, then the new in
        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if Path(dst).name == "old":
                os.kill(os.getpid(), signal.SIGKILL)
        a.os.replace = replace
        with a.atomic_output(Path({str(out)!r}), overwrite=True) as tmp:
            tmp.mkdir()
            (tmp / "data.txt").write_text("new")
    """, tmp_path)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not out.exists()
    slots = list((tmp_path / PARTIALS).iterdir())
    assert len(slots) == 1 and (slots[0] / "old" / "data.txt").read_text() == "old and whole"
    clean_partials(tmp_path)
    assert (out / "data.txt").read_text() == "old and whole"
    assert not (tmp_path / PARTIALS).exists()


@pytest.fixture
def sigint_handled():
    """Python's own SIGINT handler in this process, as in a terminal. A job started in the background
    (``pytest &``, some CI runners) inherits SIGINT ignored, and a command rightly leaves it so."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _sigint_default() -> None:
    """(In a child before exec.) SIGINT back to the default, so that Python installs its handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_swap_waits_until_the_new_output_is_in_place(policy_dir, tmp_path, monkeypatch, sig,
                                                                         sigint_handled):
    """SIGINT or SIGTERM arriving during the swap: the swap completes, the command exits 130 or 143
    and says the output *was* written (issue 13 item 3 said "not written" and had lost both)."""
    import stages.support.outputs as artifacts

    rollout, scores = _scored(policy_dir, tmp_path)
    out = tmp_path / "new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = artifacts._exchange

    def exchange_with_a_signal(new, path):
        os.kill(os.getpid(), sig)  # delivered now; its handler must wait for the swap
        return real(new, path)

    monkeypatch.setattr(artifacts, "_exchange", exchange_with_a_signal)
    result = invoke("update", "--policy", policy_dir, "--rollout", rollout, "--rewards", scores, "--out", out,
                    "--beta", 0, "--overwrite")
    assert result.exit_code == 128 + sig, result.output
    assert "was written" in result.stderr and "interrupted" in result.stderr
    assert (out / "config.json").is_file() and not (out / "old.txt").exists()
    assert not (tmp_path / PARTIALS).exists()


def test_a_failing_second_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    """Portable swap: if moving the new output in fails, the old one is moved back at once."""
    import stages.support.outputs as artifacts

    out = tmp_path / "out"
    out.mkdir()
    (out / "data.txt").write_text("old")
    monkeypatch.setattr(artifacts, "_exchange", lambda new, path: False)
    real = os.replace

    def replace(src, dst):
        if Path(src).name == "new":
            raise OSError(28, "No space left on device", str(dst))
        real(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", replace)
    with pytest.raises(OSError):
        with artifacts.atomic_output(out, overwrite=True) as tmp:
            tmp.mkdir()
            (tmp / "data.txt").write_text("new")
    assert (out / "data.txt").read_text() == "old"
    assert not (tmp_path / PARTIALS).exists()


# --------------------------------------------------------------------------------------------
# Real signals at several moments of a real command


def _start_rollout(policy_dir: Path, prompts: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-c", "from tempflow_cli.entry import main; main()"]
    return subprocess.Popen(cli + ["rollout", "--policy", str(policy_dir), "--prompts", str(prompts), "--out", str(out),
                                   "--overwrite", "--num-steps", "6", "--branches", "4", "--samples-per-shard", "1",
                                   "--batch-size", "4"],
                            cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the moment never came"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_signals_at_several_moments_keep_the_old_output_whole(policy_dir, tmp_path, sig):
    """A rollout --overwrite stopped while loading, and again while writing shards: the old rollout
    stays byte-identical; SIGINT/SIGTERM leave no slot, a SIGKILL's slot is cleared by the rerun,
    which succeeds."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 40) + "\n")
    out = make_rollout(policy_dir, tmp_path / "r")
    before = _snapshot(out)
    slots = tmp_path / PARTIALS
    moments = {
        "loading": lambda started: time.monotonic() > started + 1.5,  # past start-up: importing torch, loading
        "writing": lambda started: any(slots.glob("*/new/shard-000003.tar")),
    }
    for moment, ready in moments.items():
        proc = _start_rollout(policy_dir, prompts, out)
        started = time.monotonic()
        _wait_for(lambda: ready(started), proc)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        assert _snapshot(out) == before, f"the old rollout changed after {sig.name} while {moment}"
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:
            assert proc.returncode in (128 + sig, -sig), (moment, proc.returncode, stderr)
            assert "Traceback" not in stderr
            assert not slots.exists() or not any(slots.iterdir()), f"a slot was left after {sig.name} while {moment}"
    rerun = invoke("rollout", "--policy", policy_dir, "--prompts", tmp_path / "prompts.txt", "--out", tmp_path / "r2",
                   "--num-steps", 3)
    assert rerun.exit_code == 0, rerun.output
    assert not slots.exists()


# --------------------------------------------------------------------------------------------
# 4. an update trains on exactly the bytes it verified


def test_update_racing_rollout_overwrite_trains_on_the_verified_rollout(policy_dir, tmp_path, monkeypatch):
    """`rollout --overwrite` replaces the rollout while an update is reading it: the update's new
    policy equals one trained on an untouched copy of the old rollout (issue 13 item 4 mixed both)."""
    from safetensors.torch import load_file

    import stages.update

    rollout, scores = _scored(policy_dir, tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(rollout, copy)
    reference_out = tmp_path / "reference"
    assert invoke("update", "--policy", policy_dir, "--rollout", copy, "--rewards", scores, "--out", reference_out,
                  "--beta", 0).exit_code == 0
    real_plan = stages.update.plan_update

    def plan_then_race(opened, scores_path, config):
        plan = real_plan(opened, scores_path, config)
        make_rollout(policy_dir, tmp_path / "r2", seed=7)
        shutil.rmtree(rollout)  # what `rollout --overwrite` does to the old folder once the new one is in place
        shutil.move(tmp_path / "r2", rollout)
        return plan

    monkeypatch.setattr(stages.update, "plan_update", plan_then_race)
    out = tmp_path / "new"
    result = invoke("update", "--policy", policy_dir, "--rollout", rollout, "--rewards", scores, "--out", out, "--beta", 0)
    assert result.exit_code == 0, result.output
    weights = "transformer/diffusion_pytorch_model.safetensors"
    new, expected = load_file(out / weights), load_file(reference_out / weights)
    assert new.keys() == expected.keys() and all(torch.equal(new[k], expected[k]) for k in new)


def test_a_shard_changed_in_place_while_training_stops_the_update(policy_dir, tmp_path, monkeypatch):
    """A shard rewritten in place (same file) after the update verified it: the update stops, writes nothing."""
    import stages.update

    rollout, scores = _scored(policy_dir, tmp_path)
    real_plan = stages.update.plan_update
    shard = rollout / "shard-000000.tar"

    def plan_then_tamper(opened, scores_path, config):
        plan = real_plan(opened, scores_path, config)
        with open(shard, "r+b") as f:
            f.seek(-1000, os.SEEK_END)
            f.write(b"\x01" * 10)  # in the padding after the end-of-archive blocks: still a readable tar
        return plan

    monkeypatch.setattr(stages.update, "plan_update", plan_then_tamper)
    out = tmp_path / "new"
    _one_error(invoke("update", "--policy", policy_dir, "--rollout", rollout, "--rewards", scores, "--out", out,
                      "--beta", 0), "changed while it was being read")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# 5. nothing non-finite is published


def test_update_that_breaks_the_weights_writes_nothing(policy_dir, tmp_path, monkeypatch):
    """A step that leaves an infinite weight: the update stops, names it, and writes no policy."""
    import stages.update

    rollout, scores = _scored(policy_dir, tmp_path)
    real_step = stages.update.Trainer.step

    def step_then_break(self, batch):
        real_step(self, batch)
        with torch.no_grad():
            next(self.policy.trainable().parameters()).view(-1)[0] = float("inf")

    monkeypatch.setattr(stages.update.Trainer, "step", step_then_break)
    out = tmp_path / "new"
    _one_error(invoke("update", "--policy", policy_dir, "--rollout", rollout, "--rewards", scores, "--out", out,
                      "--beta", 0, "--metrics", tmp_path / "m.json"), "nothing was written")
    assert not out.exists() and not (tmp_path / "m.json").exists()


def test_rollout_of_a_broken_policy_stops_before_writing(policy_dir, prompts_file, tmp_path):
    """Weights of 1e30 (finite, as a learning rate of 1e30 left them): the velocity is not finite,
    the rollout says so and writes no NaN log-prob."""
    from stages.policies.base import load_policy, save_policy

    policy, record = load_policy(policy_dir)
    with torch.no_grad():
        for param in policy.trainable().parameters():
            param.mul_(1e30)
    broken = tmp_path / "broken"
    save_policy(policy, broken, record)
    out = tmp_path / "r"
    _one_error(invoke("rollout", "--policy", broken, "--prompts", prompts_file, "--out", out), "NaN or infinite")
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["update", "--learning-rate", "1e30"], "learning-rate"),
    (["update", "--beta", "1e30"], "beta"),
    (["rollout", "--shift", "1e30"], "shift"),
    (["rollout", "--noise-level", "1e-30"], "noise-level"),
    (["rollout", "--branches", "1000000000"], "branches"),
    (["init", "--image-size", "100000"], "GiB"),
    (["pretrain", "--image-size", "100000"], "image-size"),
    (["eval", "--num-steps", "100000000"], "num-steps"),
])
def test_values_past_their_limits_are_refused_saying_what_they_cost(policy_dir, prompts_file, tmp_path, args, needle):
    command, *options = args
    paths = {
        "update": ["--policy", policy_dir, "--rollout", tmp_path / "r", "--rewards", tmp_path / "s", "--out", tmp_path / "o"],
        "rollout": ["--policy", policy_dir, "--prompts", prompts_file, "--out", tmp_path / "o"],
        "init": ["--out", tmp_path / "o"],
        "pretrain": ["--out", tmp_path / "o"],
        "eval": ["--policy", policy_dir, "--out", tmp_path / "o"],
    }[command]
    line = _one_error(invoke(command, *paths, *options), needle)
    assert ("must be at most" in line or "must be at least" in line) and "(" in line  # the limit, and its cost
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# 7. an identity is never optional; 9. only a module:function name is imported


def test_a_policy_without_identity_is_refused(policy_dir, prompts_file, tmp_path):
    config = json.loads((policy_dir / "config.json").read_text())
    config["identity"] = ""
    (policy_dir / "config.json").write_text(json.dumps(config))
    _one_error(invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", tmp_path / "r"), "identity")


@pytest.mark.parametrize("spec", ["side-effect:f", "os.path", "foo:bar:baz:qux", "a b:c"])
def test_only_module_function_names_are_imported(tmp_path, monkeypatch, spec):
    """A reward that is neither a built-in nor `module:function` fails at parse time, importing nothing."""
    marker = tmp_path / "imported"
    (tmp_path / "side-effect.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef f(images, prompts): return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = invoke("score", "--rollout", tmp_path, "--reward", spec, "--out", tmp_path / "s.parquet")
    assert result.exit_code == 2 and "module:function" in result.stderr, result.output
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Found by review: races and bypasses of the checks above


def test_an_output_made_by_someone_else_meanwhile_is_never_replaced(tmp_path):
    """Without --overwrite, a file that appears at the output path while the stage runs is kept."""
    from stages.support.errors import TempflowError
    from stages.support.outputs import atomic_output

    out = tmp_path / "s.parquet"
    with pytest.raises(TempflowError, match="appeared while the stage ran"):
        with atomic_output(out, kind="file") as tmp:
            tmp.write_bytes(b"new")
            out.write_bytes(b"someone else's")
    assert out.read_bytes() == b"someone else's"
    assert not (tmp_path / PARTIALS).exists()


def test_a_symlinked_output_is_refused_before_any_work(policy_dir, prompts_file, tmp_path):
    (tmp_path / "iter3").mkdir()
    (tmp_path / "latest").symlink_to(tmp_path / "iter3")
    _one_error(invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", tmp_path / "latest",
                      "--overwrite"), "symbolic link")
    assert (tmp_path / "latest").is_symlink() and (tmp_path / "iter3").is_dir()


def test_a_bind_mounted_or_case_folded_input_is_recognised_by_inode(policy_dir, prompts_file, tmp_path, monkeypatch):
    """Two spellings of one folder (a bind mount, a case-insensitive file system) are the same input:
    simulated by making os.path.samefile say so for the policy folder and another name."""
    import stages.support.outputs as artifacts

    alias = tmp_path / "POLICY"
    alias.mkdir()
    real_samefile = os.path.samefile
    monkeypatch.setattr(artifacts.os.path, "samefile",
                        lambda a, b: {Path(a), Path(b)} == {alias.resolve(), policy_dir.resolve()} or real_samefile(a, b))
    _one_error(invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", alias, "--overwrite"), "input")
    assert (policy_dir / "config.json").is_file()


@pytest.mark.parametrize("module, body, needle", [
    ("raising_reward", "raise RuntimeError('model server down')", "RuntimeError: model server down"),
    ("wordy_reward", "return {'not': 'numbers'}", "did not return numbers"),
    ("broken_reward", "return 1 +", "SyntaxError"),
])
def test_a_failing_reward_plugin_is_one_line(policy_dir, tmp_path, monkeypatch, module, body, needle):
    (tmp_path / f"{module}.py").write_text(f"def score(images, prompts):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rollout = make_rollout(policy_dir, tmp_path / "r")
    _one_error(invoke("score", "--rollout", rollout, "--reward", f"{module}:score", "--out", tmp_path / "s.parquet"),
               needle)
    assert not (tmp_path / "s.parquet").exists()


@pytest.mark.parametrize("errno_, needle", [(28, "disk is full"), (30, "read-only"), (13, "no permission")])
def test_an_os_error_while_writing_is_one_line_naming_the_file(policy_dir, tmp_path, monkeypatch, errno_, needle):
    """Disk full, a read-only file system, no permission (simulated: tests run as root): one line
    naming the file and the fix, no output, no slot."""
    import stages.score

    rollout = make_rollout(policy_dir, tmp_path / "r")

    def failing_write(path, *args):
        raise OSError(errno_, os.strerror(errno_), str(path))

    monkeypatch.setattr(stages.score, "write_scores", failing_write)
    out = tmp_path / "s.parquet"
    line = _one_error(invoke("score", "--rollout", rollout, "--reward", "jpeg_compressibility", "--out", out), needle)
    assert PARTIALS in line or "s.parquet" in line
    assert not out.exists() and not (tmp_path / PARTIALS).exists()
