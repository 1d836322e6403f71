"""Where a stage writes (stages.support.outputs): an existing output only replaced with --overwrite,
never the working folder, a parent, an input or a symbolic link, and never one that appeared while
the stage ran; the --overwrite swap keeps the old or the new output whole through a kill, a signal
or a failed rename; leftovers of killed runs are cleared."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages.support.outputs import PARTIALS, clean_partials
from tests.conftest import (
    PROMPTS,
    _manifest,
    _one_error,
    _partials,
    _read_rollout,
    _score_cli,
    _scored,
    _scored_by_cli,
    _snapshot,
    _update_cli,
    invoke,
    make_rollout,
)


def _dead_pid(start: int = 999999) -> int:
    pid = start
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_leftovers_of_a_killed_run_are_cleared(policy_dir, prompts_file, tmp_path):
    """Slots nobody holds (any name, any PID in it, even a live one's) are removed by the next stage
    writing beside them, which succeeds; a slot a live process holds is kept."""
    import subprocess
    import sys

    slots = tmp_path / ".tempflow-partial"
    abandoned = [slots / f"{_dead_pid()}-0000abcd", slots / f"{os.getppid()}-1234abcd", slots / "whatever"]
    for slot in abandoned:
        (slot / "new").mkdir(parents=True)
        (slot / "new" / "shard-000000.tar").write_bytes(b"half a shard")
    held = slots / f"{os.getpid()}-held"
    held.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(120)
    """), str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = tmp_path / "r"
        result = invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", out, "--num-steps", 3)
        assert result.exit_code == 0, result.output
        assert not any(slot.exists() for slot in abandoned)
        assert held.is_dir(), "the slot of a live process was deleted"
        assert _manifest(out)["samples"] == len(_read_rollout(out))
    finally:
        holder.kill()
        holder.wait()
    scores = tmp_path / "s.parquet"
    result = _score_cli(tmp_path / "r", scores)
    assert result.exit_code == 0, result.output
    assert not slots.exists() and scores.is_file()


@pytest.mark.parametrize("stage", ["rollout", "score", "update"])
def test_existing_out_needs_overwrite(policy_dir, prompts_file, tmp_path, stage):
    """An existing --out is refused without --overwrite (untouched, message names --overwrite); replaced with it."""
    if stage == "rollout":
        out = tmp_path / "r"
        run = lambda *extra: invoke("rollout", "--policy", policy_dir, "--prompts", prompts_file, "--out", out,
                                    "--num-steps", 3, *extra)
    else:
        rollout, scores = _scored(policy_dir, tmp_path, "src")
        if stage == "score":
            out = tmp_path / "s.parquet"
            run = lambda *extra: _score_cli(rollout, out, *extra)
        else:
            out = tmp_path / "new"
            run = lambda *extra: _update_cli(policy_dir, rollout, scores, out, *extra)
    if stage == "score":
        out.write_bytes(b"precious")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    before = _snapshot(out)

    result = run()
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--overwrite" in lines[0], result.stderr
    assert _snapshot(out) == before
    assert _partials(out) == []

    result = run("--overwrite")
    assert result.exit_code == 0, result.output
    assert _snapshot(out) != before and _partials(out) == []
    if stage == "score":
        assert pq.read_table(out).num_rows > 0
    else:
        assert not (out / "keep.txt").exists()
        assert (out / ("manifest.json" if stage == "rollout" else "metrics.json")).is_file()


def test_out_may_not_replace_cwd_parents_or_inputs(policy_dir, tmp_path, monkeypatch):
    """--out . / a parent / an input is refused even with --overwrite; nothing is deleted."""
    rollout, scores = _scored(policy_dir, tmp_path)
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    monkeypatch.chdir(rollout)
    for out in (".", "..", str(rollout)):
        r = invoke("score", "--rollout", rollout, "--reward", "jpeg_compressibility", "--out", out, "--overwrite")
        assert r.exit_code == 1 and ("working folder" in r.stderr or "input" in r.stderr), r.stderr
    r = _update_cli(policy_dir, rollout, scores, policy_dir, "--overwrite")
    assert r.exit_code == 1 and "input" in r.stderr
    assert keep.read_text() == "precious" and (rollout / "manifest.json").is_file() and (policy_dir / "config.json").is_file()


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

    rollout, scores = _scored_by_cli(policy_dir, tmp_path)
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
