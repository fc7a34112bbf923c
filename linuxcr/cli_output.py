"""How `lcr` commands report: --json (results.SCHEMAS), a progress bar on a
terminal (rich), -q and -v/-vv (the logging module; LCR_VERBOSE=1 is -v).

``@reporting`` adds the options to a command without touching its
signature (other options of the command stay where they are): the command
asks ``opts()`` for them.  Imported by cli.py; rich only when a bar shows.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("linuxcr")


@dataclass(frozen=True)
class Opts:
    json: bool = False
    progress: bool | None = None      # None: on when stderr is a terminal
    quiet: bool = False
    verbose: int = 0

    def bar_wanted(self) -> bool:
        if self.quiet:
            return False
        if self.progress is not None:
            return self.progress
        return sys.stderr.isatty()


_KEY = "lcr_output_opts"


def opts() -> Opts:
    ctx = click.get_current_context(silent=True)
    got = ctx.meta.get(_KEY) if ctx is not None else None
    return got if isinstance(got, Opts) else Opts()


def _setup_logging(level: int) -> None:
    """-v: info (the one-line summaries), -vv: debug; LCR_VERBOSE=1 is -v."""
    if os.environ.get("LCR_VERBOSE") and level == 0:
        level = 1
    root = logging.getLogger("linuxcr")
    if root.handlers:
        return
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("lcr: %(message)s"))
    root.addHandler(h)
    root.setLevel(logging.DEBUG if level >= 2 else logging.INFO if level == 1 else logging.WARNING)
    root.propagate = False


def reporting(json_option: bool = True, progress_option: bool = True) -> Callable[[F], F]:
    """Decorator: --json, --progress/--no-progress, -q, -v on a command."""
    def deco(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kw: Any) -> Any:
            o = Opts(json=bool(kw.pop("out_json", False)), progress=kw.pop("out_progress", None),
                     quiet=bool(kw.pop("out_quiet", False)), verbose=int(kw.pop("out_verbose", 0)))
            _setup_logging(-1 if o.quiet else o.verbose)
            click.get_current_context().meta[_KEY] = o
            return f(*args, **kw)
        w: Any = wrapper
        w = click.option("-v", "--verbose", "out_verbose", count=True,
                         help="Say more on stderr (-vv: debugging detail; also LCR_VERBOSE=1).")(w)
        w = click.option("-q", "--quiet", "out_quiet", is_flag=True,
                         help="Print no progress, summary or warning on stderr.")(w)
        if progress_option:
            w = click.option("--progress/--no-progress", "out_progress", default=None,
                             help="A progress bar on stderr (default: when stderr is a terminal).")(w)
        if json_option:
            w = click.option("--json", "out_json", is_flag=True,
                             help="Print the result as JSON (schema: docs/json.md).")(w)
        return w  # type: ignore[no-any-return]
    return deco


class HasJson(Protocol):
    def to_json(self) -> dict[str, Any]: ...


def emit_json(obj: HasJson | dict[str, Any] | list[Any]) -> None:
    data = obj.to_json() if hasattr(obj, "to_json") else obj
    click.echo(json.dumps(data, indent=2))


def say(text: str) -> None:
    """A summary line on stderr: shown at -v (or LCR_VERBOSE), never with -q."""
    log.info(text)


def warn(text: str) -> None:
    if not opts().quiet:
        click.echo(f"lcr: warning: {text}", err=True)


def note(text: str) -> None:
    """A line the user should see (not with -q): `lcr: ...` on stderr."""
    if not opts().quiet:
        click.echo(f"lcr: {text}", err=True)


# --- progress ------------------------------------------------------------------

class Bar:
    """Bytes done of about ``total``, with rate and ETA (rich), or nothing.
    ``advance(n)`` from the engine's progress hook, or ``poll(fn)``: a thread
    asks fn() for the bytes done so far (a file offset, a file size)."""

    def __init__(self, what: str, total: int | None, enabled: bool) -> None:
        self.what, self.total, self.enabled = what, total, enabled
        self.done = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._p: Any = None
        self._task: Any = None

    def __enter__(self) -> Bar:
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)
        self._p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                           TransferSpeedColumn(), TimeRemainingColumn(),
                           console=Console(file=sys.stderr), transient=False)
        self._p.start()
        self._task = self._p.add_task(self.what, total=self.total)
        return self

    def advance(self, n: int) -> None:
        self.done += n
        self._show()

    def set(self, done: int) -> None:
        self.done = done
        self._show()

    def _show(self) -> None:
        if self._p is None:
            return
        if self.total is not None and self.done > self.total:
            self.total = self.done
            self._p.update(self._task, total=self.total)
        self._p.update(self._task, completed=self.done)

    def poll(self, fn: Callable[[], int | None]) -> None:
        if not self.enabled:
            return

        def loop() -> None:
            while not self._stop.wait(0.1):
                try:
                    got = fn()
                except OSError:
                    got = None
                if got is not None:
                    self.set(got)
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._p is not None:
            if et is None and self.total is not None:
                self._p.update(self._task, completed=max(self.done, self.total), total=max(self.done, self.total))
            self._p.stop()


def bar(what: str, total: int | None) -> Bar:
    return Bar(what, total, opts().bar_wanted())


def fd_offset(fd: int) -> Callable[[], int | None]:
    """How far this process has read (or written) ``fd``: its file offset."""
    def get() -> int | None:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("pos:"):
                    return int(line.split()[1])
        return None
    return get


def tree_memory(pid: int) -> int | None:
    """About how many bytes a checkpoint of pid's tree writes: its resident
    private memory (RssAnon + RssShmem of each process), for the bar's ETA."""
    total, queue, seen = 0, [pid], set()
    while queue:
        p = queue.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(("RssAnon:", "RssShmem:")):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                queue += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
    return total or None


