"""userfaultfd and PAGEMAP_SCAN-with-write-protect bindings (x86_64).

Only what write tracking needs: the UFFDIO_API / REGISTER / UNREGISTER /
WRITEPROTECT ioctls on a userfaultfd, and PAGEMAP_SCAN with its
PM_SCAN_WP_MATCHING / PM_SCAN_CHECK_WPASYNC flags (the read-only PAGEMAP_SCAN
of procfs/pagemap.py lives in syscalls.py; its structs are reused here).
Every function raises OSError with the kernel's errno.

All of these work on a userfaultfd held by another process than the one whose
memory it watches: the kernel acts on ctx->mm, the mm of the task that
*created* the userfaultfd (so it must be created inside the target).
"""
from __future__ import annotations

import ctypes
import os

from linuxcr.sys.syscalls import (
    NR, PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WPALLOWED,
    PAGE_IS_WRITTEN, PAGEMAP_SCAN, check_ret, libc, page_region, pm_scan_arg, syscall,
)

__all__ = [
    "NR_USERFAULTFD", "UFFD_USER_MODE_ONLY", "UFFD_API", "UFFDIO_API", "UFFDIO_REGISTER",
    "UFFDIO_UNREGISTER", "UFFDIO_WRITEPROTECT", "UFFDIO_REGISTER_MODE_WP",
    "UFFD_FEATURE_WP_ASYNC", "UFFD_FEATURE_WP_UNPOPULATED", "PM_SCAN_WP_MATCHING",
    "PM_SCAN_CHECK_WPASYNC", "PAGE_IS_WPALLOWED", "PAGE_IS_WRITTEN", "PAGE_IS_FILE",
    "PAGE_IS_PRESENT", "PAGE_IS_SWAPPED", "PAGE_IS_PFNZERO", "PAGE_IS_HUGE",
    "uffdio_api", "uffdio_range", "uffdio_register", "uffdio_writeprotect",
    "userfaultfd", "api", "register", "unregister", "writeprotect", "scan", "is_userfaultfd",
    "fdinfo_features", "UFFDIO_REGISTER_MODE_MISSING", "UFFDIO_COPY", "UFFDIO_ZEROPAGE",
    "UFFDIO_WAKE", "UFFD_EVENT_PAGEFAULT", "UFFD_EVENT_FORK", "UFFD_EVENT_REMAP",
    "UFFD_EVENT_REMOVE", "UFFD_EVENT_UNMAP", "UFFD_MSG_SIZE", "uffdio_copy", "uffdio_zeropage",
    "copy", "zeropage", "wake", "parse_msg",
]

NR_USERFAULTFD = NR["userfaultfd"]

# userfaultfd(2) flags
UFFD_USER_MODE_ONLY = 1
O_CLOEXEC, O_NONBLOCK = os.O_CLOEXEC, os.O_NONBLOCK

UFFD_API = 0xAA

# struct uffdio_api.features (include/uapi/linux/userfaultfd.h)
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13     # Linux 6.4
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15           # Linux 6.7
UFFD_FEATURE_MOVE = 1 << 16

# struct uffdio_register.mode
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
# struct uffdio_writeprotect.mode
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

# PAGEMAP_SCAN flags (include/uapi/linux/fs.h)
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_HUGE = 1 << 6


def _IOC(d: int, t: int, nr: int, size: int) -> int:
    return (d << 30) | (size << 16) | (t << 8) | nr


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


# struct uffd_msg (32 bytes): event, then a 24-byte union
UFFD_MSG_SIZE = 32
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

_READ, _WRITE = 2, 1
UFFDIO_API = _IOC(_READ | _WRITE, UFFD_API, 0x3F, ctypes.sizeof(uffdio_api))              # 0xc018aa3f
UFFDIO_REGISTER = _IOC(_READ | _WRITE, UFFD_API, 0x00, ctypes.sizeof(uffdio_register))    # 0xc020aa00
UFFDIO_UNREGISTER = _IOC(_READ, UFFD_API, 0x01, ctypes.sizeof(uffdio_range))              # 0x8010aa01
UFFDIO_WRITEPROTECT = _IOC(_READ | _WRITE, UFFD_API, 0x06, ctypes.sizeof(uffdio_writeprotect))  # 0xc018aa06
UFFDIO_WAKE = _IOC(_READ, UFFD_API, 0x02, ctypes.sizeof(uffdio_range))                    # 0x8010aa02
UFFDIO_COPY = _IOC(_READ | _WRITE, UFFD_API, 0x03, ctypes.sizeof(uffdio_copy))            # 0xc028aa03
UFFDIO_ZEROPAGE = _IOC(_READ | _WRITE, UFFD_API, 0x04, ctypes.sizeof(uffdio_zeropage))    # 0xc020aa04


def _ioctl(fd: int, req: int, arg) -> int:
    return check_ret(libc.ioctl(fd, ctypes.c_ulong(req), ctypes.byref(arg)))


def userfaultfd(flags: int = O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY) -> int:
    """A userfaultfd for *our own* mm (useful only to probe the kernel)."""
    return syscall(NR_USERFAULTFD, flags)


def api(fd: int, features: int) -> tuple[int, int]:
    """UFFDIO_API (once per userfaultfd): returns (features, ioctls) granted.
    EINVAL when a requested feature is unknown (the fd stays uninitialized
    and may be asked again)."""
    a = uffdio_api(api=UFFD_API, features=features, ioctls=0)
    _ioctl(fd, UFFDIO_API, a)
    return a.features, a.ioctls


def register(fd: int, start: int, length: int, mode: int = UFFDIO_REGISTER_MODE_WP) -> int:
    """UFFDIO_REGISTER [start, start+length); returns the range ioctls allowed."""
    r = uffdio_register(range=uffdio_range(start, length), mode=mode, ioctls=0)
    _ioctl(fd, UFFDIO_REGISTER, r)
    return r.ioctls


def unregister(fd: int, start: int, length: int) -> None:
    _ioctl(fd, UFFDIO_UNREGISTER, uffdio_range(start, length))


def writeprotect(fd: int, start: int, length: int, protect: bool = True) -> None:
    """UFFDIO_WRITEPROTECT: every page of the range (populated or not, with
    UFFD_FEATURE_WP_UNPOPULATED) write-protected, or unprotected."""
    mode = UFFDIO_WRITEPROTECT_MODE_WP if protect else 0
    _ioctl(fd, UFFDIO_WRITEPROTECT, uffdio_writeprotect(uffdio_range(start, length), mode))


def _ioctl_counted(fd: int, req: int, arg: ctypes.Structure, count: str) -> int:
    """An ioctl whose struct reports in field ``count`` the bytes done
    (UFFDIO_COPY, UFFDIO_ZEROPAGE): those bytes, or OSError with ``.copied``
    set to the bytes done before the error."""
    try:
        _ioctl(fd, req, arg)
    except OSError as e:
        e.copied = max(getattr(arg, count), 0)  # type: ignore[attr-defined]
        raise
    return int(getattr(arg, count))


def copy(fd: int, dst: int, src: int, length: int) -> int:
    """UFFDIO_COPY ``length`` bytes from our address ``src`` to ``dst`` in the
    userfaultfd's mm (waking the threads waiting there).  Returns the bytes
    copied; OSError (EEXIST: a page of the range is present already, EAGAIN:
    the mm is changing, retry after reading events) with ``.copied`` set to
    the bytes copied before the error."""
    return _ioctl_counted(fd, UFFDIO_COPY, uffdio_copy(dst=dst, src=src, len=length, mode=0, copy=0),
                          "copy")


def zeropage(fd: int, start: int, length: int) -> int:
    """UFFDIO_ZEROPAGE: map the zero page over [start, start+length)."""
    return _ioctl_counted(fd, UFFDIO_ZEROPAGE,
                          uffdio_zeropage(range=uffdio_range(start, length), mode=0, zeropage=0),
                          "zeropage")


def wake(fd: int, start: int, length: int) -> None:
    """UFFDIO_WAKE the threads waiting on faults in [start, start+length)."""
    _ioctl(fd, UFFDIO_WAKE, uffdio_range(start, length))


def parse_msg(raw: bytes) -> tuple[int, int, int, int]:
    """One struct uffd_msg: (event, a, b, c) with a, b, c the union's three
    u64 words: PAGEFAULT (flags, address, ptid), FORK (new fd in the low
    32 bits of a), REMAP (from, to, len), REMOVE/UNMAP (start, end, -)."""
    ev = raw[0]
    a, b, c = int.from_bytes(raw[8:16], "little"), int.from_bytes(raw[16:24], "little"), \
        int.from_bytes(raw[24:32], "little")
    return ev, a, b, c


_VEC_LEN = 4096
_vec = None


def scan(pagemap_fd: int, start: int, end: int, *, flags: int = 0, anyof: int = 0,
         inverted: int = 0, mask: int = 0, return_mask: int, vec_len: int = _VEC_LEN
         ) -> list[tuple[int, int, int]]:
    """PAGEMAP_SCAN over [start, end) with ``flags`` (PM_SCAN_*): every matching
    (start, end, categories) region, in order, adjacent equal ones merged.
    Continues after "output buffer full" from walk_end until ``end`` is
    reached, so with PM_SCAN_WP_MATCHING every match gets write-protected."""
    global _vec
    if vec_len == _VEC_LEN:
        if _vec is None:
            _vec = (page_region * _VEC_LEN)()
        vec = _vec
    else:
        vec = (page_region * vec_len)()
    out: list[tuple[int, int, int]] = []
    pos = start
    base = ctypes.addressof(vec)
    size = ctypes.sizeof(pm_scan_arg)
    while pos < end:
        arg = pm_scan_arg(size=size, flags=flags, start=pos, end=end, walk_end=0,
                          vec=base, vec_len=vec_len, max_pages=0, category_inverted=inverted,
                          category_mask=mask, category_anyof_mask=anyof, return_mask=return_mask)
        n = _ioctl(pagemap_fd, PAGEMAP_SCAN, arg)
        if n:
            regions = vec[:n]
            i = 0
            if out and out[-1][1] == regions[0].start and out[-1][2] == regions[0].categories:
                out[-1] = (out[-1][0], regions[0].end, out[-1][2])
                i = 1
            out += [(r.start, r.end, r.categories) for r in regions[i:]]
        if arg.walk_end <= pos:
            break
        pos = arg.walk_end
    return out


def is_userfaultfd(fd: int, pid: int | str = "self") -> bool:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False


def fdinfo_features(fd: int, pid: int | str = "self") -> int | None:
    """The features of an initialized userfaultfd from its fdinfo line
    ``API:\\t<api>:<features>:<ioctls>`` (None if not shown)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("API:"):
                    return int(line.split(":")[2], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None
