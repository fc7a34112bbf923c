"""The sidecar index of an image (IMAGE.lcr-index, image/chain.py): written
beside every image of the incremental path, used by index() instead of
reading the image through, and ignored -- the image is read through as
before -- whenever it is missing, corrupt, of another image, or lies."""
from __future__ import annotations

import os
import random
import stat

import msgspec
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings, strategies as st

from linuxcr.errors import ImageError
from linuxcr.image import stream
from linuxcr.image.chain import INDEX_SUFFIX, Chain, IndexBuilder, index, load_sidecar
from linuxcr.image.schema import (ENCODER, ImageIndex, IndexEntry, PageMap, PageRun, ParentRef,
                                  RecType, Tree)
from linuxcr.image.stream import ImageWriter
from helpers import damage
from test_image import BASE, PID, make_header, make_task

P = 4096


def _write(path, *, pages, pagemap=None, parent=None, image_id=b"\x01" * 16, sidecar=True,
           compress=False):
    b = IndexBuilder()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with stream.recording(b):
            w = ImageWriter(fd, compress=compress)
            w.header(make_header(flags=["compressed"] if compress else [], image_id=image_id,
                                 parent=parent))
            w.record(RecType.TREE, Tree(root=PID))
            w.record(RecType.TASK, make_task())
            for addr, data in pages:
                w.page_run(PID, addr, memoryview(data))
            if pagemap is not None:
                w.record(RecType.PAGEMAP, PageMap(pid=PID, runs=[
                    PageRun(addr=a, npages=n, depth=d) for a, n, d in pagemap]))
            w.finish()
        if sidecar:
            assert b.save(str(path), fd)
        return w.digest
    finally:
        os.close(fd)


def _pair(tmp_path, sidecar=True):
    """full.img (4 pages) and inc.img (page 1 new), each with its sidecar."""
    rnd = random.Random(3)
    old = rnd.randbytes(4 * P)
    d = _write(tmp_path / "full.img", pages=[(BASE, old[:2 * P]), (BASE + 2 * P, old[2 * P:])],
               sidecar=sidecar)
    ref = ParentRef(id=b"\x01" * 16, digest=d, path="full.img", depth=1)
    new = rnd.randbytes(P)
    _write(tmp_path / "inc.img", pages=[(BASE + P, new)],
           pagemap=[(BASE, 1, 1), (BASE + P, 1, 0), (BASE + 2 * P, 2, 1)],
           parent=ref, image_id=b"\x02" * 16, sidecar=sidecar)
    return old[:P] + new + old[2 * P:]


def _memory(tmp_path) -> tuple[bytes, list[bool]]:
    """The 4 pages a grandchild of inc.img would see, read from the chain."""
    c = Chain.from_path(str(tmp_path / "inc.img"))
    try:
        out = b"".join(bytes(d) for s, e, dep in c.held(PID) for _, d in c.read(dep, PID, s, e))
        return out, [im.from_sidecar for im in c.images]
    finally:
        c.close()


def _index_of(path) -> ImageIndex:
    raw = (path.parent / (path.name + INDEX_SUFFIX)).read_bytes()
    assert int.from_bytes(raw[:8], "little") == xxhash.xxh3_64_intdigest(raw[8:])
    return msgspec.msgpack.decode(raw[8:], type=ImageIndex)


def _put_index(path, idx: ImageIndex) -> None:
    """A forged index: with its own checksum right, so that the checks of
    what it says are what is tested."""
    body = ENCODER.encode(idx)
    (path.parent / (path.name + INDEX_SUFFIX)).write_bytes(
        xxhash.xxh3_64_intdigest(body).to_bytes(8, "little") + body)


def test_index_written_and_used(tmp_path):
    want = _pair(tmp_path)
    for name in ("full.img", "inc.img"):
        side = tmp_path / (name + INDEX_SUFFIX)
        assert side.is_file() and stat.S_IMODE(side.stat().st_mode) & 0o077 == 0
    got, used = _memory(tmp_path)
    assert got == want and used == [True, True]
    # the same as reading the images through
    for name in ("full.img", "inc.img"):
        a = index(str(tmp_path / name))
        os.rename(tmp_path / (name + INDEX_SUFFIX), tmp_path / "away")
        b = index(str(tmp_path / name))
        os.rename(tmp_path / "away", tmp_path / (name + INDEX_SUFFIX))
        try:
            assert a.from_sidecar and not b.from_sidecar
            assert a.digest == b.digest and a.held == b.held
            assert {p: [(r.meta, r.data_offset, r.data_len, r.raw_meta, r.checksum) for r in rs]
                    for p, rs in a.own.items()} == \
                   {p: [(r.meta, r.data_offset, r.data_len, r.raw_meta, r.checksum) for r in rs]
                    for p, rs in b.own.items()}
        finally:
            a.close()
            b.close()


def test_missing_index_falls_back(tmp_path):
    want = _pair(tmp_path, sidecar=False)
    assert not list(tmp_path.glob("*" + INDEX_SUFFIX))
    assert _memory(tmp_path) == (want, [False, False])


@pytest.mark.parametrize("how", ["empty", "junk", "truncated", "other image", "image rewritten"])
def test_corrupt_or_mismatched_index_ignored(tmp_path, how):
    want = _pair(tmp_path)
    side = tmp_path / ("full.img" + INDEX_SUFFIX)
    if how == "empty":
        side.write_bytes(b"")
    elif how == "junk":
        side.write_bytes(os.urandom(300))
    elif how == "truncated":
        side.write_bytes(side.read_bytes()[:-7])
    elif how == "other image":          # the index of inc.img put beside full.img
        side.write_bytes((tmp_path / ("inc.img" + INDEX_SUFFIX)).read_bytes())
    elif how == "image rewritten":      # same id, other pages: its trailer digest differs
        _write(tmp_path / "full.img", pages=[(BASE, bytes(4 * P))], sidecar=False)
        _write(tmp_path / "other.img", pages=[(BASE, bytes(4 * P))], sidecar=True)
        side.write_bytes((tmp_path / ("other.img" + INDEX_SUFFIX)).read_bytes())
        with pytest.raises(ImageError, match="changed after"):
            _memory(tmp_path)           # the chain check still applies
        return
    got, used = _memory(tmp_path)
    assert got == want and used == [True, False]


def _hostile(idx: ImageIndex, what: str) -> ImageIndex:
    recs = list(idx.records)
    k = next(i for i, e in enumerate(recs) if e.type == RecType.PAGES)
    e = recs[k]
    rep = msgspec.structs.replace
    if what == "offset past the trailer":
        recs[k] = rep(e, at=idx.trailer_at)
    elif what == "offset in the header":
        recs[k] = rep(e, at=0)
    elif what == "length not the pages":
        recs[k] = rep(e, length=e.length - P)
    elif what == "unaligned address":
        m = msgspec.msgpack.decode(e.meta)
        m["addr"] += 1
        recs[k] = rep(e, meta=msgspec.msgpack.encode(m))
    elif what == "address beyond TASK_SIZE":
        m = msgspec.msgpack.decode(e.meta)
        m["addr"] = (1 << 47) - P
        recs[k] = rep(e, meta=msgspec.msgpack.encode(m))
    elif what == "meta not a Pages":
        recs[k] = rep(e, meta=b"\xa3abc")
    elif what == "a record dropped":
        del recs[k]
    elif what == "a record added":
        recs.insert(k, e)
    elif what == "checksum changed":
        recs[k] = rep(e, checksum=e.checksum ^ 1)
    elif what == "a signature":
        recs.insert(k, IndexEntry(type=int(RecType.SIGNATURE), checksum=0))
    elif what == "tree with metadata":
        t = next(i for i, e in enumerate(recs) if e.type == RecType.TREE)
        recs[t] = rep(recs[t], meta=b"\x80")
    elif what == "no header first":
        recs[0] = rep(recs[0], type=int(RecType.TREE))
    elif what == "trailer elsewhere":
        return rep(idx, trailer_at=idx.trailer_at - 8)
    elif what == "digest":
        return rep(idx, digest=idx.digest ^ 1)
    elif what == "size":
        return rep(idx, size=idx.size + 1)
    elif what == "version":
        return rep(idx, version=idx.version + 1)
    elif what == "magic":
        return rep(idx, magic=b"LCR-INDEY")
    return rep(idx, records=recs)


HOSTILE = ["offset past the trailer", "offset in the header", "length not the pages",
           "unaligned address", "address beyond TASK_SIZE", "meta not a Pages", "a record dropped", "a record added",
           "checksum changed", "a signature", "tree with metadata", "no header first",
           "trailer elsewhere", "digest", "size", "version", "magic"]


@pytest.mark.parametrize("what", HOSTILE)
def test_hostile_index_values_rejected(tmp_path, what):
    want = _pair(tmp_path)
    full = tmp_path / "full.img"
    _put_index(full, _hostile(_index_of(full), what))
    fd = os.open(full, os.O_RDONLY)
    try:
        r = stream.ImageReader(fd, name="full.img", skim=True)
        assert load_sidecar(str(full), fd, r.read_header()) is None
    finally:
        os.close(fd)
    got, used = _memory(tmp_path)
    assert got == want and used == [True, False]


def test_hostile_page_map_in_index_rejected(tmp_path):
    """The page map of an incremental image comes from the index only if its
    checksum is the one the image lists: a different map is refused."""
    want = _pair(tmp_path)
    inc = tmp_path / "inc.img"
    idx = _index_of(inc)
    recs = list(idx.records)
    k = next(i for i, e in enumerate(recs) if e.type == RecType.PAGEMAP)
    recs[k] = msgspec.structs.replace(recs[k], meta=ENCODER.encode(PageMap(pid=PID, runs=[
        PageRun(addr=BASE, npages=1, depth=1), PageRun(addr=BASE + P, npages=1, depth=0)])))
    _put_index(inc, msgspec.structs.replace(idx, records=recs))
    got, used = _memory(tmp_path)
    assert got == want and used == [False, True]


def test_index_file_kinds_and_modes_refused(tmp_path):
    want = _pair(tmp_path)
    side = tmp_path / ("full.img" + INDEX_SUFFIX)
    good = side.read_bytes()
    side.unlink()
    (tmp_path / "elsewhere").write_bytes(good)
    side.symlink_to(tmp_path / "elsewhere")          # not followed
    assert _memory(tmp_path) == (want, [True, False])
    side.unlink()
    os.mkfifo(side)                                    # never blocks on a FIFO
    assert _memory(tmp_path) == (want, [True, False])
    side.unlink()
    side.write_bytes(good)
    os.chmod(side, 0o666)                              # writable by others, the image is not
    assert _memory(tmp_path) == (want, [True, False])
    os.chmod(side, 0o600)
    assert _memory(tmp_path) == (want, [True, True])


def test_no_index_over_a_fifo_or_for_an_unnamed_image(tmp_path):
    """save() replaces only a regular file, and only for the file it wrote."""
    side = tmp_path / ("full.img" + INDEX_SUFFIX)
    os.mkfifo(side)
    b = IndexBuilder()
    fd = os.open(tmp_path / "full.img", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with stream.recording(b):
            w = ImageWriter(fd, compress=False)
            w.header(make_header(flags=[], image_id=b"\x01" * 16))
            w.record(RecType.TREE, Tree(root=PID))
            w.record(RecType.TASK, make_task())
            w.finish()
        assert not b.save(str(tmp_path / "full.img"), fd)      # a FIFO: left alone
        assert stat.S_ISFIFO(os.lstat(side).st_mode)
        assert not b.save(str(tmp_path / "not-it.img"), fd)    # not the file written
        assert not (tmp_path / ("not-it.img" + INDEX_SUFFIX)).exists()
    finally:
        os.close(fd)


@given(st.data())
@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_index_or_image(tmp_path, data):
    """Any byte flip or cut in an index, or in an image whose index is
    intact: the chain reads the right bytes or ends in ImageError."""
    want = _pair(tmp_path)
    name = data.draw(st.sampled_from(["full.img", "inc.img"]))
    which = data.draw(st.sampled_from(["", INDEX_SUFFIX]))
    p = tmp_path / (name + which)
    damage(p, data)
    try:
        got, _ = _memory(tmp_path)
    except ImageError:
        assert which == ""          # a damaged index alone never fails the chain
        return
    assert got == want


@given(st.lists(st.tuples(st.integers(0, (1 << 47) // P + 2), st.integers(1, 4), st.integers(0, 3)),
                max_size=6), st.booleans())
@settings(max_examples=300, deadline=None)
def test_page_map_check_is_validates(raw, unaligned):
    """The index's own check of a page map accepts what validate.check does."""
    from linuxcr.image import validate
    from linuxcr.image.chain import _map_runs
    pm = PageMap(pid=PID, runs=[PageRun(addr=a * P + (1 if unaligned and i == 0 else 0),
                                        npages=n, depth=d) for i, (a, n, d) in enumerate(raw)])
    try:
        validate.check(pm)
        ok = True
    except validate.Invalid:
        ok = False
    assert (_map_runs(pm) is not None) == ok


def test_forged_pages_place_is_a_clean_error(tmp_path):
    """An index forged with its own checksum right, that moves a PAGES record
    to another address or offset: the pages read are checked against the
    image's checksum, so the chain fails with ImageError, never wrong bytes."""
    _pair(tmp_path)
    full = tmp_path / "full.img"
    idx = _index_of(full)
    recs = list(idx.records)
    ks = [i for i, e in enumerate(recs) if e.type == RecType.PAGES]
    a, b = recs[ks[0]], recs[ks[1]]
    recs[ks[0]] = msgspec.structs.replace(a, at=b.at)          # the other record's data
    _put_index(full, msgspec.structs.replace(idx, records=recs))
    with pytest.raises(ImageError, match="corrupt"):
        _memory(tmp_path)


@pytest.mark.e2e
def test_interval_images_have_their_index_and_lose_it_with_them(bins, procs, tmp_path):
    """`--interval` writes an index beside every image, deletes it with its
    image (--keep), and restart reads the chain through the indexes."""
    from helpers import lcr, probe_hog, reap, restart_image, wait_for_line
    log = tmp_path / "memhog.log"
    p = procs.start([bins["memhog"], "-f", "-s", "20000", "16"], log)
    wait_for_line(log, rf"^pid={p.pid} ready\b", 60, pid=p.pid)
    out = tmp_path / "ckpts"
    lcr("checkpoint", p.pid, "--interval", "300ms", "--count", "5", "--keep", "2",
        "--full-every", "3", "-o", out, timeout=300)
    imgs = sorted(x.name for x in out.glob("lcr-*.img"))
    sides = sorted(x.name[:-len(INDEX_SUFFIX)] for x in out.glob("*" + INDEX_SUFFIX))
    assert len(imgs) == 2 and sides == imgs, (imgs, sides)
    latest = str(out / "latest.img")
    c = Chain.from_path(latest)
    try:
        assert all(im.from_sidecar for im in c.images)
    finally:
        c.close()
    os.kill(p.pid, 9)
    reap(p.pid)
    new = restart_image(out / "latest.img", procs)
    assert probe_hog(new, log).ok


def test_compressed_image_index(tmp_path):
    page = bytes(P) + b"x" * P          # compresses
    _write(tmp_path / "full.img", pages=[(BASE, page)], compress=True)
    c = Chain.from_path(str(tmp_path / "full.img"))
    try:
        assert c.images[0].from_sidecar
        r = c.images[0].own[PID][0]
        assert r.meta.compressed and r.data_len < 2 * P
        assert b"".join(bytes(d) for _, d in c.read(1, PID, BASE, BASE + 2 * P)) == page
    finally:
        c.close()
