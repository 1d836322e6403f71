"""What every ``tempflow`` command shares, for the image commands (:mod:`tempflow_cli.main`) and the
recommender's (:mod:`tempflow_cli.rec`) alike: the command class that builds a command's configs
(their one validation) and protects the paths it reads, the group class that turns any user error
into one line on stderr, and the options several commands take.

The stages are imported inside the functions that run them, never at the top of a CLI module: that is
for start-up time, so that ``--help`` and option errors answer without importing torch (only the light
support modules of :mod:`stages.support` are imported here, and the I/O layer only when a command runs).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from stages.support.errors import TempflowError, os_error_line
from stages.support.rules import Rules, naming
from tempflow_cli.options import literal, pop_config

MAX_THREADS = 4096

Builder = Callable[[dict[str, Any]], Any]
"""Builds one config from a command's parsed options, removing the options it used."""

OUTPUT_OPTIONS = ("out", "metrics_path", "checkpoint")
"""Options that name what a command writes (every other path option names an input)."""

OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (it is replaced only once complete).")
DEVICE = click.option("--device", default="cpu", show_default=True, help="torch device to run the model on, e.g. cuda:0.")
THREADS = click.option(
    "--threads", type=int, default=None,
    help="CPU threads torch may use (torch.set_num_threads). Default: torch's, one per core. Give each of "
         "several stages run side by side its share of the cores: on 2 cores, two processes of 2 threads "
         "each ran a UNet batch about 60x slower than two of 1 thread each.")


def dtype_option(help_text: str, name: str = "--dtype") -> Callable[[Callable], Callable]:
    """A ``--dtype``-like choice of :data:`stages.support.dtypes.DTYPES` (fp32 by default); each command says what it sets."""
    return click.option(name, type=click.Choice(list(literal("stages.support.dtypes:DTYPES"))), default="fp32",
                        show_default=True, help=help_text)


def config(cls_ref: str, reads: dict[str, str] | None = None, **takes: str) -> Builder:
    """A builder of the dataclass ``cls_ref`` (``"stages.artifacts.rollout_config:RolloutConfig"``) from the options
    named like its fields, which it takes from the callback's arguments; ``takes`` maps more fields
    to options it takes, ``reads`` to options it reads and leaves (such as ``--device``). The class
    is imported only when the command runs."""
    def build(params: dict[str, Any]) -> Any:
        module, _, name = cls_ref.partition(":")
        cls = getattr(importlib.import_module(module), name)
        extra = {field: params.pop(option) for field, option in takes.items()}
        extra.update({field: params[option] for field, option in (reads or {}).items()})
        return pop_config(cls, params, **extra)

    return build


@dataclass
class RunOptions(Rules):
    """Where a compute command runs: its CPU threads (``None``: torch's default, one per core)."""

    command = "run"

    threads: int | None = None

    def __post_init__(self) -> None:
        if self.threads is not None:
            self.at_least(1, "threads")
            self.at_most("threads", MAX_THREADS, "no machine runs that many threads of one process usefully")


def command_name(ctx: click.Context) -> str:
    """``rollout``, or ``rec train`` for a command of a sub-group: how refusals name the command."""
    name, parent = ctx.info_name or "", ctx.parent
    while parent is not None and parent.parent is not None and isinstance(parent.command, click.Group):
        name, parent = f"{parent.info_name} {name}", parent.parent
    return name


class StageCommand(click.Command):
    """A command that runs a stage: it builds the command's configs from the parsed options (each
    validating itself; ``configs`` maps a callback argument to its builder), applies ``--threads``,
    and protects every path the command reads: an output that would replace, or lie inside, any
    input (whatever option names it) is refused before any work, and again when it is written.
    ``outputs`` says which options name a file rather than a folder, or a folder the command continues
    (``resumable``: it may exist)."""

    def __init__(self, *args: Any, configs: dict[str, Builder] | None = None,
                 outputs: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.configs = configs or {}
        self.outputs = {"out": "dir", **(outputs or {})}

    def build_configs(self, ctx: click.Context, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with each config built in place of the options it reads (``tempflow check``
        builds them the same way). A ``--threads`` becomes the run's :class:`RunOptions`."""
        with naming(command_name(ctx)):
            built = {name: build(params) for name, build in self.configs.items()}
            if "threads" in params:
                built["_run"] = pop_config(RunOptions, params)
        return {**params, **built}

    def invoke(self, ctx: click.Context) -> Any:
        from stages.support.outputs import check_out_free, protected_inputs

        paths = {p.name: ctx.params.get(p.name) for p in self.params if isinstance(p.type, click.Path)}
        inputs = tuple(v for name, v in paths.items() if v is not None and name not in OUTPUT_OPTIONS)
        outputs = {paths[name]: kind for name, kind in self.outputs.items() if paths.get(name) is not None}
        for path, kind in outputs.items():
            folders = tuple(other for other, k in outputs.items() if other != path and k != "file")
            # a resumable folder may exist (the command continues it); it is still kept off the inputs
            replaceable = kind == "resumable" or bool(ctx.params.get("overwrite"))
            check_out_free(path, replaceable, inputs, "dir" if kind == "resumable" else kind, outputs=folders)
        ctx.params = self.build_configs(ctx, dict(ctx.params))
        run = ctx.params.pop("_run", None)
        if run is not None and run.threads is not None:
            import torch

            torch.set_num_threads(run.threads)
        with protected_inputs(inputs):
            return super().invoke(ctx)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every partial output is removed on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class CommandGroup(click.Group):
    """A group of stage commands: user errors end in one line on stderr and a non-zero exit
    (``--debug`` keeps the traceback); Ctrl-C and SIGTERM say what was written. A sub-group named in
    ``lazy`` (``tempflow rec``) is made when first asked for, so that no other command reads its
    options."""

    command_class = StageCommand

    def __init__(self, *args: Any, lazy: dict[str, Callable[[], click.Command]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})  # name -> its maker: made when first asked for, for start-up time

    def list_commands(self, ctx: click.Context | None) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context | None, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy:
            self.add_command(self.lazy[name](), name)
        return super().get_command(ctx, name)

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        extra.pop("standalone_mode", None)
        previous = _on_sigterm_raise()
        try:
            code = super().main(args=args, prog_name=prog_name or "tempflow", standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:  # bare `tempflow`: the help is the answer
            click.echo(err.ctx.get_help() if err.ctx else "")
            sys.exit(0)
        except click.UsageError as err:  # bad option or value: one line, naming it, then --help
            where = f"tempflow {err.ctx.info_name} --help" if err.ctx and err.ctx.parent else "tempflow --help"
            click.echo(f"error: {err.format_message()} (see `{where}`)", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        committed = len(_committed_outputs())
        debug = bool(ctx.find_root().params.get("debug"))
        _quiet_libraries(debug)
        try:
            return super().invoke(ctx)
        except (TempflowError, OSError, MemoryError) as err:
            if debug:
                raise
            click.echo(f"error: {_error_line(err)}", err=True)
            ctx.exit(1)
        except RuntimeError as err:  # torch.OutOfMemoryError (CUDA), without importing torch here
            if type(err).__name__ != "OutOfMemoryError" or debug:
                raise
            click.echo(f"error: out of GPU memory ({' '.join(str(err).split())[:160]}); lower --batch-size, or use "
                       "--dtype bf16", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as err:
            kept = _committed_outputs()[committed:]
            if len(kept) > 3:  # a loop commits many: the count and the last one
                done = f"{len(kept)} outputs were written (the last, {kept[-1]}), the rest was not"
            else:
                done = f"{', '.join(map(str, kept))} was written, the rest was not" if kept else "the stage's output was not written"
            click.echo(f"interrupted: {done}; run it again", err=True)
            ctx.exit(128 + (err.signum if isinstance(err, Interrupted) else signal.SIGINT))


def _quiet_libraries(debug: bool) -> None:
    """Library output stays off stderr, whose one line is a stage's error, unless ``--debug``: the
    log lines of diffusers and transformers (whose level is read from these variables when they are
    imported, later) and the warnings of any module but tempflow's own."""
    if debug:
        return
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "critical")
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"(stages|tempflow_cli)(\.|$)")


def _committed_outputs() -> list[Path]:
    """The outputs the I/O layer has moved into place so far; none before it is imported (importing it
    here would add it to every --help)."""
    outputs = sys.modules.get("stages.support.outputs")
    return outputs.committed_outputs() if outputs is not None else []


def _error_line(err: BaseException) -> str:
    if isinstance(err, OSError):
        return os_error_line(err)
    if isinstance(err, MemoryError):
        return "out of memory; lower --batch-size (or the sizes of the model or rollout)"
    return " ".join(str(err).split())  # one line, whatever the message held


def _on_sigterm_raise() -> Any:
    """Make SIGTERM raise :class:`Interrupted` (main thread only); returns the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    return signal.signal(signal.SIGTERM, handler)


def size_of(folder: Path) -> str:
    """A folder's size, for summaries."""
    total = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    return f"{total / 2**20:.2f} MiB"
