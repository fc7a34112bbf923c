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

Before the peer is authenticated a frame carries at most MAX_PREAUTH bytes
of metadata and only the message types the handshake expects; both are
refused on the 28-byte header, before anything else is read or allocated.
The whole handshake has a deadline.  The destination runs its side as a
byte-fed state machine (DestHandshake) so that ``Gate`` can hold several
unauthenticated connections at once, each with a few KiB, and rate-limit
the ones that fail: one hostile peer costs one log line, never the
migration that the receiver waits for.

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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Callable

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
MAX_PREAUTH = 4096          # metadata bytes of one frame before the peer is authenticated
HANDSHAKE_TIMEOUT = 5.0     # seconds an unauthenticated peer gets to prove the token


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


def parse_frame(raw: bytes, peer: str, authenticated: bool = True,
                allowed: tuple[Msg, ...] | None = None) -> tuple[Msg, int, int, int]:
    """(type, meta_len, data_len, checksum) of a frame, bounded.  Before
    authentication (``authenticated`` False) only ``allowed`` types (and
    REFUSE/ABORT, which carry the peer's reason) with at most MAX_PREAUTH
    bytes of metadata pass: checked here, on the header alone, so that
    nothing a stranger announces is read or allocated."""
    magic, mtype, reserved, meta_len, data_len, cs = FRAME.unpack(raw)
    if magic != MAGIC:
        raise MigrationError(f"{peer} does not speak the lcr migration protocol (bad frame magic)")
    try:
        mt = Msg(mtype)
    except ValueError:
        raise MigrationError(f"{peer} sent a message of unknown type {mtype}") from None
    if reserved:
        raise MigrationError(f"{peer} sent a frame with reserved bits set")
    if not authenticated:
        if allowed is not None and mt not in allowed + (Msg.REFUSE, Msg.ABORT):
            raise MigrationError(f"{peer} sent {mt.name} before authenticating")
        if meta_len > MAX_PREAUTH:
            raise MigrationError(f"{peer} announced {meta_len} bytes of metadata before "
                                 f"authenticating (at most {MAX_PREAUTH}); not read")
    if meta_len > MAX_META:
        raise MigrationError(f"{peer} sent {meta_len} bytes of metadata, more than {MAX_META}")
    if data_len > MAX_DATA or (data_len and mt is not Msg.PAGES) or data_len % PAGE:
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
        self.authenticated = False     # until then frames are capped (parse_frame)
        self.deadline: float | None = None   # the handshake's, on time.monotonic()
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
            self._before_read()
            try:
                k = os.readv(self.fd, [view[got:]])
            except OSError as e:
                raise self._io_error(e, "receiving from") from None
            if k == 0:
                raise MigrationError(f"connection to {self.peer} closed by the peer")
            got += k
        self.bytes_received += got

    def _before_read(self) -> None:
        """Under a deadline, no read waits past it (a peer trickling one
        byte at a time does not stretch the handshake)."""
        if self.deadline is None:
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise MigrationError(f"{self.peer} did not complete the handshake in time")
        set_timeouts(self.sock, max(left, 0.001))   # 0 would mean "no timeout"

    def _read_some(self, n: int) -> bytes:
        self._before_read()
        try:
            b = os.read(self.fd, n)
        except OSError as e:
            raise self._io_error(e, "receiving from") from None
        if not b:
            raise MigrationError(f"connection to {self.peer} closed by the peer")
        self.bytes_received += len(b)
        return b

    def _end_handshake(self) -> None:
        self.authenticated = True
        self.deadline = None
        set_timeouts(self.sock, self.timeout)

    def recv(self, expect: tuple[Msg, ...] | None = None) -> tuple[Msg, Struct, memoryview]:
        """The next message (data valid until the next recv).  A FAILED,
        REFUSE or ABORT from the peer raises, unless expected."""
        raw = bytearray(FRAME.size)
        self._read_exact(memoryview(raw))
        mt, meta_len, data_len, cs = parse_frame(bytes(raw), self.peer, self.authenticated,
                                                 expect)
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
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK) and self.deadline is not None:
            return MigrationError(f"{self.peer} did not complete the handshake in time")
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return MigrationError(f"{what} {self.peer} timed out (no progress for "
                                  f"{self.timeout:g} s)")
        if e.errno in (errno.EPIPE, errno.ECONNRESET):
            return MigrationError(f"connection to {self.peer} lost ({e.strerror})")
        return MigrationError(f"{what} {self.peer} failed: {e.strerror}")

    # -- handshake -------------------------------------------------------------------------
    def handshake_source(self, token: bytes, timeout: float | None = None) -> bytes:
        """``timeout``: for the whole handshake (default: the connection's
        timeout; the destination may keep us in its backlog a while)."""
        from linuxcr import __version__
        self.deadline = time.monotonic() + (timeout or self.timeout)
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
        self._end_handshake()
        return session_id(token, nonce_s, nonce_d)

    def handshake_destination(self, token: bytes, timeout: float = HANDSHAKE_TIMEOUT) -> bytes:
        """The destination's side, blocking (Gate runs the same DestHandshake
        for many connections at once)."""
        hs = DestHandshake(token, self.peer)
        self.deadline = time.monotonic() + timeout
        try:
            self.write_all([hs.greeting()])
            while not hs.feed(self._read_some(hs.want())):
                pass
        except MigrationError as e:
            if hs.refusal:
                self.refuse(hs.refusal)
            if "in time" in e.message:
                raise MigrationError(f"{self.peer} did not authenticate within {timeout:g} s") \
                    from None
            raise
        self.write_all([hs.reply])
        self._end_handshake()
        assert hs.session is not None
        return hs.session

    def refuse(self, reason: str) -> None:
        try:
            self.send(Msg.REFUSE, Reason(reason[:4096]))
        except MigrationError:
            pass


class DestHandshake:
    """The destination's side of the handshake, fed with bytes as they come.

    It never holds more than one frame (header + at most MAX_PREAUTH bytes
    of metadata): ``want()`` says how many bytes the next step needs, and
    a header announcing more, or a type the handshake does not expect, is
    refused before its metadata is read.  ``feed`` returns True once the
    source proved the token (then ``reply`` is the AUTH frame to send and
    ``session`` the session id); it raises MigrationError / AuthError on
    anything else, with ``refusal`` set when a REFUSE should go back."""

    def __init__(self, token: bytes, peer: str) -> None:
        self.token = token
        self.peer = peer
        self.nonce_d = os.urandom(NONCE)
        self.buf = bytearray()
        self.hello: Hello | None = None
        self.reply = b""
        self.session: bytes | None = None
        self.refusal = ""

    def greeting(self) -> bytes:
        from linuxcr import __version__
        return b"".join(encode(Msg.HELLO, Hello(PROTO, "destination", self.nonce_d,
                                                f"linuxcr {__version__}")))

    def _head(self) -> tuple[Msg, int, int]:
        expect = (Msg.HELLO,) if self.hello is None else (Msg.AUTH,)
        mt, meta_len, _, cs = parse_frame(bytes(self.buf[:FRAME.size]), self.peer, False, expect)
        return mt, meta_len, cs

    def want(self) -> int:
        """Bytes the next step needs (at most one frame's)."""
        if len(self.buf) < FRAME.size:
            return FRAME.size - len(self.buf)
        return FRAME.size + self._head()[1] - len(self.buf)

    def feed(self, data: bytes) -> bool:
        self.buf += data
        while len(self.buf) >= FRAME.size:
            mt, meta_len, cs = self._head()
            end = FRAME.size + meta_len
            if len(self.buf) < end:
                return False
            obj = decode(mt, bytes(self.buf[:HEAD]), bytes(self.buf[FRAME.size:end]),
                         memoryview(b""), cs, self.peer)
            del self.buf[:end]
            if mt in (Msg.REFUSE, Msg.ABORT):
                raise MigrationError(f"{self.peer} gave up: "
                                     f"{_printable(obj.reason)}")  # type: ignore[attr-defined]
            if mt is Msg.HELLO:
                try:
                    _check_hello(obj, "source", self.peer)  # type: ignore[arg-type]
                except AuthError as e:
                    self.refusal = e.message
                    raise
                self.hello = obj  # type: ignore[assignment]
                continue
            return self._auth(obj)  # type: ignore[arg-type]
        return False

    def _auth(self, auth: Auth) -> bool:
        assert self.hello is not None
        nonce_s = self.hello.nonce
        if not hmac.compare_digest(auth.mac, _mac(self.token, "source", self.nonce_d, nonce_s)):
            self.refusal = "authentication failed: the tokens differ"
            raise AuthError(f"{self.peer} failed to authenticate (wrong token); refused",
                            "both sides need the same --token")
        if self.buf:
            raise MigrationError(f"{self.peer} sent more before the handshake ended")
        self.reply = b"".join(encode(Msg.AUTH, Auth(_mac(self.token, "destination", nonce_s,
                                                         self.nonce_d))))
        self.session = session_id(self.token, nonce_s, self.nonce_d)
        return True


# --- the gate: many strangers, one migration ------------------------------------------

@dataclass
class Limits:
    """What ``lcr receive`` grants peers that have not authenticated yet."""
    handshake: float = HANDSHAKE_TIMEOUT   # seconds to prove the token
    max_failures: int = 100        # failed peers before giving up (0: never)
    pending: int = 16              # connections in their handshake at once (oldest dropped)
    pending_per_host: int = 4      # of which from one address (further ones dropped)
    delay: float = 0.25            # after a host's 2nd failure; doubles with each further one
    max_delay: float = 30.0
    rate: float = 20.0             # connections accepted per second, at most (burst: 2x)
    hosts: int = 4096              # addresses whose failures are remembered


@dataclass
class _Host:
    failures: int = 0
    until: float = 0.0             # connections from it are dropped before this
    dropped: int = 0               # ... and counted, logged once per window


@dataclass
class _Pending:
    sock: socket.socket
    peer: str
    host: str
    hs: DestHandshake
    deadline: float


@dataclass
class Gate:
    """Accepts connections on ``lsock`` until one authenticates.

    Each connection's handshake runs concurrently (non-blocking, one frame
    of at most MAX_PREAUTH bytes buffered each, ``Limits.pending`` at most),
    so a peer that stalls does not keep the real source waiting.  A peer
    that fails (closes, sends garbage or a frame too big, the wrong token,
    nothing within ``Limits.handshake``) is logged in one line and dropped.
    Failures are rate-limited per address: a host's first failure is free
    (a mistyped token), then its connections are dropped unread for
    ``delay``, doubling up to ``max_delay``; and accept itself is paced by a
    token bucket (``rate`` per second), so a flood costs the kernel's
    backlog, not our CPU or memory."""
    lsock: socket.socket
    token: bytes
    io_timeout: float
    limits: Limits = field(default_factory=Limits)
    log: Callable[[str], None] = lambda _text: None
    failures: int = 0
    hosts: "OrderedDict[str, _Host]" = field(default_factory=OrderedDict)
    pending: dict[int, _Pending] = field(default_factory=dict)
    _tokens: float = -1.0
    _refill_at: float = 0.0
    _last: MigrationError | None = None

    def wait(self, timeout: float | None = None) -> tuple[Conn, bytes]:
        """The first connection that authenticates, and its session id.
        ``timeout``: for all of it (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.lsock.setblocking(False)
        try:
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    more = f" ({self.failures} failed connection(s))" if self.failures else ""
                    raise MigrationError(f"no migration arrived within {timeout:g} s{more}")
                self._expire(now)
                done = self._poll(now, deadline)
                if done is not None:
                    return done
        finally:
            for p in list(self.pending.values()):
                self._close(p)

    # -- one turn of the loop ---------------------------------------------------------
    def _poll(self, now: float, deadline: float | None) -> tuple[Conn, bytes] | None:
        can_accept = self._bucket(now) >= 1
        wake = [p.deadline for p in self.pending.values()]
        if deadline is not None:
            wake.append(deadline)
        if not can_accept:
            wake.append(now + (1 - self._tokens) / self.limits.rate)
        poller = select.poll()
        if can_accept:
            poller.register(self.lsock, select.POLLIN)
        for fd in self.pending:
            poller.register(fd, select.POLLIN)
        ms = None if not wake else max(0, int((min(wake) - now) * 1000) + 1)
        for fd, _ in poller.poll(ms):
            if fd == self.lsock.fileno():
                self._accept()
            elif fd in self.pending:
                done = self._read(self.pending[fd])
                if done is not None:
                    return done
        return None

    def _bucket(self, now: float) -> float:
        cap = 2 * self.limits.rate
        if self._tokens < 0:
            self._tokens = cap
        else:
            self._tokens = min(cap, self._tokens + (now - self._refill_at) * self.limits.rate)
        self._refill_at = now
        return self._tokens

    def _accept(self) -> None:
        try:
            sock, addr = self.lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:     # ECONNABORTED, EMFILE...: this one is lost, not the gate
            self.log(f"accept failed: {e.strerror}")
            return
        self._tokens -= 1
        sock.set_inheritable(False)
        host, peer = addr[0], f"{addr[0]}:{addr[1]}"
        now = time.monotonic()
        h = self.hosts.get(host)
        if h is not None and now < h.until:
            h.dropped += 1
            if h.dropped == 1:
                self.log(f"dropped {peer}: rate-limited after {h.failures} failures from "
                         f"{host} ({h.until - now:.1f} s left; further ones not logged)")
            sock.close()
            return
        if sum(p.host == host for p in self.pending.values()) >= self.limits.pending_per_host:
            self.log(f"dropped {peer}: {self.limits.pending_per_host} connections from {host} "
                     "already in their handshake")
            sock.close()
            return
        if len(self.pending) >= self.limits.pending:
            oldest = min(self.pending.values(), key=lambda p: p.deadline)
            self.log(f"dropped {oldest.peer}: {self.limits.pending} connections in their "
                     "handshake; the oldest goes")
            self._close(oldest)
        p = _Pending(sock, peer, host, DestHandshake(self.token, peer),
                     now + self.limits.handshake)
        sock.setblocking(False)
        try:
            hello = p.hs.greeting()
            if sock.send(hello) != len(hello):     # an empty send buffer takes ~100 bytes
                raise OSError(errno.EAGAIN, "send buffer full")
        except OSError as e:
            self._close(p)
            self._fail(p, MigrationError(f"connection to {peer} failed: {e.strerror}"))
            return
        self.pending[sock.fileno()] = p

    def _read(self, p: _Pending) -> tuple[Conn, bytes] | None:
        try:
            try:
                data = p.sock.recv(p.hs.want())
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                raise MigrationError(f"connection to {p.peer} lost ({e.strerror})") from None
            if not data:
                raise MigrationError(f"connection to {p.peer} closed by the peer")
            if not p.hs.feed(data):
                return None
        except MigrationError as e:
            if p.hs.refusal:
                try:
                    p.sock.send(b"".join(encode(Msg.REFUSE, Reason(p.hs.refusal[:4096]))))
                except OSError:
                    pass
            self._close(p)
            self._fail(p, e)
            return None
        del self.pending[p.sock.fileno()]
        p.sock.setblocking(True)
        conn = Conn(p.sock, p.peer, self.io_timeout)
        try:
            conn.write_all([p.hs.reply])
        except MigrationError as e:
            conn.close()
            self._fail(p, e)
            return None
        conn.authenticated = True
        h = self.hosts.pop(p.host, None)
        if h is not None and h.failures:
            self.log(f"{p.peer} authenticated ({h.failures} earlier failure(s) from {p.host})")
        assert p.hs.session is not None
        return conn, p.hs.session

    def _expire(self, now: float) -> None:
        for p in [p for p in self.pending.values() if now >= p.deadline]:
            self._close(p)
            self._fail(p, MigrationError(f"{p.peer} did not authenticate within "
                                         f"{self.limits.handshake:g} s"))

    def _close(self, p: _Pending) -> None:
        self.pending.pop(p.sock.fileno(), None)
        try:
            p.sock.close()
        except OSError:
            pass

    def _fail(self, p: _Pending, e: MigrationError) -> None:
        """One line, the host's penalty; past --max-failures, the end."""
        self.failures += 1
        lim = self.limits
        h = self.hosts.pop(p.host, None) or _Host()
        self.hosts[p.host] = h               # most recent last: the oldest are forgotten
        while len(self.hosts) > lim.hosts:
            self.hosts.popitem(last=False)
        h.failures += 1
        h.dropped = 0
        wait = 0.0 if h.failures < 2 else min(lim.delay * 2 ** (h.failures - 2), lim.max_delay)
        h.until = time.monotonic() + wait
        of = f"/{lim.max_failures}" if lim.max_failures else ""
        then = f"; {p.host} waits {wait:g} s" if wait else ""
        why = e.message.removeprefix(f"{p.peer} ")     # the line names it first
        self.log(f"dropped {p.peer}: {_printable(why)} (failure {self.failures}{of}{then})")
        self._last = e
        if lim.max_failures and self.failures >= lim.max_failures:
            cls = type(e) if isinstance(e, MigrationError) else MigrationError
            raise cls(f"{self.failures} connections failed before a migration arrived "
                      f"(--max-failures {lim.max_failures}); the last: {e.message}")


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
        s.listen(Limits.pending)
    except OSError as e:
        s.close()
        raise MigrationError(f"cannot listen on {addr}: {e.strerror}") from None
    return s, f"{host}:{s.getsockname()[1]}"


def parse_addr(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MigrationError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
