"""Unit tests for the image stream: round trips and every way an image can be bad.

Images here are synthetic (built with ImageWriter from hand-made records); the
property tests on a real checkpoint are in test_image_fuzz.py.  The reader is
fed through a memfd (or a pipe), as `lcr restart -` would be.
"""
from __future__ import annotations

import os
import platform
import random
import struct
import threading
import tracemalloc
from pathlib import Path

import msgspec
import pytest
import xxhash
import zstandard

from linuxcr.engine.restore import validate_task, validate_tree
from linuxcr.errors import ImageError, ImageWriteError, LcrError
from linuxcr.image import schema
from linuxcr.image.schema import (
    ARCH, FORMAT_VERSION, FRAME, FRAME_MAGIC, MAGIC, MAX_DATA, MAX_META, MAX_TASKS,
    Creds, FileDesc, Header, MmFields, OpenFile, Pages, PendingSignal, PipeData, RecType, Rlimit,
    ShmObject, SigAction, Task, Trailer, Tree, Vma, Zombie,
)
from linuxcr.image.show import render_text, summarize
from linuxcr.image.stream import PAGE, ImageReader, ImageWriter

pytestmark = pytest.mark.skipif(platform.machine() != ARCH, reason="images are x86_64 only")

PID = 4242
BASE = 0x7F0000000000
# user_regs_struct: every register distinct, segments and bases as the kernel wants them
REGS = struct.pack("<27Q", *range(0x1000, 0x1000 + 16), 0x555555555123, 0x33, 0x246,
                   0x7FFFFFFFE000, 0x2B, 0x7FFFF7D8E740, 0, 0, 0, 0, 0)


# ------------------------------------------------------------------ builders


def make_header(**kw) -> Header:
    d = dict(magic=MAGIC, version=FORMAT_VERSION, arch=ARCH, kernel="6.8.0-test", page_size=PAGE,
             created=1_700_000_000.5, hostname="testhost", tool="linuxcr 0.1.0", xfeatures=0x2E7,
             xstate_size=2696, root_pid=PID, flags=["compressed"])
    d.update(kw)
    return Header(**d)


def make_task(pid: int = PID, **kw) -> Task:
    vmas = [
        Vma(start=0x555555554000, end=0x555555556000, prot=5, shared=False, kind="file",
            path="/usr/bin/prog", offset=0, vmflags=["rd", "ex", "mr", "mw", "me"]),
        Vma(start=0x555555556000, end=0x555555557000, prot=3, shared=False, kind="file",
            path="/usr/bin/prog", offset=0x2000, vmflags=["rd", "wr"], pages=True),
        Vma(start=0x555555560000, end=0x555555581000, prot=3, shared=False, kind="anon",
            name="[heap]", pages=True),
        Vma(start=BASE, end=BASE + 8 * PAGE, prot=3, shared=False, kind="anon", pages=True),
        Vma(start=BASE + 16 * PAGE, end=BASE + 20 * PAGE, prot=3, shared=True, kind="shmem",
            pages=True, shm=5),
        Vma(start=0x7FFFF7FC1000, end=0x7FFFF7FC5000, prot=1, shared=False, kind="vvar",
            name="[vvar]"),
        Vma(start=0x7FFFF7FC5000, end=0x7FFFF7FC7000, prot=5, shared=False, kind="vdso",
            name="[vdso]"),
        Vma(start=0x7FFFFFFDE000, end=0x7FFFFFFFF000, prot=3, shared=False, kind="anon",
            name="[stack]", vmflags=["gd"], pages=True),
    ]
    files = [
        OpenFile(fd=0, fid=0, cloexec=False),
        OpenFile(fd=1, fid=1, cloexec=False),
        OpenFile(fd=2, fid=1, cloexec=False),
        OpenFile(fd=3, fid=2, cloexec=True),
        OpenFile(fd=7, fid=3, cloexec=True),
        OpenFile(fd=9, fid=4, cloexec=False),
    ]
    d = dict(
        pid=pid, tid=pid, ppid=1, pgid=pid, sid=pid, comm="prog", cwd="/tmp", root="/",
        creds=Creds(uid=[1000, 1000, 1000, 1000], gid=[100, 100, 100, 100], groups=[100, 27, 4]),
        umask=0o022, personality=0,
        rlimits=[Rlimit(resource=r, soft=r * 10, hard=(1 << 64) - 1 if r != 7 else 1 << 20)
                 for r in range(16)],
        mm=MmFields(start_code=0x555555554000, end_code=0x555555556000,
                    start_data=0x555555556000, end_data=0x555555557000,
                    start_brk=0x555555560000, brk=0x555555581000, start_stack=0x7FFFFFFFE000,
                    arg_start=0x7FFFFFFFE100, arg_end=0x7FFFFFFFE110, env_start=0x7FFFFFFFE110,
                    env_end=0x7FFFFFFFEFF0, auxv=bytes(range(256)) * 2, exe="/usr/bin/prog"),
        vmas=vmas, files=files,
        regs=REGS, xstate=bytes(i % 251 for i in range(2696)),
        sigmask=1 << 9 | 1 << 63,
        sigactions=[SigAction(sig=s, handler=0x555555555100 + s, flags=0x04000000, restorer=0x7FFFF7E00000,
                              mask=1 << (s - 1)) for s in (1, 2, 10, 15, 64)],
        pending=[PendingSignal(shared=False, siginfo=b"\x0a" + bytes(127)),
                 PendingSignal(shared=True, siginfo=b"\x22\0\0\0" + bytes(range(4, 128)))],
        altstack=[0x7FFFF0000000, 0, 8192], rseq=[BASE + 0x9E0, 32, 0x53053053],
        robust_list=[0x7FFFF7D8E9A0, 24], tid_address=0x7FFFF7D8E990,
    )
    d.update(kw)
    if "rseq" not in kw and not any(v.start <= BASE < v.end for v in d["vmas"]):
        d["rseq"] = []      # the rseq area must be in writable memory of the task
    return Task(**d)


def make_tree(root: int = PID, **kw) -> Tree:
    d = dict(
        root=root,
        files=[
            FileDesc(fid=0, kind="chr", path="/dev/null", flags=0o100000),
            FileDesc(fid=1, kind="chr", path="/dev/null", flags=0o100001),
            FileDesc(fid=2, kind="reg", path="/tmp/data file \u00e9", flags=0o2, pos=1 << 40 | 7),
            FileDesc(fid=3, kind="dir", path="/", flags=0o200000, pos=(1 << 63) - 1),
            FileDesc(fid=4, kind="pipe", flags=0o0, pipe=77),
        ],
        pipes=[PipeData(ino=77, size=65536, data=b"unread bytes")],
        shm=[ShmObject(id=5, size=4 * PAGE)],
        zombies=[Zombie(pid=root + 1, vpid=root + 1, ppid=root, status=0x100)],
    )
    d.update(kw)
    return Tree(**d)


def page_runs(seed: int = 1) -> list[tuple[int, bytes]]:
    """(address, data) runs: incompressible ones and compressible ones."""
    rnd = random.Random(seed)
    return [
        (BASE, rnd.randbytes(2 * PAGE)),                         # stays raw even when compressing
        (BASE + 2 * PAGE, bytes(3 * PAGE)),                      # zeros: compresses well
        (BASE + 5 * PAGE, (b"hello, pages " * 1000)[:PAGE]),     # text
        (BASE + 16 * PAGE, rnd.randbytes(PAGE) + bytes(PAGE)),   # half and half
    ]


def write_image(fd: int, *, compress: bool = True, task: Task | None = None,
                runs: list[tuple[int, bytes]] | None = None, header: Header | None = None,
                tree: Tree | None = None) -> ImageWriter:
    w = ImageWriter(fd, compress=compress, name="test image")
    w.header(header or make_header(flags=["compressed"] if compress else []))
    w.record(RecType.TREE, tree or make_tree())
    w.record(RecType.TASK, task or make_task())
    for addr, data in (page_runs() if runs is None else runs):
        w.page_run(PID, addr, memoryview(data))
    w.finish()
    return w


def image_bytes(**kw) -> bytes:
    fd = os.memfd_create("img", os.MFD_CLOEXEC)
    try:
        write_image(fd, **kw)
        os.lseek(fd, 0, os.SEEK_SET)
        return _read_fd(fd)
    finally:
        os.close(fd)


def small_image() -> bytes:
    """A complete image of a few KiB: header, a small task, two tiny page runs."""
    task = make_task(vmas=[Vma(start=BASE, end=BASE + 4 * PAGE, prot=3, shared=False, kind="anon",
                               pages=True)],
                     files=[], rlimits=[], sigactions=[], pending=[], xstate=b"\x01" * 64,
                     mm=MmFields(start_code=0, end_code=0, start_data=0, end_data=0, start_brk=0, brk=0,
                                 start_stack=0, arg_start=0, arg_end=0, env_start=0, env_end=0,
                                 auxv=b"", exe="/bin/x"))
    runs = [(BASE, random.Random(7).randbytes(PAGE)), (BASE + PAGE, bytes(2 * PAGE))]
    return image_bytes(task=task, runs=runs, compress=True, tree=Tree(root=PID))


def _read_fd(fd: int) -> bytes:
    out = []
    while chunk := os.read(fd, 1 << 20):
        out.append(chunk)
    return b"".join(out)


def memfd_of(data: bytes) -> int:
    fd = os.memfd_create("img", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_image(data: bytes) -> tuple[Header, list]:
    """Read an image completely (header, records, trailer, end); (header, [(type, meta, data)])."""
    fd = memfd_of(data)
    try:
        r = ImageReader(fd, name="test image")
        header = r.read_header()
        recs = []
        while not r.done:
            rec = r.next()
            recs.append((rec.type, rec.meta, bytes(rec.data)))
        r.expect_end()
        return header, recs
    finally:
        os.close(fd)


def read_error(data: bytes) -> ImageError:
    with pytest.raises(ImageError) as ei:
        read_image(data)
    assert type(ei.value) is ImageError
    msg = str(ei.value)
    assert msg.isprintable(), msg          # one line, no terminal escapes: the CLI prints it
    return ei.value


def split_records(data: bytes) -> list[bytes]:
    """The raw records (frame + meta + data) of a well-formed image."""
    out, off = [], 0
    while off < len(data):
        _m, _t, _f, meta_len, _p, data_len, _cs = FRAME.unpack_from(data, off)
        end = off + FRAME.size + meta_len + data_len
        out.append(data[off:end])
        off = end
    assert off == len(data)
    return out


def raw_record(rtype: int, meta: bytes, data: bytes = b"", *, flags: int = 0, pad: int = 0,
               meta_len: int | None = None, data_len: int | None = None, cs: int | None = None) -> bytes:
    """One record with every frame field under control (checksum right unless given)."""
    if cs is None:
        cs = xxhash.xxh3_64_intdigest(meta + data)
    return FRAME.pack(FRAME_MAGIC, rtype, flags, len(meta) if meta_len is None else meta_len, pad,
                      len(data) if data_len is None else data_len, cs) + meta + data


def hostile(records: list[tuple[int, object, bytes]], *, trailer: bool = True) -> bytes:
    """A well-framed image (checksums and trailer right) of arbitrary records, the
    way a hostile writer would make it: metadata are Structs, dicts or raw bytes."""
    out, digest, pages = [], xxhash.xxh3_64(), 0
    for rtype, meta, data in records:
        m = meta if isinstance(meta, bytes) else schema.ENCODER.encode(meta)
        rec = raw_record(int(rtype), m, data)
        out.append(rec)
        digest.update(rec[24:32])
        if isinstance(meta, Pages):
            pages += meta.npages
    if trailer:
        t = Trailer(records=len(records), pages=pages, digest=digest.intdigest())
        out.append(raw_record(RecType.TRAILER, schema.ENCODER.encode(t)))
    return b"".join(out)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip_every_field(compress: bool) -> None:
    task, tree = make_task(), make_tree()
    validate_tree(tree, [task])               # the synthetic tree is a plausible one
    data = image_bytes(compress=compress, task=task, tree=tree)
    header, recs = read_image(data)
    assert header == make_header(flags=["compressed"] if compress else [])
    assert msgspec.structs.asdict(header) == msgspec.structs.asdict(make_header(
        flags=["compressed"] if compress else []))
    types = [t for t, _m, _d in recs]
    assert types == [RecType.TREE, RecType.TASK] + [RecType.PAGES] * len(page_runs()) + [RecType.TRAILER]
    got_tree, got_task = recs[0][1], recs[1][1]
    assert got_tree == tree and got_task == task
    assert msgspec.structs.asdict(got_task) == msgspec.structs.asdict(task)
    assert got_tree.files[2].path == "/tmp/data file \u00e9" and got_tree.files[2].pos == 1 << 40 | 7
    assert got_tree.pipes[0].data == b"unread bytes" and got_tree.zombies[0].status == 0x100
    assert got_task.rlimits[0].hard == (1 << 64) - 1
    validate_tree(got_tree, [got_task])
    pages = [(m, d) for t, m, d in recs if t is RecType.PAGES]
    for (meta, d), (addr, want) in zip(pages, page_runs(), strict=True):
        assert meta.pid == PID and meta.addr == addr and meta.npages == len(want) // PAGE
        assert d == want                       # byte-exact, compressed or not
    flags = [m.compressed for m, _d in pages]
    if compress:
        assert flags == [False, True, True, True]   # random data is stored raw
    else:
        assert not any(flags)
    trailer = recs[-1][1]
    assert trailer.records == 1 + 2 + len(page_runs())
    assert trailer.pages == sum(len(d) for _a, d in page_runs()) // PAGE


def test_compression_shrinks_and_counts() -> None:
    raw, packed = image_bytes(compress=False), image_bytes(compress=True)
    assert len(packed) < len(raw) - 4 * PAGE
    fd = os.memfd_create("img", os.MFD_CLOEXEC)
    try:
        w = write_image(fd)
        assert w.bytes_written == os.fstat(fd).st_size == len(packed)
        assert w.records == 1 + 2 + len(page_runs()) + 1   # the trailer too
        assert w.pages == 8
    finally:
        os.close(fd)


def test_reader_counts_and_offset() -> None:
    data = image_bytes()
    fd = memfd_of(data)
    try:
        r = ImageReader(fd)
        r.read_header()
        while not r.done:
            r.next()
        r.expect_end()
        assert r.offset == len(data)
        assert r.records == 1 + 2 + len(page_runs())
        assert r.pages == 8 and r.tasks == 1
        with pytest.raises(ImageError, match="after the trailer"):
            r.next()
    finally:
        os.close(fd)


def test_large_page_run_round_trips() -> None:
    """A run bigger than the reader's initial buffers and than a pipe."""
    big = random.Random(3).randbytes(1 << 20) + bytes(3 << 20)
    runs = [(BASE, big), (BASE + len(big), big[:PAGE])]
    _h, recs = read_image(image_bytes(runs=runs, compress=False))
    assert [d for t, _m, d in recs if t is RecType.PAGES] == [big, big[:PAGE]]
    _h, recs = read_image(image_bytes(runs=runs, compress=True))
    assert [d for t, _m, d in recs if t is RecType.PAGES] == [big, big[:PAGE]]


def test_writer_on_a_pipe_with_reader_thread() -> None:
    runs = [(BASE + i * 64 * PAGE, random.Random(i).randbytes(PAGE) * 64) for i in range(8)]
    r_fd, w_fd = os.pipe()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            write_image(w_fd, runs=runs, compress=True)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            os.close(w_fd)

    th = threading.Thread(target=writer)
    th.start()
    try:
        r = ImageReader(r_fd, name="pipe")
        header = r.read_header()
        got = []
        while not r.done:
            rec = r.next()
            if rec.type is RecType.PAGES:
                got.append((rec.meta.addr, bytes(rec.data)))
        r.expect_end()
    finally:
        th.join()
        os.close(r_fd)
    assert not errors
    assert header.root_pid == PID
    assert got == runs


def test_show_summarize_and_render() -> None:
    fd = memfd_of(image_bytes())
    try:
        s = summarize(fd, "app.img")
    finally:
        os.close(fd)
    assert s["image"] == "app.img"
    assert s["header"]["magic"] == "LINUXCR" and s["header"]["version"] == FORMAT_VERSION
    assert s["total_pages"] == 8 and s["image_bytes"] == len(image_bytes())
    (t,) = s["tasks"]
    assert t["pid"] == PID and t["pages"] == 8 and t["regs"] == "<216 bytes>"
    assert t["pending"][0] == {"shared": False, "signo": 10}
    text = render_text(s)
    assert text.startswith(f"app.img: linuxcr image v{FORMAT_VERSION}, x86_64, kernel 6.8.0-test")
    assert "compressed" in text.splitlines()[1]
    assert f"task pid {PID} (prog) ppid 1" in text
    assert "uid 1000" in text and "8 memory areas, 8 pages saved" in text
    assert "6 open files, 1 thread" in text
    assert "fd 1   chr  /dev/null flags O_WRONLY" in text and "fd 2   chr  /dev/null" in text
    assert "fd 9   pipe pipe:[77]" in text and "(file #4)" in text
    assert s["tree"]["pipes"][0]["data"] == "<12 bytes>"
    assert "signals: 5 handlers" in text and "2 pending" in text
    msgspec.json.encode(s)   # --json output is plain data


def test_show_refuses_data_after_trailer() -> None:
    fd = memfd_of(image_bytes() + b"\0")
    try:
        with pytest.raises(ImageError, match="after the trailer"):
            summarize(fd, "app.img")
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the header


def test_empty_image() -> None:
    assert "empty" in str(read_error(b""))


@pytest.mark.parametrize("junk", [
    b"hello",                                          # shorter than a frame
    b"\x7fELF\x02\x01\x01" + bytes(100),               # a program
    b"not an image at all, just some text in a file\n" * 3,
    b"\x4c\x43\x43\x72" * 8 + bytes(100),              # frame magic everywhere, nonsense otherwise
])
def test_not_an_image(junk: bytes) -> None:
    e = read_error(junk)
    if junk.startswith(b"LCCr"):
        assert "corrupt" in str(e)
    else:
        assert "not a linuxcr image" in str(e)


def test_bad_header_magic() -> None:
    data = hostile([(RecType.HEADER, make_header(magic=b"LINUXCX\x00"), b""),
                    (RecType.TASK, make_task(), b"")])
    assert "magic" in str(read_error(data))


def test_first_record_not_a_header() -> None:
    data = hostile([(RecType.TASK, make_task(), b"")])
    assert "does not start with a header" in str(read_error(data))


def test_newer_version() -> None:
    data = image_bytes(header=make_header(version=FORMAT_VERSION + 1))
    e = read_error(data)
    assert f"version {FORMAT_VERSION + 1}" in str(e) and "newer" in str(e)


def test_newer_version_with_a_header_we_cannot_decode() -> None:
    """A future header has other fields: still 'newer version', not 'corrupt'."""
    future = msgspec.structs.asdict(make_header(version=FORMAT_VERSION + 1))
    future["compression"] = {"algo": "lz4"}
    del future["xstate_size"]
    data = hostile([(RecType.HEADER, future, b"")])
    e = read_error(data)
    assert f"version {FORMAT_VERSION + 1}" in str(e) and "corrupt" not in str(e)
    # the same header claiming our version is corrupt
    future["version"] = FORMAT_VERSION
    assert "corrupt" in str(read_error(hostile([(RecType.HEADER, future, b"")])))


@pytest.mark.parametrize("extra", [
    b"\x91" * 200_000 + b"\x00",          # skipped recursively when peeking at the version
    b"\xc1",                              # not msgpack
])
def test_undecodable_header_with_unknown_field(extra: bytes) -> None:
    d = msgspec.structs.asdict(make_header(version=FORMAT_VERSION + 1))
    meta = bytearray(msgspec.msgpack.encode(d))
    assert meta[0] == 0x80 | len(d)
    meta = bytes([meta[0] + 1]) + b"\xa5extra" + extra + bytes(meta[1:])
    e = read_error(hostile([(RecType.HEADER, meta, b"")]))
    assert "corrupt" in str(e) or "version" in str(e)


def test_wrong_arch() -> None:
    e = read_error(image_bytes(header=make_header(arch="aarch64")))
    assert "aarch64" in str(e) and platform.machine() in str(e)


@pytest.mark.parametrize("text", ["x\ny", "\x1b]0;owned\x07", "a\u2028b", "\r\x00"])
def test_image_text_in_messages_is_escaped(text: str) -> None:
    """Messages quote the image (unknown field names, the arch): one line still."""
    e = read_error(image_bytes(header=make_header(arch=text)))
    assert ("was made on" if "\0" not in text else "holds a NUL character") in str(e)
    assert str(e).isprintable()
    d = msgspec.msgpack.decode(schema.ENCODER.encode(make_task()))
    d[text] = 1
    e = read_error(hostile(hdr_task()[:1] + [(RecType.TASK, d, b"")]))
    assert "unknown field" in str(e)


def test_wrong_page_size() -> None:
    e = read_error(image_bytes(header=make_header(page_size=65536)))
    assert "65536-byte pages" in str(e) and str(PAGE) in str(e)


# ------------------------------------------------------------------ truncation and corruption


def test_truncated_at_every_offset() -> None:
    data = small_image()
    assert len(data) < 8192
    read_image(data)
    for n in range(len(data)):
        e = read_error(data[:n])
        msg = str(e)
        if n == 0:
            assert "empty" in msg
        else:
            assert "truncated" in msg or "corrupt" in msg, (n, msg)


def test_truncated_at_record_boundary_says_no_trailer() -> None:
    data = small_image()
    recs = split_records(data)
    e = read_error(b"".join(recs[:-1]))
    assert "truncated" in str(e) and "without its trailer" in str(e)


@pytest.mark.parametrize("xor", [0xFF, 0x01, 0x80])
def test_flipped_byte_at_every_offset(xor: int) -> None:
    data = small_image()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= xor
        e = read_error(bytes(bad))
        if i >= 4:   # past the first frame magic every message says the image is damaged
            assert "corrupt" in str(e) or "truncated" in str(e), (i, str(e))


def test_reserved_frame_fields_must_be_zero() -> None:
    """flags and pad are not covered by the checksum: they must be checked."""
    data = small_image()
    recs = split_records(data)
    for idx in range(len(recs)):
        for field_off in (6, 7, 12, 13, 14, 15):
            bad = [bytearray(r) for r in recs]
            bad[idx][field_off] ^= 0x10
            assert "reserved" in str(read_error(b"".join(bytes(r) for r in bad)))


def test_checksum_and_length_fields() -> None:
    data = small_image()
    recs = split_records(data)
    for idx, rec in enumerate(recs):
        _m, rtype, _f, meta_len, _p, data_len, cs = FRAME.unpack_from(rec)
        body = rec[FRAME.size:]
        variants = {
            "checksum": FRAME.pack(FRAME_MAGIC, rtype, 0, meta_len, 0, data_len, cs ^ 1),
            "meta_len-1": FRAME.pack(FRAME_MAGIC, rtype, 0, meta_len - 1, 0, data_len, cs),
            "meta_len+1": FRAME.pack(FRAME_MAGIC, rtype, 0, meta_len + 1, 0, data_len, cs),
            "data_len+1": FRAME.pack(FRAME_MAGIC, rtype, 0, meta_len, 0, data_len + 1, cs),
        }
        if data_len:
            variants["data_len-1"] = FRAME.pack(FRAME_MAGIC, rtype, 0, meta_len, 0, data_len - 1, cs)
        for what, frame in variants.items():
            bad = b"".join(recs[:idx]) + frame + body + b"".join(recs[idx + 1:])
            msg = str(read_error(bad))
            assert "corrupt" in msg or "truncated" in msg, (idx, what, msg)


def test_records_reordered_duplicated_dropped() -> None:
    data = image_bytes()
    recs = split_records(data)       # header, tree, task, 4 pages, trailer
    assert len(recs) == 8
    h, tree, task, p1, p2, p3, p4, tr = recs
    cases = {
        "swap pages": [h, tree, task, p2, p1, p3, p4, tr],
        "duplicate pages": [h, tree, task, p1, p2, p2, p3, p4, tr],
        "drop pages": [h, tree, task, p1, p3, p4, tr],
        "drop last pages": [h, tree, task, p1, p2, p3, tr],
        "duplicate task": [h, tree, task, task, p1, p2, p3, p4, tr],
        "drop task": [h, tree, p1, p2, p3, p4, tr],
        "drop tree": [h, task, p1, p2, p3, p4, tr],
        "swap tree and task": [h, task, tree, p1, p2, p3, p4, tr],
        "duplicate tree": [h, tree, tree, task, p1, p2, p3, p4, tr],
        "pages before task": [h, tree, p1, task, p2, p3, p4, tr],
    }
    for what, parts in cases.items():
        e = read_error(b"".join(parts))
        assert "trailer does not match" in str(e), (what, str(e))
    assert "second header" in str(read_error(b"".join([h, tree, task, h, p1, p2, p3, p4, tr])))
    assert "without its trailer" in str(read_error(b"".join([h, tree, task, p1, p2, p3, p4])))
    # the trailer of another image does not fit
    other = split_records(image_bytes(runs=page_runs(seed=2)))
    assert "trailer does not match" in str(read_error(b"".join([h, tree, task, p1, p2, p3, p4, other[-1]])))


def test_data_after_trailer() -> None:
    data = image_bytes()
    for extra in (b"\0", b"x" * 100, split_records(data)[-1], data):
        assert "data after the trailer" in str(read_error(data + extra))


def test_huge_data_len_is_refused_before_allocating() -> None:
    head = split_records(small_image())[:2]
    meta = schema.ENCODER.encode(Pages(pid=PID, addr=BASE, npages=1))
    for data_len in (MAX_DATA + 1, 1 << 40, (1 << 64) - 1):
        bad = b"".join(head) + raw_record(RecType.PAGES, meta, b"", data_len=data_len)
        tracemalloc.start()
        try:
            e = read_error(bad)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert f"data length {data_len}" in str(e)
        assert peak < 4 << 20, peak
    # data on a record that takes none
    bad = b"".join(head[:1]) + raw_record(RecType.TASK, schema.ENCODER.encode(make_task()), b"x")
    assert "not allowed for a TASK record" in str(read_error(bad))


def test_huge_meta_len_is_refused_before_allocating() -> None:
    head = split_records(small_image())[:1]
    for meta_len in (MAX_META + 1, (1 << 32) - 1):
        bad = b"".join(head) + raw_record(RecType.TASK, b"", meta_len=meta_len)
        tracemalloc.start()
        try:
            e = read_error(bad)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert f"metadata length {meta_len} exceeds" in str(e)
        assert peak < 4 << 20, peak


def test_allowed_but_absent_lengths_end_as_truncated() -> None:
    """Lengths within the limits but past the end: bounded allocation, clean error."""
    head = split_records(small_image())[:2]
    meta = schema.ENCODER.encode(Pages(pid=PID, addr=BASE, npages=1))
    for bad in (b"".join(head) + raw_record(RecType.PAGES, meta, b"", data_len=MAX_DATA),
                b"".join(head[:1]) + raw_record(RecType.TASK, b"", meta_len=MAX_META)):
        tracemalloc.start()
        try:
            e = read_error(bad)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert "truncated" in str(e)
        assert peak < MAX_META + MAX_DATA + (8 << 20)


def test_unknown_record_type() -> None:
    head = split_records(small_image())[:2]
    for rtype in (0, max(t for t in RecType if t != RecType.TRAILER) + 1, 14, 16, 0xFFFF):
        assert f"unknown record type {rtype}" in str(read_error(b"".join(head) + raw_record(rtype, b"\x80")))


# ------------------------------------------------------------------ hostile but well-framed records


def hdr_task() -> list:
    return [(RecType.HEADER, make_header(), b""), (RecType.TREE, make_tree(), b""),
            (RecType.TASK, make_task(), b"")]


def test_hostile_image_helper_makes_valid_images() -> None:
    data = hostile(hdr_task() + [(RecType.PAGES, Pages(pid=PID, addr=BASE, npages=1), bytes(PAGE))])
    _h, recs = read_image(data)
    assert [t for t, _m, _d in recs] == [RecType.TREE, RecType.TASK, RecType.PAGES, RecType.TRAILER]


@pytest.mark.parametrize("meta", [
    b"", b"\xc1", b"\x80", b"\x90", b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
    b"\x91" * 200_000 + b"\x01",          # deep nesting
    msgspec.msgpack.encode({"pid": 1}),
    msgspec.msgpack.encode([1, 2, 3]),
    b"\x81\xa3\xff\xfe\xfd\x01",       # a key that is not UTF-8 (msgspec: UnicodeDecodeError)
    b"\x81\xa4comm\xa2\xff\xfe",         # a value that is not UTF-8
    b"\x81\xa3pid\xd6\xff\x00\x00\x00\x01",  # a timestamp
])
def test_undecodable_metadata(meta: bytes) -> None:
    for rtype in (RecType.TASK, RecType.PAGES):
        e = read_error(hostile(hdr_task()[:1] + [(rtype, meta, b"")]))
        assert f"invalid {rtype.name} record" in str(e)


def _task_dict(**changes) -> dict:
    d = msgspec.msgpack.decode(schema.ENCODER.encode(make_task()))
    d.update(changes)
    return d


@pytest.mark.parametrize("changes", [
    {"pid": 0}, {"pid": 1 << 22 | 1}, {"pid": -1}, {"pid": "1"}, {"tid": 2 ** 64 - 1},
    {"comm": "x" * 5000}, {"regs": bytes(215)}, {"regs": bytes(217)}, {"xstate": bytes(70000)},
    {"umask": 0o1000}, {"altstack": [0] * 65}, {"rseq": [1] * 100_000},
    {"vmas": [{"start": 0}]}, {"creds": {"uid": [0] * 1000, "gid": [], "groups": []}},
    {"pending": [{"shared": True, "siginfo": b"short"}]}, {"sigactions": [{"sig": 65, "handler": 0,
                                                                          "flags": 0, "restorer": 0,
                                                                          "mask": 0}]},
    {"unknown_field": 1}, {"sigmask": -1}, {"sigmask": 1.5},
])
def test_out_of_bounds_task_fields(changes: dict) -> None:
    e = read_error(hostile(hdr_task()[:1] + [(RecType.TASK, _task_dict(**changes), b"")]))
    assert "invalid TASK record" in str(e)


def test_every_list_string_and_blob_in_the_schema_is_bounded() -> None:
    """msgpack decodes into objects ~8x its size: MAX_META alone is not a bound."""
    import msgspec.inspect as mi
    unbounded, seen = [], set()

    def walk(t, path: str) -> None:
        if isinstance(t, mi.StructType):
            if t.cls not in seen:
                seen.add(t.cls)
                for f in t.fields:
                    walk(f.type, f"{t.cls.__name__}.{f.name}")
        elif isinstance(t, mi.ListType):
            if t.max_length is None:
                unbounded.append(path)
            walk(t.item_type, path + "[]")
        elif isinstance(t, (mi.StrType, mi.BytesType)):
            if t.max_length is None:
                unbounded.append(path)
        elif isinstance(t, mi.UnionType):
            for x in t.types:
                walk(x, path)
        elif isinstance(t, (mi.DictType, mi.SetType, mi.TupleType, mi.VarTupleType, mi.AnyType)):
            unbounded.append(path)

    for cls in schema.META_TYPES.values():
        walk(mi.type_info(cls), cls.__name__)
    assert unbounded == []


def test_too_many_tasks() -> None:
    task = schema.ENCODER.encode(make_task(vmas=[], files=[], rlimits=[], sigactions=[], pending=[]))
    recs = [(RecType.HEADER, make_header(), b"")] + [(RecType.TASK, task, b"")] * (MAX_TASKS + 1)
    e = read_error(hostile(recs))
    assert f"more than {MAX_TASKS} task records" in str(e)


def test_second_header() -> None:
    e = read_error(hostile(hdr_task() + [(RecType.HEADER, make_header(), b"")]))
    assert "second header" in str(e)


@pytest.mark.parametrize("meta,data,what", [
    (Pages(pid=PID, addr=BASE, npages=2), bytes(PAGE), "holds 4096 bytes, expected 8192"),
    (Pages(pid=PID, addr=BASE, npages=1), bytes(PAGE + 1), "holds 4097 bytes"),
    (Pages(pid=PID, addr=BASE + 1, npages=1), bytes(PAGE), "not page aligned"),
    (Pages(pid=PID, addr=BASE, npages=1, compressed=True), b"", "do not decompress"),
    (Pages(pid=PID, addr=BASE, npages=1, compressed=True), b"\x28\xb5\x2f\xfd", "do not decompress"),
    (Pages(pid=PID, addr=BASE, npages=1, compressed=True), b"garbage" * 100, "do not decompress"),
    # a real zstd frame with more pages than the record claims
    (Pages(pid=PID, addr=BASE, npages=1, compressed=True),
     zstandard.ZstdCompressor().compress(bytes(8 * PAGE)), "declare 32768 bytes"),
    # fewer
    (Pages(pid=PID, addr=BASE, npages=2, compressed=True),
     zstandard.ZstdCompressor().compress(bytes(PAGE)), "declare 4096 bytes"),
    # no declared size and more output than the record claims
    (Pages(pid=PID, addr=BASE, npages=1, compressed=True),
     zstandard.ZstdCompressor(write_content_size=False).compress(bytes(3 * PAGE)), "do not decompress"),
    (Pages(pid=PID, addr=BASE, npages=2, compressed=True),
     zstandard.ZstdCompressor(write_content_size=False).compress(bytes(PAGE)), "holds 4096 bytes"),
])
def test_bad_pages_records(meta: Pages, data: bytes, what: str) -> None:
    e = read_error(hostile(hdr_task() + [(RecType.PAGES, meta, data)]))
    assert what in str(e)


def test_zstd_bomb_header_is_refused_without_allocating() -> None:
    """A zstd frame header may declare any content size; zstandard allocates what it says."""
    bomb = b"\x28\xb5\x2f\xfd" + bytes([0b11100000]) + (1 << 50).to_bytes(8, "little") + b"\x01\x00\x00"
    tracemalloc.start()
    try:
        e = read_error(hostile(hdr_task() + [(RecType.PAGES, Pages(pid=PID, addr=BASE, npages=1,
                                                                     compressed=True), bomb)]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"declare {1 << 50} bytes" in str(e)
    assert peak < 16 << 20


def test_show_survives_odd_but_valid_values() -> None:
    """Fields the schema accepts but that are odd: show must still render them."""
    for created in (float("nan"), float("inf"), -1e300, 1e300, 253402300800.0):
        task = make_task(vmas=[], files=[])
        data = hostile([(RecType.HEADER, make_header(created=created), b""), (RecType.TASK, task, b"")])
        fd = memfd_of(data)
        try:
            s = summarize(fd, "odd.img")
        finally:
            os.close(fd)
        text = render_text(s)
        assert "impossible time" in text and "uid 1000 " in text
    # a task without its four uids is no longer odd but corrupt (image/validate.py)
    task = make_task(creds=Creds(uid=[], gid=[], groups=[]), vmas=[], files=[])
    e = read_error(hostile([(RecType.HEADER, make_header(), b""), (RecType.TASK, task, b"")]))
    assert "creds.uid = <list of 0>: holds 0 items, not 4" in str(e)


def test_show_escapes_text_from_the_image() -> None:
    evil = "x\n\x1b]0;title\x07\x1b[2J"
    task = make_task(comm=evil, cwd="/" + evil, files=[OpenFile(fd=0, fid=0, cloexec=False)])
    tree = make_tree(files=[FileDesc(fid=0, kind=evil, path="/" + evil, flags=0)])
    data = hostile([(RecType.HEADER, make_header(hostname=evil, kernel=evil), b""),
                    (RecType.TREE, tree, b""), (RecType.TASK, task, b"")])
    fd = memfd_of(data)
    try:
        text = render_text(summarize(fd, "evil.img"))
    finally:
        os.close(fd)
    assert "\x1b" not in text and "\x07" not in text
    assert len(text.splitlines()) == len(render_text_lines_for(task))
    assert "x\\n\\x1b]0;title" in text


def render_text_lines_for(task: Task) -> list[str]:
    """The lines render_text makes: 2 + per task 2 + areas + 1 + files + 1."""
    return [""] * (2 + 2 + len(task.vmas) + 1 + len(task.files) + 1)


def test_validate_task_rejects_bad_layouts() -> None:
    v = dict(prot=3, shared=False, kind="anon")
    bad_tasks = [
        make_task(vmas=[Vma(start=BASE + 1, end=BASE + PAGE, **v)]),
        make_task(vmas=[Vma(start=BASE, end=BASE, **v)]),
        make_task(vmas=[Vma(start=BASE, end=BASE + 2 * PAGE, **v), Vma(start=BASE + PAGE, end=BASE + 3 * PAGE, **v)]),
        make_task(vmas=[Vma(start=BASE, end=1 << 63, **v)]),
        make_task(vmas=[Vma(start=BASE, end=BASE + PAGE, prot=3, shared=False, kind="hugetlb")]),
        make_task(vmas=[Vma(start=BASE, end=BASE + PAGE, prot=3, shared=False, kind="file", path="rel")]),
        make_task(files=[OpenFile(fd=1, fid=0, cloexec=False)] * 2),
        make_task(altstack=[0, 0]), make_task(robust_list=[]), make_task(rseq=[1, 2]),
        make_task(creds=Creds(uid=[0, 0, 0], gid=[0] * 4, groups=[])),
    ]
    for t in bad_tasks:
        with pytest.raises(ImageError):
            validate_task(t)


def test_validate_tree_rejects_bad_trees() -> None:
    task, child = make_task(), make_task(pid=PID + 7, ppid=PID)
    validate_tree(make_tree(), [task, child])
    bad = [
        (make_tree(root=PID + 1), [task]),
        (make_tree(), []),
        (make_tree(), [task, task]),
        (make_tree(), [task, make_task(pid=PID + 7, ppid=PID + 8)]),
        (make_tree(zombies=[Zombie(pid=9, vpid=9, ppid=12345, status=0)]), [task]),
        (make_tree(shm=[]), [task]),
        (make_tree(pipes=[]), [task]),
        (make_tree(files=make_tree().files[:4] + [FileDesc(fid=4, kind="reg", path="rel", flags=0)]), [task]),
        (make_tree(files=make_tree().files[:3]), [task]),     # fd 7 and 9 refer to missing files
    ]
    for tree, tasks in bad:
        with pytest.raises(ImageError):
            validate_tree(tree, tasks)


# ------------------------------------------------------------------ the writer


def test_writer_to_a_full_disk() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    fd = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(ImageWriteError) as ei:
            write_image(fd)
    finally:
        os.close(fd)
    assert "no space" in str(ei.value)
    assert ei.value.exit_code == 7 and isinstance(ei.value, LcrError)


def test_writer_to_a_closed_pipe() -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        with pytest.raises(ImageWriteError, match="broken pipe"):
            write_image(w)
    finally:
        os.close(w)


def test_writer_to_a_read_only_fd(tmp_path: Path) -> None:
    p = tmp_path / "ro"
    p.write_bytes(b"")
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(ImageWriteError, match="cannot write"):
            write_image(fd)
    finally:
        os.close(fd)


def test_reader_of_an_unreadable_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ImageError, match="cannot read"):
            ImageReader(fd, name="dir").read_header()
    finally:
        os.close(fd)
    r, w = os.pipe()
    os.close(r)
    try:
        with pytest.raises(ImageError, match="cannot read"):
            ImageReader(w, name="wrong end").read_header()
    finally:
        os.close(w)


def test_error_exit_code() -> None:
    e = read_error(b"junk" * 10)
    assert e.exit_code == 6
