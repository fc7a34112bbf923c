"""Trust: signed images, what a restart may grant (--trust, non-root
limits), and bounded resources while reading a hostile image.

- Signatures (--sign/--verify, HMAC-SHA256 or Ed25519): a signed image reads
  back with its key; unsigned, wrong key, any flipped byte, a forgery with
  every checksum recomputed, signatures removed, moved or doubled: one
  ImageError.  A forged metadata record is refused before any process is
  made, forged pages before any restored task runs (checked with LCR_FAULT:
  the fault point after the refusal is never reached).
- Root restoring what the image would grant (another uid, capabilities, a
  set-uid program, files that uid could not open) needs --trust naming it;
  the refusal is one line listing every grant.
- A non-root caller restores only its own uid, no capability it lacks in
  its own namespace (--any-pid), no set-uid program, and no file it could
  not open (lcr opens them as the caller: the kernel refuses).
- Bounds: too many tasks, VMAs claiming more than an address space, too
  much metadata in all: refused before anything is allocated or made.
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

import msgspec
import pytest
import xxhash

import helpers
from helpers import (LCR, assert_clean_error, assert_pass, child_env, exists,
                     lcr, live_children, parse_restored_pid, pids_with_exe, probe_hog, reap,
                     start_memhog, wait_for_line)
from linuxcr.errors import ImageError, LcrError, PermissionDenied
from linuxcr.image import schema, sign, stream
from linuxcr.image.source import Source
from linuxcr.image.schema import (FRAME, FRAME_MAGIC, MAX_TASKS, Creds, FileDesc, OpenFile,
                                  Pages, RecType, ShmObject, Task, Trailer, Tree, Vma)
from linuxcr.image.stream import PAGE, ImageReader, ImageWriter
from linuxcr.resources import process
from linuxcr.sys.syscalls import TASK_SIZE
from test_image import BASE, PID, make_header, make_task, make_tree, page_runs

NOBODY = 65534
CAP_NET_BIND_SERVICE = 10


# ==========================================================================
# keys and images

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """An HMAC secret, two Ed25519 key pairs (PEM, OpenSSH), an RSA key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    d = tmp_path_factory.mktemp("keys")
    k = {}
    (d / "hmac").write_bytes(os.urandom(32))
    (d / "hmac2").write_bytes(os.urandom(32))
    k["hmac"], k["hmac2"] = d / "hmac", d / "hmac2"
    for name in ("ed", "ed2"):
        priv = ed25519.Ed25519PrivateKey.generate()
        (d / f"{name}.pem").write_bytes(priv.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (d / f"{name}.pub").write_bytes(priv.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        k[name], k[name + ".pub"] = d / f"{name}.pem", d / f"{name}.pub"
    priv = ed25519.Ed25519PrivateKey.generate()
    (d / "ssh").write_bytes(priv.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
    (d / "ssh.pub").write_bytes(priv.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" test\n")
    k["ssh"], k["ssh.pub"] = d / "ssh", d / "ssh.pub"
    (d / "enc.pem").write_bytes(priv.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    k["enc"] = d / "enc.pem"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (d / "rsa.pem").write_bytes(rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    k["rsa"] = d / "rsa.pem"
    (d / "short").write_bytes(b"0123456789")
    k["short"] = d / "short"
    return k


def signed_image(key_path, **kw) -> bytes:
    """A synthetic image (test_image's builders) signed with the key."""
    key = sign.load_key(key_path, signing=True)
    fd = os.memfd_create("img", os.MFD_CLOEXEC)
    try:
        w = ImageWriter(fd, compress=kw.get("compress", True), name="test image", signer=key)
        w.header(make_header(flags=["compressed"]))
        w.record(RecType.TREE, kw.get("tree") or make_tree())
        for t in kw.get("tasks") or [make_task()]:
            w.record(RecType.TASK, t)
        for addr, data in page_runs():
            w.page_run(PID, addr, memoryview(data))
        w.finish()
        os.lseek(fd, 0, os.SEEK_SET)
        return _read_all(fd)
    finally:
        os.close(fd)


def unsigned_image() -> bytes:
    fd = os.memfd_create("img", os.MFD_CLOEXEC)
    try:
        w = ImageWriter(fd, compress=True, name="test image")
        w.header(make_header(flags=["compressed"]))
        w.record(RecType.TREE, make_tree())
        w.record(RecType.TASK, make_task())
        for addr, data in page_runs():
            w.page_run(PID, addr, memoryview(data))
        w.finish()
        os.lseek(fd, 0, os.SEEK_SET)
        return _read_all(fd)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    out = []
    while chunk := os.read(fd, 1 << 20):
        out.append(chunk)
    return b"".join(out)


def read_records(data: bytes, key=None) -> list[RecType]:
    """Read a whole image (through a memfd); the record types returned.
    Raises what the reader raises, with ``.returned`` set on it."""
    fd = os.memfd_create("img", os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    got: list[RecType] = []
    try:
        r = ImageReader(fd, name="img", verifier=None if key is None else
                        sign.load_key(key, signing=False))
        r.read_header()
        got.append(RecType.HEADER)
        while not r.done:
            got.append(r.next().type)
        r.expect_end()
        return got
    except LcrError as e:
        e.returned = got   # type: ignore[attr-defined]
        raise
    finally:
        os.close(fd)


# --- records of an image, and images re-made from records (a forger's tools)

def records_of(data: bytes) -> list[tuple[int, bytes, bytes]]:
    out, off = [], 0
    while off < len(data):
        _m, rtype, _f, meta_len, _p, data_len, _cs = FRAME.unpack_from(data, off)
        m0 = off + FRAME.size
        out.append((rtype, data[m0:m0 + meta_len], data[m0 + meta_len:m0 + meta_len + data_len]))
        off = m0 + meta_len + data_len
    return out


def reframe(records: list[tuple[int, bytes, bytes]]) -> bytes:
    """Frames with right checksums and a right trailer around any records
    (the trailer given, if any, is replaced)."""
    out, digest, npages, n = [], xxhash.xxh3_64(), 0, 0
    for rtype, meta, data in records:
        if rtype == RecType.TRAILER:
            continue
        cs = xxhash.xxh3_64_intdigest(meta + data)
        out.append(FRAME.pack(FRAME_MAGIC, rtype, 0, len(meta), 0, len(data), cs) + meta + data)
        digest.update(cs.to_bytes(8, "little"))
        n += 1
        if rtype == RecType.PAGES:
            npages += msgspec.msgpack.decode(meta, type=Pages).npages
    t = schema.ENCODER.encode(Trailer(records=n, pages=npages, digest=digest.intdigest()))
    out.append(FRAME.pack(FRAME_MAGIC, RecType.TRAILER, 0, len(t), 0, 0,
                          xxhash.xxh3_64_intdigest(t)) + t)
    return b"".join(out)


def edit_meta(records, rtype: RecType, cls, **changes):
    """Replace fields of the first record of rtype (re-encoded)."""
    out, done = [], False
    for t, m, d in records:
        if t == rtype and not done:
            obj = msgspec.structs.replace(msgspec.msgpack.decode(m, type=cls), **changes)
            m, done = schema.ENCODER.encode(obj), True
        out.append((t, m, d))
    assert done
    return out


def types(records) -> list[int]:
    return [t for t, _, _ in records]


# ==========================================================================
# signatures: the image stream

@pytest.mark.parametrize("signer,verifier", [("hmac", "hmac"), ("ed", "ed.pub"), ("ed", "ed"),
                                             ("ssh", "ssh.pub")])
def test_signed_image_reads_back(keys, signer, verifier):
    data = signed_image(keys[signer])
    recs = records_of(data)
    assert types(recs).count(RecType.SIGNATURE) == 2
    i_meta = types(recs).index(RecType.SIGNATURE)
    assert recs[i_meta - 1][0] == RecType.TASK and recs[i_meta + 1][0] == RecType.PAGES
    assert recs[-2][0] == RecType.SIGNATURE and recs[-1][0] == RecType.TRAILER
    want = [RecType.HEADER, RecType.TREE, RecType.TASK] + [RecType.PAGES] * 4 + [RecType.TRAILER]
    assert read_records(data, keys[verifier]) == want       # signatures never returned
    assert read_records(data) == want                       # and a signed image needs no key


def test_signature_scopes_are_not_interchangeable(keys):
    key = sign.load_key(keys["ed"], signing=True)
    d = bytes(32)
    assert not key.verify(sign.message("image", d), key.sign(sign.message("meta", d)))


def test_unsigned_image_refused_with_verify(keys):
    data = unsigned_image()
    with pytest.raises(ImageError, match="is not signed") as ei:
        read_records(data, keys["hmac"])
    assert ei.value.returned == []          # refused at the header


@pytest.mark.parametrize("signer,verifier,match", [
    ("hmac", "hmac2", "another key"),
    ("ed", "ed2.pub", "another key"),
    ("hmac", "ed.pub", "signed with hmac-sha256.*Ed25519 public key"),
    ("ed", "hmac", "signed with ed25519.*HMAC-SHA256 secret"),
])
def test_wrong_key(keys, signer, verifier, match):
    with pytest.raises(ImageError, match=match) as ei:
        read_records(signed_image(keys[signer]), keys[verifier])
    assert RecType.PAGES not in ei.value.returned   # before any page
    assert "\n" not in str(ei.value)


def test_every_flipped_byte_is_refused(keys):
    data = signed_image(keys["ed"], compress=False)
    for off in range(0, len(data), 13):
        bad = bytearray(data)
        bad[off] ^= 0x20
        with pytest.raises(ImageError):
            read_records(bytes(bad), keys["ed.pub"])


def test_forged_metadata_is_caught_before_the_pages(keys):
    """A forger who recomputes every checksum (they are not secret) passes
    the integrity checks, not the signature; the reader refuses before it
    returns anything after the tasks."""
    data = signed_image(keys["hmac"])
    forged = reframe(edit_meta(records_of(data), RecType.TASK, Task,
                               creds=Creds(uid=[0] * 4, gid=[0] * 4, groups=[])))
    assert len(read_records(forged)) == 8          # the checksums alone: fine
    with pytest.raises(ImageError, match="fails its metadata signature") as ei:
        read_records(forged, keys["hmac"])
    assert ei.value.returned == [RecType.HEADER, RecType.TREE, RecType.TASK]


def test_forged_pages_are_caught_before_the_trailer(keys):
    recs = records_of(signed_image(keys["ed"], compress=False))
    i = types(recs).index(RecType.PAGES)
    t, m, d = recs[i]
    recs[i] = (t, m, b"\x90" * len(d))
    forged = reframe(recs)
    assert len(read_records(forged)) == 8
    with pytest.raises(ImageError, match="fails its whole-image signature") as ei:
        read_records(forged, keys["ed.pub"])
    assert RecType.TRAILER not in ei.value.returned


def _without(recs, rtype, nth=0):
    idx = [i for i, t in enumerate(types(recs)) if t == rtype][nth]
    return recs[:idx] + recs[idx + 1:], recs[idx]


def test_signatures_removed_moved_or_doubled(keys):
    recs = records_of(signed_image(keys["hmac"]))
    no_meta, meta_sig = _without(recs, RecType.SIGNATURE, 0)
    no_image, image_sig = _without(recs, RecType.SIGNATURE, 1)
    cases = {
        "missing after the last task": no_meta,
        "missing before the trailer": no_image,
        # the metadata signature among the pages
        "missing after the last task record": no_meta[:4] + [meta_sig] + no_meta[4:],
        "a second meta signature": recs[:4] + [meta_sig] + recs[4:],
        "after the image signature": recs[:-2] + [image_sig] + recs[-3:-2] + recs[-1:],
        "before the metadata signature": [r for r in no_meta if r is not image_sig][:3]
        + [image_sig] + no_meta[3:],
    }
    for what, bad in cases.items():
        for key in (None, keys["hmac"]):          # placement is checked even without a key
            with pytest.raises(ImageError, match=what.split(" (")[0]):
                read_records(reframe(bad), key)


def test_signed_flag_removed(keys):
    """Strip the flag and both signatures: a valid unsigned image, which
    --verify refuses."""
    recs = [r for r in records_of(signed_image(keys["hmac"])) if r[0] != RecType.SIGNATURE]
    stripped = reframe(edit_meta(recs, RecType.HEADER, schema.Header, flags=["compressed"]))
    assert len(read_records(stripped)) == 8
    with pytest.raises(ImageError, match="is not signed"):
        read_records(stripped, keys["hmac"])


def test_signature_in_an_unsigned_image(keys):
    recs = records_of(signed_image(keys["hmac"]))
    bad = reframe(edit_meta(recs, RecType.HEADER, schema.Header, flags=["compressed"]))
    with pytest.raises(ImageError, match="does not say it is signed"):
        read_records(bad)


@pytest.mark.parametrize("name,signing,match", [
    ("short", True, "at least 16"),
    ("rsa", True, "only Ed25519"),
    ("rsa", False, "only Ed25519"),
    ("ed.pub", True, "signing needs the private key"),
    ("ssh.pub", True, "signing needs the private key"),
    ("enc", True, "encrypted"),
    ("missing", False, "cannot read key file"),
])
def test_unusable_key_files(keys, name, signing, match, tmp_path):
    path = keys.get(name, tmp_path / "missing")
    with pytest.raises(sign.KeyFileError, match=match) as ei:
        sign.load_key(path, signing=signing)
    assert "\n" not in str(ei.value)


def test_verify_costs_nothing_without_a_key(keys):
    """Without --verify the reader hashes nothing (SHA-256 only when asked)."""
    fd = os.memfd_create("img", os.MFD_CLOEXEC)
    try:
        assert ImageReader(fd)._sha is None
        assert ImageWriter(fd)._sha is None
        with stream.options(verifier=sign.load_key(keys["hmac"], signing=False)):
            assert ImageReader(fd)._sha is not None
    finally:
        os.close(fd)


# ==========================================================================
# signatures: end to end



def lcr_env(fault: str | None = None) -> dict:
    return child_env({"LCR_FAULT": fault or ""})


@pytest.mark.e2e
def test_sign_and_verify_a_real_checkpoint(bins, procs, tmp_path, keys):
    r = start_memhog(procs, bins, tmp_path, 8)
    assert probe_hog(r.pid, r.log).ok
    img = tmp_path / "img"
    lcr("checkpoint", r.pid, "-o", img, "--sign", keys["ed"])
    reap(r.pid)
    out = lcr("show", img, "--verify", keys["ed.pub"]).stdout
    assert "signature good (ed25519" in out
    assert "not checked" in lcr("show", img).stdout
    for key, err in ((keys["ed2.pub"], "another key"), (keys["hmac"], "signed with ed25519")):
        cp = lcr("restart", img, "--verify", key, check=False, env=lcr_env("restore.spawned"))
        assert_clean_error(cp, "ImageError", match=err, empty_stdout=True)
    cp = lcr("restart", img, "--verify", keys["ed.pub"])
    pid = procs.add(parse_restored_pid(cp.stdout))
    assert pid == r.pid
    assert probe_hog(pid, r.log).ok


@pytest.mark.e2e
def test_sign_and_verify_through_a_pipe(bins, procs, tmp_path, keys):
    """checkpoint -o - --sign | restart - --verify: hashing as it streams."""
    r = start_memhog(procs, bins, tmp_path, 8)
    assert probe_hog(r.pid, r.log).ok
    ck = subprocess.Popen([*LCR, "checkpoint", str(r.pid), "-o", "-", "--sign", str(keys["hmac"])],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rs = subprocess.Popen([*LCR, "restart", "-", "--verify", str(keys["hmac"])], stdin=ck.stdout,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ck.stdout.close()
    assert ck.wait(timeout=helpers.LCR_TIMEOUT) == 0, ck.stderr.read()
    reap(r.pid)                    # our child: restart waits for its pid to be free
    out, err = rs.communicate(timeout=helpers.LCR_TIMEOUT)
    assert rs.returncode == 0, err
    pid = procs.add(parse_restored_pid(out))
    assert probe_hog(pid, r.log).ok


@pytest.fixture(scope="module")
def real_signed(bins, tmp_path_factory, keys):
    """A signed image of memhog (original gone) and its exe."""
    tmp = tmp_path_factory.mktemp("signed")
    reg = helpers.Procs()
    try:
        r = start_memhog(reg, bins, tmp, 8)
        assert probe_hog(r.pid, r.log).ok
        img = tmp / "img"
        lcr("checkpoint", r.pid, "-o", img, "--sign", keys["hmac"])
        reap(r.pid)
        yield img.read_bytes(), r, bins["memhog"]
    finally:
        reg.kill_all()


@pytest.mark.e2e
@pytest.mark.parametrize("what", ["task", "pages", "unsigned"])
def test_restart_refuses_a_forgery_in_time(what, real_signed, keys, tmp_path, procs):
    """Forged metadata: refused before a process exists (the fault point
    right after the blank is made would SIGKILL lcr: exit -9, not 6).
    Forged pages: refused before any task runs (same, at the point where
    every task is rebuilt and none let go yet)."""
    data, orig, exe = real_signed
    recs = records_of(data)
    if what == "task":
        bad, fault = reframe(edit_meta(recs, RecType.TASK, Task, comm="forged")), "restore.spawned"
    elif what == "pages":
        i = len(recs) - 3            # the last PAGES record (then SIGNATURE, TRAILER)
        t, m, d = recs[i]
        assert t == RecType.PAGES and not msgspec.msgpack.decode(m, type=Pages).compressed
        recs[i] = (t, m, bytes(len(d)))
        bad, fault = reframe(recs), "restore.finished"
    else:
        bad = reframe(edit_meta([r for r in recs if r[0] != RecType.SIGNATURE], RecType.HEADER,
                                schema.Header, flags=[]))
        fault = "restore.spawned"
    img = tmp_path / "bad.img"
    img.write_bytes(bad)
    before = live_children()
    cp = lcr("restart", img, "--verify", keys["hmac"], check=False, env=lcr_env(fault))
    assert_clean_error(cp, "ImageError", match="signature|not signed", empty_stdout=True)
    helpers.reap_zombie_children()
    assert not pids_with_exe(exe) and not exists(orig.pid)
    # nothing new (<=: a guardian or agent of an earlier test may exit meanwhile)
    assert live_children() <= before
    # without --verify the forgery passes every integrity check: that is what signatures add
    if what != "unsigned":
        cp = lcr("show", img)
        assert cp.returncode == 0, cp.stderr


# ==========================================================================
# --trust: what root may grant

def test_parse_trust():
    assert process.parse_trust(["uid,caps", "files"]) == {"uid", "caps", "files"}
    assert process.parse_trust("all") == set(process.TRUST_KINDS)
    assert process.parse_trust(()) == set()
    with pytest.raises(LcrError, match="--trust root: unknown"):
        process.parse_trust(["uid", "root"])


@pytest.fixture
def world():
    """A directory every user can reach (pytest's tmp_path is root's only)."""
    d = Path(tempfile.mkdtemp(prefix="lcr-trust-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _task(uid: int, **kw) -> Task:
    exe = kw.pop("exe", "/bin/sh")
    t = make_task(creds=Creds(uid=[uid] * 4, gid=[uid] * 4, groups=[]), files=[], vmas=[],
                  cwd="/", root="/")
    return msgspec.structs.replace(t, mm=msgspec.structs.replace(t.mm, exe=exe), **kw)


def test_root_grants(world):
    if os.geteuid() != 0:
        pytest.skip("root's rules")
    secret = world / "secret"
    secret.write_text("x")
    os.chmod(secret, 0o600)
    private = world / "private"
    private.mkdir(mode=0o700)
    mine = process.RestorePolicy(sources=[Source("img", ((0, "root's"),))])
    assert process.root_grants([_task(0, caps=[0, (1 << 41) - 1, (1 << 41) - 1, 0, 0])], mine) == []
    # a root process in an image someone else owns
    theirs = Source("img", ((0, "root's dir"), (1000, "img is owned by uid 1000")))
    g = process.root_grants([_task(0)], process.RestorePolicy(sources=[theirs]))
    assert [x.kind for x in g] == ["uid"] and "owned by uid 1000" in g[0].what
    # ... unless it carried a good signature (--verify)
    assert process.root_grants([_task(0)], process.RestorePolicy(sources=[theirs],
                                                                 verified=True)) == []
    # another uid, with a capability, files it could not open
    tree = Tree(root=PID, files=[FileDesc(fid=1, kind="reg", path=str(secret), flags=os.O_RDONLY),
                                 FileDesc(fid=2, kind="chr", path="/dev/null", flags=os.O_RDWR)])
    t = _task(NOBODY, caps=[0, 1 << CAP_NET_BIND_SERVICE, 1 << CAP_NET_BIND_SERVICE, 0, 0],
              files=[OpenFile(fd=3, fid=1, cloexec=False), OpenFile(fd=4, fid=2, cloexec=False)],
              cwd=str(private),
              vmas=[Vma(start=BASE, end=BASE + PAGE, prot=3, shared=True, kind="file",
                        path="/etc/passwd", vmflags=["mw"])])
    g = process.root_grants([t], process.RestorePolicy(tree=tree))
    assert {x.kind for x in g} == {"uid", "caps", "files"}, g
    text = "; ".join(x.what for x in g)
    assert "cap_net_bind_service" in text and "uid 65534" in text
    assert f"fd 3: {secret}, which uid 65534 may not read" in text
    assert f"{private}" in text and "/etc/passwd, which uid 65534 may not read and write" in text
    assert "/dev/null" not in text
    # one refusal listing the whole tree, and the way out
    policy = process.RestorePolicy(tree=tree, tasks=[t, _task(1000, pid=PID + 1)])
    with process.restore_policy(policy), pytest.raises(PermissionDenied) as ei:
        process.check_creds(policy.tasks[0])
    msg = str(ei.value)
    assert "uid 65534" in msg and "uid 1000" in msg and "--trust uid,caps,files" in msg
    policy = process.RestorePolicy(trust=frozenset(process.TRUST_KINDS),
                                   tree=tree, tasks=[t])
    with process.restore_policy(policy):
        assert process.check_creds(t) is None


PRIVDROP_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <grp.h>
#include <linux/capability.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* privdrop [--caps] [--open FILE] UID: open FILE, become UID (keeping
   CAP_NET_BIND_SERVICE with --caps), then wait; SIGUSR1 -> one PASS line. */
static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }

static unsigned cap_eff(void)
{
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct d[2];
	memset(d, 0, sizeof d);
	syscall(SYS_capget, &h, d);
	return d[0].effective;
}

int main(int argc, char **argv)
{
	int caps = 0, fd = -1, i = 1;
	const char *file = NULL;
	for (; i < argc - 1 && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "--caps")) caps = 1;
		else if (!strcmp(argv[i], "--open")) file = argv[++i];
	}
	uid_t uid = (uid_t)atoi(argv[i]);
	if (file && (fd = open(file, O_RDONLY)) < 0) { perror(file); return 1; }
	if (getuid() != uid || geteuid() != uid) {
		if (caps && prctl(PR_SET_KEEPCAPS, 1) < 0) { perror("keepcaps"); return 2; }
		if (setgroups(0, NULL) || setresgid(uid, uid, uid) || setresuid(uid, uid, uid)) {
			perror("drop"); return 3;
		}
	}
	if (caps) {
		struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
		struct __user_cap_data_struct d[2];
		memset(d, 0, sizeof d);
		d[0].effective = d[0].permitted = 1u << CAP_NET_BIND_SERVICE;
		if (syscall(SYS_capset, &h, d)) { perror("capset"); return 4; }
	}
	prctl(PR_SET_DUMPABLE, 1);
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	printf("READY pid=%d\n", getpid());
	fflush(stdout);
	for (;;) {
		pause();
		if (!usr1) continue;
		usr1 = 0;
		char buf[16];
		long n = fd >= 0 ? (long)pread(fd, buf, sizeof buf, 0) : 0;
		int ok = getuid() == uid && geteuid() == uid && n >= 0 &&
			(cap_eff() == (caps ? 1u << CAP_NET_BIND_SERVICE : 0u));
		printf("%s privdrop pid=%d uid=%d eff=%x read=%ld\n", ok ? "PASS" : "FAIL", getpid(),
		       (int)geteuid(), cap_eff(), n);
		fflush(stdout);
	}
}
"""


@pytest.fixture(scope="module")
def privdrop():
    if os.geteuid() != 0:
        pytest.skip("needs root to start processes as other users")
    if not helpers.have_gcc():
        pytest.skip("gcc not found")
    d = Path(tempfile.mkdtemp(prefix="lcr-privdrop-"))
    os.chmod(d, 0o755)
    try:
        (d / "privdrop.c").write_text(PRIVDROP_C)
        subprocess.run(["gcc", "-O1", "-Wall", "-o", d / "privdrop", d / "privdrop.c"], check=True)
        os.chmod(d / "privdrop", 0o755)
        suid = d / "privdrop-suid"
        shutil.copy(d / "privdrop", suid)
        os.chmod(suid, 0o4755)
        yield {"plain": str(d / "privdrop"), "suid": str(suid)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def start_privdrop(procs, prog: str, world: Path, uid: int, *opts, prefix=()) -> helpers.Running:
    log = world / f"privdrop-{uid}-{len(list(world.iterdir()))}.log"
    log.touch()
    os.chown(log, uid, uid)
    p = procs.start([*prefix, prog, *map(str, opts), uid], log, cwd=world)
    m = wait_for_line(log, r"^READY pid=(\d+)", pid=p.pid)
    assert int(m.group(1)) == p.pid
    assert_pass(p.pid, log, "privdrop")
    return helpers.Running(p.pid, log, None, p)


def _status(pid: int, key: str) -> str:
    return helpers.proc_status(pid)[key]


def _refused(cp, *mentions, hint: str) -> str:
    line = assert_clean_error(cp, "PermissionDenied", mentions=mentions, empty_stdout=True)
    assert f"--trust {hint})" in line, line
    return line


@pytest.mark.e2e
def test_root_restores_another_uid_only_with_trust(privdrop, procs, world):
    r = start_privdrop(procs, privdrop["plain"], world, NOBODY)
    img = world / "img"
    lcr("checkpoint", r.pid, "-o", img)
    reap(r.pid)
    before = live_children()
    _refused(lcr("restart", img, check=False), "uid 65534", hint="uid")
    assert not exists(r.pid) and live_children() <= before
    pid = procs.add(parse_restored_pid(lcr("restart", img, "--trust", "uid").stdout))
    assert pid == r.pid and _status(pid, "Uid").split() == [str(NOBODY)] * 4
    assert_pass(pid, r.log, "privdrop")


@pytest.mark.e2e
def test_root_caps_and_files_need_trust(privdrop, procs, world):
    secret = world / "secret"
    secret.write_text("root only\n")
    os.chmod(secret, 0o600)
    r = start_privdrop(procs, privdrop["plain"], world, NOBODY, "--caps", "--open", secret)
    caps = (_status(r.pid, "CapPrm"), _status(r.pid, "CapEff"))
    assert int(caps[1], 16) == 1 << CAP_NET_BIND_SERVICE
    img = world / "img"
    lcr("checkpoint", r.pid, "-o", img)
    reap(r.pid)
    before = live_children()
    _refused(lcr("restart", img, check=False), "uid 65534", "cap_net_bind_service", str(secret),
             hint="uid,caps,files")
    _refused(lcr("restart", img, "--trust", "uid,caps", check=False), str(secret), hint="files")
    _refused(lcr("restart", img, "--trust", "uid", "--trust", "files", check=False),
             "cap_net_bind_service", hint="caps")
    assert not exists(r.pid) and live_children() <= before
    pid = procs.add(parse_restored_pid(lcr("restart", img, "--trust", "all").stdout))
    assert (_status(pid, "CapPrm"), _status(pid, "CapEff")) == caps
    assert _status(pid, "Uid").split() == [str(NOBODY)] * 4
    assert_pass(pid, r.log, "privdrop")      # reads the secret through its restored fd


@pytest.mark.e2e
def test_root_setuid_program_needs_trust(privdrop, procs, world):
    r = start_privdrop(procs, privdrop["suid"], world, NOBODY, prefix=helpers.as_user(NOBODY))
    img = world / "img"
    lcr("checkpoint", r.pid, "-o", img)
    reap(r.pid)
    _refused(lcr("restart", img, "--trust", "uid", check=False), "set-uid", privdrop["suid"],
             hint="setuid")
    pid = procs.add(parse_restored_pid(lcr("restart", img, "--trust", "uid,setuid").stdout))
    assert_pass(pid, r.log, "privdrop")


# ==========================================================================
# what a non-root caller can never do

@pytest.fixture
def user():
    rh = pytest.importorskip("rootless_helpers")
    u = rh.find_user()
    why = rh.user_can_run_lcr(u)
    if why:
        pytest.skip(why)
    return u


def _lcr_user(user, *args):
    import rootless_helpers as rh
    return rh.lcr_as(user, *args, check=False)


def _give(path: Path, user) -> None:
    os.chown(path, user.uid, user.gid)


@pytest.mark.e2e
def test_nonroot_gets_no_capability_it_lacks(privdrop, procs, world, user):
    r = start_privdrop(procs, privdrop["plain"], world, user.uid, "--caps")
    img = world / "img"
    lcr("checkpoint", r.pid, "-o", img)
    reap(r.pid)
    _give(img, user)
    before = live_children()
    cp = _lcr_user(user, "restart", img, "--any-pid")     # refused up front: needs root
    assert_clean_error(cp, "PermissionDenied", mentions=["--any-pid", "PR_SET_MM_MAP"],
                       empty_stdout=True)
    assert live_children() <= before and not pids_with_exe(privdrop["plain"])
    # into a user namespace of the caller's: confined there, dropped to the saved sets
    cp = _lcr_user(user, "restart", img)
    assert cp.returncode == 0, cp.stderr
    pid = procs.add(parse_restored_pid(cp.stdout))
    assert int(_status(pid, "CapEff"), 16) == 1 << CAP_NET_BIND_SERVICE
    assert int(_status(pid, "CapPrm"), 16) == 1 << CAP_NET_BIND_SERVICE
    assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    assert_pass(pid, r.log, "privdrop")


@pytest.mark.e2e
def test_nonroot_cannot_restore_a_setuid_program(privdrop, procs, world, user):
    r = start_privdrop(procs, privdrop["suid"], world, user.uid, prefix=user.prefix)
    img = world / "img"
    lcr("checkpoint", r.pid, "-o", img)
    reap(r.pid)
    _give(img, user)
    cp = _lcr_user(user, "restart", img)
    assert_clean_error(cp, "RestoreError", mentions=["set-uid", privdrop["suid"]],
                       empty_stdout=True)
    assert not pids_with_exe(privdrop["suid"])


@pytest.mark.e2e
def test_nonroot_cannot_reopen_a_file_it_may_not_open(privdrop, procs, world, user):
    """Files are reopened by lcr as the caller: the kernel is the judge."""
    _give(world, user)                      # the user's checkpoint writes its image there
    data = world / "data"
    data.write_text("the user's\n")
    _give(data, user)
    r = start_privdrop(procs, privdrop["plain"], world, user.uid, "--open", data,
                       prefix=user.prefix)
    img = world / "img"
    cp = _lcr_user(user, "checkpoint", r.pid, "-o", img)
    assert cp.returncode == 0, cp.stderr
    reap(r.pid)
    os.chown(data, 0, 0)
    os.chmod(data, 0o600)
    before = live_children()
    cp = _lcr_user(user, "restart", img)
    assert_clean_error(cp, "RestoreError", mentions=[str(data), "permission denied"],
                       empty_stdout=True)
    helpers.reap_zombie_children()
    assert live_children() <= before and not pids_with_exe(privdrop["plain"])
    _give(data, user)                       # given back: it restores
    cp = _lcr_user(user, "restart", img)
    assert cp.returncode == 0, cp.stderr
    pid = procs.add(parse_restored_pid(cp.stdout))
    assert_pass(pid, r.log, "privdrop")


# ==========================================================================
# bounded resources: hostile totals refused before anything is allocated

AS_LIMIT = 2 << 30      # address space lcr gets for these: far below what the images claim


def _restart_bounded(img: Path) -> subprocess.CompletedProcess:
    """lcr restart under an address-space limit, with a fault point right
    after the first process would be made (it must never get there)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    cp = subprocess.run([*LCR, "restart", str(img)], capture_output=True, text=True,
                        env=lcr_env("restore.spawned"), preexec_fn=limit,
                        timeout=helpers.LCR_TIMEOUT)
    return cp


def _write(path: Path, tree: Tree, tasks, runs=()) -> None:
    with open(path, "wb") as f:
        w = ImageWriter(f.fileno(), name=str(path))
        w.header(make_header(flags=[]))
        w.record(RecType.TREE, tree)
        for t in tasks:
            w.record(RecType.TASK, t)
        for pid, addr, data in runs:
            w.page_run(pid, addr, memoryview(data))
        w.finish()


def _small_task(pid: int, ppid: int = 1, **kw) -> Task:
    t = make_task(pid=pid, ppid=ppid, files=[], rlimits=[], sigactions=[], pending=[],
                  xstate=b"\x01" * 64, vmas=[Vma(start=BASE, end=BASE + PAGE, prot=3,
                                                 shared=False, kind="anon", pages=True)])
    return msgspec.structs.replace(t, **kw) if kw else t


@pytest.mark.e2e
def test_too_many_tasks(tmp_path):
    img = tmp_path / "img"
    tasks = [_small_task(PID)] + [_small_task(PID + i, ppid=PID) for i in range(1, MAX_TASKS + 1)]
    _write(img, Tree(root=PID), tasks)
    cp = _restart_bounded(img)
    assert_clean_error(cp, "ImageError", match=f"more than {MAX_TASKS} task records")


@pytest.mark.e2e
@pytest.mark.parametrize("what", ["beyond-address-space", "overlapping", "shm"])
def test_memory_claims_beyond_an_address_space(tmp_path, what):
    """100000 areas of 1 TiB each (100 PiB: more than TASK_SIZE can hold),
    areas past TASK_SIZE, a shared object bigger than an address space."""
    tib = 1 << 40
    tree = Tree(root=PID)
    if what == "overlapping":
        vmas = [Vma(start=BASE - tib, end=BASE, prot=3, shared=False, kind="anon")] * 100_000
    elif what == "beyond-address-space":
        vmas = [Vma(start=tib * i, end=tib * (i + 1), prot=3, shared=False, kind="anon")
                for i in range(1, 100_000)]
    else:
        tree = Tree(root=PID, shm=[ShmObject(id=1, size=TASK_SIZE + PAGE)])
        vmas = [Vma(start=BASE, end=BASE + PAGE, prot=3, shared=True, kind="shmem", shm=1)]
    img = tmp_path / "img"
    _write(img, tree, [_small_task(PID, vmas=vmas)])
    cp = _restart_bounded(img)
    assert_clean_error(cp, "ImageError", match="invalid memory area|impossible size|memory area .* overlaps|not a page aligned user address|not a size of shared memory")


def test_total_metadata_is_bounded(monkeypatch):
    """Every record within its own bound, but too many of them in all: the
    reader stops before reading (and keeping) the one that goes over."""
    monkeypatch.setattr(stream, "MAX_TOTAL_META", 64 << 10)
    fd = os.memfd_create("img", os.MFD_CLOEXEC)
    try:
        w = ImageWriter(fd)
        w.header(make_header(flags=[]))
        w.record(RecType.TREE, Tree(root=PID))
        for i in range(40):                 # ~3 KiB each
            w.record(RecType.TASK, make_task(pid=PID + i))
        w.finish()
        os.lseek(fd, 0, os.SEEK_SET)
        r = ImageReader(fd)
        r.read_header()
        with pytest.raises(ImageError, match="metadata records total more than"):
            while True:
                r.next()
        assert r.meta_total > 64 << 10 and r.tasks < 40
    finally:
        os.close(fd)
