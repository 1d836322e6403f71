"""rich at the edge: progress bars fed by the stages' progress callback, and summary tables."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stages.support.progress import Progress as ProgressFn

if TYPE_CHECKING:
    from rich.console import Console

# rich is imported when something is drawn, not with the command module, for start-up time: `--help`
# needs none of it.


@functools.cache
def consoles() -> tuple[Console, Console]:
    """stdout's and stderr's consoles; under torchrun only rank 0 draws bars and prints tables (every
    rank's errors still reach stderr)."""
    from rich.console import Console

    from stages.support.distributed import ranks

    quiet = ranks().rank > 0
    return Console(quiet=quiet), Console(stderr=True, quiet=quiet)


PROGRESS_SECONDS = float(os.environ.get("TEMPFLOW_PROGRESS_SECONDS", "30"))
"""When stderr is no terminal (a log file, CI, `nohup`): at most one progress line per task this often."""


@contextlib.contextmanager
def progress_bars(unit: str = "") -> Iterator[ProgressFn]:
    """A progress callback: on a terminal one bar per task name on stderr; otherwise a plain line per
    task every :data:`PROGRESS_SECONDS` and when it ends. A task that has ended and reports again (the
    next iteration of a loop) starts over."""
    err_console = consoles()[1]
    if not err_console.is_terminal:
        yield PlainProgress(err_console, unit)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bars = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=err_console, transient=False,
    )
    tasks: dict[str, Any] = {}

    def report(task: str, advance: int, total: int) -> None:
        if not tasks:
            bars.start()  # only once there is work: an early error leaves stderr with its one line
        if task not in tasks:
            tasks[task] = bars.add_task(task, total=total)
        elif bars.tasks[tasks[task]].finished:
            bars.reset(tasks[task], total=total)
        bars.update(tasks[task], advance=advance, total=total)

    try:
        yield report
    except BaseException:
        if tasks:  # a failed stage's stderr is its one error line: the half-drawn bar is removed
            bars.live.transient, quiet, err_console.quiet = True, err_console.quiet, True
            try:
                bars.stop()
            finally:
                err_console.quiet = quiet
        raise
    else:
        if tasks:
            bars.stop()


@dataclass
class _Task:
    """One task's round of :class:`PlainProgress`."""

    total: int
    started: float
    done: int = 0
    last_line: float = 0.0
    printed: bool = False


class PlainProgress:
    """Progress as plain lines, for a log: ``rollout: 1200/4800 NFE (25%), 41.3/s, 29 s, eta 87 s``, one
    per task every ``every`` seconds, and one when a task that has printed one ends. A task shorter
    than that prints nothing (a stage that fails fast leaves its one error line alone on stderr)."""

    def __init__(self, console: Console, unit: str = "", every: float | None = None) -> None:
        self.console, self.unit = console, f" {unit}" if unit else ""
        self.every = PROGRESS_SECONDS if every is None else every
        self.tasks: dict[str, _Task] = {}

    def __call__(self, task: str, advance: int, total: int) -> None:
        now = time.monotonic()
        state = self.tasks.get(task)
        if state is None or state.done >= state.total:  # new, or the next round of a finished one
            state = self.tasks[task] = _Task(total=total, started=now, last_line=now)
        state.done += advance
        state.total = total
        if now - state.last_line >= self.every or (state.done >= total and state.printed):
            state.last_line, state.printed = now, True
            self.console.print(self.line(task, state, now), highlight=False, soft_wrap=True)

    def line(self, task: str, state: _Task, now: float) -> str:
        done, total, elapsed = state.done, state.total, now - state.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f", eta {_duration((total - done) / rate)}" if rate > 0 and done < total else ""
        percent = f" ({100 * done / total:.0f}%)" if total else ""
        return f"{task}: {done:g}/{total:g}{self.unit}{percent}, {rate:.3g}/s, {_duration(elapsed)}{eta}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def iteration_line(report: Any) -> None:
    """One line on stderr per loop iteration: the rollout's reward, the update's KL and clipped share,
    the rollout's NFE, the seconds; and the evaluation's reward when it ran one."""
    m = report.metrics
    text = (f"iteration {report.iteration}/{report.iterations}: rollout reward {m['reward_mean']:.4f}, "
            f"kl {m['kl']:.3g}, clip fraction {m['clip_fraction']:.3f}, NFE {m['rollout_nfe']}, "
            f"{report.seconds:.1f} s")
    if report.eval is not None:
        strict = f", strict {report.eval['strict']:.3f}" if "strict" in report.eval else ""
        text += f"; eval reward {report.eval['reward']:.4f}{strict}"
    consoles()[1].print(text, highlight=False, soft_wrap=True)


def summary(title: str, rows: dict[str, Any]) -> None:
    """A two-column table on stdout."""
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in rows.items():
        table.add_row(name, f"{value:.6g}" if isinstance(value, float) else str(value))
    consoles()[0].print(table)


def comparison(title: str, columns: dict[str, dict[str, Any]]) -> None:
    """A table on stdout with one column per name (e.g. base, final) and a row per metric."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("")
    for name in columns:
        table.add_column(name, justify="right")
    for row in dict.fromkeys(key for column in columns.values() for key in column):
        cells = [columns[name].get(row) for name in columns]
        table.add_row(row, *(f"{v:.3f}" if isinstance(v, float) else "" if v is None else str(v) for v in cells))
    consoles()[0].print(table)
