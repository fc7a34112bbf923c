"""Writer and strict reader of the image stream (see schema.py for the layout).

The reader treats the image as untrusted: every frame field is bounded before
anything is allocated, the checksum is verified before the metadata is
decoded, the metadata is decoded into typed Structs whose fields carry
bounds, and the trailer must close the stream.  Every failure is an
ImageError naming what is wrong and where.

Signatures (image/sign.py): a writer given a signing key (``options``, or
``signer=``) hashes every byte it writes with SHA-256, flags the header
"signed", writes a "meta" SIGNATURE record before the first record that is
not HEADER/TREE/TASK and an "image" one right before the TRAILER.  A reader
given a key (``verifier``) refuses an unsigned image at its header and
checks each signature as it comes; without a key it only checks that a
signed image has both, in their places.  SIGNATURE records never reach the
caller of ``next()``.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import platform
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

import msgspec
import xxhash
import zstandard

from linuxcr import faults
from linuxcr.errors import ImageError, ImageWriteError
from linuxcr.image import sign, validate
from linuxcr.image.schema import (
    ARCH, DATA_TYPES, DECODERS, ENCODER, FORMAT_VERSION, FRAME, FRAME_MAGIC, MAGIC,
    MAX_DATA, MAX_META, MAX_TASKS, MAX_TOTAL_META, Header, Pages, RecType, Signature, Trailer,
)

PAGE = os.sysconf("SC_PAGE_SIZE")
RING = 3
SMALL_DATA = 256 << 10     # records up to this size get a buffer of their own (not the ring)


class _Version(msgspec.Struct):
    """Just the version of a header of any format (unknown fields ignored)."""
    version: int = 0


# msgspec raises UnicodeDecodeError for a map key that is not UTF-8, and
# RecursionError when it skips deeply nested unknown values (_Version).
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def printable(text: str) -> str:
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


SIGNED = "signed"                       # header flag of a signed image
META_RECORDS = (RecType.HEADER, RecType.TREE, RecType.TASK)   # under the "meta" signature


@dataclass(frozen=True)
class Options:
    """What writers and readers made in this context use by default."""
    signer: sign.Key | None = None       # writers sign with it
    verifier: sign.Key | None = None     # readers check signatures with it
    observer: Callable[[RecType, msgspec.Struct], None] | None = None  # readers report metadata
    # writers report each record written: (type, encoded meta, checksum,
    # offset of its frame, bytes of data) -- image/chain.py's sidecar index
    recorder: Callable[[RecType, bytes, int, int, int], None] | None = None


_OPTIONS: ContextVar[Options] = ContextVar("linuxcr_stream_options", default=Options())


@contextmanager
def options(**kw) -> Iterator[None]:
    """``with options(signer=key): dump.checkpoint(...)``: the engine makes its
    ImageWriter/ImageReader itself; this is how api.py hands them keys."""
    token = _OPTIONS.set(Options(**kw))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


@contextmanager
def recording(recorder: Callable[[RecType, bytes, int, int, int], None]) -> Iterator[None]:
    """Writers made in this context report every record to ``recorder``
    (the other options stay as they are)."""
    token = _OPTIONS.set(dataclasses.replace(_OPTIONS.get(), recorder=recorder))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


class ImageWriter:
    """Writes records to a file descriptor, sequentially (never seeks)."""

    def __init__(self, fd: int, *, compress: bool = False, level: int = 1, name: str = "image",
                 signer: sign.Key | None = None) -> None:
        self.fd = fd
        self.name = name
        self.compress = compress
        self._zstd = zstandard.ZstdCompressor(level=level) if compress else None
        self._digest = xxhash.xxh3_64()
        self.records = 0
        self.pages = 0
        self.bytes_written = 0
        self.signer = signer if signer is not None else _OPTIONS.get().signer
        self._sha = hashlib.sha256() if self.signer is not None else None
        self._meta_signed = False
        self.digest = 0              # the trailer's, once finish() wrote it
        self._recorder = _OPTIONS.get().recorder

    def record(self, rtype: RecType, meta: msgspec.Struct, data: bytes | memoryview = b"",
               cs: int | None = None) -> None:
        """One record; ``cs``: its checksum if the caller computed it already
        (record_checksum of the same meta and data), e.g. in another thread."""
        if self._sha is not None and not self._meta_signed and rtype not in META_RECORDS:
            self._sign("meta")
        m = ENCODER.encode(meta)
        if cs is None:
            cs = record_checksum(m, data)
        frame = FRAME.pack(FRAME_MAGIC, int(rtype), 0, len(m), 0, len(data), cs)
        bufs = [frame, m, data] if data else [frame, m]
        if self._sha is not None:
            for b in bufs:
                self._sha.update(b)
        at = self.bytes_written
        self._write_all(bufs)
        self._digest.update(_digest_bytes(cs))
        self.records += 1
        if self._recorder is not None:
            self._recorder(rtype, m, cs, at, len(data))

    def _sign(self, scope: str) -> None:
        """A SIGNATURE record over the SHA-256 of everything written so far."""
        assert self.signer is not None and self._sha is not None
        if scope == "meta":
            self._meta_signed = True
        sig = self.signer.sign(sign.message(scope, self._sha.digest()))
        self.record(RecType.SIGNATURE, Signature(scope=scope, alg=self.signer.alg,
                                                 key_id=self.signer.key_id, sig=sig))

    def header(self, header: Header) -> None:
        if self.signer is not None and SIGNED not in header.flags:
            header = msgspec.structs.replace(header, flags=[*header.flags, SIGNED])
        self.record(RecType.HEADER, header)

    def page_digest(self, pid: int, addr: int, data: memoryview) -> int | None:
        """The checksum page_run(pid, addr, data) will need, or None when it
        cannot be known before (compressed records): thread-safe, so that the
        thread reading the pages can hash them while they are in its cache
        and this one only writes (docs/benchmarks.md)."""
        if self._zstd is not None:
            return None
        return record_checksum(ENCODER.encode(Pages(pid=pid, addr=addr, npages=len(data) // PAGE)), data)

    def page_run(self, pid: int, addr: int, data: memoryview, cs: int | None = None) -> None:
        faults.point("dump.pages")
        npages = len(data) // PAGE
        if self._zstd is not None:
            packed = self._zstd.compress(data)
            if len(packed) < len(data):
                self.record(RecType.PAGES, Pages(pid=pid, addr=addr, npages=npages, compressed=True), packed)
                self.pages += npages
                return
        self.record(RecType.PAGES, Pages(pid=pid, addr=addr, npages=npages), data, cs)
        self.pages += npages

    def finish(self) -> None:
        faults.point("dump.trailer")
        if self._sha is not None:
            if not self._meta_signed:
                self._sign("meta")
            self._sign("image")
        self.digest = self._digest.intdigest()
        self.record(RecType.TRAILER, Trailer(records=self.records, pages=self.pages,
                                             digest=self.digest))

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


def record_checksum(meta: bytes, data: bytes | memoryview = b"") -> int:
    """The frame checksum of a record: xxh3-64 of its encoded metadata then its data."""
    h = xxhash.xxh3_64(meta)
    if data:
        h.update(data)
    return h.intdigest()


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
    data: memoryview          # valid while the next two are read (for good if <= SMALL_DATA)
    # a skimmed PAGES record (ImageReader(skim=True)): its data was skipped,
    # read_skimmed() fetches and checks it later
    data_offset: int = -1
    data_len: int = 0
    raw_meta: bytes = b""
    checksum: int = 0


class ImageReader:
    """Reads and validates records one by one."""

    def __init__(self, fd: int, *, name: str = "image", verifier: sign.Key | None = None,
                 observer: Callable[[RecType, msgspec.Struct], None] | None = None,
                 skim: bool = False) -> None:
        opts = _OPTIONS.get()
        self.verifier = verifier if verifier is not None else opts.verifier
        self._observer = observer if observer is not None else opts.observer
        self._sha = hashlib.sha256() if self.verifier is not None else None
        self._sig_digest = b""          # SHA-256 of the stream before the SIGNATURE frame
        self.signed = False             # the header says so
        self.meta_total = 0             # bytes of metadata of all records but PAGES
        self.scopes: set[str] = set()   # signatures seen (checked if we have a verifier)
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
        # skim: seek over PAGES data (an image of a chain is indexed, and only
        # the pages needed are read later).  Not with signatures: those cover
        # every byte, so every byte must be read.
        self.skim = skim and self.verifier is None

    def widen(self, n: int) -> None:
        """At least ``n`` data buffers in the rotation: a record's data then
        stays valid while the next n - 1 are read (a restore that writes
        several records at once, resources/memory.py PageFill)."""
        while len(self._bufs) < n:
            self._bufs.append(bytearray(0))

    def _fail(self, what: str) -> ImageError:
        return ImageError(f"{self.name} is corrupt: {printable(what)} (at byte {self.offset})",
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
            raise ImageError(f"{self.name} was made on {printable(hdr.arch)}; "
                             f"this machine is {platform.machine()}")
        if hdr.page_size != PAGE:
            raise ImageError(f"{self.name} uses {hdr.page_size}-byte pages; this machine uses {PAGE}")
        self.signed = SIGNED in hdr.flags
        if self.verifier is not None and not self.signed:
            raise ImageError(f"{self.name} is not signed, and --verify asks for a signature",
                             "it was made without --sign; use it without --verify only if you "
                             "trust where it came from")
        self.header = hdr
        if self._observer is not None:
            self._observer(RecType.HEADER, hdr)
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
        if rt not in DATA_TYPES:    # metadata the caller keeps (tree, tasks): bounded in all
            self.meta_total += meta_len
            if self.meta_total > MAX_TOTAL_META:
                raise self._fail(f"its metadata records total more than {MAX_TOTAL_META >> 20} MiB")
        if self._sha is not None:
            if rt is RecType.SIGNATURE:
                self._sig_digest = self._sha.digest()
            self._sha.update(raw)
        self.offset += FRAME.size
        return rt, meta_len, data_len, cs

    def _skim_body(self, rt: RecType, meta_len: int, data_len: int, cs: int) -> Record:
        """A PAGES record whose data is skipped: its checksum is checked when
        read_skimmed() reads it; the trailer digest covers the checksum."""
        start = self.offset
        meta = bytes(self._read_exact(meta_len))
        try:
            obj = DECODERS[rt].decode(meta)
        except _DECODE_ERRORS as e:
            self.offset = start
            raise self._fail(f"invalid {rt.name} record: {e}") from None
        self._check_ranges(rt, obj, start)
        try:
            os.lseek(self.fd, data_len, os.SEEK_CUR)
        except OSError as e:
            raise ImageError(f"cannot read {self.name}: {e.strerror}") from None
        data_at = self.offset
        self.offset += data_len
        self._digest.update(_digest_bytes(cs))
        self.records += 1
        self.pages += obj.npages  # type: ignore[attr-defined]
        return Record(rt, obj, memoryview(b""), data_offset=data_at, data_len=data_len,
                      raw_meta=meta, checksum=cs)

    def _check_ranges(self, rt: RecType, obj: msgspec.Struct, start: int) -> None:
        """Every field within what the kernel accepts and restore assumes
        (image/validate.py), before any caller sees the record."""
        try:
            validate.check(obj)
        except validate.Invalid as e:
            self.offset = start
            raise self._fail(f"{validate.where(rt, obj)}: {e.describe()}") from None

    def read_skimmed(self, rec: Record) -> memoryview:
        """The pages of a record skim() passed over, checked and decompressed."""
        data = bytearray(rec.data_len)
        got = 0
        while got < rec.data_len:
            try:
                k = os.preadv(self.fd, [memoryview(data)[got:]], rec.data_offset + got)
            except OSError as e:
                raise ImageError(f"cannot read {self.name}: {e.strerror}") from None
            if k == 0:
                raise ImageError(f"{self.name} is truncated: it ends at byte "
                                 f"{rec.data_offset + got} in the middle of a record",
                                 "the image was changed or cut short after it was indexed")
            got += k
        h = xxhash.xxh3_64(rec.raw_meta)
        h.update(data)
        if h.intdigest() != rec.checksum:
            raise ImageError(f"{self.name} is corrupt: checksum mismatch in a PAGES record "
                             f"(at byte {rec.data_offset})",
                             "the image cannot be used; take a new checkpoint")
        pages = self.pages
        try:
            return self._pages_data(rec.meta, memoryview(data))  # type: ignore[arg-type]
        finally:
            self.pages = pages

    def _read_body(self, rt: RecType, meta_len: int, data_len: int, cs: int) -> Record:
        start = self.offset
        meta = bytes(self._read_exact(meta_len))
        data = memoryview(b"")
        if data_len and data_len <= SMALL_DATA:   # a buffer of its own: valid for good
            data = self._read_exact(data_len)
        elif data_len:
            self._turn = (self._turn + 1) % len(self._bufs)
            if data_len > len(self._bufs[self._turn]):
                self._bufs[self._turn] = bytearray(data_len)
            data = self._read_exact(data_len, memoryview(self._bufs[self._turn]))
        if self._sha is not None:
            self._sha.update(meta)
            if data_len:
                self._sha.update(data)
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
        self._check_ranges(rt, obj, start)
        if rt is not RecType.TRAILER:
            self._digest.update(_digest_bytes(cs))
            self.records += 1
        return Record(rt, obj, data, data_offset=self.offset - data_len, data_len=data_len,
                      raw_meta=meta, checksum=cs)

    def next(self) -> Record:
        """The next record; PAGES data is checked and decompressed.
        SIGNATURE records are checked here and never returned."""
        while True:
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
            self._check_place(frame[0])
            if self.skim and frame[0] is RecType.PAGES:
                rec = self._skim_body(*frame)
                if rec.meta.addr % PAGE:  # type: ignore[attr-defined]
                    raise self._fail(f"pages record address 0x{rec.meta.addr:x} is not page aligned")  # type: ignore[attr-defined]
                return rec
            rec = self._read_body(*frame)
            if rec.type is RecType.SIGNATURE:
                self._check_signature(rec.meta)  # type: ignore[arg-type]
                continue
            if rec.type is RecType.PAGES:
                rec.data = self._pages_data(rec.meta, rec.data)  # type: ignore[arg-type]
            elif rec.type is RecType.TRAILER:
                self._check_trailer(rec.meta)  # type: ignore[arg-type]
            elif self._observer is not None and rec.type in META_RECORDS:
                self._observer(rec.type, rec.meta)
            return rec

    def _check_place(self, rt: RecType) -> None:
        """A signed image has a "meta" signature right after its metadata
        records and an "image" signature right before its trailer."""
        if rt is RecType.SIGNATURE:
            if not self.signed:
                raise self._fail("a signature record in an image whose header does not say "
                                 "it is signed")
            return
        if not self.signed:
            return
        if rt in META_RECORDS:
            if self.scopes:
                raise self._fail(f"a {rt.name} record after the metadata signature")
        elif "meta" not in self.scopes:
            raise self._fail("the signature of the metadata is missing after the last task record")
        elif rt is RecType.TRAILER and "image" not in self.scopes:
            raise self._fail("the image signature is missing before the trailer")
        elif rt is not RecType.TRAILER and "image" in self.scopes:
            raise self._fail(f"a {rt.name} record after the image signature")

    def _check_signature(self, sig: Signature) -> None:
        if sig.scope in self.scopes:
            raise self._fail(f"a second {sig.scope} signature")
        if sig.scope == "image" and "meta" not in self.scopes:
            raise self._fail("the image signature comes before the metadata signature")
        self.scopes.add(sig.scope)
        v = self.verifier
        if v is None:
            return
        what = "metadata" if sig.scope == "meta" else "whole-image"
        if sig.alg != v.alg:
            raise ImageError(f"{self.name} is signed with {printable(sig.alg)}, but {v.path} "
                             f"holds {v.what}", "give the key it was signed with")
        if sig.key_id != v.key_id:
            raise ImageError(f"{self.name} was signed with another key (key id "
                             f"{sign.key_id_hex(sig.key_id)}; {v.path} has key id "
                             f"{sign.key_id_hex(v.key_id)})", "give the key it was signed with")
        if not v.verify(sign.message(sig.scope, self._sig_digest), sig.sig):
            raise ImageError(f"{self.name} fails its {what} signature check (record ending at byte "
                             f"{self.offset}): it was modified after it was signed",
                             "do not use it; take a new checkpoint")

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
