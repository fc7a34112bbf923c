"""fanotify groups (fanotify_init) with their marks: on an inode, on a
mount, on a whole file system; each with its event mask, ignore mask and
mark flags (FAN_MARK_IGNORED_SURV_MODIFY, FAN_MARK_EVICTABLE, FAN_MARK_IGNORE).
fanotify needs CAP_SYS_ADMIN: root only.

Dump: fdinfo gives the group's init flags and event_f_flags and one line
per mark: an inode mark's path is found by its file handle (as inotify
does, inotify.path_by_handle), a mount mark's through /proc/PID/mountinfo
(mount id -> mount point), a file system mark's through any mount of that
device.  Refused: events queued and not read (FIONREAD on our copy: they
cannot be read without consuming them), permission classes
(FAN_CLASS_CONTENT / FAN_CLASS_PRE_CONTENT: a reply may be owed), a mark
whose object lcr cannot find by path.
Restore, in lcr: fanotify_init with the saved flags, then fanotify_mark
for each mark (the mask, then the ignore mask), then the new group's
fdinfo is compared with the saved marks (object, masks, flags).
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import termios

from linuxcr.errors import RestoreError
from linuxcr.image.kinds import FanotifyMark, FanotifyState
from linuxcr.procfs import read_fdinfo
from linuxcr.procfs.fdinfo import fanotify_flags, fanotify_marks
from linuxcr.procfs.mountinfo import read_mountinfo
from linuxcr.resources.fdkinds.inotify import path_by_handle
from linuxcr.sys.syscalls import libc

FAN_CLOEXEC, FAN_NONBLOCK = 0x1, 0x2
FAN_CLASS_MASK = 0xC                     # FAN_CLASS_NOTIF 0, CONTENT 4, PRE_CONTENT 8
FAN_MARK_ADD, FAN_MARK_DONT_FOLLOW, FAN_MARK_MOUNT = 0x1, 0x4, 0x10
FAN_MARK_IGNORED_MASK, FAN_MARK_IGNORED_SURV_MODIFY = 0x20, 0x40
FAN_MARK_FILESYSTEM, FAN_MARK_EVICTABLE, FAN_MARK_IGNORE = 0x100, 0x200, 0x400
INODE, MOUNT, FILESYSTEM = "inode", "mount", "filesystem"
_TYPE_FLAG = {INODE: FAN_MARK_DONT_FOLLOW, MOUNT: FAN_MARK_MOUNT, FILESYSTEM: FAN_MARK_FILESYSTEM}
AT_FDCWD = -100


def _queued(fd: int) -> int:
    buf = fcntl.ioctl(fd, termios.FIONREAD, struct.pack("i", 0))
    return struct.unpack("i", buf)[0]


def _kind_of(fields: dict[str, str]) -> str:
    return INODE if "ino" in fields else MOUNT if "mnt_id" in fields else FILESYSTEM


def _where(pid: int, fields: dict[str, str]) -> tuple[str | None, str]:
    """(path of the marked object, what it is) or (None, why not)."""
    kind = _kind_of(fields)
    if kind == INODE:
        path, why = path_by_handle(pid, fields)
        return (path, "") if path else (None, f"inode {int(fields['ino'], 16)}: {why}")
    mounts = read_mountinfo(pid)
    if kind == MOUNT:
        mid = int(fields["mnt_id"], 16)       # (hex, unlike fdinfo's own mnt_id)
        for m in mounts:
            if m.mnt_id == mid:
                return m.point, ""
        return None, f"mount {mid}: not visible in the process's mount table"
    sdev = int(fields["sdev"], 16)
    dev = os.makedev(sdev >> 20, sdev & 0xFFFFF)
    for m in mounts:
        if m.dev == dev and m.root == "/":
            return m.point, ""
    return None, f"file system {os.major(dev)}:{os.minor(dev)}: no mount of its root is visible"


def _mark(fields: dict[str, str], kind: str, path: str) -> FanotifyMark:
    return FanotifyMark(kind=kind, path=path, mask=int(fields.get("mask", "0"), 16),
                        ignored=int(fields.get("ignored_mask", "0"), 16),
                        mflags=int(fields.get("mflags", "0"), 16))


class Fanotify:
    name = "fanotify"

    def matches(self, ctx) -> bool:
        return ctx.link in ("anon_inode:[fanotify]", "anon_inode:fanotify")

    def reason(self, ctx) -> str | None:
        try:
            flags, _ = fanotify_flags(ctx.info)
            marks = fanotify_marks(ctx.info)
        except (ValueError, KeyError) as e:
            return f"fanotify group: unexpected fdinfo ({e})"
        if flags & FAN_CLASS_MASK:
            return ("fanotify group of a permission class (FAN_CLASS_CONTENT/PRE_CONTENT): a "
                    "reply may be owed to a blocked process; only notification groups are "
                    "saved; close it before the checkpoint")
        try:
            n = _queued(ctx.grab())
        finally:
            ctx.close()
        if n:
            return (f"fanotify group has {n} bytes of events the program has not read yet: they "
                    "cannot be saved without consuming them (checkpoint once it has read them)")
        for f in marks:
            path, why = _where(ctx.pid, f)
            if path is None:
                return f"fanotify {_kind_of(f)} mark of {why}; close the group before the checkpoint"
        return None

    def dump(self, ctx) -> FanotifyState:
        flags, event_flags = fanotify_flags(ctx.info)
        marks = []
        for f in fanotify_marks(ctx.info):
            path, why = _where(ctx.pid, f)
            if path is None:
                raise RestoreError(f"fd {ctx.fd}: fanotify mark of {why}")   # a race with reason()
            marks.append(_mark(f, _kind_of(f), path))
        return FanotifyState(flags=flags & ~FAN_NONBLOCK, event_flags=event_flags, marks=marks)

    def open(self, state: FanotifyState, flags: int) -> int:
        fd = libc.fanotify_init(state.flags | FAN_CLOEXEC | (FAN_NONBLOCK if flags & os.O_NONBLOCK else 0),
                                state.event_flags)
        if fd < 0:
            e = ctypes.get_errno()
            raise RestoreError(f"cannot create a fanotify group: {os.strerror(e)}",
                               "fanotify needs root (CAP_SYS_ADMIN)")
        try:
            for m in reversed(state.marks):     # fdinfo lists the newest mark first
                _add(fd, m)
            _check(fd, state)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _add(fd: int, m: FanotifyMark) -> None:
    base = FAN_MARK_ADD | _TYPE_FLAG[m.kind] | (m.mflags & FAN_MARK_EVICTABLE)
    calls = []
    if m.mask or not m.ignored:
        calls.append((base, m.mask))
    if m.ignored:
        how = FAN_MARK_IGNORE if m.mflags & FAN_MARK_IGNORE else FAN_MARK_IGNORED_MASK
        calls.append((base | how | (m.mflags & FAN_MARK_IGNORED_SURV_MODIFY), m.ignored))
    for how, mask in calls:
        if libc.fanotify_mark(fd, ctypes.c_uint(how), ctypes.c_uint64(mask), AT_FDCWD,
                              os.fsencode(m.path)) != 0:
            e = ctypes.get_errno()
            raise RestoreError(f"cannot put the fanotify {m.kind} mark on {m.path} again "
                               f"(mask 0x{mask:x}): {os.strerror(e)}",
                               "it must exist at the same path on this machine")


def _check(fd: int, state: FanotifyState) -> None:
    got = sorted((_kind_of(f), int(f.get("mask", "0"), 16), int(f.get("ignored_mask", "0"), 16),
                  int(f.get("mflags", "0"), 16)) for f in fanotify_marks(read_fdinfo(os.getpid(), fd)))
    want = sorted((m.kind, m.mask, m.ignored, m.mflags) for m in state.marks)
    if got != want:
        raise RestoreError(f"the fanotify marks did not come back as saved ({len(got)} of "
                           f"{len(want)}, masks {got} vs {want})")


KIND = Fanotify()
