"""What the command line draws (tempflow_cli.ui): off a terminal, progress as plain lines at a bounded
rate, each with done/total, rate and ETA, a finished task starting over, a short one silent; one
line per loop iteration."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from tempflow_cli import ui


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def test_plain_progress_prints_every_interval_and_the_end_of_a_task_that_printed(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0, 100.0, 101.0])
    monkeypatch.setattr(ui.time, "monotonic", lambda: next(clock))
    console, buffer = _console()
    progress = ui.PlainProgress(console, "NFE", every=30)
    progress("rollout", 10, 100)   # t=0: starts the task, no line yet
    progress("rollout", 10, 100)   # t=1
    progress("rollout", 20, 100)   # t=2
    progress("rollout", 20, 100)   # t=40: 30 s after the start
    progress("rollout", 40, 100)   # t=41: done, after a line: the end is printed
    progress("rollout", 50, 100)   # t=100: the next round of the task
    progress("rollout", 50, 100)   # t=101: done within the interval: nothing printed
    lines = buffer.getvalue().splitlines()
    assert lines == ["rollout: 60/100 NFE (60%), 1.5/s, 40 s, eta 27 s", "rollout: 100/100 NFE (100%), 2.44/s, 41 s"]


def test_an_iteration_is_one_line_with_its_figures(monkeypatch):
    console, buffer = _console()
    monkeypatch.setattr(ui, "consoles", lambda: (console, console))
    metrics = {"reward_mean": 0.61234, "kl": 0.00123, "clip_fraction": 0.031, "rollout_nfe": 1280}
    ui.iteration_line(SimpleNamespace(iteration=3, iterations=16, metrics=metrics, seconds=12.34, eval=None))
    ui.iteration_line(SimpleNamespace(iteration=4, iterations=16, metrics=metrics, seconds=10.0,
                                      eval={"reward": 0.8, "strict": 0.5}))
    assert buffer.getvalue().splitlines() == [
        "iteration 3/16: rollout reward 0.6123, kl 0.00123, clip fraction 0.031, NFE 1280, 12.3 s",
        "iteration 4/16: rollout reward 0.6123, kl 0.00123, clip fraction 0.031, NFE 1280, 10.0 s; eval reward 0.8000, "
        "strict 0.500"]
