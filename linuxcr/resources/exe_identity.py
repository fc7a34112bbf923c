"""The identity of every mapped file and of the executable.

A process whose program or libraries were rebuilt at the same path between
checkpoint and restart would be mapped onto different code: it runs a few
instructions and dies (SIGSEGV, general protection fault) after lcr reported
success.  So the checkpoint records, per mapped file, its size, mtime and a
content identity (the ELF build-id where there is one, and always a sha256
of the page at each mapped file offset: cheap, and catches a non-ELF file
or an ELF without build-id), read from the very inode the process maps
(/proc/PID/map_files); restart compares before any task is created and
refuses with one line naming the file and what differs.  No ``--trust``
overrides it: the restored process could not run.
"""
from __future__ import annotations

import hashlib
import os
import struct

from linuxcr.errors import RestoreError
from linuxcr.image.schema import FileIdentity, Task

PAGE = 4096
MAX_OFFSETS = 64           # fingerprinted pages per file (a libc maps 5 ranges)
PT_NOTE, NT_GNU_BUILD_ID = 4, 3


# --- ELF build-id -------------------------------------------------------------

def build_id(fd: int) -> str:
    """The NT_GNU_BUILD_ID note of an ELF file, hex; "" if none (or not ELF)."""
    try:
        ehdr = os.pread(fd, 64, 0)
        if len(ehdr) < 64 or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
            return ""        # only 64-bit little-endian: the only arch lcr restores
        phoff, = struct.unpack_from("<Q", ehdr, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
        if phentsize < 56 or phnum > 256:
            return ""
        phdrs = os.pread(fd, phentsize * phnum, phoff)
        for i in range(phnum):
            p_type, = struct.unpack_from("<I", phdrs, i * phentsize)
            if p_type != PT_NOTE:
                continue
            off, = struct.unpack_from("<Q", phdrs, i * phentsize + 8)
            size, = struct.unpack_from("<Q", phdrs, i * phentsize + 32)
            found = _note(os.pread(fd, min(size, 1 << 16), off))
            if found:
                return found
    except (OSError, struct.error):
        return ""
    return ""


def _note(buf: bytes) -> str:
    at = 0
    while at + 12 <= len(buf):
        namesz, descsz, ntype = struct.unpack_from("<III", buf, at)
        name_at = at + 12
        desc_at = name_at + ((namesz + 3) & ~3)
        if ntype == NT_GNU_BUILD_ID and buf[name_at:name_at + namesz] == b"GNU\x00":
            return buf[desc_at:desc_at + descsz].hex()
        at = desc_at + ((descsz + 3) & ~3)
    return ""


def fingerprint(fd: int, offsets: list[int]) -> str:
    h = hashlib.sha256()
    for off in offsets:
        h.update(off.to_bytes(8, "little"))
        h.update(os.pread(fd, PAGE, off))
    return h.hexdigest()


def _identity(path: str, fd: int, offsets: list[int]) -> FileIdentity:
    st = os.fstat(fd)
    return FileIdentity(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns, build_id=build_id(fd),
                        offsets=offsets, fingerprint=fingerprint(fd, offsets))


# --- checkpoint ------------------------------------------------------------------

def collect(tasks: list[Task]) -> list[FileIdentity]:
    """One record per file path mapped (kind "file") or executed by the tasks
    (taken while they are frozen: the inode each maps, not what the path names now)."""
    where: dict[str, tuple[str, set[int]]] = {}     # path -> (a /proc path to its inode, offsets)
    for t in tasks:
        for v in t.vmas:
            if v.kind == "file" and v.path.startswith("/"):
                src, offs = where.setdefault(v.path, (f"/proc/{t.pid}/map_files/{v.start:x}-{v.end:x}", set()))
                offs.add(v.offset)
        if t.mm.exe.startswith("/") and t.mm.exe not in where:
            where[t.mm.exe] = (f"/proc/{t.pid}/exe", set())
    out = []
    for path, (src, offs) in where.items():
        try:
            fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue          # not readable to us: restart's own open will say so
        try:
            out.append(_identity(path, fd, sorted(offs | {0})[:MAX_OFFSETS]))
        finally:
            os.close(fd)
    return out


# --- restart ------------------------------------------------------------------------

def verify(saved: list[FileIdentity]) -> None:
    """Refuse (one line: the file, what differs) if any file changed."""
    for s in saved:
        why = difference(s)
        if why:
            raise RestoreError(f"{s.path} changed since the checkpoint: {why}",
                               "the restored process would run other code and crash; put the "
                               "original file back at that path, or start the program afresh")


def difference(s: FileIdentity) -> str | None:
    try:
        fd = os.open(s.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return "it no longer exists"
    except OSError as e:
        return f"it cannot be opened ({e.strerror})"
    try:
        now = _identity(s.path, fd, list(s.offsets))
    finally:
        os.close(fd)
    if s.build_id and now.build_id != s.build_id:
        return f"ELF build-id {now.build_id or '(none)'}, was {s.build_id}"
    if now.size != s.size:
        return f"size {now.size} bytes, was {s.size}"
    if s.fingerprint and now.fingerprint != s.fingerprint:
        return "its content differs (mapped pages)"
    if now.mtime_ns != s.mtime_ns:
        return f"modification time {_ts(now.mtime_ns)}, was {_ts(s.mtime_ns)}"
    return None


def _ts(ns: int) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d} UTC"
