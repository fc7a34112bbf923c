"""inotify: every watch (watch descriptor, mask, the watched file's path).

fdinfo shows one line per watch: 'inotify wd:W ino:I sdev:D mask:M
ignored_mask:0 fhandle-bytes:N fhandle-type:T f_handle:H' (hex numbers).
A watch is on an inode, not on a path: lcr finds a path to it at the
checkpoint and watches that path again at the restart.

Finding the path:
- with CAP_DAC_READ_SEARCH (root): open_by_handle_at(f_handle) on a mount
  of the inode's file system, then readlink(/proc/self/fd/N);
- else (or if that fails): the inode is looked for among the places the
  process uses: its working directory, the directories of its open files
  and of the other watches, and their entries (one level down).
Every path found is checked by watching it with a throw-away inotify
instance, whose fdinfo must show the same inode and super block (stat()
may disagree with the kernel's view on overlayfs or btrfs).  A watched
file that was deleted but is still open (an fd of the holder or of its
descendants: same inode, no link left) is saved as that open file (ctx.adopt
gives its fid) and watched again, once every description is open
(finish_open), through /proc/self/fd of the restored file; its watch number
is set with INOTIFY_IOC_SETNEXTWD.  A deleted file no fd holds: refused.

Queued events are not saved: inotify has no way to read them without
consuming them, so a process with unread events (FIONREAD on our own copy
of the fd, which does not consume) is refused; `lcr check` says so.

Restore: inotify_init1 in lcr, then each watch in wd order: the next wd is
set with ioctl(INOTIFY_IOC_SETNEXTWD) (CONFIG_CHECKPOINT_RESTORE) or, where
that ioctl is missing, numbers are used up by adding and removing a
watch on a directory nobody watches (its IN_IGNORED events are read
away); every wd the kernel returns is checked."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import termios

from linuxcr.procfs.fdinfo import inotify_watches
from linuxcr.errors import RestoreError
from linuxcr.image.kinds import InotifyState, InotifyWatch
from linuxcr.procfs import list_fds, read_fd_link, read_fdinfo, read_status
from linuxcr.resources.fdkinds.epoll import family
from linuxcr.sys.syscalls import libc, pidfd_getfd, pidfd_open

IN_CLOEXEC, IN_NONBLOCK = os.O_CLOEXEC, os.O_NONBLOCK
IN_DELETE_SELF = 0x400
IN_DONT_FOLLOW, IN_EXCL_UNLINK, IN_MASK_CREATE = 0x02000000, 0x04000000, 0x10000000
INOTIFY_IOC_SETNEXTWD = 0x40044900      # _IOW('I', 0, __s32)
CAP_DAC_READ_SEARCH = 2
MAX_SKIPPED = 1 << 20                   # wd numbers we agree to use up without the ioctl
MAX_SCAN = 100_000                      # directory entries looked at per watch, at most
DUMMY_DIRS = ("/", "/proc", "/sys", "/dev", "/etc", "/usr", "/var", "/tmp")


class _Watch:
    __slots__ = ("wd", "ino", "sdev", "dev", "mask", "htype", "handle")

    def __init__(self, fields: dict[str, str]) -> None:
        self.wd = int(fields["wd"], 16)
        self.ino = int(fields["ino"], 16)
        self.sdev = sdev = int(fields["sdev"], 16)  # the kernel's dev_t: major << 20 | minor
        self.dev = os.makedev(sdev >> 20, sdev & 0xFFFFF)
        self.mask = int(fields["mask"], 16)
        self.htype = int(fields.get("fhandle-type", "0"), 16)
        h = fields.get("f_handle", "")
        self.handle = bytes.fromhex(h) if h and int(fields.get("fhandle-bytes", "0"), 16) else b""

    def where(self) -> str:
        return (f"inotify watch wd {self.wd} (inode {self.ino} on device "
                f"{os.major(self.dev)}:{os.minor(self.dev)})")


def parse(info) -> list[_Watch]:
    """The watches of an inotify fdinfo; ValueError if a line is malformed."""
    out = []
    for fields in inotify_watches(info):
        try:
            out.append(_Watch(fields))
        except (KeyError, ValueError):
            raise ValueError(f"unexpected inotify fdinfo line {fields}") from None
    return out


def queued(fd: int) -> int:
    """Bytes of events waiting to be read (FIONREAD does not consume them)."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, struct.pack("i", 0))
    return struct.unpack("i", buf)[0]


def _queued_in(pid: int, fd: int) -> int:
    """queued() of a process's fd, through a copy closed at once (reason()
    may run on its own, without FdContext.close())."""
    pfd = pidfd_open(pid)
    try:
        ours = pidfd_getfd(pfd, fd)
    finally:
        os.close(pfd)
    try:
        return queued(ours)
    finally:
        os.close(ours)


# --- finding the path of a watched inode -----------------------------------

def kernel_id(path: str, follow: bool = False) -> tuple[int, int] | None:
    """(inode number, super block dev) of path as inotify sees them: watched
    by a throw-away inotify instance, whose fdinfo says.  stat() may say
    otherwise (overlayfs, btrfs subvolumes); this compares like with like."""
    fd = libc.inotify_init1(IN_CLOEXEC)
    if fd < 0:
        return None
    try:
        mask = IN_DELETE_SELF | (0 if follow else IN_DONT_FOLLOW)
        if libc.inotify_add_watch(fd, os.fsencode(path), mask) < 0:
            return None
        ws = parse(read_fdinfo(os.getpid(), fd))
        return (ws[0].ino, ws[0].sdev) if ws else None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _is(path: str, w: _Watch) -> bool:
    return kernel_id(path) == (w.ino, w.sdev)


def _by_handle(w: _Watch, mounts: list[str]) -> tuple[str | None, str | None]:
    """(path, None) or (None, why not) through open_by_handle_at."""
    if not w.handle:
        return None, "its file system gives no file handle"
    fh = ctypes.create_string_buffer(struct.pack("<Ii", len(w.handle), w.htype) + w.handle)
    why = "no mount of its file system is visible to lcr"
    for m in mounts:
        try:
            # (open_by_handle_at refuses an O_PATH mount fd: EBADF)
            mfd = os.open(m, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            mid = kernel_id(f"/proc/self/fd/{mfd}", follow=True)   # its super block
            if mid is None or mid[1] != w.sdev:
                continue
            fd = libc.open_by_handle_at(mfd, fh, os.O_PATH | os.O_CLOEXEC)
            if fd < 0:
                e = ctypes.get_errno()
                why = f"its file handle does not open ({errno.errorcode.get(e, e)}"
                why += ": was the file deleted?)" if e == errno.ESTALE else ")"
                continue
            try:
                if os.fstat(fd).st_nlink == 0:
                    return None, "the watched file was deleted (it is still open somewhere)"
                path = os.readlink(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            if _is(path, w):
                return path, None
            why = "the path of its file handle leads elsewhere"
        finally:
            os.close(mfd)
    return None, why


def _near(w: _Watch, dirs: list[str]) -> str | None:
    """Look for the inode among dirs and their entries."""
    scanned = 0
    for d in dirs:
        if _is(d, w):
            return d
        try:
            with os.scandir(d) as it:
                for e in it:
                    scanned += 1
                    if scanned > MAX_SCAN:
                        return None
                    if e.inode() == w.ino and _is(e.path, w):
                        return e.path
        except OSError:
            continue
    return None


class _Finder:
    """Paths of the inodes a process watches, with the reason when one has none."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.root = bool(read_status(os.getpid()).cap_eff & (1 << CAP_DAC_READ_SEARCH))
        self._dirs: list[str] | None = None
        self._mounts: list[str] | None = None

    def dirs(self) -> list[str]:
        """The working directory, open directories, and directories of open files."""
        if self._dirs is None:
            out: list[str] = []
            try:
                out.append(os.readlink(f"/proc/{self.pid}/cwd"))
            except OSError:
                pass
            for fd in list_fds(self.pid):
                try:
                    link = read_fd_link(self.pid, fd)
                except OSError:
                    continue
                if link.startswith("/") and not link.endswith(" (deleted)"):
                    out.append(link if os.path.isdir(link) else os.path.dirname(link))
            self._dirs = list(dict.fromkeys(out))
        return self._dirs

    def mounts(self) -> list[str]:
        if self._mounts is None:
            out = ["/", *self.dirs()]
            try:
                import psutil
                out += [p.mountpoint for p in psutil.disk_partitions(all=True)]
            except Exception:   # psutil missing or /proc/self/mounts unreadable
                pass
            self._mounts = list(dict.fromkeys(out))
        return self._mounts

    def path(self, w: _Watch, found: list[str]) -> tuple[str | None, str | None]:
        why = None
        if self.root:
            path, why = _by_handle(w, self.mounts())
            if path is not None or (why or "").startswith("the watched file was deleted"):
                return path, why
        near = self.dirs() + [os.path.dirname(p) for p in found] + found
        path = _near(w, list(dict.fromkeys(near)))
        if path is not None:
            return path, None
        if not self.root:
            why = ("its path is not known: lcr finds the paths of watched files by file handle, "
                   "which needs root (CAP_DAC_READ_SEARCH), or near the files the process uses")
        return None, why or "its path is not known"

    def deleted_holder(self, w: _Watch) -> tuple[int, int, str] | None:
        """(pid, fd, link) of an fd of the family on the watched inode, deleted."""
        for p in family(self.pid):
            try:
                fds = list_fds(p)
            except OSError:
                continue
            for fd in fds:
                try:
                    link = read_fd_link(p, fd)
                    st = os.stat(f"/proc/{p}/fd/{fd}")
                except OSError:
                    continue
                if st.st_ino == w.ino and st.st_nlink == 0 and link.endswith(" (deleted)") and \
                        kernel_id(f"/proc/{p}/fd/{fd}", follow=True) == (w.ino, w.sdev):
                    return p, fd, link[: -len(" (deleted)")]
        return None

    def resolve(self, watches: list[_Watch]) -> tuple[list[InotifyWatch], str | None]:
        out: list[InotifyWatch] = []
        self.held: dict[int, tuple[int, int]] = {}      # wd -> (pid, fd) of a deleted file
        for w in sorted(watches, key=lambda w: w.wd):
            path, why = self.path(w, [x.path for x in out])
            if path is None:
                held = self.deleted_holder(w)
                if held is not None:
                    self.held[w.wd] = held[:2]
                    out.append(InotifyWatch(wd=w.wd, mask=w.mask, path=held[2][:4096], ino=w.ino))
                    continue
                if (why or "").startswith("the watched file was deleted"):
                    why += "; no fd of this process or its children holds it: close the watch"
                return out, f"{w.where()}: {why}"
            out.append(InotifyWatch(wd=w.wd, mask=w.mask, path=path, ino=w.ino,
                                    dir=os.path.isdir(path) and not os.path.islink(path)))
        return out, None


# --- the kind ------------------------------------------------------------------

class Inotify:
    name = "inotify"

    def matches(self, ctx) -> bool:
        return ctx.link in ("anon_inode:inotify", "anon_inode:[inotify]")

    def reason(self, ctx) -> str | None:
        try:
            ws = parse(ctx.info)
        except ValueError as e:
            return f"inotify: {e}"
        n = _queued_in(ctx.pid, ctx.fd)
        if n:
            return (f"inotify has {n} bytes of events the program has not read yet: they cannot "
                    "be saved without consuming them (checkpoint once it has read them)")
        if len(ws) and max(w.wd for w in ws) - len(ws) > MAX_SKIPPED and not _has_setnextwd():
            return "inotify watch numbers are too high to be given back"
        _, why = _Finder(ctx.pid).resolve(ws)
        return why

    def dump(self, ctx) -> InotifyState:
        finder = _Finder(ctx.pid)
        watches, why = finder.resolve(parse(ctx.info))
        if why:
            raise RestoreError(f"fd {ctx.fd}: {why}")   # reason() said yes a moment ago: a race
        for i, w in enumerate(watches):
            if w.wd in finder.held:
                watches[i] = InotifyWatch(wd=w.wd, mask=w.mask, path=w.path, ino=w.ino,
                                          fid=_adopt(ctx, *finder.held[w.wd]))
        return InotifyState(watches=watches)

    def open(self, state: InotifyState, flags: int) -> int:
        fd = libc.inotify_init1(IN_CLOEXEC | IN_NONBLOCK)
        if fd < 0:
            e = ctypes.get_errno()
            raise RestoreError(f"cannot create an inotify instance: {os.strerror(e)}",
                               "see /proc/sys/fs/inotify/max_user_instances" if e == errno.EMFILE else None)
        try:
            _add_all(fd, sorted((w for w in state.watches if w.fid < 0), key=lambda w: w.wd))
            os.set_blocking(fd, not flags & os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd


    def finish_open(self, fd: int, state: InotifyState, env) -> None:
        """Watches of deleted files: on the restored files, now all open."""
        late = [w for w in state.watches if w.fid >= 0]
        for w in late:
            if w.fid not in env.ours:
                raise RestoreError(f"inotify watch wd {w.wd} is on open file #{w.fid}, which "
                                   "the image lacks")
            try:
                fcntl.ioctl(fd, INOTIFY_IOC_SETNEXTWD, w.wd)
                got = _add(fd, f"/proc/self/fd/{env.ours[w.fid]}",   # (followed: the file)
                           (w.mask & ~IN_DONT_FOLLOW) | IN_MASK_CREATE)
            except OSError as e:
                raise RestoreError(f"cannot watch deleted file {w.path} again (inotify wd "
                                   f"{w.wd}): {e.strerror}") from None
            if got != w.wd:
                raise RestoreError(f"inotify watch of deleted file {w.path} came back as wd "
                                   f"{got}, not {w.wd}")
        if late:        # the next watch the program adds gets the number it would have had
            try:
                fcntl.ioctl(fd, INOTIFY_IOC_SETNEXTWD, max(w.wd for w in state.watches) + 1)
            except OSError:
                pass


def _adopt(ctx, pid: int, fd: int) -> int:
    """fid of the deleted file (pid's fd), saved like any open file."""
    if ctx.adopt is None:
        raise RestoreError(f"fd {ctx.fd}: an inotify watch of a deleted file cannot be saved here")
    pfd = pidfd_open(pid)
    try:
        copy = pidfd_getfd(pfd, fd)
    finally:
        os.close(pfd)
    try:
        return ctx.adopt(copy)
    finally:
        os.close(copy)


def _has_setnextwd() -> bool:
    fd = libc.inotify_init1(IN_CLOEXEC)
    if fd < 0:
        return False
    try:
        fcntl.ioctl(fd, INOTIFY_IOC_SETNEXTWD, 1)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _add(fd: int, path: str, mask: int) -> int:
    wd = libc.inotify_add_watch(fd, os.fsencode(path), mask)
    if wd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return wd


def _add_all(fd: int, watches: list[InotifyWatch]) -> None:
    next_wd, dummy = 1, None
    setnext = True
    for w in watches:
        if w.wd != next_wd and setnext:
            try:
                fcntl.ioctl(fd, INOTIFY_IOC_SETNEXTWD, w.wd)
                next_wd = w.wd
            except OSError:
                setnext = False
        if w.wd < next_wd:
            raise RestoreError(f"cannot give inotify watch {w.path} its number {w.wd} back: "
                               f"the next free one is {next_wd}")
        while next_wd < w.wd:     # no ioctl: use numbers up
            dummy = dummy or _dummy_dir(watches)
            try:
                os_wd = _add(fd, dummy, IN_DELETE_SELF | IN_DONT_FOLLOW | IN_MASK_CREATE)
                libc.inotify_rm_watch(fd, os_wd)
            except OSError as e:
                raise RestoreError(f"cannot skip inotify watch numbers with {dummy}: {e.strerror}") from None
            next_wd = os_wd + 1
            if next_wd % 1024 == 0:
                _drain(fd)
        try:
            got = _add(fd, w.path, w.mask | IN_DONT_FOLLOW | IN_MASK_CREATE)
        except OSError as e:
            hint = ("see /proc/sys/fs/inotify/max_user_watches" if e.errno == errno.ENOSPC
                    else "the file must exist at the same path on this machine")
            raise RestoreError(f"cannot watch {w.path} again (inotify wd {w.wd}): {e.strerror}",
                               hint) from None
        if got != w.wd:
            raise RestoreError(f"inotify watch of {w.path} came back as wd {got}, not {w.wd}",
                               "two saved watches may be the same file on this machine"
                               if got < w.wd else None)
        next_wd = got + 1
    if dummy is not None:
        _drain(fd)   # IN_IGNORED of the removed stand-ins (and anything seen meanwhile:
                     # the process was not there to see it)


def _dummy_dir(watches: list[InotifyWatch]) -> str:
    taken = set()
    for w in watches:
        try:
            st = os.stat(w.path, follow_symlinks=False)
            taken.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    for d in DUMMY_DIRS:
        try:
            st = os.stat(d)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in taken:
            return d
    raise RestoreError("cannot give inotify watches their numbers back: no unwatched directory "
                       "to skip numbers with")


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 1 << 16):
                return
        except BlockingIOError:
            return


KIND = Inotify()


def path_by_handle(pid: int, fields: dict[str, str]) -> tuple[str | None, str | None]:
    """(path, None) or (None, why) of the inode an fdinfo mark line names
    (ino, sdev, fhandle-type, f_handle: inotify and fanotify alike), found
    by file handle (root) or near the files ``pid`` uses; checked by inode."""
    w = _Watch({"wd": "1", "mask": "0", **fields})
    return _Finder(pid).path(w, [])
