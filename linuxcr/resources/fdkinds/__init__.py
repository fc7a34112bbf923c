"""Kinds of open files beyond regular files, directories, devices, pipes and
UNIX socket pairs (see files.py): one module each, listed in REGISTRY.

A kind is an object with:
  name                       short name stored in FileDesc.kind
  matches(ctx) -> bool       is this fd of my kind (ctx: FdContext)
  reason(ctx) -> str | None  why it cannot be saved (None: it can)
  dump(ctx) -> Struct        its state (a Struct from image/kinds.py); may use
                             ctx.grab() for our own copy of the file, never
                             consuming anything the program would see
  open(state, flags) -> int  an fd of lcr's holding the same thing, made
                             before the tasks exist (they inherit it)
  after_open(fd, state, env) / finish_open(fd, state, env)   optional:
                             work once every description is open (env:
                             files.OpenEnv), e.g. queues carrying files
  after_install(t, arena, fd, state, fds)   optional: work done inside the
                             task once its fds are in place (fds: the task's
                             fd -> FileDesc), e.g. epoll watches
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from linuxcr.procfs import FdInfo
from linuxcr.sys.syscalls import fd_of


@dataclass
class FdContext:
    pid: int
    fd: int
    link: str                 # readlink of /proc/PID/fd/N
    st: os.stat_result        # stat of the open file
    info: FdInfo              # /proc/PID/fdinfo/N
    adopt: object = None      # files.Table: adopt(our_fd) -> fid saves a file found in flight
    _grabbed: list[int] = field(default_factory=list)

    def grab(self) -> int:
        """Our own fd for the same open file (pidfd_getfd); closed by close()."""
        fd = fd_of(self.pid, self.fd)
        self._grabbed.append(fd)
        return fd

    def close(self) -> None:
        for fd in self._grabbed:
            os.close(fd)
        self._grabbed.clear()


from linuxcr.resources.fdkinds import eventfd  # noqa: E402
from linuxcr.resources.fdkinds import fifo, memfd, unlinked  # noqa: E402
from linuxcr.resources.fdkinds import epoll, inotify, signalfd, timerfd  # noqa: E402
from linuxcr.resources.fdkinds import tcp, udp, unix_bound  # noqa: E402
from linuxcr.resources.fdkinds import deleted_dir, opath, othersock, pidfd  # noqa: E402
from linuxcr.resources.fdkinds import devnode, fanotify, procfile, shmfd  # noqa: E402
from linuxcr.resources.fdkinds import pty  # noqa: E402

# One line per kind module; order matters only where two kinds could match
# the same fd (the first one wins).
REGISTRY = [procfile.KIND]   # first: /proc/PID/... of a task, even O_PATH, is reopened in the task
REGISTRY += [opath.KIND]     # an O_PATH fd of any other object is only a path
REGISTRY += [eventfd.KIND]
REGISTRY += [shmfd.KIND, memfd.KIND, unlinked.KIND, fifo.KIND]   # shmfd before memfd before unlinked
REGISTRY += [devnode.KIND]
REGISTRY += [timerfd.KIND, signalfd.KIND, epoll.KIND, inotify.KIND, fanotify.KIND]
REGISTRY += [unix_bound.KIND, tcp.KIND, udp.KIND]   # not connected UNIX pairs: files.py
REGISTRY += [deleted_dir.KIND, pidfd.KIND, othersock.KIND]   # othersock: after tcp/udp, every other family
REGISTRY += [pty.PTMX, pty.PTS]     # terminals: before files.py refuses devices
BY_NAME = {k.name: k for k in REGISTRY}


def find(ctx: FdContext):
    return next((k for k in REGISTRY if k.matches(ctx)), None)
