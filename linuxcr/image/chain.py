"""Chains of incremental images: find, check and read the parents of an image.

An incremental image names its parent in its header (ParentRef: the
parent's image_id, the digest of its trailer, a path relative to the
child's directory, and its depth).  Each parent is opened, indexed once
(its PAGES records are skimmed: their data is skipped, its frames and
trailer digest checked) and matched against the reference: the same id
(the same checkpoint) and the same digest (the same bytes).  Pages are then
read on demand, each record's checksum checked as it is read.

``images[k - 1]`` is the image at depth k: 1 the parent, 2 its parent...
"""
from __future__ import annotations

import bisect
import os
import stat
from dataclasses import dataclass, field
from typing import Iterator

import xxhash

import msgspec

from linuxcr.errors import ImageError, LcrError
from linuxcr.image import files, runs
from linuxcr.image.schema import (DECODERS, ENCODER, FRAME, FRAME_MAGIC, INDEX_MAGIC,
                                  INDEX_VERSION, MAX_CHAIN, MAX_DATA, MAX_TOTAL_META, Header,
                                  ImageIndex, IndexEntry, PageMap, Pages, ParentRef, RecType,
                                  Trailer)
from linuxcr.image.stream import PAGE, ImageReader, Record
from linuxcr.sys.syscalls import TASK_SIZE

INDEX_SUFFIX = ".lcr-index"     # IMAGE.lcr-index: the sidecar index of IMAGE
MAX_INDEX = MAX_TOTAL_META      # bytes of a sidecar index read at most
_PAGES = msgspec.msgpack.Decoder(Pages)
_PAGEMAP = msgspec.msgpack.Decoder(PageMap)


@dataclass
class Indexed:
    """One image of a chain, its pages located but not read."""
    path: str
    header: Header
    digest: int
    reader: ImageReader
    fd: int
    own: dict[int, list[Record]] = field(default_factory=dict)          # pid -> PAGES, by address
    held: dict[int, list[runs.Tagged]] = field(default_factory=dict)    # pid -> (start, end, depth)
    _last: tuple[int, memoryview] | None = None    # the record read last: runs come in order
    from_sidecar: bool = False     # located by its IMAGE.lcr-index, not read through
    _keys: dict[int, list[int]] = field(default_factory=dict)

    def keys(self, pid: int) -> list[int]:
        if pid not in self._keys:
            self._keys[pid] = [r.meta.addr for r in self.own.get(pid, [])]  # type: ignore[attr-defined]
        return self._keys[pid]

    def pages_of(self, rec: Record) -> memoryview:
        if self._last is None or self._last[0] != rec.data_offset:
            self._last = (rec.data_offset, self.reader.read_skimmed(rec))
        return self._last[1]

    def close(self) -> None:
        os.close(self.fd)


def index(path: str) -> Indexed:
    """Read an image through, skipping page data; check its frames and trailer."""
    name = path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ImageError(f"{path} is not a regular file: a parent image must be a file")
    except FileNotFoundError:
        raise ImageError(f"image {path} not found") from None
    except OSError as e:
        raise ImageError(f"cannot open image {path}: {e.strerror}") from None
    try:
        files.opened(fd, path, path)    # the chain is as trusted as its least trusted image
        reader = ImageReader(fd, name=name, skim=True)
        header = reader.read_header()
        img = Indexed(path=path, header=header, digest=0, reader=reader, fd=fd)
        maps: dict[int, list[runs.Tagged]] = {}
        side = load_sidecar(path, fd, header) if reader.skim else None
        if side is not None:
            img.digest, img.own, maps = side
            img.from_sidecar = True
        while side is None:
            rec = reader.next()
            if rec.type is RecType.PAGES:
                m: Pages = rec.meta  # type: ignore[assignment]
                img.own.setdefault(m.pid, []).append(rec)
            elif rec.type is RecType.PAGEMAP:
                pm: PageMap = rec.meta  # type: ignore[assignment]
                maps.setdefault(pm.pid, []).extend(
                    (r.addr, r.addr + r.npages * PAGE, r.depth) for r in pm.runs)
            elif rec.type is RecType.TRAILER:
                img.digest = rec.meta.digest  # type: ignore[attr-defined]
                break
        for recs in img.own.values():
            recs.sort(key=lambda r: r.meta.addr)  # type: ignore[attr-defined]
        if header.parent is None:
            if maps:
                raise ImageError(f"{name} is corrupt: a full image with a page map")
            img.held = {pid: runs.merge_tagged(
                (r.meta.addr, r.meta.addr + r.meta.npages * PAGE, 0) for r in recs)  # type: ignore[attr-defined]
                for pid, recs in img.own.items()}
        else:
            try:
                img.held = {pid: runs.merge_tagged(v) for pid, v in maps.items()}
            except ValueError as e:
                raise ImageError(f"{name} is corrupt: its page map has {e}") from None
            _check_own(img)
        return img
    except BaseException:
        os.close(fd)
        raise


# --- the sidecar index: IMAGE.lcr-index --------------------------------------------
#
# Written beside an image as it is written (IndexBuilder, fed by the
# ImageWriter through stream.recording), read by index() instead of reading
# the image through.  It is untrusted input, bound to the image it sits
# beside: the same id and size, a TRAILER frame where it says, whose digest
# is the xxh3 of the checksums it lists (so the list is the image's, record
# for record), PAGEMAP metadata whose checksum is the listed one, and PAGES
# places within the image (their data is checked against the listed
# checksum when read, as for a skimmed image).  Anything else: the image is
# read through, as without it.

class IndexBuilder:
    """Collects what ImageWriter writes (stream.recording(builder)); save()
    writes the sidecar of the finished image."""

    def __init__(self) -> None:
        self.entries: list[IndexEntry] = []
        self.usable = True           # no sidecar for signed images (read in full anyway)
        self.image_id = b""
        self.trailer_at = -1
        self.digest = 0

    def __call__(self, rtype: RecType, meta: bytes, cs: int, at: int, data_len: int) -> None:
        if rtype is RecType.TRAILER:
            self.trailer_at = at
            self.digest = DECODERS[RecType.TRAILER].decode(meta).digest  # type: ignore[attr-defined]
            return
        if rtype is RecType.SIGNATURE:
            self.usable = False
        elif rtype is RecType.HEADER:
            self.image_id = DECODERS[RecType.HEADER].decode(meta).image_id  # type: ignore[attr-defined]
        if rtype is RecType.PAGES:
            e = IndexEntry(type=int(rtype), checksum=cs, meta=meta,
                           at=at + FRAME.size + len(meta), length=data_len)
        elif rtype is RecType.PAGEMAP:
            e = IndexEntry(type=int(rtype), checksum=cs, meta=meta)
        else:
            e = IndexEntry(type=int(rtype), checksum=cs)
        self.entries.append(e)

    def save(self, path: str, fd: int) -> bool:
        """Write PATH.lcr-index for the image just written to fd and named
        path; False when there is none to write (not a named regular file,
        signed, or the name is taken by something else than a file).  Never
        raises for a failed write: the sidecar is an optimisation."""
        if not self.usable or self.trailer_at < 0 or len(self.image_id) != 16:
            return False
        try:
            st = os.fstat(fd)
            named = os.stat(path)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (named.st_dev, named.st_ino):
                return False
            side = path + INDEX_SUFFIX
            try:
                if not stat.S_ISREG(os.lstat(side).st_mode):
                    return False       # not ours to replace (a FIFO would block us)
            except FileNotFoundError:
                pass
            data = ENCODER.encode(ImageIndex(
                magic=INDEX_MAGIC, version=INDEX_VERSION, image_id=self.image_id,
                size=st.st_size, digest=self.digest, trailer_at=self.trailer_at,
                records=self.entries))
            data = xxhash.xxh3_64_intdigest(data).to_bytes(8, "little") + data
            if len(data) > MAX_INDEX:
                return False
            with files.output_image(side, overwrite=True) as (ifd, _name, commit):
                view = memoryview(data)
                while view:
                    view = view[os.write(ifd, view):]
                commit()
            return True
        except (OSError, LcrError):
            return False


def remove_sidecar(path: str) -> None:
    """Remove PATH.lcr-index if there is one (its image is being deleted)."""
    try:
        os.unlink(path + INDEX_SUFFIX)
    except OSError:
        pass


def load_sidecar(path: str, fd: int, header: Header
                 ) -> tuple[int, dict[int, list[Record]], dict[int, list[runs.Tagged]]] | None:
    """The digest, PAGES and page maps of the image open at fd (its header
    read), from its sidecar index, or None if there is none that matches it."""
    try:     # beside the file itself: DIR/latest.img is a symlink to the newest image
        ifd = os.open(os.path.realpath(path) + INDEX_SUFFIX,
                      os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st, ist = os.fstat(ifd), os.fstat(fd)
        # a regular file, of the image's owner, writable by no one the image is not
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_INDEX or st.st_uid != ist.st_uid \
                or st.st_mode & 0o022 & ~ist.st_mode:
            return None
        raw = os.pread(ifd, st.st_size + 1, 0)
        if len(raw) != st.st_size:
            return None
    except OSError:
        return None
    finally:
        os.close(ifd)
    if len(raw) < 8 or int.from_bytes(raw[:8], "little") != xxhash.xxh3_64_intdigest(raw[8:]):
        return None          # damaged (what a careful liar could forge is checked below)
    try:
        idx = msgspec.msgpack.decode(memoryview(raw)[8:], type=ImageIndex)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if idx.magic != INDEX_MAGIC or idx.version != INDEX_VERSION \
            or idx.image_id != header.image_id or idx.size != ist.st_size:
        return None
    return _bind(idx, fd, header)


def _read_trailer(fd: int, at: int, size: int) -> Trailer | None:
    """The TRAILER frame at ``at``, closing the image of ``size`` bytes."""
    try:
        raw = os.pread(fd, FRAME.size, at)
        if len(raw) != FRAME.size:
            return None
        magic, rtype, flags, meta_len, pad, data_len, cs = FRAME.unpack(raw)
        if magic != FRAME_MAGIC or rtype != RecType.TRAILER or flags or pad or data_len \
                or at + FRAME.size + meta_len != size or meta_len > 4096:
            return None
        meta = os.pread(fd, meta_len, at + FRAME.size)
    except OSError:
        return None
    if len(meta) != meta_len or xxhash.xxh3_64_intdigest(meta) != cs:
        return None
    try:
        t = DECODERS[RecType.TRAILER].decode(meta)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return t  # type: ignore[return-value]


def _bind(idx: ImageIndex, fd: int, header: Header):
    """What the index says, if it is the image's own (see above)."""
    trailer = _read_trailer(fd, idx.trailer_at, idx.size)
    if trailer is None or trailer.digest != idx.digest or trailer.records != len(idx.records):
        return None
    if not idx.records or idx.records[0].type != RecType.HEADER:
        return None
    try:
        first = os.pread(fd, FRAME.size, 0)
    except OSError:
        return None
    if len(first) != FRAME.size or FRAME.unpack(first)[6] != idx.records[0].checksum:
        return None
    digest = xxhash.xxh3_64()
    own: dict[int, list[Record]] = {}
    maps: dict[int, list[runs.Tagged]] = {}
    pages = 0
    first_data = FRAME.size     # no page data before the header's end
    for i, e in enumerate(idx.records):
        digest.update(e.checksum.to_bytes(8, "little"))
        if e.type == RecType.PAGES:
            try:
                m = _PAGES.decode(e.meta)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                return None
            want = m.npages * PAGE
            # validate.check's rules for Pages (its generic walk costs 6 us a record)
            if m.addr % PAGE or m.addr + want > TASK_SIZE or e.length > MAX_DATA or e.at < first_data \
                    or e.at + e.length > idx.trailer_at \
                    or (not m.compressed and e.length != want):
                return None
            pages += m.npages
            own.setdefault(m.pid, []).append(Record(
                RecType.PAGES, m, memoryview(b""), data_offset=e.at, data_len=e.length,
                raw_meta=e.meta, checksum=e.checksum))
        elif e.type == RecType.PAGEMAP:
            if xxhash.xxh3_64_intdigest(e.meta) != e.checksum:
                return None
            try:
                pm = _PAGEMAP.decode(e.meta)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                return None
            got = _map_runs(pm)
            if got is None:
                return None
            maps.setdefault(pm.pid, []).extend(got)
        elif e.type in (RecType.TREE, RecType.TASK):
            if e.meta or e.length:
                return None
        elif not (e.type == RecType.HEADER and i == 0):
            return None        # signatures, a second header, unknown types: read it through
    if pages != trailer.pages or digest.intdigest() != trailer.digest:
        return None
    return trailer.digest, own, maps


def _map_runs(pm: PageMap) -> list[runs.Tagged] | None:
    """The runs of a page map, if validate.check accepts it (its rules for
    PageMap and PageRun, without its generic walk: 10 us a run)."""
    out: list[runs.Tagged] = []
    prev = 0
    for r in pm.runs:
        start = r.addr
        end = start + r.npages * PAGE
        if start % PAGE or start < prev or end > TASK_SIZE:
            return None
        out.append((start, end, r.depth))
        prev = end
    return out


def _check_own(img: Indexed) -> None:
    """The depth-0 runs of a child's page map are exactly its PAGES."""
    for pid in set(img.own) | set(img.held):
        stored = runs.normalize((r.meta.addr, r.meta.addr + r.meta.npages * PAGE)  # type: ignore[attr-defined]
                                for r in img.own.get(pid, []))
        mapped = runs.normalize((s, e) for s, e, d in img.held.get(pid, []) if d == 0)
        if stored != mapped:
            raise ImageError(f"{img.path} is corrupt: the pages it stores for pid {pid} do not "
                             "match its page map")
        for s, e, d in img.held.get(pid, []):
            if d > img.header.parent.depth:  # type: ignore[union-attr]
                raise ImageError(f"{img.path} is corrupt: its page map refers to depth {d}, "
                                 f"beyond its chain of {img.header.parent.depth}")  # type: ignore[union-attr]


def resolve(ref: ParentRef, child: str, images_dir: str | None) -> str:
    """Where the parent named by ref is: --images-dir first, then beside the child."""
    tried = []
    cands = []
    if images_dir:
        cands.append(os.path.join(images_dir, os.path.basename(ref.path)))
    if os.path.isabs(ref.path):
        cands.append(ref.path)
    else:
        base = os.path.dirname(child) if child and child != "-" else "."
        cands.append(os.path.join(base, ref.path))
    for c in cands:
        if os.path.exists(c):
            return c
        tried.append(c)
    raise ImageError(f"the parent image of {child} is missing: looked for {' and '.join(tried)}",
                     "put the parent images beside it, or give --images-dir DIR")


@dataclass
class Chain:
    """The parents of one image, nearest first."""
    images: list[Indexed]

    @classmethod
    def open(cls, ref: ParentRef, child: str, images_dir: str | None = None) -> "Chain":
        images: list[Indexed] = []
        try:
            while True:
                path = resolve(ref, child, images_dir)
                img = index(path)
                images.append(img)
                _match(img, ref, child)
                if img.header.parent is None:
                    return cls(images)
                if len(images) >= MAX_CHAIN:
                    raise ImageError(f"the chain of {child} is longer than {MAX_CHAIN} images")
                ref, child = img.header.parent, path
        except BaseException:
            for img in images:
                img.close()
            raise

    @classmethod
    def from_path(cls, path: str, images_dir: str | None = None) -> "Chain":
        """The chain whose nearest image is ``path`` (a parent given by the user)."""
        img = index(path)
        if img.header.parent is None:
            return cls([img])
        try:
            rest = cls.open(img.header.parent, path, images_dir)
        except BaseException:
            img.close()
            raise
        if len(rest.images) + 1 >= MAX_CHAIN:
            img.close()
            rest.close()
            raise ImageError(f"{path} ends a chain of {len(rest.images) + 1} images, the most "
                             "lcr builds on", "take a full checkpoint (without --parent)")
        return cls([img] + rest.images)

    @property
    def parent(self) -> Indexed:
        return self.images[0]

    def close(self) -> None:
        for img in self.images:
            img.close()

    def read(self, depth: int, pid: int, start: int, end: int) -> Iterator[tuple[int, memoryview]]:
        """The pages [start, end) of pid that the image at ``depth`` stores."""
        if not 1 <= depth <= len(self.images):
            raise ImageError(f"a page map refers to an image {depth} parents up; the chain has "
                             f"{len(self.images)}")
        img = self.images[depth - 1]
        recs = img.own.get(pid, [])
        keys = img.keys(pid)
        i = max(0, bisect.bisect_right(keys, start) - 1)
        cur = start
        while cur < end:
            if i >= len(recs):
                break
            r = recs[i]
            m: Pages = r.meta  # type: ignore[assignment]
            rend = m.addr + m.npages * PAGE
            if rend <= cur:
                i += 1
                continue
            if m.addr > cur:
                break
            data = img.pages_of(r)
            hi = min(end, rend)
            yield cur, data[cur - m.addr: hi - m.addr]
            cur = hi
            i += 1
        if cur < end:
            raise ImageError(f"{img.path} lacks pages of pid {pid} at 0x{cur:x} that its child "
                             "needs: the chain is inconsistent",
                             "restart from an image whose parents are intact")

    def held(self, pid: int) -> list[runs.Tagged]:
        """The pages of pid at the parent's checkpoint, with their depth seen
        from a child of the parent (1: the parent itself)."""
        return [(s, e, d + 1) for s, e, d in self.parent.held.get(pid, [])]

    def hashes(self, pid: int):
        """Addresses and xxh3 of every page of pid at the parent's checkpoint
        (read from the chain): what a child without a write tracker compares with."""
        import numpy as np
        held = self.held(pid)
        n = runs.total(held) // PAGE
        addrs = np.empty(n, dtype=np.uint64)
        hashes = np.empty(n, dtype=np.uint64)
        h = xxhash.xxh3_64_intdigest
        k = 0
        for s, e, d in held:
            for addr, data in self.read(d, pid, s, e):
                cnt = len(data) // PAGE
                addrs[k:k + cnt] = np.arange(addr, addr + cnt * PAGE, PAGE, dtype=np.uint64)
                hashes[k:k + cnt] = [h(data[i:i + PAGE]) for i in range(0, len(data), PAGE)]
                k += cnt
        return addrs, hashes


def _match(img: Indexed, ref: ParentRef, child: str) -> None:
    if img.header.image_id != ref.id:
        raise ImageError(f"{img.path} is not the parent of {child}: it is another checkpoint "
                         f"(id {img.header.image_id.hex() or 'none'}, expected {ref.id.hex()})",
                         "find the image it was made from, or give --images-dir")
    if img.digest != ref.digest:
        raise ImageError(f"{img.path} was changed after {child} was made from it (its digest "
                         "differs)", "restore the original file")
    depth = img.header.parent.depth + 1 if img.header.parent else 1
    if depth != ref.depth:
        raise ImageError(f"{img.path} is corrupt: it sits at depth {depth} of its chain, "
                         f"its child says {ref.depth}")
