"""Saved state of each kind of open file handled by a module in
linuxcr/resources/fdkinds/: part of the image schema (schema.py builds the
tagged union FileDesc.state from KIND_STATES).  Declarations only, no logic.

Adding a kind: declare its Struct here (tag=True, bounded fields) and append
it to KIND_STATES; write its module (see resources/fdkinds/eventfd.py)."""
from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

U64 = Annotated[int, Meta(ge=0)]
U32 = Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]


class EventfdState(Struct, tag="eventfd", forbid_unknown_fields=True):
    count: U64
    semaphore: bool = False


# --- timerfd, signalfd, epoll, inotify (resources/fdkinds/<kind>.py) --------
MAX_WATCHES = 1 << 20


class TimerfdState(Struct, tag="timerfd", forbid_unknown_fields=True):
    clock: U32                  # clockid
    settime_flags: U32 = 0      # TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET
    value_ns: U64 = 0           # time left to the next expiry at the checkpoint; 0: disarmed
    interval_ns: U64 = 0
    ticks: U64 = 0              # expirations not read yet


class SignalfdState(Struct, tag="signalfd", forbid_unknown_fields=True):
    mask: U64                   # bit N-1: signal N


class EpollWatch(Struct, forbid_unknown_fields=True):
    fd: Annotated[int, Meta(ge=0, le=1 << 20)]   # target fd number in the task that added the watch
    events: U32
    data: U64
    fid: Annotated[int, Meta(ge=-1, le=(1 << 32) - 1)] = -1   # the watched file (FileDesc.fid) when
    # fd no longer names it (closed, or its number reused): the watch is keyed (that file, fd)


class EpollState(Struct, tag="epoll", forbid_unknown_fields=True):
    watches: Annotated[list[EpollWatch], Meta(max_length=MAX_WATCHES)] = []


class InotifyWatch(Struct, forbid_unknown_fields=True):
    wd: Annotated[int, Meta(ge=1, le=(1 << 31) - 1)]
    mask: U32
    path: Annotated[str, Meta(max_length=4096)]   # where the watched inode was found at the checkpoint
    ino: U64 = 0
    dir: bool = False
    fid: Annotated[int, Meta(ge=-1, le=(1 << 32) - 1)] = -1   # a deleted file, still open: its
    # FileDesc (the watch is put on the restored file through /proc/self/fd)


class InotifyState(Struct, tag="inotify", forbid_unknown_fields=True):
    watches: Annotated[list[InotifyWatch], Meta(max_length=MAX_WATCHES)] = []


# --- unlinked files, memfd, FIFOs (resources/fdkinds/{unlinked,memfd,fifo}.py) --
MAX_CONTENT = 16 << 20          # bytes of data saved per memfd or unlinked file
MAX_EXTENTS = 4096              # runs of data (holes between them are not saved)
MAX_FIFO = 16 << 20             # unread bytes of one FIFO
Off = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]


class Extent(Struct, forbid_unknown_fields=True):
    offset: Off
    data: Annotated[bytes, Meta(max_length=MAX_CONTENT)]


class FileContent(Struct, forbid_unknown_fields=True):
    """The inode behind a memfd or an unlinked file.  (dev, ino) as seen at
    the checkpoint names it: every fd and mapping of it gets one new inode."""
    dev: U64
    ino: U64
    size: Off
    mode: Annotated[int, Meta(ge=0, le=0o7777)]
    uid: U32 = 0
    gid: U32 = 0
    atime_ns: U64 = 0
    mtime_ns: U64 = 0
    extents: Annotated[list[Extent], Meta(max_length=MAX_EXTENTS)] = []


class UnlinkedState(Struct, tag="unlinked", forbid_unknown_fields=True):
    path: Annotated[str, Meta(min_length=1, max_length=4096)]   # without " (deleted)"
    content: FileContent
    pos: Off = 0


class MemfdState(Struct, tag="memfd", forbid_unknown_fields=True):
    name: Annotated[str, Meta(max_length=249)]                  # memfd_create's name
    content: FileContent
    seals: Annotated[int, Meta(ge=0, le=0xFFFF)] = 0            # F_GET_SEALS
    pos: Off = 0


class FifoState(Struct, tag="fifo", forbid_unknown_fields=True):
    path: Annotated[str, Meta(min_length=1, max_length=4096)]   # without " (deleted)"
    size: U32                                                   # capacity (F_GETPIPE_SZ)
    data: Annotated[bytes, Meta(max_length=MAX_FIFO)] = b""     # bytes still unread
    unlinked: bool = False          # no name left: made again, then unlinked
    dev: U64 = 0                    # unlinked: (dev, ino) at the checkpoint, shared by its descriptions
    ino: U64 = 0
    mode: Annotated[int, Meta(ge=0, le=0o7777)] = 0o600
    uid: U32 = 0
    gid: U32 = 0


class DevnodeState(Struct, tag="devnode", forbid_unknown_fields=True):
    """An unlinked device node (resources/fdkinds/devnode.py)."""
    path: Annotated[str, Meta(min_length=1, max_length=4096)]   # without " (deleted)"
    rdev: U64                                                   # major/minor
    block: bool = False
    mode: Annotated[int, Meta(ge=0, le=0o7777)] = 0o600
    uid: U32 = 0
    gid: U32 = 0
    pos: Off = 0


class ShmfdState(Struct, tag="shmfd", forbid_unknown_fields=True):
    """An fd of MAP_SHARED|MAP_ANONYMOUS memory (/dev/zero (deleted)), opened
    through /proc/PID/map_files (resources/fdkinds/shmfd.py)."""
    start: U64 = 0                  # a mapping of it in the holder; 0: none (content saved)
    end: U64 = 0
    content: FileContent | None = None
    pos: Off = 0


# --- sockets (resources/fdkinds/{unix_bound,tcp,udp}.py) ----------------------
MAX_SOCK_QUEUE = 16 << 20       # bytes queued in one socket (each way)
SockBytes = Annotated[bytes, Meta(max_length=MAX_SOCK_QUEUE)]
Datagrams = Annotated[list[Annotated[bytes, Meta(max_length=1 << 20)]], Meta(max_length=1 << 16)]
I32 = Annotated[int, Meta(ge=-(1 << 31), le=(1 << 31) - 1)]


class MsgExtra(Struct, forbid_unknown_fields=True):
    """What travels with a queued UNIX message besides its bytes
    (resources/unix_sockets.py): files in flight, credentials, sender."""
    index: U32                                          # position in the queue
    fids: Annotated[list[U32], Meta(max_length=253)] = []   # SCM_RIGHTS: open files (FileDesc.fid)
    creds: Annotated[list[I32], Meta(max_length=3)] = []    # SCM_CREDENTIALS: pid, uid, gid
    sender: Annotated[bytes, Meta(max_length=108)] = b""    # datagram: the sender's name


MsgExtras = Annotated[list[MsgExtra], Meta(max_length=1 << 16)]


class SockOpts(Struct, forbid_unknown_fields=True):
    """SOL_SOCKET options of a socket."""
    rcvbuf: U32 = 0             # as getsockopt reports them (twice what was asked)
    sndbuf: U32 = 0
    buf_lock: Annotated[int, Meta(ge=0, le=3)] = 0   # SO_BUF_LOCK: 1 send, 2 receive size set by hand
    reuseaddr: bool = False
    reuseport: bool = False
    keepalive: bool = False
    broadcast: bool = False
    passcred: bool = False
    oobinline: bool = False
    linger: I32 = -1            # SO_LINGER seconds; -1: off
    peek_off: I32 = -1          # SO_PEEK_OFF; -1: off


class UnixBoundState(Struct, tag="unix_bound", forbid_unknown_fields=True):
    """A UNIX socket that is not one end of a connected pair."""
    sotype: Annotated[int, Meta(ge=1, le=5)]        # SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
    opts: SockOpts
    name: Annotated[bytes, Meta(max_length=108)] = b""   # b"": unbound; leading NUL: abstract
    cwd: Annotated[str, Meta(max_length=4096)] = ""      # a relative name is bound from here
    mode: Annotated[int, Meta(ge=0, le=0o7777)] = 0o777  # the socket file's permissions
    uid: U32 = 0
    gid: U32 = 0
    listening: bool = False
    backlog: U32 = 0
    shutdown: Annotated[int, Meta(ge=0, le=3)] = 0
    queue: Datagrams = []                               # datagrams not read yet
    peer_name: Annotated[bytes, Meta(max_length=108)] = b""   # datagram: connect()ed to this name
    extras: MsgExtras = []                              # files, credentials, senders of the queue
    ino: U64 = 0                                        # the original's inode (links listener and clients)
    pending: Annotated[list[U64], Meta(max_length=1 << 16)] = []   # listener: clients not accepted yet, in order
    pending_on: U64 = 0                                 # client: the listener (ino) it waits on
    unlinked: bool = False                              # its socket file was removed after bind()


class InetAddr(Struct, forbid_unknown_fields=True):
    host: Annotated[str, Meta(max_length=64)]       # numeric, as getsockname() gives it
    port: Annotated[int, Meta(ge=0, le=65535)]
    flowinfo: U32 = 0                               # IPv6 only
    scope_id: U32 = 0


class TcpState(Struct, tag="tcp", forbid_unknown_fields=True):
    """A TCP socket: listening, unconnected (CLOSE, never connected) or an
    established connection saved with TCP repair mode."""
    family: Annotated[int, Meta(ge=2, le=10)]       # AF_INET, AF_INET6
    state: Annotated[str, Meta(max_length=16)]      # LISTEN | ESTABLISHED | CLOSE
    local: InetAddr
    opts: SockOpts
    peer: InetAddr | None = None
    backlog: U32 = 0
    v6only: bool = False
    nodelay: bool = False
    cork: bool = False
    keepidle: U32 = 0
    keepintvl: U32 = 0
    keepcnt: U32 = 0
    # ESTABLISHED
    ino: U64 = 0                # the original's inode (finds it while it is held)
    boot_id: Annotated[str, Meta(max_length=64)] = ""
    inq_seq: U32 = 0            # rcv_nxt: sequence after the last byte received
    outq_seq: U32 = 0           # write_seq: sequence after the last byte queued to send
    inq: SockBytes = b""        # received, not read by the program
    outq: SockBytes = b""       # queued to send, not acknowledged by the peer
    unsent: U32 = 0             # bytes at the end of outq never sent
    mss_clamp: U32 = 0
    opt_mask: Annotated[int, Meta(ge=0, le=255)] = 0     # TCPI_OPT_* negotiated
    snd_wscale: Annotated[int, Meta(ge=0, le=15)] = 0
    rcv_wscale: Annotated[int, Meta(ge=0, le=15)] = 0
    timestamp: U32 = 0
    window: Annotated[list[U32], Meta(max_length=5)] = []   # snd_wl1 snd_wnd max_window rcv_wnd rcv_wup


class UdpState(Struct, tag="udp", forbid_unknown_fields=True):
    family: Annotated[int, Meta(ge=2, le=10)]
    local: InetAddr
    opts: SockOpts
    peer: InetAddr | None = None        # connect()ed to
    v6only: bool = False
    queue: Datagrams = []               # datagrams not read yet (their senders are not kept)


class OpathState(Struct, tag="opath", forbid_unknown_fields=True):
    """An O_PATH descriptor (resources/fdkinds/opath.py)."""
    path: Annotated[str, Meta(min_length=1, max_length=4096)]
    ftype: Annotated[int, Meta(ge=0, le=0o170000)]      # S_IFMT of the object
    nofollow: bool = False                              # the fd names a symbolic link itself


class PidfdState(Struct, tag="pidfd", forbid_unknown_fields=True):
    """A pidfd (resources/fdkinds/pidfd.py)."""
    pid: Annotated[int, Meta(ge=-1, le=(1 << 22))]        # target as the holder sees it; -1: reaped
    host_pid: Annotated[int, Meta(ge=-1, le=(1 << 22))] = -1   # as lcr saw it at the checkpoint


class NetlinkState(Struct, tag="netlink", forbid_unknown_fields=True):
    """A bound netlink socket, route or generic (resources/fdkinds/othersock.py)."""
    sotype: Annotated[int, Meta(ge=1, le=5)]           # SOCK_RAW or SOCK_DGRAM
    protocol: Annotated[int, Meta(ge=0, le=31)]
    opts: "SockOpts"
    portid: U32 = 0
    groups: U32 = 0                                     # bind()'s nl_groups (groups 1-32)
    memberships: Annotated[list[Annotated[int, Meta(ge=1, le=1 << 16)]], Meta(max_length=4096)] = []


class DeletedDirState(Struct, tag="deleted_dir", forbid_unknown_fields=True):
    """An open directory that was removed (resources/fdkinds/deleted_dir.py)."""
    path: Annotated[str, Meta(min_length=1, max_length=4096)]   # without " (deleted)"
    mode: Annotated[int, Meta(ge=0, le=0o7777)] = 0o700
    uid: U32 = 0
    gid: U32 = 0


class Fown(Struct, forbid_unknown_fields=True):
    """Owner, signal and lease of any open file description
    (resources/fdkinds/fown.py; FileDesc.fown).  Not a kind."""
    type: Annotated[int, Meta(ge=0, le=2)] = 1          # F_OWNER_TID, F_OWNER_PID, F_OWNER_PGRP
    pid: Annotated[int, Meta(ge=0, le=(1 << 22))] = 0   # owner as the holder sees it; 0: none
    host_pid: Annotated[int, Meta(ge=-1, le=(1 << 22))] = -1   # another process, as lcr saw it
    signum: Annotated[int, Meta(ge=0, le=64)] = 0       # F_SETSIG; 0: SIGIO without siginfo
    lease: Annotated[int, Meta(ge=0, le=2)] = 2         # F_RDLCK, F_WRLCK; F_UNLCK: none


class FanotifyMark(Struct, forbid_unknown_fields=True):
    kind: Annotated[str, Meta(max_length=16)]           # inode | mount | filesystem
    path: Annotated[str, Meta(min_length=1, max_length=4096)]   # where lcr found the object
    mask: U64 = 0
    ignored: U64 = 0
    mflags: U32 = 0                                     # FAN_MARK_* flags fdinfo shows


class FanotifyState(Struct, tag="fanotify", forbid_unknown_fields=True):
    """A fanotify group with its marks (resources/fdkinds/fanotify.py)."""
    flags: U32                                          # fanotify_init flags
    event_flags: U32 = 0                                # event_f_flags
    marks: Annotated[list[FanotifyMark], Meta(max_length=MAX_WATCHES)] = []


class ProcfileState(Struct, tag="procfile", forbid_unknown_fields=True):
    """A file under /proc/PID/ of a task of the tree (resources/fdkinds/procfile.py)."""
    rest: Annotated[str, Meta(max_length=4096)]         # below /proc/PID: "/stat", "/fd", ""
    pid: Annotated[int, Meta(ge=1, le=(1 << 22))]       # the target as the holder sees it
    ftype: Annotated[int, Meta(ge=0, le=0o170000)]      # S_IFMT of the file
    own: bool = False                                   # the holder's own /proc/PID
    thread: bool = False                                # rest is /task/PID/... (its main thread)
    host_pid: Annotated[int, Meta(ge=-1, le=(1 << 22))] = -1   # another task, as lcr saw it
    pos: Off = 0


KIND_STATES: list[type[Struct]] = [EventfdState]

# Each kind's module adds its states below, one line per module (keep this
# list at the end of the file).
KIND_STATES += [TimerfdState, SignalfdState, EpollState, InotifyState]
KIND_STATES += [UnlinkedState, MemfdState, FifoState]
KIND_STATES += [UnixBoundState, TcpState, UdpState]
KIND_STATES += [OpathState, PidfdState, NetlinkState, DeletedDirState]
KIND_STATES += [ProcfileState, DevnodeState, ShmfdState, FanotifyState]
from linuxcr.image.kinds_tty import PtmxState, PtsState  # noqa: E402  (resources/fdkinds/pty.py)
KIND_STATES += [PtmxState, PtsState]
