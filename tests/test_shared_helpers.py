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
