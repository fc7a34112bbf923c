"""ctypes bindings for the system calls Python does not wrap (x86_64 only).

Everything that builds a raw syscall lives here, so the rest of linuxcr speaks
Python: functions raise OSError with the real errno, structs are ctypes types.
"""
from __future__ import annotations

import ctypes
import errno
import os

# by name: ctypes.util.find_library runs ldconfig (start-up time of every command)
libc = ctypes.CDLL("libc.so.6", use_errno=True)
_syscall = libc.syscall
_syscall.restype = ctypes.c_long

# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl)
NR = dict(
    read=0, write=1, open=2, wait4=61, recvmsg=47, rt_sigtimedwait=128, close=3, lseek=8, mmap=9, mprotect=10, munmap=11,
    brk=12, rt_sigaction=13, rt_sigprocmask=14, ioctl=16, mremap=25, madvise=28,
    dup=32, dup2=33, getitimer=36, setitimer=38, getpid=39, kill=62, fcntl=72, chdir=80, fchdir=81, umask=95,
    ptrace=101, getuid=102, setpgid=109, getppid=110, setsid=112, setgroups=116,
    setresuid=117, setresgid=119, getpgid=121, getsid=124, rt_sigqueueinfo=129,
    sigaltstack=131, capset=126, personality=135, prctl=157, arch_prctl=158, chroot=161,
    gettid=186, tkill=200, set_tid_address=218, restart_syscall=219, clock_nanosleep=230,
    exit_group=231, set_robust_list=273, get_robust_list=274, dup3=292,
    rt_tgsigqueueinfo=297, prlimit64=302, process_vm_readv=310,
    process_vm_writev=311, kcmp=312, rseq=334, pidfd_open=434, clone3=435,
    close_range=436, pidfd_getfd=438, userfaultfd=323, openat=257, epoll_ctl=233, epoll_wait=232, poll=7,
    flock=73, timer_create=222, timer_settime=223, timer_gettime=224, timer_getoverrun=225,
    timer_delete=226, connect=42, pause=34, tgkill=234,
    # process attributes (resources/sched.py, security.py, procattrs.py)
    getpriority=140, setpriority=141, mincore=27, mlock=149, munlock=150, mlockall=151, munlockall=152, mkdir=83, rmdir=84,
    sched_setattr=314, sched_getattr=315, ioprio_set=251, ioprio_get=252, seccomp=317, membarrier=324, mlock2=325,
    shmat=30, shmdt=67,   # System V shared memory attached in a restored task (resources/sysvipc.py)
)

# The kernel's restart codes, seen in rax of a task stopped inside a syscall.
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516

TASK_SIZE = 0x7FFFFFFFF000  # 4-level paging user address space end


def check_ret(ret: int) -> int:
    """The return value of a libc call; OSError (from errno) if it is -1."""
    if ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def syscall(nr: int, *args: int | ctypes._SimpleCData | ctypes.Array | None) -> int:
    """Raw syscall; raises OSError on failure."""
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return check_ret(_syscall(ctypes.c_long(nr), *cargs))


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class user_regs_struct(ctypes.Structure):
    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
        "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
        "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]

    def copy(self) -> "user_regs_struct":
        return user_regs_struct.from_buffer_copy(self)


class clone_args(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack",
        "stack_size", "tls", "set_tid", "set_tid_size", "cgroup")]


def process_vm_readv(pid: int, local: memoryview | bytearray, remote_addr: int) -> int:
    """Copy len(local) bytes from pid's address remote_addr; returns bytes read."""
    buf = (ctypes.c_char * len(local)).from_buffer(local)
    liov = iovec(ctypes.addressof(buf), len(local))
    riov = iovec(remote_addr, len(local))
    return syscall(NR["process_vm_readv"], pid, ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)


def _buffer_address(buf: memoryview | bytes | bytearray) -> tuple[int, object]:
    """Address of a buffer's bytes (and an object that keeps it alive), no copy."""
    if isinstance(buf, memoryview) and buf.readonly:
        buf = buf.obj if isinstance(buf.obj, bytes) and len(buf.obj) == len(buf) else bytes(buf)
    if isinstance(buf, bytes):
        ptr = ctypes.c_char_p(buf)
        return ctypes.cast(ptr, ctypes.c_void_p).value or 0, (ptr, buf)
    arr = (ctypes.c_char * len(buf)).from_buffer(buf)
    return ctypes.addressof(arr), arr


def process_vm_writev(pid: int, local: memoryview | bytes | bytearray, remote_addr: int) -> int:
    n = len(local)
    addr, _keep = _buffer_address(local)
    liov = iovec(addr, n)
    riov = iovec(remote_addr, n)
    return syscall(NR["process_vm_writev"], pid, ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)


IOV_MAX = 1024


def process_vm_writev_many(pid: int, pieces: list[tuple[int, memoryview | bytes | bytearray]]) -> int:
    """Many (remote address, data) pieces in one call (at most IOV_MAX);
    returns the bytes written (the kernel stops at the first failure)."""
    n = len(pieces)
    liov = (iovec * n)()
    riov = (iovec * n)()
    keep = []
    for i, (addr, data) in enumerate(pieces):
        a, k = _buffer_address(data)
        keep.append(k)
        liov[i] = iovec(a, len(data))
        riov[i] = iovec(addr, len(data))
    return syscall(NR["process_vm_writev"], pid, liov, n, riov, n, 0)


def process_vm_readv_many(pid: int, local: memoryview | bytearray,
                          remote: list[tuple[int, int]]) -> int:
    """Scattered remote (address, length) pieces into one local buffer, back
    to back (at most IOV_MAX); returns the bytes read (the kernel stops at
    the first failure)."""
    buf = (ctypes.c_char * len(local)).from_buffer(local)
    liov = iovec(ctypes.addressof(buf), len(local))
    n = len(remote)
    riov = (iovec * n)()
    for i, (addr, length) in enumerate(remote):
        riov[i] = iovec(addr, length)
    return syscall(NR["process_vm_readv"], pid, ctypes.byref(liov), 1, riov, n, 0)


def process_vm_writev_scatter(pid: int, local: memoryview | bytearray,
                              remote: list[tuple[int, int]]) -> int:
    """One local buffer, back to back, into scattered remote (address,
    length) pieces (at most IOV_MAX): the mirror of process_vm_readv_many,
    one local iovec whatever the number of pieces."""
    addr, _keep = _buffer_address(local)
    liov = iovec(addr, len(local))
    n = len(remote)
    riov = (iovec * n)()
    for i, (raddr, length) in enumerate(remote):
        riov[i] = iovec(raddr, length)
    return syscall(NR["process_vm_writev"], pid, ctypes.byref(liov), 1, riov, n, 0)


def clone3_stopped_child(set_tid: int | None) -> int:
    """fork() through clone3 so that the child can get a chosen pid.

    Returns 0 in the child (which then runs Python code: keep it minimal).
    """
    args = clone_args()
    args.exit_signal = 17  # SIGCHLD
    tid_arr = None
    if set_tid is not None:
        tid_arr = (ctypes.c_int32 * 1)(set_tid)
        args.set_tid = ctypes.addressof(tid_arr)
        args.set_tid_size = 1
    return syscall(NR["clone3"], ctypes.byref(args), ctypes.sizeof(args))


def tgkill(tgid: int, tid: int, sig: int) -> None:
    """A signal to one thread (os.kill would pick any thread of the process)."""
    syscall(NR["tgkill"], tgid, tid, sig)


def pidfd_open(pid: int) -> int:
    return syscall(NR["pidfd_open"], pid, 0)


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """Our own fd for the open file behind another process's fd (O_CLOEXEC)."""
    return syscall(NR["pidfd_getfd"], pidfd, fd, 0)


def fd_of(pid: int, fd: int) -> int:
    """Our own fd (O_CLOEXEC) for the open file behind fd ``fd`` of process
    ``pid``: pidfd_open + pidfd_getfd, the pidfd closed again."""
    pfd = pidfd_open(pid)
    try:
        return pidfd_getfd(pfd, fd)
    finally:
        os.close(pfd)


def close_all_but(keep: set[int], low: int = 3) -> None:
    """Close every fd of this process from ``low`` up but those in ``keep``
    (a child forked to live on its own: a server, a guardian, an init)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd >= low and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


KCMP_FILE, KCMP_VM, KCMP_FILES = 0, 1, 2


def kcmp_file(pid1: int, pid2: int, fd1: int, fd2: int) -> bool:
    """True when both fds name the same open file description."""
    return syscall(NR["kcmp"], pid1, pid2, KCMP_FILE, fd1, fd2) == 0


def kcmp_same(kind: int, pid1: int, pid2: int) -> bool:
    """True when two processes share the object (KCMP_VM, KCMP_FILES, ...)."""
    return syscall(NR["kcmp"], pid1, pid2, kind, 0, 0) == 0


def get_robust_list(pid: int) -> tuple[int, int]:
    head = ctypes.c_void_p()
    length = ctypes.c_size_t()
    syscall(NR["get_robust_list"], pid, ctypes.byref(head), ctypes.byref(length))
    return head.value or 0, length.value


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return syscall(NR["prctl"], option, a2, a3, a4, a5)


def errno_name(e: int) -> str:
    return errno.errorcode.get(e, str(e))


# --- PAGEMAP_SCAN (Linux 6.7+): ranges of pages by category, from the kernel --
PAGEMAP_SCAN = 0xC0606610          # _IOWR('f', 16, struct pm_scan_arg)
PAGE_IS_WPALLOWED, PAGE_IS_WRITTEN, PAGE_IS_FILE = 1 << 0, 1 << 1, 1 << 2
PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_PFNZERO = 1 << 3, 1 << 4, 1 << 5


class pm_scan_arg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class page_region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


def pagemap_scan(fd: int, start: int, end: int, *, anyof: int, inverted: int = 0, mask: int = 0,
                 return_mask: int, vec_len: int = 1024) -> list[tuple[int, int]]:
    """All (start, end) ranges in [start, end) whose pages match; merged by the kernel.

    Raises OSError(ENOTTY/EINVAL) on kernels without PAGEMAP_SCAN."""
    vec = (page_region * vec_len)()
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        arg = pm_scan_arg(size=ctypes.sizeof(pm_scan_arg), flags=0, start=pos, end=end, walk_end=0,
                          vec=ctypes.addressof(vec), vec_len=vec_len, max_pages=0,
                          category_inverted=inverted, category_mask=mask,
                          category_anyof_mask=anyof, return_mask=return_mask)
        n = check_ret(libc.ioctl(fd, ctypes.c_ulong(PAGEMAP_SCAN), ctypes.byref(arg)))
        for i in range(n):
            r = vec[i]
            if out and out[-1][1] == r.start:
                out[-1] = (out[-1][0], r.end)
            else:
                out.append((r.start, r.end))
        if arg.walk_end <= pos:
            break
        pos = arg.walk_end
    return out


class sched_attr(ctypes.Structure):
    """struct sched_attr (SCHED_ATTR_SIZE_VER1, 56 bytes: without the
    utilization clamps, which stay as inherited)."""
    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
                ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
                ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64)]


def sched_getattr(tid: int) -> sched_attr:
    attr = sched_attr()
    syscall(NR["sched_getattr"], tid, ctypes.byref(attr), ctypes.sizeof(attr), 0)
    return attr


def sched_setattr(tid: int, attr: sched_attr) -> None:
    attr.size = ctypes.sizeof(attr)
    syscall(NR["sched_setattr"], tid, ctypes.byref(attr), 0)


IOPRIO_WHO_PROCESS = 1       # one thread, by tid


def ioprio_get(tid: int) -> int:
    """The I/O priority of one thread (class << 13 | level)."""
    return syscall(NR["ioprio_get"], IOPRIO_WHO_PROCESS, tid)


def ioprio_set(tid: int, value: int) -> None:
    syscall(NR["ioprio_set"], IOPRIO_WHO_PROCESS, tid, value)
