"""Writer and strict reader of the image stream (see schema.py for the layout).

The reader treats the image as untrusted: every frame field is bounded before
anything is allocated, the checksum is verified before the metadata is
decoded, the metadata is decoded into typed Structs whose fields carry
bounds, and the trailer must close the stream.  Every failure is an
ImageError naming what is wrong and where.
"""
from __future__ import annotations

import errno
import os
import platform
from dataclasses import dataclass

import msgspec
import xxhash
import zstandard

from linuxcr.errors import ImageError, ImageWriteError
from linuxcr.image.schema import (
    ARCH, DATA_TYPES, DECODERS, ENCODER, FORMAT_VERSION, FRAME, FRAME_MAGIC, MAGIC,
    MAX_DATA, MAX_META, MAX_TASKS, Header, Pages, RecType, Trailer,
)

PAGE = os.sysconf("SC_PAGE_SIZE")
RING = 3


class _Version(msgspec.Struct):
    """Just the version of a header of any format (unknown fields ignored)."""
    version: int = 0


# msgspec raises UnicodeDecodeError for a map key that is not UTF-8, and
# RecursionError when it skips deeply nested unknown values (_Version).
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _printable(text: str) -> str:
    """Text from the image, fit for a one-line message: control characters
    (newlines, terminal escapes) escaped.  msgspec quotes field names."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _buffer_limit() -> int:
    """Half the memory available now: the most we buffer of a piped image."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError):
        pass
    return 1 << 30


def _digest_bytes(cs: int) -> bytes:
    return cs.to_bytes(8, "little")


class ImageWriter:
    """Writes records to a file descriptor, sequentially (never seeks)."""

    def __init__(self, fd: int, *, compress: bool = False, level: int = 1, name: str = "image") -> None:
        self.fd = fd
        self.name = name
        self.compress = compress
        self._zstd = zstandard.ZstdCompressor(level=level) if compress else None
        self._digest = xxhash.xxh3_64()
        self.records = 0
        self.pages = 0
        self.bytes_written = 0

    def record(self, rtype: RecType, meta: msgspec.Struct, data: bytes | memoryview = b"") -> None:
        m = ENCODER.encode(meta)
        h = xxhash.xxh3_64(m)
        if data:
            h.update(data)
        cs = h.intdigest()
        frame = FRAME.pack(FRAME_MAGIC, int(rtype), 0, len(m), 0, len(data), cs)
        self._write_all([frame, m, data] if data else [frame, m])
        self._digest.update(_digest_bytes(cs))
        self.records += 1

    def header(self, header: Header) -> None:
        self.record(RecType.HEADER, header)

    def page_run(self, pid: int, addr: int, data: memoryview) -> None:
        npages = len(data) // PAGE
        if self._zstd is not None:
            packed = self._zstd.compress(data)
            if len(packed) < len(data):
                self.record(RecType.PAGES, Pages(pid=pid, addr=addr, npages=npages, compressed=True), packed)
                self.pages += npages
                return
        self.record(RecType.PAGES, Pages(pid=pid, addr=addr, npages=npages), data)
        self.pages += npages

    def finish(self) -> None:
        self.record(RecType.TRAILER, Trailer(records=self.records, pages=self.pages,
                                             digest=self._digest.intdigest()))

    def _write_all(self, bufs: list) -> None:
        views = [memoryview(b).cast("B") for b in bufs]
        while views:
            try:
                n = os.writev(self.fd, views)
            except OSError as e:
                raise _write_error(e, self.name) from None
            self.bytes_written += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]


def _write_error(e: OSError, name: str) -> ImageWriteError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ImageWriteError(f"no space left on the device holding {name}",
                               "free some space or write the image elsewhere")
    if e.errno == errno.EPIPE:
        return ImageWriteError(f"the reader of {name} went away (broken pipe)")
    return ImageWriteError(f"cannot write {name}: {e.strerror}")


@dataclass
class Record:
    type: RecType
    meta: msgspec.Struct
    data: memoryview          # valid until the next read


class ImageReader:
    """Reads and validates records one by one."""

    def __init__(self, fd: int, *, name: str = "image") -> None:
        self.fd = fd
        self.name = name
        self.offset = 0
        self.records = 0
        self.pages = 0
        self.done = False
        self.header: Header | None = None
        self.tasks = 0
        self._digest = xxhash.xxh3_64()
        # Data buffers rotate, so a record's data stays valid while the next
        # two are read (the restore reads ahead in a helper thread).
        self._bufs = [bytearray(0) for _ in range(RING)]
        self._turn = 0
        self._zstd = zstandard.ZstdDecompressor()
        self._owned_fd: int | None = None

    def _fail(self, what: str) -> ImageError:
        return ImageError(f"{self.name} is corrupt: {_printable(what)} (at byte {self.offset})",
                          "the image cannot be used; take a new checkpoint")

    def _read_exact(self, n: int, into: memoryview | None = None) -> memoryview:
        view = into if into is not None else memoryview(bytearray(n))
        got = 0
        while got < n:
            try:
                k = os.readv(self.fd, [view[got:n]])
            except OSError as e:
                raise ImageError(f"cannot read {self.name}: {e.strerror}") from None
            if k == 0:
                raise ImageError(f"{self.name} is truncated: it ends at byte {self.offset + got} "
                                 "in the middle of a record",
                                 "the checkpoint did not complete or the copy was cut short")
            got += k
        self.offset += n
        return view[:n]

    def read_header(self) -> Header:
        first = self._read_frame(allow_eof=True)
        if first is None:
            raise ImageError(f"{self.name} is empty")
        if first[0] != RecType.HEADER:
            raise self._fail("it does not start with a header")
        rec = self._read_body(*first)
        hdr = rec.meta
        assert isinstance(hdr, Header)
        if hdr.magic != MAGIC:
            raise self._fail("bad magic in header")
        if hdr.version > FORMAT_VERSION:
            raise self._newer(hdr.version)
        if hdr.arch != ARCH or platform.machine() != ARCH:
            raise ImageError(f"{self.name} was made on {_printable(hdr.arch)}; "
                             f"this machine is {platform.machine()}")
        if hdr.page_size != PAGE:
            raise ImageError(f"{self.name} uses {hdr.page_size}-byte pages; this machine uses {PAGE}")
        self.header = hdr
        return hdr

    def _newer(self, version: int) -> ImageError:
        return ImageError(f"{self.name} has format version {version}; this lcr reads up to "
                          f"{FORMAT_VERSION}", "restart it with a newer linuxcr")

    def _read_frame(self, allow_eof: bool = False) -> tuple[RecType, int, int, int] | None:
        raw = bytearray(FRAME.size)
        got = 0
        while got < FRAME.size:
            try:
                k = os.readv(self.fd, [memoryview(raw)[got:]])
            except OSError as e:
                raise ImageError(f"cannot read {self.name}: {e.strerror}") from None
            if k == 0:
                if got == 0 and allow_eof:
                    return None
                if got == 0:
                    raise ImageError(f"{self.name} is truncated: it ends at byte {self.offset} "
                                     "without its trailer",
                                     "the checkpoint did not complete or the copy was cut short")
                head = min(got, 4)
                if self.offset == 0 and raw[:head] != FRAME_MAGIC.to_bytes(4, "little")[:head]:
                    raise ImageError(f"{self.name} is not a linuxcr image (bad magic)")
                raise ImageError(f"{self.name} is truncated: it ends inside a record frame "
                                 f"at byte {self.offset + got}")
            got += k
        magic, rtype, flags, meta_len, pad, data_len, cs = FRAME.unpack(raw)
        if magic != FRAME_MAGIC:
            if self.offset == 0:
                raise ImageError(f"{self.name} is not a linuxcr image (bad magic)")
            raise self._fail("bad record frame")
        try:
            rt = RecType(rtype)
        except ValueError:
            raise self._fail(f"unknown record type {rtype}") from None
        if flags or pad:   # reserved, written as 0, and not covered by the checksum
            raise self._fail(f"reserved frame fields are not zero ({flags:#x}, {pad:#x})")
        if meta_len > MAX_META:
            raise self._fail(f"metadata length {meta_len} exceeds the limit {MAX_META}")
        if data_len > MAX_DATA or (data_len and rt not in DATA_TYPES):
            raise self._fail(f"data length {data_len} not allowed for a {rt.name} record")
        self.offset += FRAME.size
        return rt, meta_len, data_len, cs

    def _read_body(self, rt: RecType, meta_len: int, data_len: int, cs: int) -> Record:
        start = self.offset
        meta = bytes(self._read_exact(meta_len))
        data = memoryview(b"")
        if data_len:
            self._turn = (self._turn + 1) % RING
            if data_len > len(self._bufs[self._turn]):
                self._bufs[self._turn] = bytearray(data_len)
            data = self._read_exact(data_len, memoryview(self._bufs[self._turn]))
        h = xxhash.xxh3_64(meta)
        if data_len:
            h.update(data)
        if h.intdigest() != cs:
            self.offset = start
            raise self._fail(f"checksum mismatch in a {rt.name} record")
        try:
            obj = DECODERS[rt].decode(meta)
        except _DECODE_ERRORS as e:
            self.offset = start
            if rt is RecType.HEADER:   # a newer format may have other header fields
                try:
                    version = msgspec.msgpack.decode(meta, type=_Version).version
                except _DECODE_ERRORS:
                    version = 0
                if version > FORMAT_VERSION:
                    raise self._newer(version) from None
            raise self._fail(f"invalid {rt.name} record: {e}") from None
        if rt is not RecType.TRAILER:
            self._digest.update(_digest_bytes(cs))
            self.records += 1
        return Record(rt, obj, data)

    def next(self) -> Record:
        """The next record; PAGES data is checked and decompressed."""
        if self.done:
            raise self._fail("data after the trailer")
        frame = self._read_frame()
        assert frame is not None
        if frame[0] is RecType.HEADER:
            raise self._fail("a second header record")
        if frame[0] is RecType.TASK:
            if self.tasks >= MAX_TASKS:
                raise self._fail(f"more than {MAX_TASKS} task records")
            self.tasks += 1
        rec = self._read_body(*frame)
        if rec.type is RecType.PAGES:
            rec.data = self._pages_data(rec.meta, rec.data)  # type: ignore[arg-type]
        elif rec.type is RecType.TRAILER:
            self._check_trailer(rec.meta)  # type: ignore[arg-type]
        return rec

    def _pages_data(self, meta: Pages, data: memoryview) -> memoryview:
        want = meta.npages * PAGE
        if meta.compressed:
            try:
                # decompress() allocates the size the zstd frame declares, even beyond
                # max_output_size: check it first (-1: not declared, then bounded)
                size = zstandard.frame_content_size(data)
                if size not in (-1, want):
                    raise self._fail(f"compressed pages at 0x{meta.addr:x} declare {size} bytes, "
                                     f"expected {want}")
                out = self._zstd.decompress(data, max_output_size=want)
            except zstandard.ZstdError as e:
                raise self._fail(f"compressed pages at 0x{meta.addr:x} do not decompress: {e}") from None
            data = memoryview(out)
        if len(data) != want:
            raise self._fail(f"pages record at 0x{meta.addr:x} holds {len(data)} bytes, "
                             f"expected {want}")
        if meta.addr % PAGE:
            raise self._fail(f"pages record address 0x{meta.addr:x} is not page aligned")
        self.pages += meta.npages
        return data

    def _check_trailer(self, t: Trailer) -> None:
        if t.records != self.records or t.pages != self.pages or t.digest != self._digest.intdigest():
            raise self._fail("trailer does not match the records read (records were lost, "
                             "duplicated or reordered)")
        self.done = True

    def buffer_rest(self) -> None:
        """Take the rest of the stream into memory (a memfd) and read from there.

        Used when the writer waits for us to drain it before it can finish."""
        mem = os.memfd_create("lcr-image", os.MFD_CLOEXEC)
        limit = _buffer_limit()
        held = 0
        try:
            while True:
                try:
                    chunk = os.read(self.fd, 1 << 20)
                except OSError as e:
                    raise ImageError(f"cannot read {self.name}: {e.strerror}") from None
                if not chunk:
                    break
                held += len(chunk)
                if held > limit:
                    raise ImageError(f"{self.name} does not fit in memory while waiting for the "
                                     f"original process to exit ({limit >> 20} MiB)",
                                     "write the image to a file first, or restart with --any-pid")
                os.write(mem, chunk)
        except BaseException:
            os.close(mem)
            raise
        os.lseek(mem, 0, os.SEEK_SET)
        self.fd = mem
        self._owned_fd = mem

    def close(self) -> None:
        """Close what the reader opened itself (the caller owns the fd it gave)."""
        if self._owned_fd is not None:
            os.close(self._owned_fd)
            self._owned_fd = None

    def expect_end(self) -> None:
        """After the trailer nothing may follow."""
        try:
            extra = os.read(self.fd, 1)
        except OSError as e:
            raise ImageError(f"cannot read {self.name}: {e.strerror}") from None
        if extra:
            raise self._fail("data after the trailer")
