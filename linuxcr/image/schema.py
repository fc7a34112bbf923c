"""The image schema: every record type, declared once.

An image is one sequential stream (no seeks, so pipes and sockets work):

    HEADER  TREE  TASK+  [SIGNATURE]  PAGES*  PAGEMAP*  [SIGNATURE]  TRAILER

An incremental image (``lcr checkpoint --parent``) names its parent in the
header (ParentRef) and stores only the pages that changed; its PAGEMAP
records list, per task, every page of the process at checkpoint time and
which image of the chain holds it (depth 0: this one, 1: the parent, ...).
A full image has no PAGEMAP: its PAGES are the whole memory.

Each record is a fixed 32-byte frame followed by ``meta_len`` bytes of
msgpack metadata (decoded strictly into the Struct for its type, with every
number and string bounded below) and ``data_len`` bytes of raw data (page
contents, possibly zstd-compressed).  The frame carries an xxh3-64 checksum of
meta+data; the trailer carries a digest over all frames, so a stream that is
cut short or spliced never passes as complete.

A signed image (header flag "signed", `lcr checkpoint --sign`) has two
SIGNATURE records (image/sign.py): scope "meta" right after the last TASK
(covers every byte before it: what restore reads before it creates any
process) and scope "image" right before the TRAILER (covers every byte
before it).  Records restore needs before creating processes must come
before the "meta" signature.
"""
from __future__ import annotations

import enum
import struct
from typing import Annotated

from typing import Union

import msgspec
from msgspec import Meta, Struct

from linuxcr.image.kinds import (KIND_STATES, DeletedDirState, Fown, MemfdState, MsgExtras,
                                 UnlinkedState)

MAGIC = b"LINUXCR\x00"
FORMAT_VERSION = 2          # 2: image_id, parent, PAGEMAP (incremental images)
MAX_CHAIN = 64             # images in a chain of incremental images, the full one included
ARCH = "x86_64"

# Frame: magic(u32) type(u16) flags(u16) meta_len(u32) pad(u32) data_len(u64) checksum(u64)
FRAME = struct.Struct("<IHHIIQQ")
FRAME_MAGIC = 0x7243434C  # "LCCr"

# Bounds for untrusted input (see the reader).
MAX_META = 64 << 20          # one metadata record
MAX_DATA = 64 << 20          # one page record's data (we write at most 16 MiB)
MAX_STR = 4096               # paths, names
MAX_LIST = 1 << 20           # VMAs, fds, siginfos, groups per task
MAX_SMALL = 64               # the other lists: ids, rlimits, sigactions, flags
MAX_TASKS = 4096
MAX_TOTAL_META = 128 << 20   # all metadata of an image (held in memory until the pages)

U64 = Annotated[int, Meta(ge=0)]  # msgpack cannot hold more than 2**64-1
I64 = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
U32 = Annotated[int, Meta(ge=0, le=(1 << 32) - 1)]
I32 = Annotated[int, Meta(ge=-(1 << 31), le=(1 << 31) - 1)]
Pid = Annotated[int, Meta(ge=1, le=(1 << 22))]
Fd = Annotated[int, Meta(ge=0, le=(1 << 20))]
Sig = Annotated[int, Meta(ge=1, le=64)]
Str = Annotated[str, Meta(max_length=MAX_STR)]
Blob = Annotated[bytes, Meta(max_length=1 << 16)]
# msgpack decodes into objects ~8x its size: lists are bounded too, not only by MAX_META
Small = Meta(max_length=MAX_SMALL)
Long = Meta(max_length=MAX_LIST)


class RecType(enum.IntEnum):
    HEADER = 1
    TASK = 2
    PAGES = 3
    TREE = 4
    SIGNATURE = 5
    PAGEMAP = 6
    TRAILER = 15


class ParentRef(Struct, forbid_unknown_fields=True):
    """The image an incremental image builds on."""
    id: Annotated[bytes, Meta(min_length=16, max_length=16)]   # its Header.image_id
    digest: U64          # its Trailer.digest: the very same bytes, not a rewrite
    path: Str            # where it was: relative to this image's directory, or absolute
    depth: Annotated[int, Meta(ge=1, le=MAX_CHAIN - 1)]   # 1: the parent is a full image


class Header(Struct, forbid_unknown_fields=True):
    magic: Annotated[bytes, Meta(max_length=64)]
    version: U32
    arch: Str
    kernel: Str                  # uname release of the checkpointing machine
    page_size: U32
    created: float               # unix time
    hostname: Str
    tool: Str                    # "linuxcr 0.1.0"
    xfeatures: U64               # XCR0 bits used by the saved FPU state
    xstate_size: U32
    root_pid: Pid
    flags: Annotated[list[Str], Small] = []        # e.g. ["compressed"]
    image_id: Annotated[bytes, Meta(max_length=16)] = b""   # random; names it to its children
    parent: ParentRef | None = None                # incremental images only


class Vma(Struct, forbid_unknown_fields=True):
    start: U64
    end: U64
    prot: Annotated[int, Meta(ge=0, le=7)]
    shared: bool
    kind: Str          # anon | file | shmem | sysv | vvar | vvar_vclock | vdso | memfd | deleted
    path: Str = ""     # file path for kind=file
    offset: U64 = 0    # file offset
    name: Str = ""     # [heap], [stack], [anon:x] as shown in maps
    vmflags: Annotated[list[Annotated[str, Meta(max_length=2)]], Small] = []
    pages: bool = False  # PAGES records follow for this area
    shm: U64 = 0         # kind=shmem: the ShmObject it maps; kind=sysv: the segment's id
    dev: U64 = 0         # kind=memfd|deleted: st_dev of the object mapped (shm: its inode)


KindState = Union[tuple(KIND_STATES)]  # type: ignore[valid-type]


class FileDesc(Struct, forbid_unknown_fields=True):
    """One open file description; fds of one or more tasks refer to it."""
    fid: U32
    kind: Str          # reg | dir | chr | pipe
    flags: U32         # open(2) flags as in fdinfo (no O_CLOEXEC: that is per fd)
    path: Str = ""
    pos: I64 = 0
    pipe: U64 = 0      # kind=pipe: the pipe's inode (PipeData.ino)
    sock: U64 = 0      # kind=unix: the socket's inode (UnixPair.ino)
    state: KindState | None = None   # kinds of resources/fdkinds/: their saved state
    fown: Fown | None = None         # F_SETOWN/F_SETSIG/lease (resources/fdkinds/fown.py)


class OpenFile(Struct, forbid_unknown_fields=True):
    """An fd of a task."""
    fd: Fd
    fid: U32
    cloexec: bool


class PipeData(Struct, forbid_unknown_fields=True):
    ino: U64
    size: U32          # capacity (F_GETPIPE_SZ)
    data: Annotated[bytes, Meta(max_length=MAX_META // 2)] = b""   # bytes still unread


class UnixPair(Struct, forbid_unknown_fields=True):
    """One end of a connected pair of UNIX sockets held inside the tree."""
    ino: U64
    peer: U64
    type: Annotated[int, Meta(ge=1, le=5)]     # SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET
    shutdown: Annotated[int, Meta(ge=0, le=3)]
    rcvbuf: U32
    sndbuf: U32
    passcred: bool = False
    queue: Annotated[list[Annotated[bytes, Meta(max_length=MAX_META // 4)]], Meta(max_length=MAX_LIST)] = []
    peek_off: I32 = -1         # SO_PEEK_OFF; -1: off
    extras: MsgExtras = []     # files in flight, credentials (image/kinds.py MsgExtra)


class ShmObject(Struct, forbid_unknown_fields=True):
    """A MAP_SHARED|MAP_ANONYMOUS object, possibly mapped by several tasks."""
    id: U64
    size: U64


class Zombie(Struct, forbid_unknown_fields=True):
    pid: Pid
    vpid: Pid
    ppid: Pid          # host pid of the parent (a task of the tree)
    status: Annotated[int, Meta(ge=0, le=0xFFFF)]   # as wait() reports it
    pgid: Annotated[int, Meta(ge=0)] = 0   # as the tree sees them; 0: an image made before
    sid: Annotated[int, Meta(ge=0)] = 0    # they were saved (the zombie is left in its parent's)
    comm: Annotated[str, Meta(max_length=64)] = ""   # its name ("": an older image)


class IpcOwner(Struct, forbid_unknown_fields=True):
    """What every System V IPC object has: id, key, owner, creator, mode."""
    id: Annotated[int, Meta(ge=0, le=(1 << 31) - 1)]
    key: I32
    mode: Annotated[int, Meta(ge=0, le=0o7777)]   # permission bits and SHM_DEST/SHM_LOCKED
    uid: U32
    gid: U32
    cuid: U32
    cgid: U32


class ShmExtent(Struct, array_like=True, forbid_unknown_fields=True):
    offset: U64
    data: Annotated[bytes, Meta(max_length=MAX_META // 2)]


class SysvShm(Struct, forbid_unknown_fields=True):
    """A System V shared memory segment; its pages that are not zero."""
    perm: IpcOwner
    size: Annotated[int, Meta(ge=1, le=1 << 46)]
    extents: Annotated[list[ShmExtent], Meta(max_length=MAX_LIST)] = []


class SysvSem(Struct, forbid_unknown_fields=True):
    perm: IpcOwner
    values: Annotated[list[Annotated[int, Meta(ge=0, le=32767)]], Meta(min_length=1, max_length=1 << 16)]


class SysvMessage(Struct, array_like=True, forbid_unknown_fields=True):
    mtype: Annotated[int, Meta(ge=1, le=(1 << 63) - 1)]
    text: Annotated[bytes, Meta(max_length=1 << 20)]


class SysvMsg(Struct, forbid_unknown_fields=True):
    perm: IpcOwner
    qbytes: U64
    messages: Annotated[list[SysvMessage], Meta(max_length=MAX_LIST)] = []


class SysvIpc(Struct, forbid_unknown_fields=True):
    """System V IPC objects the tree uses (resources/sysvipc.py)."""
    shm: Annotated[list[SysvShm], Meta(max_length=MAX_LIST)] = []
    sem: Annotated[list[SysvSem], Meta(max_length=MAX_LIST)] = []
    msg: Annotated[list[SysvMsg], Meta(max_length=MAX_LIST)] = []


class TmpFile(Struct, forbid_unknown_fields=True):
    """One entry of a tmpfs the tree mounted (resources/namespaces.py)."""
    path: Str                    # relative to the mount point
    kind: Annotated[str, Meta(pattern="^(dir|file|link)$", max_length=4)]
    mode: Annotated[int, Meta(ge=0, le=0o7777)] = 0o755
    uid: U32 = 0
    gid: U32 = 0
    data: Annotated[bytes, Meta(max_length=MAX_META // 2)] = b""   # file content, link target


class MountRec(Struct, forbid_unknown_fields=True):
    """A mount the tree made in its mount namespace: a tmpfs (with its
    files) or a bind mount of a directory or file."""
    point: Str
    kind: Annotated[str, Meta(pattern="^(tmpfs|bind)$", max_length=5)]
    source: Str = ""             # bind: the path bound, as lcr sees it
    flags: Annotated[list[Annotated[str, Meta(max_length=16)]], Small] = []   # ro nosuid nodev noexec
    data: Str = ""               # tmpfs: size=..., mode=..., nr_inodes=...
    files: Annotated[list[TmpFile], Meta(max_length=MAX_LIST)] = []


class Namespaces(Struct, forbid_unknown_fields=True):
    """Namespaces of its own the tree's root had (`lcr run --ipc/--uts/--net/--mount`),
    made again on restart (resources/namespaces.py)."""
    kinds: Annotated[list[Annotated[str, Meta(pattern="^(ipc|uts|net|mnt)$", max_length=3)]],
                     Small] = []
    hostname: Annotated[str, Meta(max_length=64)] = ""      # uts
    domainname: Annotated[str, Meta(max_length=64)] = ""
    mounts: Annotated[list[MountRec], Meta(max_length=MAX_SMALL * 16)] = []   # mnt: made inside


class FileIdentity(Struct, forbid_unknown_fields=True):
    """What a mapped file (or the executable) was at the checkpoint
    (resources/exe_identity.py): restart refuses if it changed."""
    path: Str
    size: U64
    mtime_ns: U64
    build_id: Annotated[str, Meta(max_length=128)] = ""     # ELF NT_GNU_BUILD_ID, hex
    offsets: Annotated[list[U64], Meta(max_length=256)] = []   # file offsets fingerprinted
    fingerprint: Annotated[str, Meta(max_length=64)] = ""  # sha256 of the page at each offset


class Tree(Struct, forbid_unknown_fields=True):
    """What the tasks share; comes before the TASK records."""
    root: Pid
    files: Annotated[list[FileDesc], Meta(max_length=MAX_LIST)] = []
    pipes: Annotated[list[PipeData], Meta(max_length=MAX_LIST)] = []
    shm: Annotated[list[ShmObject], Meta(max_length=MAX_LIST)] = []
    unix: Annotated[list[UnixPair], Meta(max_length=MAX_LIST)] = []
    zombies: Annotated[list[Zombie], Meta(max_length=MAX_TASKS)] = []
    # memfds and unlinked files that are mapped but held by no fd of the tree
    mapped: Annotated[list[Union[MemfdState, UnlinkedState]], Meta(max_length=MAX_LIST)] = []
    # every mapped file and executable as it was (resources/exe_identity.py)
    identities: Annotated[list[FileIdentity], Meta(max_length=MAX_LIST)] = []
    ipc: SysvIpc | None = None        # System V IPC objects (resources/sysvipc.py)
    ns: Namespaces | None = None      # namespaces of the tree's own (resources/namespaces.py)


class SigAction(Struct, forbid_unknown_fields=True):
    sig: Sig
    handler: U64
    flags: U64
    restorer: U64
    mask: U64


class PendingSignal(Struct, forbid_unknown_fields=True):
    shared: bool
    siginfo: Annotated[bytes, Meta(min_length=128, max_length=128)]


class Rlimit(Struct, forbid_unknown_fields=True):
    resource: Annotated[int, Meta(ge=0, le=31)]
    soft: U64
    hard: U64


class MmFields(Struct, forbid_unknown_fields=True):
    start_code: U64
    end_code: U64
    start_data: U64
    end_data: U64
    start_brk: U64
    brk: U64
    start_stack: U64
    arg_start: U64
    arg_end: U64
    env_start: U64
    env_end: U64
    auxv: Annotated[bytes, Meta(max_length=4096)]
    exe: Str


class Creds(Struct, forbid_unknown_fields=True):
    """uid/gid as numbers in the checkpointing machine's initial namespace."""
    uid: Annotated[list[U32], Small]      # real, effective, saved, fs
    gid: Annotated[list[U32], Small]
    groups: Annotated[list[U32], Long]


class SeccompFilter(Struct, forbid_unknown_fields=True):
    """One seccomp BPF filter of a thread (resources/security.py)."""
    prog: Annotated[bytes, Meta(min_length=8, max_length=4096 * 8)]   # struct sock_filter[]
    flags: U64 = 0               # SECCOMP_FILTER_FLAG_LOG: what the kernel keeps


class ThreadAttrs(Struct, forbid_unknown_fields=True):
    """Per-thread kernel state besides registers and signals: scheduling
    (resources/sched.py) and security (resources/security.py)."""
    policy: U32 = 0              # SCHED_OTHER 0, FIFO 1, RR 2, BATCH 3, IDLE 5, DEADLINE 6
    sched_flags: U64 = 0         # SCHED_FLAG_RESET_ON_FORK, ...
    nice: Annotated[int, Meta(ge=-20, le=19)] = 0
    priority: Annotated[int, Meta(ge=0, le=99)] = 0
    runtime: U64 = 0             # SCHED_DEADLINE parameters (ns)
    deadline: U64 = 0
    period: U64 = 0
    affinity: Annotated[list[U64], Meta(max_length=128)] = []   # CPU mask, 64 CPUs a word
    timerslack: U64 = 0          # ns; 0: not saved (RT and DEADLINE threads have none)
    # I/O priority (ioprio_get: class << 13 | level); -1: the default, which
    # follows the nice value (or an image from before it was saved)
    ioprio: Annotated[int, Meta(ge=-1, le=0xFFFF)] = -1
    no_new_privs: bool = False
    securebits: U32 = 0
    caps: Annotated[list[U64], Meta(max_length=5)] = []    # inh, prm, eff, bnd, amb
    seccomp_mode: Annotated[int, Meta(ge=0, le=2)] = 0     # disabled, strict, filter
    seccomp: Annotated[list[SeccompFilter], Meta(max_length=1024)] = []   # oldest first
    # filters not saved because they are exactly lcr's own (a container's
    # profile, inherited by lcr and by the process from lcr): how many; the
    # restoring lcr must run under as many (resources/security.py)
    seccomp_inherited: Annotated[int, Meta(ge=0, le=1024)] = 0


class ProcAttrs(Struct, forbid_unknown_fields=True):
    """Process-wide attributes (resources/procattrs.py)."""
    oom_score_adj: Annotated[int, Meta(ge=-1000, le=1000)] = 0
    pdeathsig: Annotated[int, Meta(ge=0, le=64)] = 0     # the leader's
    subreaper: bool = False
    thp_disable: Annotated[int, Meta(ge=0, le=3)] = 0    # PR_GET_THP_DISABLE
    dumpable: Annotated[int, Meta(ge=0, le=2)] = 1
    membarrier: U32 = 0          # MEMBARRIER_CMD_REGISTER_* to repeat
    mlockall: Annotated[int, Meta(ge=0, le=7)] = 0       # MCL_FUTURE | MCL_ONFAULT


class Thread(Struct, forbid_unknown_fields=True):
    """A thread other than the leader (whose state is in Task itself)."""
    tid: Pid
    vtid: Pid                     # the tid the thread sees (its pid namespace)
    comm: Str
    regs: Annotated[bytes, Meta(min_length=216, max_length=216)]
    xstate: Blob
    sigmask: U64
    pending: Annotated[list[PendingSignal], Long]  # private to this thread
    altstack: Annotated[list[U64], Small]
    rseq: Annotated[list[U64], Small]
    robust_list: Annotated[list[U64], Small]
    tid_address: U64
    attrs: ThreadAttrs | None = None   # None: an image made before they were saved


class PosixTimer(Struct, forbid_unknown_fields=True):
    """A timer_create() timer of the process (resources/posix_timers.py)."""
    id: Annotated[int, Meta(ge=0, le=(1 << 31) - 1)]
    clock: I32                   # clockid as given to timer_create
    notify: Annotated[int, Meta(ge=0, le=7)]   # sigev_notify: SIGNAL 0, NONE 1, THREAD 2, |THREAD_ID 4
    signo: Annotated[int, Meta(ge=0, le=64)]
    sigval: U64                  # sigev_value: si_value of its signals
    tid: Annotated[int, Meta(ge=0, le=1 << 22)] = 0   # SIGEV_THREAD_ID: the thread (as the process sees it)
    interval_s: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 0
    interval_ns: Annotated[int, Meta(ge=0, le=999_999_999)] = 0
    left_s: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 0     # time left; 0 and 0: disarmed
    left_ns: Annotated[int, Meta(ge=0, le=999_999_999)] = 0
    overrun: I32 = 0             # informative only: a restored timer's overrun starts at 0


class FileLock(Struct, forbid_unknown_fields=True):
    """A file lock the process holds, through fd (resources/locks.py)."""
    fd: Fd
    kind: Annotated[str, Meta(max_length=8)]    # flock | posix | ofd
    write: bool                  # exclusive / F_WRLCK, else shared / F_RDLCK
    start: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 0
    length: Annotated[int, Meta(ge=0, le=(1 << 63) - 1)] = 0   # 0: to the end of the file


class CowRun(Struct, array_like=True, forbid_unknown_fields=True):
    """Pages of a child that were its parent's very pages (copy-on-write
    shared since a fork) at the checkpoint: not stored with the child;
    restart forks it from its filled parent so that they are shared again."""
    addr: U64
    npages: Annotated[int, Meta(ge=1, le=1 << 36)]


class Task(Struct, forbid_unknown_fields=True):
    pid: Pid
    tid: Pid
    ppid: Annotated[int, Meta(ge=0)]
    pgid: Annotated[int, Meta(ge=0)]
    sid: Annotated[int, Meta(ge=0)]
    comm: Str
    cwd: Str
    root: Str
    creds: Creds
    umask: Annotated[int, Meta(ge=0, le=0o777)]
    personality: U32
    rlimits: Annotated[list[Rlimit], Small]
    mm: MmFields
    vmas: Annotated[list[Vma], Long]
    files: Annotated[list[OpenFile], Long]
    regs: Annotated[bytes, Meta(min_length=216, max_length=216)]   # user_regs_struct
    xstate: Blob
    sigmask: U64
    sigactions: Annotated[list[SigAction], Small]
    pending: Annotated[list[PendingSignal], Long]
    altstack: Annotated[list[U64], Small]          # ss_sp, ss_flags, ss_size
    rseq: Annotated[list[U64], Small]              # address, length, signature ([] if none)
    robust_list: Annotated[list[U64], Small]       # head, length
    tid_address: U64             # set_tid_address (clear_child_tid)
    threads: Annotated[list[Thread], Meta(max_length=MAX_TASKS)] = []
    vpid: Pid | None = None       # the pid the process sees (innermost pid namespace)
    pidns_init: bool = False      # pid 1 of a pid namespace of its own (`lcr run`)
    caps: Annotated[list[U64], Meta(max_length=5)] = []   # inh, prm, eff, bnd, amb
    # REAL, VIRTUAL, PROF: [it_interval s, us, it_value s, us]
    itimers: Annotated[list[Annotated[list[U64], Small]], Small] = []
    starttime: U64 = 0           # /proc/PID/stat starttime: tells the original
    boot_id: Str = ""            # process apart from a later one with its pid
    posix_timers: Annotated[list[PosixTimer], Meta(max_length=MAX_LIST)] = []
    locks: Annotated[list[FileLock], Meta(max_length=MAX_LIST)] = []
    attrs: ThreadAttrs | None = None      # the leader's (None: an older image)
    proc: ProcAttrs | None = None
    # pages shared with the parent task (CowRun), sorted, each inside one
    # area of this task that is the same private area in the parent
    cow: Annotated[list[CowRun], Long] = []
    # the earlier task of the tree whose fd table this one shares (clone with
    # CLONE_FILES, found with kcmp at dump): the first task of its group; None
    # for a table of its own.  Restored by forking it with CLONE_FILES.
    files_with: Pid | None = None
    # In a group-stop (SIGSTOP, ^Z...) when saved: its stop signal; 0: running.
    # Restart brings it back stopped (resources/jobstop.py).
    stopped: Annotated[int, Meta(ge=0, le=64)] = 0
    cwd_deleted: DeletedDirState | None = None   # a working directory removed since (resources/fsroot.py)
    guards: Annotated[list[Annotated[list[U64], Meta(min_length=2, max_length=2)]],
                      Meta(max_length=MAX_LIST)] = []   # [start, end] guard regions (resources/guards.py)


class Pages(Struct, forbid_unknown_fields=True):
    pid: Pid
    addr: U64
    npages: Annotated[int, Meta(ge=1, le=MAX_DATA // 4096)]
    compressed: bool = False


class PageRun(Struct, array_like=True, forbid_unknown_fields=True):
    addr: U64
    npages: Annotated[int, Meta(ge=1, le=1 << 36)]
    depth: Annotated[int, Meta(ge=0, le=MAX_CHAIN - 1)]   # 0: in this image's PAGES, k: k parents up


class PageMap(Struct, forbid_unknown_fields=True):
    """Of an incremental image: where every saved page of task pid is."""
    pid: Pid
    runs: Annotated[list[PageRun], Long]      # sorted by address, not overlapping


class Signature(Struct, forbid_unknown_fields=True):
    """A signature over the SHA-256 of every byte before this record."""
    scope: Annotated[str, Meta(pattern="^(meta|image)$", max_length=5)]
    alg: Annotated[str, Meta(max_length=32)]        # hmac-sha256 | ed25519
    key_id: Annotated[bytes, Meta(max_length=32)]   # names the key (sign.py)
    sig: Annotated[bytes, Meta(max_length=512)]


class Trailer(Struct, forbid_unknown_fields=True):
    records: U64        # records before the trailer, header included
    pages: U64          # pages stored in all PAGES records
    digest: U64         # xxh3-64 over all previous frames' checksums


INDEX_MAGIC = b"LCR-INDEX"
INDEX_VERSION = 1


class IndexEntry(Struct, array_like=True, forbid_unknown_fields=True):
    """One record of an image, as its sidecar index (ImageIndex) lists it."""
    type: Annotated[int, Meta(ge=1, le=15)]           # RecType
    checksum: U64                                     # its frame's checksum
    meta: Annotated[bytes, Meta(max_length=MAX_META)] = b""   # PAGES, PAGEMAP: encoded metadata
    at: U64 = 0                                       # PAGES: where its data starts in the image
    length: Annotated[int, Meta(ge=0, le=MAX_DATA)] = 0        # PAGES: bytes of data


class ImageIndex(Struct, forbid_unknown_fields=True):
    """IMAGE.lcr-index, written beside an image (image/chain.py): every
    record's checksum in order, with the place and metadata of the PAGES and
    the metadata of the PAGEMAP records, so that a child need not read the
    image through.  Untrusted: used only if it names the image (id, size,
    trailer place and digest) and its checksums digest to the image's
    trailer; otherwise the image is read through as before.  The file is the
    xxh3-64 of the encoded index (8 bytes, little endian), then the index."""
    magic: Annotated[bytes, Meta(max_length=16)]
    version: U32
    image_id: Annotated[bytes, Meta(min_length=16, max_length=16)]
    size: U64                # bytes of the image
    digest: U64              # its Trailer.digest
    trailer_at: U64          # where its TRAILER frame starts
    records: Annotated[list[IndexEntry], Long]        # every record before the trailer


META_TYPES: dict[RecType, type[Struct]] = {
    RecType.HEADER: Header,
    RecType.TASK: Task,
    RecType.TREE: Tree,
    RecType.PAGES: Pages,
    RecType.SIGNATURE: Signature,
    RecType.PAGEMAP: PageMap,
    RecType.TRAILER: Trailer,
}

# Records that may carry raw data after the metadata.
DATA_TYPES = {RecType.PAGES}

ENCODER = msgspec.msgpack.Encoder()
DECODERS = {t: msgspec.msgpack.Decoder(cls) for t, cls in META_TYPES.items()}
