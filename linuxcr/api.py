"""Public Python API (what the CLI calls).

    linuxcr.checkpoint(pid, "app.img")            # or an open fd / file object
    pid = linuxcr.restart("app.img")
    reasons = linuxcr.check(pid)                  # [] when checkpointable
"""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from typing import IO, Iterator, Union

from linuxcr.engine import dump, restore
from linuxcr.errors import ImageError, ImageWriteError, LcrError, NoSuchProcess

Target = Union[int, str, os.PathLike, IO[bytes]]


def _pid(pid: object) -> int:
    try:
        p = int(pid)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise NoSuchProcess(f"{pid!r} is not a process id") from None
    if p <= 0:
        raise NoSuchProcess(f"{p} is not a process id")
    return p


@contextmanager
def _output(target: Target) -> Iterator[tuple[int, str, callable]]:
    """fd to write to, its name, and the commit step (rename for files).

    Files are written under a temporary name and renamed only once complete:
    a failed checkpoint never leaves something that looks like an image."""
    if isinstance(target, int):
        yield target, f"fd {target}", lambda: None
        return
    if hasattr(target, "fileno"):
        target.flush()  # type: ignore[union-attr]
        yield target.fileno(), getattr(target, "name", "image"), lambda: None  # type: ignore[union-attr]
        return
    path = os.fspath(target)
    try:
        special = not stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        special = False
    except OSError as e:
        raise ImageWriteError(f"cannot write {path}: {e.strerror}") from None
    if special:   # a FIFO, a device, a socket file: write straight into it
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ImageWriteError(f"cannot open {path}: {e.strerror}") from None
        try:
            yield fd, path, lambda: None
        finally:
            os.close(fd)
        return
    tmp = f"{path}.lcr-partial-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ImageWriteError(f"cannot create {path}: {e.strerror}") from None
    done = False

    def commit() -> None:
        nonlocal done
        os.rename(tmp, path)
        done = True
    try:
        yield fd, path, commit
    finally:
        os.close(fd)
        if not done:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


@contextmanager
def _input(source: Target) -> Iterator[tuple[int, str]]:
    if isinstance(source, int):
        yield source, f"fd {source}"
        return
    if hasattr(source, "fileno"):
        yield source.fileno(), getattr(source, "name", "image")  # type: ignore[union-attr]
        return
    path = os.fspath(source)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"cannot open image {path}: {e.strerror}") from None
    try:
        yield fd, path
    finally:
        os.close(fd)


def checkpoint(pid: int, out: Target, *, leave_running: bool = False, compress: bool = False,
               progress=None) -> dump.DumpResult:
    """Save process ``pid`` to ``out`` (path, fd or binary file object).

    The process is killed after a complete image was written, unless
    ``leave_running``; on any error it is left running as it was."""
    pid = _pid(pid)
    with _output(out) as (fd, name, commit):
        return dump.checkpoint(pid, fd, leave_running=leave_running, compress=compress,
                               name=name, on_written=commit, progress=progress)


def restart(image: Target, *, any_pid: bool = False) -> int:
    """Restart the process saved in ``image``; returns its pid.

    The restored process is a child of the caller until the caller exits."""
    return restart_full(image, any_pid=any_pid).pid


def restart_full(image: Target, *, any_pid: bool = False) -> restore.RestoreResult:
    with _input(image) as (fd, name):
        return restore.restart(fd, any_pid=any_pid, name=name)


def check(pid: int, tree: bool = True) -> list[str]:
    """Reasons why ``pid`` (and, with tree, its descendants) cannot be
    checkpointed now ([] if it can)."""
    pid = _pid(pid)
    return dump.check_tree(pid) if tree else dump.check_process(pid)


def run(argv: list[str], *, log: str | None = None, cwd: str | None = None) -> int:
    """Start argv as pid 1 of a fresh pid namespace, detached, ready to be
    checkpointed as a whole tree; returns its pid."""
    from linuxcr.engine import spawn
    if not argv:
        raise LcrError("nothing to run")
    return spawn.run_in_namespace(list(argv), log, cwd)


__all__ = ["checkpoint", "restart", "restart_full", "check", "run", "LcrError"]
