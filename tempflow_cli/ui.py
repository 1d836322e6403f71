"""rich at the edge: progress bars fed by the stages' progress callback, and summary tables."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
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


@contextlib.contextmanager
def progress_bars(unit: str = "") -> Iterator[ProgressFn]:
    """A progress callback that draws one bar per task name on stderr (hidden when not a terminal)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    err_console = consoles()[1]
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
