"""The small helpers that replaced code written twice (procfs.fd_links,
sys.syscalls.fd_of): checked on this test's own process."""
from __future__ import annotations

import os

from helpers import free_pid
from linuxcr.procfs import fd_links
from linuxcr.sys.syscalls import fd_of


def test_fd_links_lists_our_fds_and_nothing_of_a_gone_process():
    r, w = os.pipe()
    try:
        links = dict(fd_links(os.getpid()))
        assert links[r] == links[w] and links[r].startswith("pipe:["), links
        assert [fd for fd, _ in fd_links(os.getpid())] == sorted(links)
    finally:
        os.close(r)
        os.close(w)
    assert r not in dict(fd_links(os.getpid()))
    assert fd_links(free_pid()) == []


def test_fd_of_is_the_same_open_file():
    r, w = os.pipe()
    try:
        ours = fd_of(os.getpid(), w)
        try:
            assert ours not in (r, w)
            assert os.get_inheritable(ours) is False        # O_CLOEXEC
            os.write(ours, b"x")
            assert os.read(r, 1) == b"x"
        finally:
            os.close(ours)
    finally:
        os.close(r)
        os.close(w)


def test_uffd_copy_and_zeropage_count_what_they_did():
    """sys.uffd.copy / zeropage on an area of ours registered in MISSING
    mode: the bytes done, and on EEXIST an OSError with .copied."""
    import ctypes
    import errno
    import mmap

    import pytest

    from linuxcr.sys import uffd as U
    P = mmap.PAGESIZE
    area = mmap.mmap(-1, 4 * P)
    start = ctypes.addressof(ctypes.c_char.from_buffer(area))
    src = ctypes.create_string_buffer(b"\x5a" * (2 * P), 2 * P)
    fd = U.userfaultfd()
    try:
        U.api(fd, 0)
        U.register(fd, start, 4 * P, U.UFFDIO_REGISTER_MODE_MISSING)
        assert U.copy(fd, start, ctypes.addressof(src), 2 * P) == 2 * P
        assert U.zeropage(fd, start + 2 * P, P) == P
        with pytest.raises(OSError) as e:
            U.copy(fd, start + 2 * P, ctypes.addressof(src), P)      # present already
        assert e.value.errno == errno.EEXIST and e.value.copied == 0
        U.unregister(fd, start, 4 * P)
        assert area[:2 * P] == b"\x5a" * (2 * P) and area[2 * P:3 * P] == bytes(P)
    finally:
        os.close(fd)
        del src


def test_close_all_but_keeps_what_it_is_told():
    """sys.syscalls.close_all_but in a forked child: every fd from 3 up
    closed but those kept; 0-2 untouched."""
    from linuxcr.sys.syscalls import close_all_but
    a, b = os.pipe()
    c, d = os.pipe()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            close_all_but({b, w})
            left = sorted(int(n) for n in os.listdir("/proc/self/fd"))
            os.write(w, (" ".join(map(str, left)) + "\n").encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    got = os.read(r, 4096)           # one short line, written at once
    for fd in (a, b, c, d, r):
        os.close(fd)
    left = [int(x) for x in got.split()]
    # the listing's own directory fd may show up (it is open while listing)
    assert {0, 1, 2, b, w} <= set(left) and not {a, c, d, r} & set(left), left
