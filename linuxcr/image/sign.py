"""Image signatures: HMAC-SHA256 with a shared secret, or Ed25519.

A KEYFILE is either
- an Ed25519 key, PEM (PKCS#8 ``PRIVATE KEY`` / ``PUBLIC KEY``) or OpenSSH
  (``OPENSSH PRIVATE KEY``, ``ssh-ed25519 AAAA...``): the private key signs
  (and verifies), the public key only verifies;
- anything else: the raw bytes of an HMAC-SHA256 secret, at least 16 bytes
  (every byte counts, a trailing newline included).

What is signed (see stream.py): the SHA-256 of every byte of the stream
before the SIGNATURE record, framed with a label naming the scope:

- ``meta``: HEADER, TREE and TASK records; the record sits right after the
  last TASK, so `lcr restart --verify` refuses a tampered image before it
  creates any process;
- ``image``: everything before the final SIGNATURE record, which sits right
  before the TRAILER; checked before any restored task runs.

The record checksums (xxh3-64) are not used for this: they catch accidents,
not forgers, who can recompute them.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any

from linuxcr.errors import KeyFileError

HMAC_SHA256 = "hmac-sha256"
ED25519 = "ed25519"
ALGS = (HMAC_SHA256, ED25519)
SCOPES = ("meta", "image")
MAX_KEYFILE = 64 << 10
MIN_SECRET = 16
_LABEL = b"linuxcr image signature v1\0"


def message(scope: str, digest: bytes) -> bytes:
    """What a signature of ``scope`` signs: a label, the scope, the digest."""
    return _LABEL + scope.encode() + b"\0" + digest


@dataclass(frozen=True, eq=False)
class Key:
    alg: str
    key_id: bytes          # 8 bytes naming the key (not secret)
    path: str
    _secret: bytes | None = None        # HMAC
    _private: Any = None                # Ed25519PrivateKey
    _public: Any = None                 # Ed25519PublicKey

    @property
    def can_sign(self) -> bool:
        return self._secret is not None or self._private is not None

    @property
    def what(self) -> str:
        if self.alg == HMAC_SHA256:
            return "an HMAC-SHA256 secret"
        return "an Ed25519 private key" if self._private is not None else "an Ed25519 public key"

    def sign(self, msg: bytes) -> bytes:
        if self._secret is not None:
            return hmac.new(self._secret, msg, hashlib.sha256).digest()
        if self._private is None:
            raise KeyFileError(f"{self.path} holds an Ed25519 public key: signing needs the private key")
        return self._private.sign(msg)

    def verify(self, msg: bytes, sig: bytes) -> bool:
        if self._secret is not None:
            return hmac.compare_digest(hmac.new(self._secret, msg, hashlib.sha256).digest(), sig)
        from cryptography.exceptions import InvalidSignature
        try:
            self._public.verify(sig, msg)
            return True
        except InvalidSignature:
            return False


def key_id_hex(key_id: bytes) -> str:
    return key_id.hex() or "none"


def load_key(path: str | os.PathLike | Key, *, signing: bool) -> Key:
    """The key in ``path``; KeyFileError (one line) if it cannot be used."""
    if isinstance(path, Key):
        if signing and not path.can_sign:
            raise KeyFileError(f"{path.path} holds {path.what}: signing needs the private key")
        return path
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_KEYFILE + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {name}: {e.strerror}") from None
    if len(data) > MAX_KEYFILE:
        raise KeyFileError(f"key file {name} is larger than {MAX_KEYFILE} bytes: not a key")
    head = data.lstrip()
    if head.startswith(b"-----BEGIN") or head.startswith(b"ssh-ed25519 "):
        key = _load_ed25519(name, head)
    else:
        if len(data) < MIN_SECRET:
            raise KeyFileError(f"key file {name} holds {len(data)} bytes: an HMAC secret needs "
                               f"at least {MIN_SECRET}",
                               "e.g. head -c 32 /dev/urandom > KEYFILE")
        kid = hmac.new(data, b"linuxcr key id", hashlib.sha256).digest()[:8]
        key = Key(HMAC_SHA256, kid, name, _secret=data)
    if signing and not key.can_sign:
        raise KeyFileError(f"{name} holds {key.what}: signing needs the private key")
    return key


def _load_ed25519(name: str, data: bytes) -> Key:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - a dependency of linuxcr
        raise KeyFileError(f"{name} is a PEM/OpenSSH key: Ed25519 needs the 'cryptography' "
                           "package", "pip install cryptography") from None
    private = public = None
    try:
        if b"PRIVATE KEY" in data.split(b"\n", 1)[0]:
            if data.startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
                private = serialization.load_ssh_private_key(data, password=None)
            else:
                private = serialization.load_pem_private_key(data, password=None)
            public = private.public_key()
        elif data.startswith(b"ssh-ed25519 "):
            public = serialization.load_ssh_public_key(data.split(b"\n", 1)[0])
        else:
            public = serialization.load_pem_public_key(data)
    except TypeError:   # encrypted without a password
        raise KeyFileError(f"{name} is an encrypted private key: give an unencrypted one") from None
    except ValueError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KeyFileError(f"{name} is not a usable PEM or OpenSSH key: {first}") from None
    except Exception as e:  # cryptography raises UnsupportedAlgorithm for some  # noqa: BLE001
        raise KeyFileError(f"{name} is not a usable key: {type(e).__name__}: {e}") from None
    if private is not None and not isinstance(private, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{name} is a {type(private).__name__.replace('_', '')} key: "
                           "only Ed25519 keys (or an HMAC secret) are supported")
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{name} is a {type(public).__name__} key: only Ed25519 keys "
                           "(or an HMAC secret) are supported")
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Key(ED25519, hashlib.sha256(raw).digest()[:8], name, _private=private, _public=public)


__all__ = ["Key", "KeyFileError", "load_key", "message", "HMAC_SHA256", "ED25519", "SCOPES"]
