"""ptrace(2) requests as Python functions (x86_64)."""
from __future__ import annotations

import ctypes
import os
import signal

from linuxcr.sys.syscalls import NR, iovec, syscall, user_regs_struct

PTRACE_PEEKDATA = 2
PTRACE_POKEDATA = 5
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
PTRACE_SETOPTIONS = 0x4200
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_SECCOMP_GET_METADATA = 0x420D

PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_EXITKILL = 0x100000
PTRACE_O_SUSPEND_SECCOMP = 0x200000
PTRACE_EVENT_FORK = 1
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 128
PTRACE_PEEKSIGINFO_SHARED = 1

NT_PRSTATUS = 1
NT_X86_XSTATE = 0x202

WALL = 0x40000000  # __WALL: wait for threads and non-SIGCHLD children too

XSTATE_MAX = 16384  # generous upper bound; the kernel tells the real size


def request(req: int, pid: int, addr: int | ctypes.c_void_p = 0, data: object = 0) -> int:
    """ptrace(2) itself, for the requests that have no function below."""
    return syscall(NR["ptrace"], req, pid, addr, data)




def seize(pid: int, options: int) -> None:
    request(PTRACE_SEIZE, pid, 0, options)


def interrupt(pid: int) -> None:
    request(PTRACE_INTERRUPT, pid)


def detach(pid: int, sig: int = 0) -> None:
    request(PTRACE_DETACH, pid, 0, sig)


def cont(pid: int, sig: int = 0) -> None:
    request(PTRACE_CONT, pid, 0, sig)


def resume_syscall(pid: int, sig: int = 0) -> None:
    request(PTRACE_SYSCALL, pid, 0, sig)


def get_event_msg(pid: int) -> int:
    msg = ctypes.c_ulong()
    request(PTRACE_GETEVENTMSG, pid, 0, ctypes.byref(msg))
    return msg.value


def get_regs(pid: int) -> user_regs_struct:
    regs = user_regs_struct()
    request(PTRACE_GETREGS, pid, 0, ctypes.byref(regs))
    return regs


def set_regs(pid: int, regs: user_regs_struct) -> None:
    request(PTRACE_SETREGS, pid, 0, ctypes.byref(regs))


def get_xstate(pid: int) -> bytes:
    buf = ctypes.create_string_buffer(XSTATE_MAX)
    iov = iovec(ctypes.addressof(buf), XSTATE_MAX)
    request(PTRACE_GETREGSET, pid, NT_X86_XSTATE, ctypes.byref(iov))
    return buf.raw[: iov.iov_len]


def set_xstate(pid: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(data, len(data))
    iov = iovec(ctypes.addressof(buf), len(data))
    request(PTRACE_SETREGSET, pid, NT_X86_XSTATE, ctypes.byref(iov))


def get_sigmask(pid: int) -> int:
    mask = ctypes.c_uint64()
    request(PTRACE_GETSIGMASK, pid, 8, ctypes.byref(mask))
    return mask.value


def set_sigmask(pid: int, mask: int) -> None:
    m = ctypes.c_uint64(mask)
    request(PTRACE_SETSIGMASK, pid, 8, ctypes.byref(m))


class _PeekSiginfoArgs(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


SIGINFO_SIZE = 128


def peek_siginfo(pid: int, shared: bool) -> list[bytes]:
    """All queued siginfos (private or process-wide), without dequeuing them."""
    out: list[bytes] = []
    batch = 32
    while True:
        args = _PeekSiginfoArgs(len(out), PTRACE_PEEKSIGINFO_SHARED if shared else 0, batch)
        buf = ctypes.create_string_buffer(SIGINFO_SIZE * batch)
        n = request(PTRACE_PEEKSIGINFO, pid, ctypes.byref(args), buf)
        out.extend(buf.raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE] for i in range(n))
        if n < batch:
            return out


class _RseqConfig(ctypes.Structure):
    _fields_ = [("rseq_abi_pointer", ctypes.c_uint64), ("rseq_abi_size", ctypes.c_uint32),
                ("signature", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def get_rseq(pid: int) -> tuple[int, int, int]:
    """(address, length, signature) of the thread's rseq area; address 0 if none."""
    cfg = _RseqConfig()
    request(PTRACE_GET_RSEQ_CONFIGURATION, pid, ctypes.sizeof(cfg), ctypes.byref(cfg))
    return cfg.rseq_abi_pointer, cfg.rseq_abi_size, cfg.signature


def peek(pid: int, addr: int) -> int:
    word = ctypes.c_uint64()
    request(PTRACE_PEEKDATA, pid, addr, ctypes.byref(word))
    return word.value


def poke(pid: int, addr: int, value: int) -> None:
    request(PTRACE_POKEDATA, pid, addr, value & 0xFFFFFFFFFFFFFFFF)


def wait_stop(pid: int) -> int:
    """waitpid(__WALL) for pid; returns the raw status."""
    while True:
        try:
            _, status = os.waitpid(pid, WALL)
            return status
        except InterruptedError:
            continue


def wait_nohang(pid: int) -> tuple[int, int]:
    """waitpid(__WALL | WNOHANG) for pid: (0, 0) while it has nothing to report."""
    while True:
        try:
            return os.waitpid(pid, WALL | os.WNOHANG)
        except InterruptedError:
            continue


def is_event_stop(status: int) -> bool:
    return os.WIFSTOPPED(status) and (status >> 16) == PTRACE_EVENT_STOP


def is_event(status: int, event: int) -> bool:
    return os.WIFSTOPPED(status) and (status >> 16) == event


def is_syscall_stop(status: int) -> bool:
    return os.WIFSTOPPED(status) and os.WSTOPSIG(status) == (signal.SIGTRAP | 0x80)


def set_options(pid: int, options: int) -> None:
    request(PTRACE_SETOPTIONS, pid, 0, options)


BPF_INSN = 8     # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k


def seccomp_filter(pid: int, index: int) -> bytes | None:
    """The thread's index-th seccomp filter (0: the newest) as raw BPF, None
    past the oldest.  Needs CAP_SYS_ADMIN."""
    try:
        n = request(PTRACE_SECCOMP_GET_FILTER, pid, index, 0)
    except OSError as e:
        if e.errno == 2:    # ENOENT: no filter at that index
            return None
        raise
    buf = ctypes.create_string_buffer(n * BPF_INSN)
    n = request(PTRACE_SECCOMP_GET_FILTER, pid, index, buf)
    return buf.raw[: n * BPF_INSN]


class _SeccompMetadata(ctypes.Structure):
    _fields_ = [("filter_off", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def seccomp_metadata(pid: int, index: int) -> int:
    """The flags a filter was installed with (the kernel keeps only LOG)."""
    md = _SeccompMetadata(index, 0)
    request(PTRACE_SECCOMP_GET_METADATA, pid, ctypes.sizeof(md), ctypes.byref(md))
    return md.flags
