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

3. with seed images (LCR_FUZZ_SEEDS=a.img:b.img, real images), the input
   drives edits of their *decoded* metadata: a value of a HEADER, TREE or
   TASK record set to a boundary number (0, -1, 2^31, 2^32-1, 2^63, 2^64-2,
   2^64-1, TASK_SIZE ...), a string made long, NUL-holding or not UTF-8, a
   list emptied or grown, then re-encoded with right checksums and trailer:
   this reaches image/validate.py's range checks and the restore code
   behind them.  With LCR_FUZZ_RESTART=1 (root, a scratch machine) each such
   mutant is also restarted through the API (any restored process is
   killed at once); an LcrError is the only allowed failure.

    LCR_FUZZ_SEEDS=fuzz/corpus/a.img python fuzz/atheris_image.py -atheris_runs=20000
    LCR_FUZZ_SEEDS=... python fuzz/atheris_image.py --smoke 2000   # without atheris

Only ImageError and RestoreError may come out (any LcrError from a
restart), with a message that is one printable line; anything else (a zstd error, struct.error, a msgspec error,
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


# ------------------------------------------------------------------ 3. decoded edits

INTS = [0, 1, -1, 2, 9, 19, 64, 65, 4095, 4096, 4097, 1 << 22, (1 << 22) + 1, (1 << 31) - 1,
        1 << 31, (1 << 32) - 2, (1 << 32) - 1, 1 << 32, 0x7FFFFFFFE000, 0x7FFFFFFFF000,
        0x800000000000, (1 << 63) - 1, 1 << 63, (1 << 64) - 2, (1 << 64) - 1, -(1 << 31),
        -(1 << 63)]
MARK = "\x01BADUTF8\x01"          # its bytes are made non-UTF-8 after encoding
STRS = ["", "/", "rel", "x" * 4097, "/a\0b", "\0", MARK, "\u00e9" * 300]
SEEDS = [Path(p).read_bytes() for p in os.environ.get("LCR_FUZZ_SEEDS", "").split(":") if p]
RESTART = os.environ.get("LCR_FUZZ_RESTART") == "1"


class Bytes:
    """Choices drawn from the fuzzer's input (atheris' FuzzedDataProvider is
    not needed: this works the same without atheris)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def pick(self, n: int) -> int:
        if n <= 1:
            return 0
        b = self.data[self.at:self.at + 2]
        self.at += 2
        return int.from_bytes(b.ljust(2, b"\0"), "little") % n


def _leaves(obj, prefix=()):
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield prefix + (k,), v
        yield from _leaves(v, prefix + (k,))


def _value(old, c: Bytes):
    if isinstance(old, bool):
        return [not old, 2, None][c.pick(3)]
    if isinstance(old, int):
        v = INTS + [old - 1, old + 1, old - 4096, old + 4096]
        return min(max(v[c.pick(len(v))], -(1 << 63)), (1 << 64) - 1)
    if isinstance(old, str):
        return STRS[c.pick(len(STRS))]
    if isinstance(old, bytes):
        return [b"", old[:-1], old + b"\0", bytes(1 << 16)][c.pick(4)]
    if isinstance(old, list):
        return [[], old[1:], old + old[:1], old * 65][c.pick(4)]
    return [0, "", None][c.pick(3)]


def edited(seed: bytes, c: Bytes) -> bytes:
    """seed with 1-3 decoded metadata values changed, checksums and trailer right."""
    recs, off = [], 0
    while off < len(seed):
        _m, rtype, _f, meta_len, _p, data_len, _cs = FRAME.unpack_from(seed, off)
        body = seed[off + FRAME.size:off + FRAME.size + meta_len + data_len]
        recs.append((rtype, body[:meta_len], body[meta_len:]))
        off += FRAME.size + meta_len + data_len
    meta_at = [i for i, r in enumerate(recs) if r[0] in (RecType.HEADER, RecType.TREE, RecType.TASK)]
    i = meta_at[c.pick(len(meta_at))]
    obj = msgspec.msgpack.decode(recs[i][1])
    for _ in range(1 + c.pick(3)):
        leaves = list(_leaves(obj))
        path, old = leaves[c.pick(len(leaves))]
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = _value(old, c)
    raw = msgspec.msgpack.encode(obj).replace(MARK.encode(), b"\xff\xfe" + MARK.encode()[2:])
    recs[i] = (recs[i][0], raw, recs[i][2])
    return reframe(b"".join(FRAME.pack(FRAME_MAGIC, t, 0, len(m), 0, len(d), 0) + m + d
                            for t, m, d in recs))


def _restart(data: bytes) -> None:
    """A restart through the API: an LcrError or a process (killed at once)."""
    import signal
    import tempfile

    from linuxcr import api
    from linuxcr.errors import LcrError
    with tempfile.NamedTemporaryFile(prefix="lcr-fuzz-", suffix=".img") as f:
        f.write(data)
        f.flush()
        try:
            pid = api.restart(f.name, any_pid=True)
        except LcrError as e:
            _one_line(e)
            return
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def one_input(data: bytes) -> None:
    _check(data)
    _check(reframe(data))
    if SEEDS:
        c = Bytes(data)
        mutant = edited(SEEDS[c.pick(len(SEEDS))], c)
        _check(mutant)
        if RESTART:
            _restart(mutant)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--smoke":     # random inputs, no atheris
        import random
        rnd = random.Random(0)
        for _ in range(int(sys.argv[2])):
            one_input(rnd.randbytes(rnd.randrange(64, 512)))
        print(f"{sys.argv[2]} inputs: no crash")
        return
    if atheris is None:
        sys.exit("atheris is not installed (pip install atheris); it is not a linuxcr dependency")
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
