"""Range checks of every decoded metadata record, before anything uses it.

schema.py bounds each field by its type (what msgpack and our memory can
hold); this module checks what the *kernel* accepts and what the restore
code assumes: an rlimit is below 2^63 or RLIM_INFINITY and soft <= hard, a
uid is not (uid_t)-1 (which setresuid reads as "unchanged"), addresses lie
below TASK_SIZE and are page aligned where mmap wants it, areas of a task do
not overlap, signal numbers are 1..64, capabilities are bits this kernel
knows, paths are absolute and hold no NUL...  The stream reader
(image/stream.py) runs ``check()`` on every record it decodes, so `lcr show`,
`lcr restart` (before any task exists), rollback and the receiver all refuse
the same out-of-range images, with a message naming record, field and value.

It is a table, not code per record: FIELDS maps (Struct, field) to a rule,
CHECKS maps a Struct to the few rules that relate its fields, and every str
anywhere must hold no NUL.  Cross-record consistency (a fd's open file
exists, a task's parent comes first) stays in engine/restore.py's
validate_tree.
"""
from __future__ import annotations

import os
import ipaddress
import struct
from typing import Any, Callable, Iterable

from msgspec import Struct

from linuxcr.image import kinds as K
from linuxcr.image import schema as S
from linuxcr.sys.syscalls import TASK_SIZE

PAGE = 4096
RLIM_INFINITY = (1 << 64) - 1
RLIM_NLIMITS = 16                 # RLIMIT_CPU .. RLIMIT_RTTIME
RLIMIT_NOFILE = 7
NR_OPEN_MAX = 2147483584          # sysctl_nr_open_max on 64-bit: INT_MAX & -BITS_PER_LONG
INT_MAX = (1 << 31) - 1
ID_MAX = (1 << 32) - 2            # uid_t/gid_t; (uid_t)-1 means "unchanged" to setresuid
PID_MAX = 1 << 22                 # PID_MAX_LIMIT on 64-bit
NGROUPS_MAX = 65536
OFF_MAX = (1 << 63) - 1           # loff_t
OPEN_FLAGS = (os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_APPEND
              | os.O_NONBLOCK | os.O_DSYNC | 0o20000 | os.O_DIRECT | 0o100000
              | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NOATIME | os.O_CLOEXEC | os.O_SYNC
              | os.O_PATH | os.O_TMPFILE)
# (0o20000 is FASYNC; 0o100000 is the kernel's O_LARGEFILE, which Python calls 0)
S64_MAX = (1 << 63) - 1
SIGKILL, SIGSTOP = 9, 19
STOP_SIGNALS = {19, 20, 21, 22}    # SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU
# Signals that may not be the notification of a POSIX timer (good_sigevent):
# kernel-only and core-dumping ones.
_COREDUMP_SIGS = {3, 4, 5, 6, 7, 8, 11, 24, 25, 31}
# personality(2): PER_MASK and the flag bits of <linux/personality.h>
PERSONALITY_BITS = 0xFF | 0x0FFE0000
USER_CS, USER32_CS, USER_DS = 0x33, 0x23, 0x2B
# user_regs_struct: 27 u64
_REGS = struct.Struct("<27Q")
_REG = {name: i for i, name in enumerate(
    "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss "
    "fs_base gs_base ds es fs gs".split())}
SS_ONSTACK, SS_DISABLE, SS_AUTODISARM = 1, 2, 1 << 31
ROBUST_LIST_HEAD = 24             # sizeof(struct robust_list_head): set_robust_list wants it
RSEQ_MIN = 32                     # ORIG_RSEQ_SIZE; the area is 32-byte aligned
AUXV_MAX = 2 * 8 * 64             # saved_auxv holds AT_VECTOR_SIZE (< 64) pairs
EVENTFD_MAX = (1 << 64) - 2       # ULLONG_MAX is refused by eventfd_write
S_IFMT_TYPES = {0o010000, 0o020000, 0o040000, 0o060000, 0o100000, 0o120000, 0o140000}
TIMERFD_CLOCKS = {0, 1, 7, 8, 9}  # REALTIME, MONOTONIC, BOOTTIME and their _ALARM
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET = 1, 2, 3, 5
AF_INET, AF_INET6 = 2, 10
VMA_KINDS = {"anon", "file", "shmem", "vvar", "vvar_vclock", "vdso", "memfd", "deleted",
             "sysv"}     # sysv: an attached System V segment (resources/sysvipc.py)


def _cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40        # CAP_CHECKPOINT_RESTORE, the last one of Linux 5.9 .. 6.x


CAP_MASK = (1 << (_cap_last_cap() + 1)) - 1


class Invalid(Exception):
    """A field out of range: where (dotted path), its value, and why."""

    def __init__(self, path: str, value: Any, why: str) -> None:
        super().__init__(path)
        self.path, self.value, self.why = path, value, why

    def describe(self) -> str:
        return f"{self.path} = {show_value(self.value)}: {self.why}"


def show_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v}" if -4096 < v < 4096 else f"{v} ({v & ((1 << 64) - 1):#x})"
    if isinstance(v, str):
        return repr(v if len(v) <= 60 else v[:60] + "...")
    if isinstance(v, (bytes, bytearray, memoryview)):
        return f"<{len(v)} bytes>"
    if isinstance(v, list):
        return f"<list of {len(v)}>"
    return f"<{type(v).__name__}>"


# --- rules: value -> None if fine, else why not ------------------------------------------

Rule = Callable[[Any], "str | None"]


def rng(lo: int, hi: int, what: str = "") -> Rule:
    def rule(v: int) -> str | None:
        if lo <= v <= hi:
            return None
        return f"{what + ' ' if what else ''}not in {lo}..{hi}"
    return rule


def one_of(allowed: Iterable, what: str = "") -> Rule:
    allowed = frozenset(allowed)
    shown = ", ".join(sorted(map(str, allowed)))

    def rule(v: Any) -> str | None:
        return None if v in allowed else f"{what + ' ' if what else ''}not one of {shown}"
    return rule


def bits(mask: int, what: str) -> Rule:
    def rule(v: int) -> str | None:
        return None if not v & ~mask else f"unknown {what} bits {v & ~mask:#x}"
    return rule


def user_addr(v: int) -> str | None:
    return None if v < TASK_SIZE else f"not a user address (TASK_SIZE is {TASK_SIZE:#x})"


def page_addr(v: int) -> str | None:
    return user_addr(v) or (f"not page aligned" if v % PAGE else None)


def abs_path(v: str) -> str | None:
    return None if v.startswith("/") else "not an absolute path"


def abs_or_empty(v: str) -> str | None:
    return None if v == "" or v.startswith("/") else "not an absolute path"


def utf8_max(n: int) -> Rule:
    def rule(v: str) -> str | None:
        size = len(v.encode("utf-8", "surrogatepass"))
        return None if size <= n else f"{size} bytes long, more than {n}"
    return rule


def both(*rules: Rule) -> Rule:
    def rule(v: Any) -> str | None:
        for r in rules:
            why = r(v)
            if why:
                return why
        return None
    return rule


def length(*allowed: int) -> Rule:
    def rule(v: list) -> str | None:
        return None if len(v) in allowed else f"holds {len(v)} items, not {' or '.join(map(str, allowed))}"
    return rule


def each(rule: Rule) -> Rule:
    """A rule for every item of a list; names the first bad one."""
    def check(v: list) -> str | None:
        for i, x in enumerate(v):
            why = rule(x)
            if why:
                return f"item {i} ({show_value(x)}) {why}"
        return None
    return check


def unique(key: Callable[[Any], Any], what: str) -> Rule:
    def rule(v: list) -> str | None:
        seen = set()
        for x in v:
            k = key(x)
            if k in seen:
                return f"{what} {show_value(k)} twice"
            seen.add(k)
        return None
    return rule


def rlim(v: int) -> str | None:
    if v == RLIM_INFINITY or v <= S64_MAX:
        return None
    return "not a limit (below 2^63, or RLIM_INFINITY)"


uid = rng(0, ID_MAX, "not a valid id:")
pid = rng(1, PID_MAX)
pid0 = rng(0, PID_MAX)
intmax = rng(0, INT_MAX)
sock_buf = rng(0, INT_MAX, "a socket buffer size")
caps = bits(CAP_MASK, "capability")
sockflags = one_of({SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET}, "socket type")
mode = rng(0, 0o7777)


def signo(v: int) -> str | None:
    return None if 1 <= v <= 64 else "not a signal number (1..64)"


def pipe_size(v: int) -> str | None:
    """F_SETPIPE_SZ: one page up to 2^31 bytes, a power of two pages."""
    if PAGE <= v <= 1 << 31 and not v & (v - 1):
        return None
    return "not a pipe capacity (a power of two from 4096 to 2^31)"


def siginfo_signo(v: bytes) -> str | None:
    return signo(int.from_bytes(v[:4], "little", signed=True)) and "its si_signo is not 1..64"


def _regs(v: bytes) -> str | None:
    r = _REGS.unpack(v)
    if r[_REG["cs"]] not in (USER_CS, USER32_CS):
        return f"cs {r[_REG['cs']]:#x} is not a user code segment"
    if r[_REG["ss"]] != USER_DS:
        return f"ss {r[_REG['ss']]:#x} is not the user data segment"
    for seg in ("ds", "es", "fs", "gs"):
        if r[_REG[seg]] > 0xFFFF:
            return f"{seg} {r[_REG[seg]]:#x} is not a segment selector"
    for base in ("fs_base", "gs_base", "rip"):
        if r[_REG[base]] >= TASK_SIZE:
            return f"{base} {r[_REG[base]]:#x} is not a user address"
    return None


def _altstack(v: list) -> str | None:
    if len(v) != 3:
        return "holds not 3 items (sp, flags, size)"
    sp, flags, size = v
    if flags & ~(SS_ONSTACK | SS_DISABLE | SS_AUTODISARM):
        return f"unknown sigaltstack flags {flags:#x}"
    if not flags & SS_DISABLE and (sp >= TASK_SIZE or size >= TASK_SIZE or sp + size > TASK_SIZE):
        return "the alternate stack is not in user memory"
    return None


def _rseq(v: list) -> str | None:
    if not v:
        return None
    if len(v) != 3:
        return "holds not 0 or 3 items (address, length, signature)"
    addr, size, sig = v
    if not 0 < addr < TASK_SIZE or addr % RSEQ_MIN:
        return f"address {addr:#x} is not a 32-byte aligned user address"
    if not RSEQ_MIN <= size <= PAGE:
        return f"length {size} not in {RSEQ_MIN}..{PAGE}"
    return None if sig <= 0xFFFFFFFF else f"signature {sig:#x} is not 32 bits"


def _robust(v: list) -> str | None:
    if len(v) != 2:
        return "holds not 2 items (head, length)"
    head, size = v
    if head >= TASK_SIZE:
        return f"head {head:#x} is not a user address"
    if size != ROBUST_LIST_HEAD and (head or size):
        return f"length {size} is not {ROBUST_LIST_HEAD}"
    return None


def _itimers(v: list) -> str | None:
    if len(v) not in (0, 3):
        return "holds not 0 or 3 timers (REAL, VIRTUAL, PROF)"
    for i, tv in enumerate(v):
        if len(tv) != 4:
            return f"timer {i} holds not 4 numbers"
        if max(tv) > S64_MAX or tv[1] >= 1_000_000 or tv[3] >= 1_000_000:
            return f"timer {i} is not a valid itimerval {tv}"
    return None


def _caps(v: list) -> str | None:
    if len(v) not in (0, 5):
        return "holds not 0 or 5 sets (inheritable, permitted, effective, bounding, ambient)"
    for name, c in zip(("inheritable", "permitted", "effective", "bounding", "ambient"), v):
        if c & ~CAP_MASK:
            return f"{name} set has bits {c & ~CAP_MASK:#x} this kernel does not know"
    if v:
        inh, prm, eff, _bnd, amb = v
        if eff & ~prm:
            return "effective set is not within the permitted set"
        if amb & ~(prm & inh):
            return "ambient set is not within permitted and inheritable"
    return None


def _auxv(v: bytes) -> str | None:
    if len(v) > AUXV_MAX or len(v) % 16:
        return f"{len(v)} bytes: not whole (type, value) pairs within {AUXV_MAX} bytes"
    return None


def _clock(v: int) -> str | None:
    """timer_create's clockids: the fixed ones, or a CPU clock of a process or
    thread (negative: ~pid << 3 | type, type PROF 0, VIRT 1, SCHED 2)."""
    if v in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11) or (v < 0 and (v & 3) != 3):
        return None
    return "not a clock id"


def _host(v: str) -> str | None:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return "not a numeric IP address"
    return None


# --- (Struct, field) -> rule ----------------------------------------------------------

FIELDS: dict[type, dict[str, Rule]] = {
    S.Header: {"image_id": lambda v: None if len(v) in (0, 16) else "not 0 or 16 bytes",
               "xstate_size": rng(0, 1 << 16)},
    S.ParentRef: {},
    S.Vma: {"start": page_addr, "end": lambda v: None if v <= TASK_SIZE and not v % PAGE
            else "not a page aligned user address", "kind": one_of(VMA_KINDS, "memory area kind"),
            "offset": lambda v: None if v <= OFF_MAX and not v % PAGE
            else "not a page aligned file offset",
            "vmflags": each(lambda s: None if len(s) == 2 else "is not two letters")},
    S.FileDesc: {"pos": rng(0, OFF_MAX, "a file position"),
                 # open(2) flags only; O_PATH is its own kind (fdkinds/opath.py), the
                 # built-in kinds are reopened for reading/writing
                 "flags": lambda v: None if 0 <= v < (1 << 32) and not v & ~OPEN_FLAGS
                 else "not a set of open(2) flags"},
    S.OpenFile: {},
    S.PipeData: {"size": pipe_size},
    S.UnixPair: {"type": sockflags, "rcvbuf": sock_buf, "sndbuf": sock_buf},
    # resources/exe_identity.py reads a page at each offset (pread takes an off_t)
    S.FileIdentity: {"path": abs_path,
                     "offsets": each(lambda v: None if v <= OFF_MAX and not v % PAGE
                                     else "not a page-aligned file offset")},
    S.ShmObject: {"size": lambda v: None if 0 < v <= TASK_SIZE and not v % PAGE
                  else "not a size of shared memory (whole pages, below TASK_SIZE)"},
    S.Zombie: {"ppid": pid},
    S.SigAction: {"sig": lambda v: signo(v) or ("SIGKILL and SIGSTOP have no handler"
                                                if v in (SIGKILL, SIGSTOP) else None),
                  "handler": user_addr, "restorer": user_addr},
    S.PendingSignal: {"siginfo": siginfo_signo},
    S.Rlimit: {"resource": rng(0, RLIM_NLIMITS - 1, "a resource"), "soft": rlim, "hard": rlim},
    S.MmFields: {"auxv": _auxv, "exe": abs_path, **{
        f: user_addr for f in ("start_code", "end_code", "start_data", "end_data", "start_brk",
                               "brk", "start_stack", "arg_start", "arg_end", "env_start",
                               "env_end")}},
    S.Creds: {"uid": both(length(4), each(uid)), "gid": both(length(4), each(uid)),
              "groups": both(lambda v: None if len(v) <= NGROUPS_MAX else "more than NGROUPS_MAX",
                             each(uid))},
    S.Thread: {"comm": utf8_max(64), "regs": _regs, "altstack": _altstack, "rseq": _rseq,
               "robust_list": _robust, "tid_address": user_addr},
    S.PosixTimer: {"notify": one_of({0, 1, 2, 4}, "sigev_notify"), "clock": _clock,
                   "tid": pid0},
    S.FileLock: {"kind": one_of({"flock", "posix", "ofd"}, "lock kind")},
    S.Task: {"ppid": pid0, "pgid": pid0, "sid": pid0, "comm": utf8_max(64), "cwd": abs_path,
             "root": abs_path, "personality": bits(PERSONALITY_BITS, "personality"),
             "rlimits": unique(lambda r: r.resource, "resource limit"),
             "files": unique(lambda f: f.fd, "fd"),
             "regs": _regs, "sigactions": unique(lambda a: a.sig, "signal handler of"),
             "altstack": _altstack, "rseq": _rseq, "robust_list": _robust,
             "tid_address": user_addr, "threads": unique(lambda t: t.tid, "thread"),
             "caps": _caps, "itimers": _itimers, "boot_id": utf8_max(64),
             "posix_timers": unique(lambda t: t.id, "POSIX timer id"),
             "stopped": one_of({0, *STOP_SIGNALS}, "stop signal (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU)")},
    S.Pages: {"addr": page_addr},
    S.PageRun: {"addr": page_addr},
    S.CowRun: {"addr": page_addr},
    S.Tree: {"files": unique(lambda d: d.fid, "open file"),
             "pipes": unique(lambda p: p.ino, "pipe"), "unix": unique(lambda u: u.ino, "socket"),
             "shm": unique(lambda o: o.id, "shared memory object"),
             "zombies": unique(lambda z: z.pid, "zombie")},
    # kinds.py: the saved state of each kind of fd
    K.EventfdState: {"count": rng(0, EVENTFD_MAX, "an eventfd counter")},
    K.TimerfdState: {"clock": one_of(TIMERFD_CLOCKS, "timerfd clock"),
                     "settime_flags": bits(3, "timerfd_settime flag"),
                     "value_ns": rng(0, S64_MAX), "interval_ns": rng(0, S64_MAX)},
    K.EpollState: {},
    K.InotifyWatch: {"path": abs_path},
    K.InotifyState: {"watches": unique(lambda w: w.wd, "watch descriptor")},
    K.FileContent: {"uid": uid, "gid": uid, "atime_ns": rng(0, S64_MAX),
                    "mtime_ns": rng(0, S64_MAX)},
    K.UnlinkedState: {"path": abs_path},
    K.MemfdState: {"name": both(utf8_max(249), lambda v: "holds a /" if "/" in v else None),
                   "seals": bits(0x3F, "F_SEAL_*")},
    K.FifoState: {"path": abs_path, "size": pipe_size},
    K.SockOpts: {"rcvbuf": sock_buf, "sndbuf": sock_buf, "linger": rng(-1, INT_MAX),
                 "peek_off": rng(-1, INT_MAX)},
    K.UnixBoundState: {"sotype": sockflags, "cwd": abs_or_empty, "uid": uid, "gid": uid,
                       "backlog": intmax},
    K.InetAddr: {"host": _host, "flowinfo": rng(0, 0xFFFFF, "an IPv6 flow label")},
    K.TcpState: {"family": one_of({AF_INET, AF_INET6}, "address family"),
                 "state": one_of({"LISTEN", "ESTABLISHED", "CLOSE"}, "TCP state"),
                 "backlog": intmax, "keepidle": rng(0, 32767), "keepintvl": rng(0, 32767),
                 "keepcnt": rng(0, 127), "mss_clamp": rng(0, 0xFFFF), "window": length(0, 5)},
    K.UdpState: {"family": one_of({AF_INET, AF_INET6}, "address family")},
    K.OpathState: {"path": abs_path, "ftype": one_of(S_IFMT_TYPES, "file type")},
    K.PidfdState: {"pid": lambda v: None if v == -1 or 1 <= v <= PID_MAX else "not a pid or -1",
                   "host_pid": lambda v: None if v == -1 or 1 <= v <= PID_MAX else "not a pid or -1"},
    K.NetlinkState: {"sotype": one_of({SOCK_DGRAM, SOCK_RAW}, "socket type")},
    K.DeletedDirState: {"path": abs_path, "uid": uid, "gid": uid},
}


# --- rules that relate fields of one Struct: obj -> (field, value, why) or None -----------

Check = Callable[[Any], "tuple[str, Any, str] | None"]


def _vma(v: S.Vma) -> tuple[str, Any, str] | None:
    if v.start >= v.end:
        return "end", v.end, f"not above its start {v.start:#x}"
    if v.kind == "file" and not v.path.startswith("/"):
        return "path", v.path, "a file mapping without an absolute path"
    if v.offset + (v.end - v.start) > OFF_MAX + 1:
        return "offset", v.offset, "the area ends beyond the largest file offset"
    return None


def _rlimit(r: S.Rlimit) -> tuple[str, Any, str] | None:
    if r.soft > r.hard:
        return "soft", r.soft, f"above the hard limit {r.hard}"
    if r.resource == RLIMIT_NOFILE and r.hard > NR_OPEN_MAX:
        return "hard", r.hard, f"more open files than the kernel allows ({NR_OPEN_MAX})"
    return None


def _mm(m: S.MmFields) -> tuple[str, Any, str] | None:
    # the order PR_SET_MM_MAP (validate_prctl_map_addr) insists on
    for lo, hi, strict in (("start_code", "end_code", True), ("start_data", "end_data", False),
                           ("start_brk", "brk", False), ("arg_start", "arg_end", False),
                           ("env_start", "env_end", False)):
        a, b = getattr(m, lo), getattr(m, hi)
        if a > b or (strict and a == b and a):
            return hi, b, f"below {lo} {a:#x}"
    return None


def _ordered(areas: Iterable[tuple[int, int]], what: str) -> str | None:
    prev = 0
    for start, end in areas:
        if start < prev:
            return f"{what} at {start:#x} overlaps or is out of order"
        prev = end
    return None


def _task(t: S.Task) -> tuple[str, Any, str] | None:
    if t.tid != t.pid:
        return "tid", t.tid, f"not the pid {t.pid} of the thread group leader"
    why = _ordered(((v.start, v.end) for v in t.vmas), "memory area")
    if why:
        return "vmas", t.vmas, why
    for where_, rseq in [("rseq", t.rseq)] + [(f"threads[{i}].rseq", th.rseq)
                                              for i, th in enumerate(t.threads)]:
        # the kernel writes the area when it is registered: it must be writable memory
        if rseq and not any(v.start <= rseq[0] and rseq[0] + rseq[1] <= v.end and v.prot & 2
                            for v in t.vmas):
            return where_, rseq[0], "the rseq area is not in writable memory of the task"
    why = _ordered(((r.addr, r.addr + r.npages * PAGE) for r in t.cow), "shared page run")
    if why:
        return "cow", t.cow, why
    if t.files_with == t.pid:
        return "files_with", t.files_with, "its own pid (it names another task's fd table)"
    if any(th.tid == t.pid for th in t.threads):
        return "threads", t.threads, "a thread has the leader's tid"
    fds = {f.fd for f in t.files}
    for i, lk in enumerate(t.locks):
        if lk.fd not in fds:
            return f"locks[{i}].fd", lk.fd, "not an open fd of the task"
    return None


def _timer(tm: S.PosixTimer) -> tuple[str, Any, str] | None:
    if tm.notify != 1:     # SIGEV_NONE sends nothing; the others need a signal good_sigevent takes
        if not 1 <= tm.signo <= 64 or tm.signo in (SIGKILL, SIGSTOP) or tm.signo in _COREDUMP_SIGS:
            return "signo", tm.signo, "not a signal a timer may send"
    if tm.notify == 4 and not 1 <= tm.tid <= PID_MAX:
        return "tid", tm.tid, "SIGEV_THREAD_ID without a thread"
    return None


def _lock(lk: S.FileLock) -> tuple[str, Any, str] | None:
    if lk.length and lk.start + lk.length - 1 > OFF_MAX:
        return "length", lk.length, "the range ends beyond the largest file offset"
    if lk.kind == "flock" and (lk.start or lk.length):
        return "start", lk.start, "a flock() lock has no range"
    return None


def _pages(p: S.Pages) -> tuple[str, Any, str] | None:
    if p.addr + p.npages * PAGE > TASK_SIZE:
        return "npages", p.npages, f"the pages at {p.addr:#x} end beyond TASK_SIZE"
    return None


def _run(r: S.PageRun) -> tuple[str, Any, str] | None:
    if r.addr + r.npages * PAGE > TASK_SIZE:
        return "npages", r.npages, f"the pages at {r.addr:#x} end beyond TASK_SIZE"
    return None


def _cow_run(r: S.CowRun) -> tuple[str, Any, str] | None:
    if r.addr + r.npages * PAGE > TASK_SIZE:
        return "npages", r.npages, f"the pages at {r.addr:#x} end beyond TASK_SIZE"
    return None


def _pagemap(m: S.PageMap) -> tuple[str, Any, str] | None:
    why = _ordered(((r.addr, r.addr + r.npages * PAGE) for r in m.runs), "page run")
    return ("runs", m.runs, why) if why else None


def _pipe(p: S.PipeData) -> tuple[str, Any, str] | None:
    return ("data", p.data, f"more than the pipe's capacity {p.size}") if len(p.data) > p.size else None


def _fifo(f: K.FifoState) -> tuple[str, Any, str] | None:
    return ("data", f.data, f"more than the FIFO's capacity {f.size}") if len(f.data) > f.size else None


def _unix(u: S.UnixPair) -> tuple[str, Any, str] | None:
    return ("peer", u.peer, "the socket is its own peer") if u.peer == u.ino else None


def _content(c: K.FileContent) -> tuple[str, Any, str] | None:
    end = 0
    for i, e in enumerate(c.extents):
        if e.offset < end:
            return f"extents[{i}].offset", e.offset, "overlaps or is out of order"
        end = e.offset + len(e.data)
        if end > c.size:
            return f"extents[{i}].offset", e.offset, f"the data ends beyond the file size {c.size}"
    return None


def _unix_bound(u: K.UnixBoundState) -> tuple[str, Any, str] | None:
    for field in ("name", "peer_name"):
        name = getattr(u, field)
        if name and name[0] != 0 and 0 in name:   # a path (not abstract) ends at its NUL
            return field, name, "a socket path with a NUL inside"
    return None


def _inet(fam: int, addrs: Iterable[tuple[str, K.InetAddr | None]]) -> tuple[str, Any, str] | None:
    want = 4 if fam == AF_INET else 6
    for field, a in addrs:
        if a is not None and ipaddress.ip_address(a.host).version != want:
            return f"{field}.host", a.host, f"not an IPv{want} address"
    return None


def _tcp(s: K.TcpState) -> tuple[str, Any, str] | None:
    if s.state == "ESTABLISHED" and s.peer is None:
        return "peer", None, "an established connection without a peer"
    if s.unsent > len(s.outq):
        return "unsent", s.unsent, f"more than the {len(s.outq)} bytes queued"
    return _inet(s.family, (("local", s.local), ("peer", s.peer)))


def _udp(s: K.UdpState) -> tuple[str, Any, str] | None:
    return _inet(s.family, (("local", s.local), ("peer", s.peer)))


CHECKS: dict[type, Check] = {
    S.Vma: _vma, S.Rlimit: _rlimit, S.MmFields: _mm, S.Task: _task, S.PosixTimer: _timer,
    S.FileLock: _lock, S.Pages: _pages, S.PageRun: _run, S.CowRun: _cow_run, S.PageMap: _pagemap, S.PipeData: _pipe,
    S.UnixPair: _unix, K.FifoState: _fifo, K.FileContent: _content,
    K.UnixBoundState: _unix_bound, K.TcpState: _tcp, K.UdpState: _udp,
}


# --- the walk ----------------------------------------------------------------------------

def check(obj: Struct) -> None:
    """Raise Invalid for the first field of obj (a decoded record) out of range."""
    _walk(obj, "")


def _walk(obj: Struct, path: str) -> None:
    cls = type(obj)
    rules = FIELDS.get(cls, {})
    for name in cls.__struct_fields__:
        v = getattr(obj, name)
        here = f"{path}.{name}" if path else name
        rule = rules.get(name)
        if rule is not None:
            why = rule(v)
            if why:
                raise Invalid(here, v, why)
        _descend(v, here)
    rel = CHECKS.get(cls)
    if rel is not None:
        bad = rel(obj)
        if bad is not None:
            field, value, why = bad
            raise Invalid(f"{path}.{field}" if path else field, value, why)


def _descend(v: Any, path: str) -> None:
    if isinstance(v, Struct):
        _walk(v, path)
    elif isinstance(v, str):
        if "\0" in v:
            raise Invalid(path, v, "holds a NUL character")
    elif isinstance(v, list) and v and isinstance(v[0], (Struct, str, list)):
        for i, x in enumerate(v):
            _descend(x, f"{path}[{i}]")


def where(rt: S.RecType, obj: Struct) -> str:
    """The record, for the message: "TASK record of pid 12"."""
    pid = getattr(obj, "pid", None)
    if rt in (S.RecType.TASK, S.RecType.PAGEMAP) and pid is not None:
        return f"{rt.name} record of pid {pid}"
    if rt is S.RecType.PAGES:
        return f"PAGES record of pid {pid} at {obj.addr:#x}"  # type: ignore[attr-defined]
    return f"{rt.name} record"
