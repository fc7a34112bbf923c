"""Unit tests for linuxcr.procfs: real samples, tricky inputs, properties, live /proc."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linuxcr.procfs import (
    MapEntry,
    PagemapReader,
    list_fds,
    page_runs,
    parse_auxv,
    parse_fdinfo,
    parse_maps,
    parse_maps_line,
    parse_smaps,
    parse_stat,
    parse_status,
    read_auxv,
    read_fd_link,
    read_fdinfo,
    read_maps,
    read_pagemap,
    read_smaps,
    read_stat,
    read_status,
    split_runs,
)
from linuxcr.procfs.auxv import AT_PAGESZ, AT_SYSINFO_EHDR
from linuxcr.procfs.pagemap import PM_FILE, PM_MMAP_EXCLUSIVE, PM_PRESENT, PM_SOFT_DIRTY, PM_SWAP

SAMPLES = Path(__file__).parent / "samples" / "procfs"
PAGE = 4096


def sample(name: str) -> str:
    return (SAMPLES / name).read_text()


def buffer_address(buf: mmap.mmap | bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


# --------------------------------------------------------------------- maps


def test_maps_sample_round_trips_line_by_line() -> None:
    text = sample("maps.txt")
    entries = parse_maps(text)
    assert len(entries) == len(text.splitlines()) == 127
    assert [e.line() for e in entries] == text.splitlines()


def test_maps_sample_special_areas() -> None:
    by_path = {e.path: e for e in parse_maps(sample("maps.txt"))}
    for name in ("[heap]", "[stack]", "[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]"):
        assert by_path[name].special and by_path[name].is_anon
    vsyscall = by_path["[vsyscall]"]
    assert (vsyscall.start, vsyscall.size, vsyscall.perms) == (0xFFFFFFFFFF600000, PAGE, "--xp")
    assert vsyscall.executable and not vsyscall.readable and vsyscall.private


def test_maps_deleted_file_with_spaces_and_parens() -> None:
    e = parse_maps_line(
        "7fb2e41ec000-7fb2e41ee000 rw-p 00001000 fe:00 2146517"
        "                    /tmp/procfs_stub/my file (v2).bin (deleted)"
    )
    assert e.path == "/tmp/procfs_stub/my file (v2).bin" and e.deleted
    assert (e.dev_major, e.dev_minor, e.inode, e.offset) == (0xFE, 0, 2146517, 0x1000)
    assert e.writable and e.private and not e.shared and not e.is_anon and not e.special


def test_maps_shared_anon_is_dev_zero_deleted() -> None:
    e = parse_maps_line("7fb2e41bb000-7fb2e41be000 rw-s 00000000 00:01 24                         /dev/zero (deleted)")
    assert e.shared and e.deleted and e.path == "/dev/zero" and not e.is_anon


@pytest.mark.parametrize(
    ("line", "path"),
    [
        ("7f99d8c00000-7f99d8d00000 rw-p 00000000 00:00 0 ", ""),
        ("7f99d8c00000-7f99d8d00000 rw-p 00000000 00:00 0", ""),
        ("7f0000000000-7f0000003000 rw-p 00000000 00:00 0                          [anon:foo]", "[anon:foo]"),
        ("7f0000000000-7f0000003000 rw-p 00000000 00:00 0                          [anon:a b) c]", "[anon:a b) c]"),
        ("7f0000000000-7f0000001000 r--p 00000000 08:01 12                         /a\\012b  ", "/a\nb  "),
    ],
)
def test_maps_tricky_names(line: str, path: str) -> None:
    e = parse_maps_line(line)
    assert e.path == path and not e.deleted
    assert e.is_anon == (e.inode == 0)


@pytest.mark.parametrize(
    "line",
    ["", "garbage", "7f-7g r--p 0 00:00 0", "1000-2000 rwxq 00000000 00:00 0", "1000-2000 r--p 0 00:00 x /p"],
)
def test_maps_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(ValueError):
        parse_maps_line(line)


def test_maps_bytes_with_non_utf8_path() -> None:
    raw = b"1000-2000 r--p 00000000 08:01 7 /tmp/\xff\xfe name\n"
    (e,) = parse_maps(raw)
    assert os.fsencode(e.path) == b"/tmp/\xff\xfe name"


_paths = st.one_of(
    st.just(""),
    st.builds(lambda s: f"[{s}]", st.text(st.characters(blacklist_characters="\n\x00"), max_size=20)),
    st.builds(lambda s: "/" + s, st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))),
).filter(lambda p: "\\012" not in p and not p.endswith(" (deleted)"))


@given(
    start=st.integers(0, 2**52),
    npages=st.integers(1, 2**20),
    perms=st.tuples(*(st.sampled_from(["-", c]) for c in "rwx"), st.sampled_from("sp")).map("".join),
    offset=st.integers(0, 2**44),
    major=st.integers(0, 4095),
    minor=st.integers(0, 2**20 - 1),
    inode=st.integers(0, 2**64 - 1),
    path=_paths,
    deleted=st.booleans(),
)
def test_maps_format_parse_identity(
    start: int, npages: int, perms: str, offset: int, major: int, minor: int, inode: int, path: str, deleted: bool
) -> None:
    deleted = deleted and bool(path)
    e = MapEntry(start * PAGE, (start + npages) * PAGE, perms, offset, major, minor, inode, path, deleted)
    assert parse_maps_line(e.line()) == e
    assert parse_maps(e.line() + "\n" + e.line() + "\n") == [e, e]


# -------------------------------------------------------------------- smaps


def test_smaps_sample() -> None:
    entries = parse_smaps(sample("smaps.txt"))
    assert len(entries) == 10
    deleted = next(s for s in entries if s.map.deleted and s.map.private)
    assert deleted.map.path == "/tmp/procfs_stub/my file (v2).bin"
    assert deleted.fields["Size"] == 8192 and deleted.fields["Anonymous"] == 4096
    assert deleted.fields["Private_Dirty"] == 4096 and deleted.fields["Swap"] == 0
    assert deleted.vmflags == {"rd", "wr", "mr", "mw", "me", "ac"}
    assert deleted.thp_eligible == 0 and deleted.protection_key is None
    for s in entries:
        assert s.fields["Size"] == s.map.size
        assert "rd" in s.vmflags or not s.map.readable


def test_smaps_odd_fields() -> None:
    text = (
        "1000-3000 rw-p 00000000 00:00 0 \n"
        "Rss:                   8 kB\n"
        "ProtectionKey:         3\n"
        "Weird:    hello world\n"
        "VmFlags: \n"
        "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]\n"
    )
    first, second = parse_smaps(text)
    assert first.fields == {"Rss": 8192} and first.protection_key == 3
    assert first.extra == {"Weird": "hello world"} and first.vmflags == frozenset()
    assert second.map.path == "[vsyscall]" and second.fields == {} and second.thp_eligible is None
    assert parse_smaps("") == []
    with pytest.raises(ValueError):
        parse_smaps("Rss: 4 kB\n")


# --------------------------------------------------------------------- stat


def test_stat_sample_with_hostile_comm() -> None:
    st_ = parse_stat(sample("stat.txt"))
    assert (st_.pid, st_.comm, st_.state, st_.ppid, st_.pgrp) == (5913, "a) b (c", "R", 5910, 5910)
    assert st_.tty_nr == 0 and st_.tpgid == -1 and st_.num_threads == 1 and st_.exit_signal == 17
    assert st_.start_code < st_.end_code < st_.start_data < st_.end_data <= st_.start_brk
    assert st_.arg_start < st_.arg_end <= st_.env_start < st_.env_end and st_.exit_code == 0
    assert st_.rsslim == 2**64 - 1


def test_stat_old_kernel_missing_trailing_fields() -> None:
    st_ = parse_stat("1 (init) S 0 1 1 0 -1 4194560 10 20")
    assert st_.minflt == 10 and st_.cminflt == 20 and st_.majflt == 0 and st_.exit_code == 0


@pytest.mark.parametrize("text", ["", "12 no parens S", "x (a) S 1", "12 (a)", "12 (a) S one"])
def test_stat_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_stat(text)


@given(
    comm=st.text(st.characters(blacklist_characters="\x00"), max_size=40),
    pid=st.integers(1, 2**22),
    nums=st.lists(st.integers(-(2**31), 2**64 - 1), min_size=49, max_size=49),
    state=st.sampled_from("RSDZTtXxKWPI"),
)
def test_stat_any_comm(comm: str, pid: int, nums: list[int], state: str) -> None:
    st_ = parse_stat(f"{pid} ({comm}) {state} " + " ".join(map(str, nums)) + "\n")
    assert (st_.pid, st_.comm, st_.state, st_.ppid, st_.exit_code) == (pid, comm, state, nums[0], nums[-1])
    assert st_.num_threads == nums[16] and st_.policy == nums[37] and st_.start_data == nums[41]


# ------------------------------------------------------------------- status


def test_status_sample() -> None:
    s = parse_status(sample("status.txt"))
    assert (s.name, s.umask, s.state, s.tgid, s.pid, s.ppid) == ("a) b (c", 0o22, "R", 5913, 5913, 5910)
    assert s.uid == (0, 0, 0, 0) and s.gid == (0, 0, 0, 0) and s.groups == ()
    assert s.ns_pid == (5913,) and s.ns_tgid == (5913,) and s.ns_sid == (2434,) and s.threads == 1
    stat = parse_stat(sample("stat.txt"))
    assert s.sig_q[1] > 0 and s.sig_ign == stat.sigignore == 0x1001000 and s.sig_cgt == stat.sigcatch == 2
    assert s.cap_eff == s.cap_prm == 0x1FFFEFFFFFF and s.cap_amb == 0
    assert s.no_new_privs == 0 and s.seccomp == 0 and s.raw["Cpus_allowed_list"]


def test_status_escapes_groups_and_namespaces() -> None:
    s = parse_status(
        "Name:\t x\\\\y\\nz\tw \n"
        "State:\tt (tracing stop)\n"
        "Uid:\t1000\t1001\t1002\t1003\n"
        "Groups:\t4 24 27 \n"
        "NStgid:\t812\t1\nNSpid:\t813\t2\n"
        "SigQ:\t3/1024\nSigBlk:\tfffffffe7ffbfeff\nTracerPid:\t77\n"
    )
    assert s.name == " x\\y\nz\tw " and s.state == "t" and s.tracer_pid == 77
    assert s.uid == (1000, 1001, 1002, 1003) and s.groups == (4, 24, 27)
    assert s.ns_tgid == (812, 1) and s.ns_pid == (813, 2) and s.sig_q == (3, 1024)
    assert s.sig_blk == 0xFFFFFFFE7FFBFEFF


@pytest.mark.parametrize(
    "text", ["", "garbage\n", "Name:\tkthreadd\nUid:\t0 0\nSigQ:\t1\nThreads:\tmany\nUmask:\t9z\nState:\n"]
)
def test_status_missing_or_bad_keys_get_defaults(text: str) -> None:
    s = parse_status(text)
    assert s.umask is None and s.uid == (0, 0, 0, 0) and s.sig_q == (0, 0)
    assert s.threads == 0 and s.groups == () and s.ns_pid == () and s.state == ""


# ------------------------------------------------------------------- fdinfo


def test_fdinfo_samples() -> None:
    reg = parse_fdinfo(sample("fdinfo_regular.txt"))
    assert (reg.pos, reg.flags, reg.mnt_id, reg.ino) == (3, os.O_CLOEXEC | 0o100000, 27, 612)
    assert reg.extra == {}

    ev = parse_fdinfo(sample("fdinfo_eventfd.txt"))
    assert ev.flags == os.O_CLOEXEC | os.O_RDWR and ev.extra["eventfd-count"] == "5"

    ep = parse_fdinfo(sample("fdinfo_epoll.txt"))
    tfds = ep.values("tfd")
    assert len(tfds) == 2 and tfds[0].startswith("5 events:") and ep.extra["tfd"] == tfds[0]
    assert [k for k, _ in ep.lines] == ["pos", "flags", "mnt_id", "ino", "tfd", "tfd"]

    ino = parse_fdinfo(sample("fdinfo_inotify.txt"))
    assert ino.values("inotify")[0].startswith("wd:1 ino:")

    tfd = parse_fdinfo(sample("fdinfo_timerfd.txt"))
    assert tfd.extra["settime flags"] == "00" and tfd.extra["it_value"] == "(0, 0)"

    sig = parse_fdinfo(sample("fdinfo_signalfd.txt"))
    assert int(sig.extra["sigmask"], 16) == 1 << 9


def test_fdinfo_minimal_and_malformed() -> None:
    fi = parse_fdinfo(b"pos:\t7\nflags:\t0101\n")
    assert (fi.pos, fi.flags, fi.mnt_id, fi.ino) == (7, 0o101, 0, 0)
    for bad in ("", "flags:\t02\n", "pos:\t0\nflags:\t9\n"):
        with pytest.raises(ValueError):
            parse_fdinfo(bad)


# --------------------------------------------------------------------- auxv


def _auxv_bytes(pairs: list[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack("<QQ", k, v) for k, v in pairs)


def test_auxv_sample() -> None:
    data = (SAMPLES / "auxv.bin").read_bytes()
    pairs = parse_auxv(data)
    assert dict(pairs)[AT_PAGESZ] == PAGE and all(k != 0 for k, _ in pairs)
    assert len(pairs) == len(data) // 16 - 1


def test_auxv_trailing_garbage_and_bad_length() -> None:
    data = _auxv_bytes([(6, 4096), (0, 0), (99, 1)])
    assert parse_auxv(data) == [(6, 4096)]
    assert parse_auxv(b"") == []
    with pytest.raises(ValueError):
        parse_auxv(data + b"\0")


# ------------------------------------------------------------------ pagemap


def naive_runs(entries: list[int], first: int, anon_only: bool) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i, e in enumerate(entries):
        marker = e & (PM_PRESENT | PM_SWAP) == PM_SWAP and e & 0x1F == 31   # a PTE marker
        keep = bool(e & (PM_PRESENT | PM_SWAP)) and not (anon_only and e & PM_FILE) and not marker
        if keep and runs and runs[-1][0] + runs[-1][1] * PAGE == first + i * PAGE:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        elif keep:
            runs.append((first + i * PAGE, 1))
    return runs


_entry = st.builds(
    lambda flags, pfn: flags | pfn,
    st.sampled_from([0, PM_PRESENT, PM_SWAP, PM_PRESENT | PM_FILE, PM_SWAP | PM_FILE, PM_SOFT_DIRTY, PM_FILE]).flatmap(
        lambda f: st.sampled_from([f, f | PM_MMAP_EXCLUSIVE])
    ),
    st.integers(0, 2**55 - 1),
)


@given(entries=st.lists(_entry, max_size=300), first=st.integers(0, 2**35), anon_only=st.booleans())
def test_page_runs_matches_naive(entries: list[int], first: int, anon_only: bool) -> None:
    data = struct.pack(f"<{len(entries)}Q", *entries)
    assert page_runs(data, first * PAGE, anon_only=anon_only) == naive_runs(entries, first * PAGE, anon_only)


def test_pte_markers_are_not_pages() -> None:
    """A write tracker's marks in empty slots read as swap entries of type 31:
    not pages; a real swap entry (type 0) is one."""
    from linuxcr.procfs.pagemap import marker_runs
    marker = PM_SWAP | (1 << 5) | 31
    real = PM_SWAP | (7 << 5) | 0
    data = struct.pack("<4Q", marker, real, marker, PM_PRESENT | 31)
    assert page_runs(data, 0) == [(PAGE, 1), (3 * PAGE, 1)]
    assert marker_runs(data, 0) == [(0, 1), (2 * PAGE, 1)]


def test_page_runs_edges() -> None:
    assert page_runs(b"", 0) == []
    with pytest.raises(ValueError):
        page_runs(b"\0" * 12, 0)
    full = np.full(4, PM_PRESENT, dtype="<u8").tobytes()
    assert page_runs(full, 0xFFFFFFFFFF600000) == [(0xFFFFFFFFFF600000, 4)]
    assert page_runs(full, 0x10000, page_size=2 << 20) == [(0x10000, 4)]


def test_page_runs_is_fast_on_one_gib() -> None:
    entries = np.full(262144, PM_PRESENT, dtype="<u8")
    entries[::1000] = 0
    data = entries.tobytes()
    t = time.perf_counter()
    runs = page_runs(data, 0x7F0000000000, anon_only=True)
    assert time.perf_counter() - t < 0.05
    assert len(runs) == 263 and sum(n for _, n in runs) == 262144 - 263


@given(
    runs=st.lists(st.tuples(st.integers(0, 2**30), st.integers(1, 100)), max_size=20),
    max_pages=st.integers(1, 40),
)
def test_split_runs_bounds_and_covers(runs: list[tuple[int, int]], max_pages: int) -> None:
    runs = [(a * PAGE, n) for a, n in runs]
    out = split_runs(runs, max_pages)
    assert all(1 <= n <= max_pages for _, n in out)

    def pages(rs: list[tuple[int, int]]) -> list[int]:
        return [a + i * PAGE for a, n in rs for i in range(n)]

    assert pages(out) == pages(runs)


def test_split_runs_rejects_zero() -> None:
    with pytest.raises(ValueError):
        split_runs([(0, 1)], 0)


def test_pagemap_live_private_and_shared_anon() -> None:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    with mmap.mmap(-1, 16 * PAGE, flags=flags) as priv, mmap.mmap(-1, 16 * PAGE) as shared:
        for buf in (priv, shared):
            for page in (0, 1, 2, 5):
                buf[page * PAGE] = 1
        a, b = buffer_address(priv), buffer_address(shared)
        expected = [(a, 3), (a + 5 * PAGE, 1)]
        with PagemapReader(os.getpid()) as reader:
            assert reader.runs(a, a + 16 * PAGE) == expected
            assert reader.runs(a, a + 16 * PAGE, anon_only=True) == expected
            assert reader.runs(a, a + 16 * PAGE, chunk_pages=2) == expected  # merged across chunks
            assert reader.runs(b, b + 16 * PAGE) == [(b, 3), (b + 5 * PAGE, 1)]
            assert reader.runs(b, b + 16 * PAGE, anon_only=True) == []  # shmem: PM_FILE set
        assert reader.fd == -1


def test_read_pagemap_touched_bytearray() -> None:
    buf = bytearray(8 * PAGE)
    buf[::PAGE] = b"\1" * 8
    addr = buffer_address(buf)
    first = addr - addr % PAGE
    data = read_pagemap(os.getpid(), first, addr + len(buf))
    assert len(data) % 8 == 0
    runs = page_runs(data, first)
    assert any(s <= addr and addr + len(buf) <= s + n * PAGE for s, n in runs)
    assert read_pagemap(os.getpid(), 0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000) == b""  # past TASK_SIZE


# --------------------------------------------------------------------- live


def test_live_maps_smaps_stat_status() -> None:
    pid = os.getpid()
    maps = read_maps(pid)
    assert any(e.path == "[stack]" for e in maps)
    assert all(a.end <= b.start for a, b in zip(maps, maps[1:]))
    smaps = read_smaps(pid)
    assert len(smaps) >= len(maps) - 5 and all("Rss" in s.fields for s in smaps)
    st_, status = read_stat(pid), read_status(pid)
    assert st_.pid == status.pid == status.tgid == pid and st_.ppid == status.ppid == os.getppid()
    assert st_.state == status.state == "R" and status.uid[0] == os.getuid()
    assert any(e.start <= st_.start_stack < e.end and e.path == "[stack]" for e in maps)


def test_live_fds_and_auxv(tmp_path: Path) -> None:
    pid = os.getpid()
    path = tmp_path / "with space (x)"
    path.write_bytes(b"hello")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 2)
        assert fd in list_fds(pid) and list_fds(pid) == sorted(list_fds(pid))
        assert read_fd_link(pid, fd) == str(path)
        info = read_fdinfo(pid, fd)
        assert info.pos == 2 and info.flags & 0o3 == os.O_RDONLY and info.ino == os.fstat(fd).st_ino
    finally:
        os.close(fd)
    raw = read_auxv(pid)
    assert raw.endswith(b"\0" * 16) and len(raw) % 16 == 0
    vdso = next(e for e in read_maps(pid) if e.path == "[vdso]")
    assert dict(parse_auxv(raw))[AT_SYSINFO_EHDR] == vdso.start


def test_read_missing_pid_raises_builtin() -> None:
    pid = next(p for p in range(2**22, 2**22 - 1000, -1) if not os.path.exists(f"/proc/{p}"))
    for reader in (read_maps, read_smaps, read_stat, read_status, read_auxv, list_fds):
        with pytest.raises(FileNotFoundError):
            reader(pid)
    with pytest.raises(FileNotFoundError):
        read_pagemap(pid, 0, PAGE)


@settings(max_examples=20, deadline=None)
@given(st.binary(max_size=200))
def test_parsers_never_crash_unexpectedly(blob: bytes) -> None:
    parse_status(blob)
    for parse in (parse_maps, parse_smaps, parse_stat, parse_fdinfo):
        try:
            parse(blob)
        except ValueError:
            pass
