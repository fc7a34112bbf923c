"""The `lcr` command line.  Every user error ends as one line on stderr and
a distinct exit code (see errors.py); never a traceback unless LCR_DEBUG=1."""
from __future__ import annotations

import json
import os
import sys
from typing import Callable

import click

from linuxcr import api
from linuxcr.errors import LcrError

INTERNAL_ERROR = 70


def _fail(msg: str, code: int) -> None:
    click.echo(f"lcr: {msg}", err=True)
    sys.exit(code)


def _run(fn: Callable[[], None]) -> None:
    try:
        fn()
    except LcrError as e:
        if os.environ.get("LCR_DEBUG"):
            raise
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # a bug of ours: still one line, with the way to learn more
        if os.environ.get("LCR_DEBUG"):
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (run with LCR_DEBUG=1 for details)",
              INTERNAL_ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="linuxcr")
def main() -> None:
    """Transparent checkpoint/restart of Linux processes."""


@main.command()
@click.argument("pid", type=int)
@click.option("-o", "--output", required=True, metavar="PATH|-",
              help="Image file, or - for standard output.")
@click.option("--leave-running", is_flag=True, help="Keep the process running after the dump.")
@click.option("--compress", is_flag=True, help="Compress memory pages with zstd.")
def checkpoint(pid: int, output: str, leave_running: bool, compress: bool) -> None:
    """Save process PID to an image (the process is killed after a complete dump)."""
    def go() -> None:
        if output == "-":
            if sys.stdout.isatty():
                raise LcrError("refusing to write an image to a terminal", "use -o FILE or a pipe")
            res = api.checkpoint(pid, 1, leave_running=leave_running, compress=compress)
        else:
            res = api.checkpoint(pid, output, leave_running=leave_running, compress=compress)
        if os.environ.get("LCR_VERBOSE"):
            click.echo(f"lcr: pid {pid}: {res.pages} pages, {res.bytes_written} bytes in "
                       f"{res.seconds:.3f} s (frozen {res.frozen_seconds:.3f} s)", err=True)
    _run(go)


@main.command()
@click.argument("image", metavar="IMAGE|-")
@click.option("--any-pid", is_flag=True, help="Take any free pid if the saved one is in use.")
def restart(image: str, any_pid: bool) -> None:
    """Restart the process saved in IMAGE; prints its pid."""
    def go() -> None:
        res = api.restart_full(0 if image == "-" else image, any_pid=any_pid)
        for w in res.warnings:
            click.echo(f"lcr: warning: {w}", err=True)
        if res.namespace:
            click.echo(f"lcr: restored in a new pid namespace: the process sees pid {res.vpid}, "
                       f"pid {res.pid} from here", err=True)
        elif res.pid != res.original_pid:
            click.echo(f"lcr: pid {res.original_pid} was in use; restored as pid {res.pid}", err=True)
        click.echo(str(res.pid))
        sys.stdout.flush()
    _run(go)


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-o", "--output", "log", metavar="LOG", help="Send the command's stdout and stderr to LOG.")
@click.option("-C", "--cwd", metavar="DIR", help="Working directory of the command.")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def run(log: str | None, cwd: str | None, argv: tuple[str, ...]) -> None:
    """Start a command as init of a fresh pid namespace, detached; prints its pid.

    The whole tree it starts can then be checkpointed, and restarts with
    every pid as it was."""
    def go() -> None:
        click.echo(str(api.run(list(argv), log=log, cwd=cwd)))
    _run(go)


@main.command()
@click.argument("image", metavar="IMAGE|-")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(image: str, as_json: bool) -> None:
    """Show what an image holds (and validate it)."""
    from linuxcr.image.show import render_text, summarize

    def go() -> None:
        with api._input(0 if image == "-" else image) as (fd, name):
            s = summarize(fd, name)
        click.echo(json.dumps(s, indent=2) if as_json else render_text(s))
    _run(go)


@main.command()
@click.argument("pid", type=int)
@click.option("--tree/--no-tree", default=True, help="Include all descendants (default).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(pid: int, tree: bool, as_json: bool) -> None:
    """Say whether PID can be checkpointed now, and if not, why."""
    def go() -> None:
        reasons = api.check(pid, tree=tree)
        if as_json:
            click.echo(json.dumps({"pid": pid, "checkpointable": not reasons, "reasons": reasons}))
        elif reasons:
            for r in reasons:
                click.echo(f"pid {pid}: {r}")
        else:
            click.echo(f"pid {pid}: can be checkpointed")
        if reasons:
            sys.exit(5)
    _run(go)
