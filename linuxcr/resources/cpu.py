"""CPU state: general registers (incl. fs/gs base), FPU/SSE/AVX xstate, rseq."""
from __future__ import annotations

import struct

from linuxcr.errors import RestoreError
from linuxcr.remote.task import Tracee, restartable_regs
from linuxcr.sys import ptrace
from linuxcr.sys.syscalls import user_regs_struct

RSEQ_FLAG_UNREGISTER = 1
# xsave layout: the kernel stores its "software reserved" bytes at 464 in the
# legacy area: magic1, extended_size, xfeatures, xstate_size.
_SW_BYTES = struct.Struct("<IIQI")


def xstate_features(xstate: bytes) -> tuple[int, int]:
    """(XCR0 feature bits, size) that this xstate buffer was saved with."""
    if len(xstate) < 512:
        return 0, len(xstate)
    _magic, _ext, features, size = _SW_BYTES.unpack_from(xstate, 464)
    return features, len(xstate)


def dump(t: Tracee) -> dict:
    assert t.saved_regs is not None
    rseq = ptrace.get_rseq(t.pid)
    return dict(regs=bytes(t.saved_regs), xstate=ptrace.get_xstate(t.pid),
                rseq=list(rseq) if rseq[0] else [])


def check_restorable(xstate: bytes, local_xstate: bytes) -> str | None:
    feat, size = xstate_features(xstate)
    lfeat, lsize = xstate_features(local_xstate)
    if feat & ~lfeat:
        return (f"the image's FPU state uses CPU features 0x{feat & ~lfeat:x} "
                "(XCR0 bits) that this CPU does not have")
    if size != lsize:
        return f"the image's FPU state is {size} bytes, this CPU's is {lsize}"
    return None


def unregister_rseq(t: Tracee) -> None:
    """A task holds one rseq registration: drop the one it inherited."""
    addr, length, sig = ptrace.get_rseq(t.pid)
    if addr:
        t.syscall("rseq", addr, length, RSEQ_FLAG_UNREGISTER, sig)


def register_rseq(t: Tracee, rseq: list[int]) -> None:
    if rseq:
        addr, length, sig = rseq
        t.syscall("rseq", addr, length, 0, sig)


def final_regs(regs: bytes) -> user_regs_struct:
    return restartable_regs(user_regs_struct.from_buffer_copy(regs), restart_block_ok=False)


def restore_fpu(t: Tracee, xstate: bytes) -> None:
    try:
        ptrace.set_xstate(t.pid, xstate)
    except OSError as e:
        raise RestoreError(f"the kernel refused the saved FPU/AVX state: {e.strerror}") from None
