"""Property tests: a real image, mutated every which way, read back.

A tiny real process is checkpointed once per module (plain and compressed);
hypothesis then flips bytes, cuts the stream, rewrites frame lengths, moves
records around, inserts junk, and (acting as a hostile writer that gets the
checksums right) rewrites the metadata and page data.  Whatever the input,
reading it (read_header, next() until done, expect_end, validate_tree on the
tree and its tasks, then `lcr show`'s summarize/render) may only end in
ImageError or RestoreError, and never allocates more than the reader's
documented bounds.
A few mutated images also go through a real `lcr restart`.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import msgspec
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import linuxcr
from linuxcr.engine.restore import validate_tree
from linuxcr.errors import ImageError, PermissionDenied, RestoreError
from linuxcr.image.schema import ARCH, FRAME, FRAME_MAGIC, MAX_DATA, MAX_META, Pages, RecType, Trailer
from linuxcr.image.show import render_text, summarize
from linuxcr.image.stream import PAGE, RING, ImageReader

pytestmark = pytest.mark.skipif(platform.machine() != ARCH, reason="images are x86_64 only")

# LCR_FUZZ_EXAMPLES=20000 for a deeper run on demand.
FUZZ = settings(max_examples=int(os.environ.get("LCR_FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
ALLOWED = (ImageError, RestoreError)

PROGRAM = r"""
#include <unistd.h>
int main(void) { for (;;) pause(); }
"""


# ------------------------------------------------------------------ the real images


def _wait_asleep(pid: int, exe: str) -> None:
    """Until the child runs our program and sleeps in pause()."""
    for _ in range(1000):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if os.readlink(f"/proc/{pid}/exe") == exe and state == "S":
                return
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.005)
    raise RuntimeError(f"test program pid {pid} did not start")


class Real(dict):
    """The real images and what we know of their process (short repr for hypothesis)."""

    def __repr__(self) -> str:
        return "<real images>"


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("real-image")
    src, exe = d / "sleeper.c", d / "sleeper"
    src.write_text(PROGRAM)
    subprocess.run([cc, "-O2", "-o", str(exe), str(src)], check=True)
    out = Real(exe=str(exe), dir=d)
    proc = subprocess.Popen([str(exe)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_asleep(proc.pid, str(exe))
        for compress in (False, True):
            path = d / ("compressed.img" if compress else "plain.img")
            try:
                res = linuxcr.checkpoint(proc.pid, path, leave_running=True, compress=compress)
            except PermissionDenied as e:
                pytest.skip(f"cannot checkpoint here: {e}")
            out["compressed" if compress else "plain"] = path.read_bytes()
            out["pages"] = res.pages
    finally:
        proc.kill()
        proc.wait()
    out["pid"] = proc.pid
    out["images"] = [out["plain"], out["compressed"]]
    return out


# ------------------------------------------------------------------ helpers


def memfd_of(data: bytes) -> int:
    fd = os.memfd_create("img", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_all(data: bytes, check_tree: bool = True) -> list:
    """Read like a restart (and validate the tree); the records' types and metas."""
    fd = memfd_of(data)
    try:
        r = ImageReader(fd, name="fuzzed image")
        r.read_header()
        out = []
        while not r.done:
            rec = r.next()
            out.append((rec.type, rec.meta))
        r.expect_end()
    finally:
        os.close(fd)
    if check_tree:
        validate(out)
    return out


def validate(recs: list) -> None:
    """What restart checks before any process exists (validate_tree: every task too)."""
    trees = [m for t, m in recs if t is RecType.TREE]
    tasks = [m for t, m in recs if t is RecType.TASK]
    if trees:
        validate_tree(trees[0], tasks)


def show(data: bytes) -> str:
    fd = memfd_of(data)
    try:
        s = summarize(fd, "fuzzed image")
    finally:
        os.close(fd)
    json.dumps(s)
    text = render_text(s)
    assert all(line.isprintable() for line in text.split("\n")), text
    return text


# Largest single allocations the reader may make for one record: the metadata
# (and its bytes copy, once it was all read), the data ring, one decompressed run.
BOUND = 2 * MAX_META + RING * MAX_DATA + MAX_DATA


def check(data: bytes, *, must_fail: bool) -> BaseException | None:
    """Read data; only ImageError/RestoreError may escape, memory stays bounded."""
    tracemalloc.start()
    err: BaseException | None = None
    try:
        try:
            recs = read_all(data, check_tree=False)
        except ALLOWED as e:
            err = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < min(BOUND, MAX_META + MAX_DATA + 20 * len(data) + (32 << 20)), peak
    if err is None:
        show(data)             # what reads as valid, `lcr show` can render
        try:
            validate(recs)
        except ALLOWED as e:
            err = e
        assert err is not None or not must_fail, "a damaged image was read as valid"
    else:
        try:
            show(data)
        except ALLOWED:
            pass
        else:
            raise AssertionError("lcr show accepted what the reader refused")
    if err is not None:
        msg = str(err)
        assert msg and msg.isprintable(), msg     # one line, no terminal escapes
    return err


def split_records(data: bytes) -> list[bytes]:
    out, off = [], 0
    while off < len(data):
        _m, _t, _f, meta_len, _p, data_len, _cs = FRAME.unpack_from(data, off)
        end = off + FRAME.size + meta_len + data_len
        out.append(data[off:end])
        off = end
    assert off == len(data)
    return out


def parse(rec: bytes) -> tuple[int, bytes, bytes]:
    _m, rtype, _f, meta_len, _p, _dl, _cs = FRAME.unpack_from(rec)
    body = rec[FRAME.size:]
    return rtype, body[:meta_len], body[meta_len:]


def reframe(records: list[tuple[int, bytes, bytes]]) -> bytes:
    """What a hostile writer would make: frames, checksums and trailer all right."""
    out, digest, pages = [], xxhash.xxh3_64(), 0
    for rtype, meta, data in records:
        if rtype == RecType.TRAILER:
            continue
        cs = xxhash.xxh3_64_intdigest(meta + data)
        out.append(FRAME.pack(FRAME_MAGIC, rtype, 0, len(meta), 0, len(data), cs) + meta + data)
        digest.update(cs.to_bytes(8, "little"))
        if rtype == RecType.PAGES:
            try:
                pages += msgspec.msgpack.decode(meta, type=Pages).npages
            except (msgspec.DecodeError, UnicodeDecodeError):
                pass
    n = len(out)
    t = msgspec.msgpack.encode(Trailer(records=n, pages=pages, digest=digest.intdigest()))
    cs = xxhash.xxh3_64_intdigest(t)
    out.append(FRAME.pack(FRAME_MAGIC, RecType.TRAILER, 0, len(t), 0, 0, cs) + t)
    return b"".join(out)


# ------------------------------------------------------------------ the unmodified image


def test_real_image_reads_back(real: dict) -> None:
    for data in real["images"]:
        recs = read_all(data)
        types = [t for t, _m in recs]
        assert types[:2] == [RecType.TREE, RecType.TASK] and types[-1] is RecType.TRAILER
        assert set(types[2:-1]) == {RecType.PAGES}
        tree, task = recs[0][1], recs[1][1]
        assert tree.root == real["pid"] and len(tree.files) == len({f.fid for f in task.files})
        assert task.pid == real["pid"] and task.mm.exe == real["exe"]
        assert sum(m.npages for t, m in recs if t is RecType.PAGES) == real["pages"]
        text = show(data)
        assert f"task pid {real['pid']} (sleeper)" in text
        check(data, must_fail=False)
        assert reframe([parse(r) for r in split_records(data)]) == data
    assert len(real["compressed"]) < len(real["plain"])
    assert any(m.compressed for t, m in read_all(real["compressed"]) if t is RecType.PAGES)


# ------------------------------------------------------------------ damaged images: must fail


@FUZZ
@given(st.data())
def test_byte_flips(real: dict, data: st.DataObject) -> None:
    img = bytearray(real[data.draw(st.sampled_from(["plain", "compressed"]), label="image")])
    positions = data.draw(st.sets(st.integers(0, len(img) - 1), min_size=1, max_size=4), label="at")
    for pos in positions:
        img[pos] ^= data.draw(st.integers(1, 255), label="xor")
    check(bytes(img), must_fail=True)


@FUZZ
@given(st.data())
def test_truncation(real: dict, data: st.DataObject) -> None:
    img = real[data.draw(st.sampled_from(["plain", "compressed"]), label="image")]
    n = data.draw(st.one_of(st.integers(0, len(img) - 1),
                            st.integers(max(0, len(img) - 64), len(img) - 1)), label="length")
    err = check(img[:n], must_fail=True)
    assert any(w in str(err) for w in ("truncated", "corrupt", "empty")), str(err)


LENGTHS = st.one_of(
    st.integers(0, (1 << 32) - 1),
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([MAX_META, MAX_META + 1, MAX_DATA, MAX_DATA + 1, (1 << 32) - 1, 1 << 63,
                     (1 << 64) - 1]),
)


@FUZZ
@given(st.data())
def test_frame_length_fields(real: dict, data: st.DataObject) -> None:
    img = real[data.draw(st.sampled_from(["plain", "compressed"]), label="image")]
    recs = split_records(img)
    i = data.draw(st.integers(0, len(recs) - 1), label="record")
    field = data.draw(st.sampled_from(["meta_len", "data_len"]), label="field")
    magic, rtype, flags, meta_len, pad, data_len, cs = FRAME.unpack_from(recs[i])
    delta = st.integers(-64, 64).map(lambda d: (meta_len if field == "meta_len" else data_len) + d)
    value = data.draw(st.one_of(LENGTHS, delta).filter(lambda v: 0 <= v < (1 << 64)), label="value")
    if field == "meta_len":
        value &= (1 << 32) - 1
        frame = FRAME.pack(magic, rtype, flags, value, pad, data_len, cs)
    else:
        frame = FRAME.pack(magic, rtype, flags, meta_len, pad, value, cs)
    bad = b"".join(recs[:i]) + frame + recs[i][FRAME.size:] + b"".join(recs[i + 1:])
    check(bad, must_fail=bad != img)


@FUZZ
@given(st.data())
def test_record_shuffles(real: dict, data: st.DataObject) -> None:
    img = real[data.draw(st.sampled_from(["plain", "compressed"]), label="image")]
    recs = split_records(img)
    n = len(recs)
    ops = data.draw(st.lists(st.tuples(st.sampled_from(["dup", "swap", "drop", "move"]),
                                       st.integers(0, 10 * n), st.integers(0, 10 * n)),
                             min_size=1, max_size=4), label="ops")
    for op, a, b in ops:
        if not recs:
            break
        a, b = a % len(recs), b % (len(recs) + 1)
        if op == "dup":
            recs.insert(b, recs[a])
        elif op == "swap":
            b %= len(recs)
            recs[a], recs[b] = recs[b], recs[a]
        elif op == "drop":
            del recs[a]
        else:
            recs.insert(b, recs.pop(a))
    bad = b"".join(recs)
    check(bad, must_fail=bad != img)


@FUZZ
@given(st.data())
def test_inserted_bytes(real: dict, data: st.DataObject) -> None:
    img = real[data.draw(st.sampled_from(["plain", "compressed"]), label="image")]
    pos = data.draw(st.integers(0, len(img)), label="position")
    junk = data.draw(st.one_of(st.binary(min_size=1, max_size=64),
                               st.sampled_from(split_records(img))), label="junk")
    check(img[:pos] + junk + img[pos:], must_fail=True)


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(blob: bytes) -> None:
    check(blob, must_fail=True)


@FUZZ
@given(st.data())
def test_real_prefix_then_garbage(real: dict, data: st.DataObject) -> None:
    img = real[data.draw(st.sampled_from(["plain", "compressed"]), label="image")]
    recs = split_records(img)
    k = data.draw(st.integers(1, len(recs) - 1), label="records kept")
    tail = data.draw(st.binary(max_size=512), label="tail")
    check(b"".join(recs[:k]) + tail, must_fail=True)


# ------------------------------------------------------------------ hostile writer: checksums right

# Values a hostile writer might put anywhere in the metadata.
EDGE_INTS = [0, 1, -1, 2, 3, 7, 64, 65, 4095, 4096, 4097, 1 << 20, (1 << 20) + 1, 1 << 22,
             (1 << 22) + 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 47) - 4096,
             1 << 47, (1 << 63) - 1, 1 << 63, (1 << 64) - 2, (1 << 64) - 1, -(1 << 63),
             (1 << 32) - 2, 0x7FFFFFFFF000, 0x7FFFFFFFF000 + 4096]
VALUES = st.one_of(
    st.sampled_from(EDGE_INTS),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.floats(),
    st.booleans(),
    st.none(),
    st.text(max_size=16),
    st.sampled_from(["", "/", "rel/path", "x" * 4097, "/a\0b", "\0", "anon", "file", "shmem", "vdso", "vvar",
                     "hugetlb", "reg", "dir", "chr", "sock", "[heap]", "/dev/null"]),
    st.binary(max_size=300),
    st.sampled_from([bytes(127), bytes(128), bytes(129), bytes(215), bytes(216), bytes(1 << 16),
                     bytes((1 << 16) + 1)]),
    st.lists(st.integers(0, (1 << 64) - 1), max_size=6),
    st.just([]), st.just({}),
    st.lists(st.sampled_from([0, 1]), min_size=64, max_size=70),
)


def _paths(obj, prefix=()):
    """Every (path) to a value inside decoded msgpack."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def mutate_meta(meta: bytes, data: st.DataObject) -> bytes:
    obj = msgspec.msgpack.decode(meta)
    paths = list(_paths(obj))
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        parent, key = _get(obj, path[:-1]), path[-1]
        old = parent[key]
        op = data.draw(st.sampled_from(["set", "nudge", "delete", "add", "dup"]), label="op")
        if op == "nudge" and isinstance(old, int) and not isinstance(old, bool):
            step = data.draw(st.sampled_from([-PAGE, -1, 1, PAGE, 1 << 32, -(1 << 32)]), label="step")
            parent[key] = min(max(old + step, -(1 << 63)), (1 << 64) - 1)
        elif op == "delete":
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["extra", "pid", "version", "x" * 40]))] = \
                data.draw(VALUES, label="value")
        elif op == "dup" and isinstance(parent, list):
            parent.insert(key, old)
        else:
            parent[key] = data.draw(VALUES, label="value")
        paths = list(_paths(obj))
    return msgspec.msgpack.encode(obj)


@FUZZ
@given(st.data())
def test_hostile_metadata(real: dict, data: st.DataObject) -> None:
    """Header, task, pages or trailer metadata rewritten, checksums fixed up:
    the schema bounds, the header checks, validate_tree and show all hold."""
    img = real[data.draw(st.sampled_from(["plain", "compressed"]), label="image")]
    recs = [parse(r) for r in split_records(img)]
    i = data.draw(st.integers(0, len(recs) - 1), label="record")
    rtype, meta, body = recs[i]
    recs[i] = (rtype, mutate_meta(meta, data), body)
    bad = reframe(recs)
    if i == len(recs) - 1:   # reframe writes its own trailer: mutate the raw one instead
        bad = bad[:-len(split_records(bad)[-1])] + FRAME.pack(
            FRAME_MAGIC, RecType.TRAILER, 0, len(recs[i][1]), 0, 0,
            xxhash.xxh3_64_intdigest(recs[i][1])) + recs[i][1]
    check(bad, must_fail=False)


@FUZZ
@given(st.data())
def test_hostile_metadata_bytes(real: dict, data: st.DataObject) -> None:
    """Metadata bytes flipped, cut or spliced behind a right checksum: msgpack
    that does not parse, keys that are not UTF-8, wrong types, deep nesting."""
    img = real[data.draw(st.sampled_from(["plain", "compressed"]), label="image")]
    recs = [parse(r) for r in split_records(img)]
    i = data.draw(st.integers(0, len(recs) - 2), label="record")
    rtype, meta, body = recs[i]
    meta = bytearray(meta)
    how = data.draw(st.sampled_from(["flip", "cut", "splice", "nest"]), label="how")
    if how == "flip":
        for pos, xor in data.draw(st.lists(st.tuples(st.integers(0, len(meta) - 1), st.integers(1, 255)),
                                           min_size=1, max_size=4), label="flips"):
            meta[pos] ^= xor
    elif how == "cut":
        del meta[data.draw(st.integers(0, len(meta)), label="at"):]
    elif how == "splice":
        at = data.draw(st.integers(0, len(meta)), label="at")
        meta[at:at] = data.draw(st.binary(min_size=1, max_size=32), label="bytes")
    else:   # an extra key holding a deeply nested value (at the front: the map grows by one)
        depth = data.draw(st.integers(1, 200_000), label="depth")
        if meta[0] & 0xF0 == 0x80 and meta[0] != 0x8F:
            meta = bytearray([meta[0] + 1]) + b"\xa5extra" + b"\x91" * depth + b"\x00" + meta[1:]
    recs[i] = (rtype, bytes(meta), body)
    check(reframe(recs), must_fail=False)


@FUZZ
@given(st.data())
def test_hostile_page_data(real: dict, data: st.DataObject) -> None:
    """Page data (zstd frames included) damaged behind a right checksum."""
    img = real[data.draw(st.sampled_from(["plain", "compressed"]), label="image")]
    recs = [parse(r) for r in split_records(img)]
    pages = [i for i, (t, _m, _d) in enumerate(recs) if t == RecType.PAGES]
    i = data.draw(st.sampled_from(pages), label="record")
    rtype, meta, body = recs[i]
    body = bytearray(body)
    how = data.draw(st.sampled_from(["flip", "cut", "grow", "replace", "flag"]), label="how")
    if how == "flip" and body:
        for pos, xor in data.draw(st.lists(st.tuples(st.integers(0, len(body) - 1), st.integers(1, 255)),
                                           min_size=1, max_size=4), label="flips"):
            body[pos] ^= xor
    elif how == "cut":
        del body[data.draw(st.integers(0, len(body)), label="at"):]
    elif how == "grow":
        body += data.draw(st.binary(min_size=1, max_size=4096), label="more")
    elif how == "replace":
        body = bytearray(data.draw(st.binary(max_size=8192), label="body"))
    else:   # say compressed when it is not, or the reverse
        m = msgspec.msgpack.decode(meta, type=Pages)
        meta = msgspec.msgpack.encode(msgspec.structs.replace(m, compressed=not m.compressed))
    recs[i] = (rtype, meta, bytes(body))
    check(reframe(recs), must_fail=False)


# ------------------------------------------------------------------ lcr restart on damaged images


PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def _children() -> dict[int, str]:
    """Our children and their states."""
    me, out = os.getpid(), {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == me:
            out[int(p)] = fields[0]
    return out


def _running(exe: str) -> list[int]:
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/exe") == exe:
                    pids.append(int(p))
            except OSError:
                pass
    return pids


def _mutations(img: bytes) -> dict[str, bytes]:
    recs = split_records(img)      # header, tree, task, pages..., trailer
    last_pages = len(recs) - 2
    flipped = bytearray(recs[last_pages])
    flipped[-1] ^= 0x40
    meta_flip = bytearray(recs[2])
    meta_flip[FRAME.size + 10] ^= 0x01
    return {
        "truncated after the task": b"".join(recs[:3]),
        "truncated inside the pages": img[:len(b"".join(recs[:last_pages])) + 100],
        "flipped byte in the last pages": b"".join(recs[:last_pages]) + bytes(flipped) + recs[-1],
        "duplicated pages": b"".join(recs[:-1] + [recs[3], recs[-1]]),
        "data after the trailer": img + b"\0",
        "flipped byte in the task": b"".join(recs[:2]) + bytes(meta_flip) + b"".join(recs[3:]),
        "flipped byte in the header": img[:FRAME.size + 5] + bytes([img[FRAME.size + 5] ^ 0x20])
        + img[FRAME.size + 6:],
    }


EARLY = {"flipped byte in the header", "flipped byte in the task"}


class Restarts:
    """Runs `lcr restart` as a subreaper, so that anything it leaves comes to us."""

    def __init__(self, real: dict, tmp_path: Path) -> None:
        self.real, self.tmp = real, tmp_path
        self.env = {k: v for k, v in os.environ.items() if k not in ("LCR_DEBUG", "LCR_VERBOSE")}
        self.before = _children()

    def run(self, data: bytes) -> subprocess.CompletedProcess:
        path = self.tmp / "image.img"
        path.write_bytes(data)
        return subprocess.run([sys.executable, "-m", "linuxcr", "restart", str(path)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, env=self.env)

    def refused(self, data: bytes, what: str) -> str:
        """The restart failed cleanly and left nothing behind; its message."""
        cp = self.run(data)
        assert cp.returncode != 0, what
        assert cp.returncode != 70, (what, cp.stderr)           # not an internal error
        lines = cp.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("lcr: "), (what, cp.stderr)
        assert "Traceback" not in cp.stderr and cp.stdout == "", what
        self.nothing_left(what)
        return cp.stderr

    def nothing_left(self, what: str) -> None:
        """No restored process, no orphan handed to us."""
        for pid, state in _children().items():
            if pid in self.before:
                continue
            for _ in range(200):      # an orphan killed by EXITKILL may still be dying
                if state in ("Z", "X"):
                    break
                time.sleep(0.01)
                state = _children().get(pid, "X")
            assert state in ("Z", "X"), (what, pid, state)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        exe, pid = self.real["exe"], self.real["pid"]
        assert _running(exe) == [], what
        assert not os.path.exists(f"/proc/{pid}") or os.readlink(f"/proc/{pid}/exe") != exe, what


@pytest.fixture
def restarts(real: dict, tmp_path: Path):
    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int(0)
    assert libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0) == 0
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0   # orphans of lcr come to us
    try:
        yield Restarts(real, tmp_path)
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, was.value, 0, 0, 0)


@pytest.mark.parametrize("which", ["plain", "compressed"])
def test_lcr_restart_refuses_damaged_images(real: dict, restarts: Restarts, which: str) -> None:
    for what, bad in _mutations(real[which]).items():
        msg = restarts.refused(bad, what)
        if what in EARLY:   # found before any process exists: the reader's own words
            assert "corrupt" in msg or "truncated" in msg, (what, msg)
    # and the undamaged image does restart (so the refusals above are the reader's doing)
    cp = restarts.run(real[which])
    if cp.returncode == 0:
        pid = int(cp.stdout)
        assert os.readlink(f"/proc/{pid}/exe") == real["exe"]
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)        # ours: lcr has exited and we are the subreaper
    else:
        assert len(cp.stderr.splitlines()) == 1 and "Traceback" not in cp.stderr


def _tree_edits() -> list:
    return [
        pytest.param(lambda t: t.update(zombies=[{"pid": 9, "vpid": 9, "ppid": 12345, "status": 0}]),
                     id="zombie-of-nobody"),
        pytest.param(lambda t: t["files"][0].update(path="dev/null"), id="relative-path"),
        pytest.param(lambda t: t["files"][0].update(kind="sock"), id="unknown-kind"),
        pytest.param(lambda t: t.update(pipes=[{"ino": 5, "size": (1 << 32) - 1, "data": b"x"}]),
                     id="huge-pipe"),
        pytest.param(lambda t: [f.update(fid=f["fid"] + 100) for f in t["files"]], id="fid-missing"),
        pytest.param(lambda t: t.update(shm=[{"id": 1, "size": (1 << 64) - 1}]), id="huge-shm"),
    ]


@pytest.mark.parametrize("edit", _tree_edits())
def test_lcr_restart_refuses_hostile_trees(real: dict, restarts: Restarts, edit) -> None:
    """Well-framed images (checksums right) whose TREE record is hostile."""
    recs = [parse(r) for r in split_records(real["plain"])]
    assert recs[1][0] == RecType.TREE
    tree = msgspec.msgpack.decode(recs[1][1])
    edit(tree)
    recs[1] = (RecType.TREE, msgspec.msgpack.encode(tree), b"")
    restarts.refused(reframe(recs), "hostile tree")
