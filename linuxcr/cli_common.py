"""What every `lcr` command module shares (cli.py, cli_migrate.py): the error
wrapper that turns any error into one line on stderr and its exit code
(errors.EXIT_CODES), and the epilog of `lcr --help`.  Light on purpose: it is
imported by every `lcr` command (tests/test_startup.py)."""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable, NoReturn

import click

from linuxcr.errors import (INTERNAL_ERROR, INTERRUPTED, LcrError, Terminated, UsageError,
                            exit_code_table)


def fail(msg: str, code: int) -> NoReturn:
    """One line on stderr, then exit with ``code``."""
    click.echo(f"lcr: {msg}", err=True)
    sys.exit(code)


def run_guarded(fn: Callable[[], None]) -> None:
    """Run a command's body: an LcrError becomes its line and exit code, a
    bug of ours one line and INTERNAL_ERROR; LCR_DEBUG=1 shows tracebacks."""
    try:
        fn()
    except LcrError as e:
        if os.environ.get("LCR_DEBUG"):
            raise
        fail(str(e), e.exit_code)
    except Terminated as e:           # SIGTERM/SIGHUP, armed by the command: as ^C
        fail(e.message, e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", INTERRUPTED)
    except Exception as e:  # a bug of ours: still one line, with the way to learn more
        if os.environ.get("LCR_DEBUG"):
            raise
        fail(f"internal error: {type(e).__name__}: {e} (run with LCR_DEBUG=1 for details)",
             INTERNAL_ERROR)


def help_epilog() -> str:
    """The exit codes (errors.EXIT_CODES), kept as lines by click (\\b)."""
    return "\b\nExit codes:\n" + exit_code_table()


def usage_line(e: click.ClickException) -> str:
    """click's usage error (3-4 lines: usage, hint, error) as one line:
    the command, what is wrong, where its help is."""
    msg = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    path = ctx.command_path if ctx is not None else "lcr"
    sub = path.partition(" ")[2]
    return f"{sub + ': ' if sub else ''}{msg} (see {path} --help)"


def interruptible() -> None:
    """^C (SIGINT) raises KeyboardInterrupt, whatever lcr inherited: a shell
    script's background job (`lcr restart - <fifo &`) starts with SIGINT
    ignored, and Python then installs no handler, so a blocking read of the
    image from stdin could not be interrupted at all.  lcr never leaves a
    half-done job behind on ^C (run_guarded: `lcr: interrupted`, exit 130), so
    it takes SIGINT back.  Commands that forward signals (--wait, `lcr run`)
    install their own handlers afterwards."""
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:      # not the main thread (lcr driven from a test's thread)
        pass


def main_guarded(run: Callable[[], Any]) -> NoReturn:
    """Run the `lcr` group (``run``: its main() with standalone_mode off):
    usage errors become one `lcr: ...` line and UsageError's exit code
    (errors.EXIT_CODES); --help and --version exit 0 as usual."""
    interruptible()
    try:
        rv = run()
    except click.UsageError as e:
        fail(usage_line(e), UsageError.exit_code)
    except click.Abort:
        fail("interrupted", INTERRUPTED)
    except click.ClickException as e:          # e.g. click.FileError
        fail(" ".join(e.format_message().split()), e.exit_code)
    except Terminated as e:
        fail(e.message, e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", INTERRUPTED)
    sys.exit(rv if isinstance(rv, int) else 0)
