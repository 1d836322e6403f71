"""rich at the edge: progress bars fed by the stages' progress callback, and summary tables."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from stages.distributed import ranks
from stages.progress import Progress as ProgressFn

# under torchrun only rank 0 draws bars and prints tables (every rank's errors still reach stderr)
_QUIET = ranks().rank > 0
console = Console(quiet=_QUIET)
err_console = Console(stderr=True, quiet=_QUIET)


@contextlib.contextmanager
def progress_bars(unit: str = "") -> Iterator[ProgressFn]:
    """A progress callback that draws one bar per task name on stderr (hidden when not a terminal)."""
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


def summary(title: str, rows: dict[str, Any]) -> None:
    """A two-column table on stdout."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in rows.items():
        table.add_row(name, f"{value:.6g}" if isinstance(value, float) else str(value))
    console.print(table)


def comparison(title: str, columns: dict[str, dict[str, Any]]) -> None:
    """A table on stdout with one column per name (e.g. base, final) and a row per metric."""
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for name in columns:
        table.add_column(name, justify="right")
    for row in dict.fromkeys(key for column in columns.values() for key in column):
        cells = [columns[name].get(row) for name in columns]
        table.add_row(row, *(f"{v:.3f}" if isinstance(v, float) else "" if v is None else str(v) for v in cells))
    console.print(table)
