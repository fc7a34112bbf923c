"""Coverage-guided fuzzing of the image reader with atheris (on demand, not in CI).

    pip install atheris            # not a dependency of linuxcr
    python fuzz/atheris_image.py -atheris_runs=100000
    python fuzz/atheris_image.py fuzz/corpus -max_len=262144     # with seeds

Good seeds are real images: ``lcr checkpoint PID -o fuzz/corpus/a.img
--leave-running`` (also with ``--compress``).

Every input is read twice, as `lcr restart` / `lcr show` would read it:

1. as is, through a pipe (or a memfd when it is larger than a pipe holds):
   checksums stop most mutations at the frame they hit;
2. re-framed: the input is cut into records along its frame headers (lengths
   clamped to what is there), then written back with right checksums and a
   right trailer, as a hostile writer would, so that mutations reach the
   msgpack decoding, the schema bounds, the header checks, the page
   decompression, validate_tree and `lcr show`'s rendering.

Only ImageError and RestoreError may come out, with a message that is one
printable line; anything else (a zstd error, struct.error, a msgspec error,
UnicodeDecodeError, IndexError, MemoryError, ...) is a crash.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import atheris
except ImportError:   # the module stays importable (one_input) without atheris
    atheris = None


def _imports():
    import msgspec
    import xxhash

    from linuxcr.engine.restore import validate_tree
    from linuxcr.errors import ImageError, RestoreError
    from linuxcr.image.schema import FRAME, FRAME_MAGIC, Pages, RecType, Trailer
    from linuxcr.image.show import render_text, summarize
    from linuxcr.image.stream import ImageReader
    return (msgspec, xxhash, validate_tree, ImageError, RestoreError, FRAME, FRAME_MAGIC, Pages,
            RecType, Trailer, render_text, summarize, ImageReader)


if atheris is not None:
    with atheris.instrument_imports():
        (msgspec, xxhash, validate_tree, ImageError, RestoreError, FRAME, FRAME_MAGIC, Pages,
         RecType, Trailer, render_text, summarize, ImageReader) = _imports()
else:
    (msgspec, xxhash, validate_tree, ImageError, RestoreError, FRAME, FRAME_MAGIC, Pages,
     RecType, Trailer, render_text, summarize, ImageReader) = _imports()

ALLOWED = (ImageError, RestoreError)
F_GETPIPE_SZ = 1032


def _source(data: bytes) -> int:
    """A readable fd holding data, at EOF after it: a pipe if it fits, else a memfd."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        if len(data) <= fcntl.fcntl(w, F_GETPIPE_SZ):
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
            return r
    finally:
        os.close(w)
    os.close(r)
    fd = os.memfd_create("fuzz-image", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read(data: bytes) -> bool:
    """Read like a restart does; True if the image is valid."""
    fd = _source(data)
    try:
        r = ImageReader(fd, name="fuzz image")
        r.read_header()
        trees, tasks = [], []
        while not r.done:
            rec = r.next()
            if rec.type is RecType.TREE:
                trees.append(rec.meta)
            elif rec.type is RecType.TASK:
                tasks.append(rec.meta)
        r.expect_end()
    except ALLOWED as e:
        _one_line(e)
        return False
    finally:
        os.close(fd)
    if trees:   # what restart checks before any process exists
        try:
            validate_tree(trees[0], tasks)
        except ALLOWED as e:
            _one_line(e)
    return True


def _one_line(e: BaseException) -> None:
    """The CLI prints the message as one line: nothing from the image may break it."""
    if not str(e).isprintable():
        raise AssertionError(f"message is not one printable line: {str(e)!r}")


def _show(data: bytes) -> None:
    fd = _source(data)
    try:
        s = summarize(fd, "fuzz image")
    finally:
        os.close(fd)
    json.dumps(s)
    text = render_text(s)
    if not all(line.isprintable() for line in text.split("\n")):
        raise AssertionError("lcr show printed control characters from the image")


def _check(data: bytes) -> None:
    ok = _read(data)
    try:
        _show(data)
    except ALLOWED:
        if ok:
            raise AssertionError("lcr show refused an image the reader accepts") from None
    else:
        if not ok:
            raise AssertionError("lcr show accepted an image the reader refuses")


def reframe(data: bytes) -> bytes:
    """The records along data's frame headers, with right checksums and trailer."""
    out, digest, pages, off = [], xxhash.xxh3_64(), 0, 0
    while len(data) - off >= FRAME.size:
        _magic, rtype, _flags, meta_len, _pad, data_len, _cs = FRAME.unpack_from(data, off)
        off += FRAME.size
        meta = data[off:off + meta_len]
        off += len(meta)
        body = data[off:off + data_len]
        off += len(body)
        if rtype == RecType.TRAILER:
            continue
        cs = xxhash.xxh3_64_intdigest(meta + body)
        out.append(FRAME.pack(FRAME_MAGIC, rtype, 0, len(meta), 0, len(body), cs) + meta + body)
        digest.update(cs.to_bytes(8, "little"))
        if rtype == RecType.PAGES:
            try:
                pages += msgspec.msgpack.decode(meta, type=Pages).npages
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                pass
    t = msgspec.msgpack.encode(Trailer(records=len(out), pages=pages, digest=digest.intdigest()))
    out.append(FRAME.pack(FRAME_MAGIC, RecType.TRAILER, 0, len(t), 0, 0, xxhash.xxh3_64_intdigest(t)) + t)
    return b"".join(out)


def one_input(data: bytes) -> None:
    _check(data)
    _check(reframe(data))


def main() -> None:
    if atheris is None:
        sys.exit("atheris is not installed (pip install atheris); it is not a linuxcr dependency")
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
