"""The migration connection: frames, handshake, messages.

Every message is one frame:

    magic u32 | type u16 | reserved u16 | meta_len u32 | data_len u64 | xxh3-64 u64

followed by ``meta_len`` bytes of msgpack metadata (decoded strictly into the
Struct of its type, every field bounded) and ``data_len`` bytes of raw data
(page contents, PAGES only).  The checksum covers the first 20 bytes of the
frame, the metadata and the data.  Both sides treat everything they receive
as untrusted: lengths are bounded before anything is allocated, the checksum
is checked before anything is decoded.

Handshake (protocol "lcr-migrate/1"), mutual, with a shared token:

    destination -> HELLO(proto, role, nonce_d)
    source      -> HELLO(proto, role, nonce_s), AUTH(HMAC(token, "lcr-migrate/1 source" | nonce_d | nonce_s))
    destination -> AUTH(HMAC(token, "lcr-migrate/1 destination" | nonce_s | nonce_d))   or REFUSE(reason)

Each side proves it knows the token on the other's fresh nonce; the session
id (HMAC(token, "session" | nonce_s | nonce_d), 16 bytes) names the state
the destination holds, as the parent of the final image.  A token is
required: there is no unauthenticated mode.  The token authenticates the
peers; it does not encrypt the traffic, and frames after the handshake are
checksummed, not MACed (see docs/migration.md).

After the handshake, the source sends TREE, TASK..., META_END (the
preliminary metadata), waits for READY, then PAGES... ROUND_END per round,
then FINAL followed by a raw image stream (image/stream.py records up to
its TRAILER, then the source shuts its sending side); the destination
answers RUNNING or FAILED.  ABORT (source) and FAILED (destination) may come
at any time.
"""
from __future__ import annotations

import enum
import errno
import hashlib
import hmac
import os
import select
import socket
import struct
import time
from typing import Annotated

import msgspec
import xxhash
from msgspec import Meta, Struct

from linuxcr.errors import AuthError, LcrError, MigrationError  # noqa: F401 (re-exported)
from linuxcr.image import schema

PROTO = "lcr-migrate/1"
MAGIC = 0x674D434C          # "LCMg"
FRAME = struct.Struct("<IHHIQQ")
HEAD = 20                   # bytes of the frame covered by the checksum (all but it)
MAX_META = schema.MAX_META
MAX_DATA = schema.MAX_DATA
MAX_TOTAL_META = schema.MAX_TOTAL_META
NONCE = 32
PAGE = os.sysconf("SC_PAGE_SIZE")
TOKEN_ENV = "LCR_MIGRATE_TOKEN"
MIN_TOKEN = 8


class Msg(enum.IntEnum):
    HELLO = 1
    AUTH = 2
    REFUSE = 3
    TREE = 4
    TASK = 5
    META_END = 6
    READY = 7
    PAGES = 8
    ROUND_END = 9
    FINAL = 10
    RUNNING = 11
    FAILED = 12
    ABORT = 13


Text = Annotated[str, Meta(max_length=4096)]


class Hello(Struct):
    """Unknown fields are ignored: a newer peer's HELLO still tells its proto."""
    proto: Annotated[str, Meta(max_length=64)]
    role: Annotated[str, Meta(max_length=16)]
    nonce: Annotated[bytes, Meta(max_length=64)]
    tool: Annotated[str, Meta(max_length=64)] = ""


class Auth(Struct, forbid_unknown_fields=True):
    mac: Annotated[bytes, Meta(min_length=32, max_length=32)]


class Reason(Struct, forbid_unknown_fields=True):
    reason: Text


class MetaEnd(Struct, forbid_unknown_fields=True):
    tasks: Annotated[int, Meta(ge=1, le=schema.MAX_TASKS)]


class Empty(Struct, forbid_unknown_fields=True):
    pass


class RoundEnd(Struct, forbid_unknown_fields=True):
    round: Annotated[int, Meta(ge=0, le=1 << 20)]
    pages: schema.U64


class Running(Struct, forbid_unknown_fields=True):
    pid: schema.Pid
    vpid: schema.Pid
    namespace: bool = False
    processes: Annotated[int, Meta(ge=1, le=schema.MAX_TASKS)] = 1
    seconds: float = 0.0        # from FINAL to RUNNING, as the destination saw it


TYPES: dict[Msg, type[Struct]] = {
    Msg.HELLO: Hello, Msg.AUTH: Auth, Msg.REFUSE: Reason, Msg.TREE: schema.Tree,
    Msg.TASK: schema.Task, Msg.META_END: MetaEnd, Msg.READY: Empty, Msg.PAGES: schema.Pages,
    Msg.ROUND_END: RoundEnd, Msg.FINAL: Empty, Msg.RUNNING: Running, Msg.FAILED: Reason,
    Msg.ABORT: Reason,
}
DECODERS = {t: msgspec.msgpack.Decoder(c) for t, c in TYPES.items()}
ENCODER = msgspec.msgpack.Encoder()
_DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def encode(mtype: Msg, meta: Struct, data: bytes | memoryview = b"") -> list:
    """The buffers of one frame (frame, meta[, data])."""
    m = ENCODER.encode(meta)
    head = FRAME.pack(MAGIC, int(mtype), 0, len(m), len(data), 0)[:HEAD]
    h = xxhash.xxh3_64(head)
    h.update(m)
    if len(data):
        h.update(data)
    frame = head + h.intdigest().to_bytes(8, "little")
    return [frame, m, data] if len(data) else [frame, m]


def parse_frame(raw: bytes, peer: str) -> tuple[Msg, int, int, int]:
    """(type, meta_len, data_len, checksum) of a frame, bounded."""
    magic, mtype, reserved, meta_len, data_len, cs = FRAME.unpack(raw)
    if magic != MAGIC:
        raise MigrationError(f"{peer} does not speak the lcr migration protocol (bad frame magic)")
    try:
        mt = Msg(mtype)
    except ValueError:
        raise MigrationError(f"{peer} sent a message of unknown type {mtype}") from None
    if reserved:
        raise MigrationError(f"{peer} sent a frame with reserved bits set")
    if meta_len > MAX_META:
        raise MigrationError(f"{peer} sent {meta_len} bytes of metadata, more than {MAX_META}")
    if data_len > MAX_DATA or (data_len and mt is not Msg.PAGES):
        raise MigrationError(f"{peer} sent {data_len} bytes of data in a {mt.name} message")
    return mt, meta_len, data_len, cs


def decode(mt: Msg, head: bytes, meta: bytes | memoryview, data: memoryview, cs: int,
           peer: str) -> Struct:
    h = xxhash.xxh3_64(head)
    h.update(meta)
    if len(data):
        h.update(data)
    if h.intdigest() != cs:
        raise MigrationError(f"checksum mismatch in a {mt.name} message from {peer}",
                             "the connection corrupts data")
    try:
        obj = DECODERS[mt].decode(meta)
    except _DECODE_ERRORS as e:
        raise MigrationError(f"{peer} sent an invalid {mt.name} message: "
                             f"{_printable(str(e))}") from None
    if mt is Msg.PAGES and len(data) != obj.npages * PAGE:  # type: ignore[attr-defined]
        raise MigrationError(f"{peer} sent a PAGES message of {len(data)} bytes for "
                             f"{obj.npages} pages")  # type: ignore[attr-defined]
    if mt is Msg.PAGES and (obj.addr % PAGE or obj.compressed):  # type: ignore[attr-defined]
        raise MigrationError(f"{peer} sent a malformed PAGES message")
    return obj


# --- tokens and the handshake --------------------------------------------------

def load_token(token: str | bytes | None, token_file: str | None = None) -> bytes:
    """The shared secret: given, read from a file, or from $LCR_MIGRATE_TOKEN."""
    if token is None and token_file:
        try:
            with open(token_file, "rb") as f:
                token = f.read().strip()
        except OSError as e:
            raise AuthError(f"cannot read the token file {token_file}: {e.strerror}") from None
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    if not token:
        raise AuthError("a migration needs a shared token",
                        f"give the same --token (or --token-file, or ${TOKEN_ENV}) to both sides")
    t = token.encode() if isinstance(token, str) else bytes(token)
    if len(t) < MIN_TOKEN:
        raise AuthError(f"the token is too short ({len(t)} bytes; at least {MIN_TOKEN})")
    return t


def _mac(token: bytes, label: str, a: bytes, b: bytes) -> bytes:
    return hmac.new(token, f"{PROTO} {label}".encode() + b"\0" + a + b, hashlib.sha256).digest()


def session_id(token: bytes, nonce_s: bytes, nonce_d: bytes) -> bytes:
    return _mac(token, "session", nonce_s, nonce_d)[:16]


# --- the connection ---------------------------------------------------------------

class Conn:
    """One TCP connection, blocking, with kernel send/receive timeouts
    (SO_SNDTIMEO/SO_RCVTIMEO: the fd stays blocking, so the image writer and
    reader can use it directly)."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float) -> None:
        self.sock = sock
        self.peer = peer
        self.fd = sock.fileno()
        self.timeout = timeout
        self.meta_total = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._buf = bytearray(0)
        sock.settimeout(None)
        set_timeouts(sock, timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError:
            pass

    # -- connecting ---------------------------------------------------------------------
    @classmethod
    def connect(cls, host: str, port: int, timeout: float) -> "Conn":
        peer = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except socket.timeout:
            raise MigrationError(f"cannot connect to {peer}: timed out") from None
        except OSError as e:
            raise MigrationError(f"cannot connect to {peer}: {e.strerror or e}",
                                 "is `lcr receive --listen` running there?") from None
        return cls(sock, peer, timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def shutdown_send(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- sending -------------------------------------------------------------------------
    def send(self, mtype: Msg, meta: Struct | None = None, data: bytes | memoryview = b"") -> None:
        self.write_all(encode(mtype, meta if meta is not None else Empty(), data))

    def write_all(self, bufs: list) -> None:
        views = [memoryview(b).cast("B") for b in bufs if len(b)]
        while views:
            try:
                n = os.writev(self.fd, views)
            except OSError as e:
                raise self._io_error(e, "sending to") from None
            self.bytes_sent += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    # -- receiving -----------------------------------------------------------------------
    def _read_exact(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                k = os.readv(self.fd, [view[got:]])
            except OSError as e:
                raise self._io_error(e, "receiving from") from None
            if k == 0:
                raise MigrationError(f"connection to {self.peer} closed by the peer")
            got += k
        self.bytes_received += got

    def recv(self, expect: tuple[Msg, ...] | None = None) -> tuple[Msg, Struct, memoryview]:
        """The next message (data valid until the next recv).  A FAILED,
        REFUSE or ABORT from the peer raises, unless expected."""
        raw = bytearray(FRAME.size)
        self._read_exact(memoryview(raw))
        mt, meta_len, data_len, cs = parse_frame(bytes(raw), self.peer)
        if mt not in (Msg.PAGES,):
            self.meta_total += meta_len
            if self.meta_total > MAX_TOTAL_META:
                raise MigrationError(f"{self.peer} sent more than {MAX_TOTAL_META >> 20} MiB "
                                     "of metadata")
        meta = bytearray(meta_len)
        self._read_exact(memoryview(meta))
        data = memoryview(b"")
        if data_len:
            if len(self._buf) < data_len:
                self._buf = bytearray(data_len)
            data = memoryview(self._buf)[:data_len]
            self._read_exact(data)
        obj = decode(mt, bytes(raw[:HEAD]), meta, data, cs, self.peer)
        if expect is not None and mt not in expect:
            if mt in (Msg.FAILED, Msg.REFUSE, Msg.ABORT):
                cls = AuthError if mt is Msg.REFUSE else MigrationError
                raise cls(f"{self.peer}: {_printable(obj.reason)}")  # type: ignore[attr-defined]
            raise MigrationError(f"{self.peer} sent {mt.name} where "
                                 f"{' or '.join(m.name for m in expect)} was expected")
        return mt, obj, data

    def peer_failed(self) -> str | None:
        """Without blocking: did the peer send FAILED (or close)?  Its reason."""
        try:
            ready, _, _ = select.select([self.fd], [], [], 0)
        except OSError:
            return None
        if not ready:
            return None
        try:
            mt, obj, _ = self.recv()
        except MigrationError as e:
            return e.message
        if mt in (Msg.FAILED, Msg.REFUSE):
            return _printable(obj.reason)  # type: ignore[attr-defined]
        return f"unexpected {mt.name} message"

    def _io_error(self, e: OSError, what: str) -> MigrationError:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return MigrationError(f"{what} {self.peer} timed out (no progress for "
                                  f"{self.timeout:g} s)")
        if e.errno in (errno.EPIPE, errno.ECONNRESET):
            return MigrationError(f"connection to {self.peer} lost ({e.strerror})")
        return MigrationError(f"{what} {self.peer} failed: {e.strerror}")

    # -- handshake -------------------------------------------------------------------------
    def handshake_source(self, token: bytes) -> bytes:
        from linuxcr import __version__
        _, hello, _ = self.recv((Msg.HELLO,))
        _check_hello(hello, "destination", self.peer)  # type: ignore[arg-type]
        nonce_s = os.urandom(NONCE)
        nonce_d = hello.nonce  # type: ignore[attr-defined]
        self.write_all(encode(Msg.HELLO, Hello(PROTO, "source", nonce_s, f"linuxcr {__version__}"))
                       + encode(Msg.AUTH, Auth(_mac(token, "source", nonce_d, nonce_s))))
        _, auth, _ = self.recv((Msg.AUTH,))
        if not hmac.compare_digest(auth.mac, _mac(token, "destination", nonce_s, nonce_d)):  # type: ignore[attr-defined]
            raise AuthError(f"{self.peer} did not prove it knows the token",
                            "both sides need the same --token")
        return session_id(token, nonce_s, nonce_d)

    def handshake_destination(self, token: bytes) -> bytes:
        from linuxcr import __version__
        nonce_d = os.urandom(NONCE)
        self.send(Msg.HELLO, Hello(PROTO, "destination", nonce_d, f"linuxcr {__version__}"))
        _, hello, _ = self.recv((Msg.HELLO,))
        try:
            _check_hello(hello, "source", self.peer)  # type: ignore[arg-type]
        except AuthError as e:
            self.refuse(e.message)
            raise
        nonce_s = hello.nonce  # type: ignore[attr-defined]
        _, auth, _ = self.recv((Msg.AUTH,))
        if not hmac.compare_digest(auth.mac, _mac(token, "source", nonce_d, nonce_s)):  # type: ignore[attr-defined]
            self.refuse("authentication failed: the tokens differ")
            raise AuthError(f"{self.peer} failed to authenticate (wrong token); refused",
                            "both sides need the same --token")
        self.send(Msg.AUTH, Auth(_mac(token, "destination", nonce_s, nonce_d)))
        return session_id(token, nonce_s, nonce_d)

    def refuse(self, reason: str) -> None:
        try:
            self.send(Msg.REFUSE, Reason(reason[:4096]))
        except MigrationError:
            pass


def _check_hello(h: Hello, role: str, peer: str) -> None:
    if h.proto != PROTO:
        raise AuthError(f"{peer} speaks {_printable(h.proto)!s}, this lcr speaks {PROTO}",
                        "use the same linuxcr version on both sides")
    if h.role != role:
        raise AuthError(f"{peer} is a {_printable(h.role)}, expected a {role}")
    if len(h.nonce) != NONCE:
        raise AuthError(f"{peer} sent a malformed hello")


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def listen(addr: str) -> tuple[socket.socket, str]:
    """A listening socket on HOST:PORT (IPv6 as [addr]:port)."""
    host, port = parse_addr(addr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(1)
    except OSError as e:
        s.close()
        raise MigrationError(f"cannot listen on {addr}: {e.strerror}") from None
    return s, f"{host}:{s.getsockname()[1]}"


def accept(lsock: socket.socket, timeout: float | None, io_timeout: float) -> Conn:
    if timeout is not None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationError(f"no migration arrived within {timeout:g} s")
            ready, _, _ = select.select([lsock], [], [], left)
            if ready:
                break
    try:
        sock, addr = lsock.accept()
    except OSError as e:
        raise MigrationError(f"accept failed: {e.strerror}") from None
    sock.set_inheritable(False)
    return Conn(sock, f"{addr[0]}:{addr[1]}", io_timeout)


def parse_addr(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MigrationError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
