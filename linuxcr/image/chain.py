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

from linuxcr.errors import ImageError
from linuxcr.image import files, runs
from linuxcr.image.schema import MAX_CHAIN, Header, PageMap, Pages, ParentRef, RecType
from linuxcr.image.stream import PAGE, ImageReader, Record


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
        while True:
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
