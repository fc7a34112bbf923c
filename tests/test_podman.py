"""`lcr run --checkpoint-dir` as a container's entrypoint, with real podman.

The image is built once per session from this machine (scripts/build_image.py,
cached by content hash under /var/tmp/lcr-image).  Every container is
started with `--runtime runc` and explicit ulimits (see DESIGN.md,
"Containers here") and removed at teardown.  Skipped where podman is missing
or cannot run a container here (the reason is given)."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.e2e
REPO = helpers.REPO
SECCOMP = REPO / "deploy" / "seccomp-lcr.json"
BASE = ["--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
# the default capabilities, plus SYS_PTRACE: podman's seccomp profile
# allows kcmp(2) only with it (docs/containers.md)
CAPS = ["--cap-add", "SYS_PTRACE"]
JOB = ["python3", "/opt/lcr/work/job_count.py"]
WAIT = 90.0


def _podman(*args, user_env: dict | None = None, check: bool = True, runuser: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    argv = ["podman", *BASE, *(str(a) for a in args)]
    if runuser:
        argv = ["runuser", "-u", runuser, "--", "env", *(f"{k}={v}" for k, v in
                                                           (user_env or {}).items()), *argv]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/tmp")
    if check and cp.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {cp.returncode}:\n{cp.stderr}{cp.stdout}")
    return cp


@pytest.fixture(scope="module")
def image(bins):
    if not shutil.which("podman"):
        pytest.skip("podman not installed (.ci/run installs it: apt-get install podman runc)")
    spec = importlib.util.spec_from_file_location("build_image", REPO / "scripts" / "build_image.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    work = [str(helpers.PROGS_DIR / "job_count.py")]
    if "memhog" in bins.paths:
        work.append(str(bins.paths["memhog"]))
    try:
        tag = mod.build(work, podman=["podman", *BASE])
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot build a local image with podman here: {e}")
    cp = _podman("run", "--rm", *LIMITS, tag, "--version", check=False)
    if cp.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {(cp.stderr or cp.stdout).strip()[:300]}")
    return {"tag": tag, "tar": mod.build_tar(work)[0], "memhog": "memhog" in bins.paths}


class Containers:
    """Containers a test started, removed (podman rm -f) at teardown."""

    def __init__(self, image: str, runuser: str | None = None, env: dict | None = None) -> None:
        self.image, self.names, self.runuser, self.env = image, [], runuser, env

    def podman(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return _podman(*args, check=check, runuser=self.runuser, user_env=self.env)

    def run(self, vol: Path, *lcr_args: str, opts: list[str] = CAPS, cmd=JOB) -> str:
        name = f"lcr-test-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        self.podman("run", "-d", "--name", name, *LIMITS, *opts, "-v", f"{vol}:/ckpt",
                    self.image, "run", "--checkpoint-dir", "/ckpt", *lcr_args, "--", *cmd)
        return name

    def logs(self, name: str) -> str:
        cp = self.podman("logs", name, check=False)
        return cp.stdout + cp.stderr

    def wait_log(self, name: str, pattern: str, start: int = 0) -> re.Match:
        deadline = time.monotonic() + WAIT
        while True:
            text = self.logs(name)
            m = re.search(pattern, text[start:], re.M)
            if m:
                return m
            if time.monotonic() > deadline or self.state(name) not in ("running", "created",
                                                                         "configured"):
                raise AssertionError(f"container {name} ({self.state(name)}): no {pattern!r} "
                                     f"in its log:\n{text[-3000:]}")
            time.sleep(0.2)

    def state(self, name: str) -> str:
        return self.podman("inspect", name, "--format", "{{.State.Status}}", check=False
                           ).stdout.strip()

    def stop(self, name: str) -> int:
        self.podman("stop", "-t", "30", name)
        return int(self.podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout)

    def wait_exit(self, name: str) -> int:
        return int(self.podman("wait", name).stdout.strip().splitlines()[-1])

    def remove_all(self) -> None:
        for n in self.names:
            self.podman("rm", "-f", "-t", "0", n, check=False)


@pytest.fixture
def ctrs(image):
    c = Containers(image["tag"])
    yield c
    c.remove_all()


def _counts(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"^count (\d+)", text, re.M)]


def _volume(tmp_path: Path) -> Path:
    v = tmp_path / "vol"
    # sticky, as /tmp: any container user may write, and lcr's -o rules
    # (image/files.py) accept it; a world-writable one without the sticky
    # bit is refused (someone else could swap the image)
    v.mkdir(mode=0o777)
    os.chmod(v, 0o1777)
    return v


def test_python_job_survives_two_stop_start_cycles(ctrs, tmp_path):
    vol = _volume(tmp_path)
    c1 = ctrs.run(vol)
    ctrs.wait_log(c1, r"^count 5 ")
    assert ctrs.stop(c1) == 0, ctrs.logs(c1)
    log1 = ctrs.logs(c1)
    assert re.search(r"saved /ckpt/ckpt-000001\.img", log1), log1
    assert os.readlink(vol / "latest") == "ckpt-000001.img"
    last = _counts(log1)[-1]
    for k in (2, 3):
        c = ctrs.run(vol)                                 # a new container, same volume
        ctrs.wait_log(c, rf"resumed from /ckpt/ckpt-{k - 1:06d}\.img")
        ctrs.wait_log(c, rf"^count {last + 5} ")
        assert ctrs.stop(c) == 0, ctrs.logs(c)
        got = _counts(ctrs.logs(c))
        assert got[0] == last + 1, (last, got[:3])       # continues, no gap, no repeat
        assert got == list(range(got[0], got[0] + len(got)))
        last = got[-1]
        assert os.readlink(vol / "latest") == f"ckpt-{k:06d}.img"


PROBE = r"counter=(\d+) expected=\w+ actual=\w+ (OK|MISMATCH)"


def _hog_probe(ctrs: Containers, name: str) -> tuple[int, bool]:
    # podman logs interleaves stdout and stderr by time: count answers, not offsets
    before = len(re.findall(PROBE, ctrs.logs(name)))
    ctrs.podman("kill", "--signal", "USR1", name)     # to lcr (pid 1): forwarded to memhog
    deadline = time.monotonic() + WAIT
    while True:
        found = re.findall(PROBE, ctrs.logs(name))
        if len(found) > before:
            return int(found[-1][0]), found[-1][1] == "OK"
        assert time.monotonic() < deadline, ctrs.logs(name)[-2000:]
        time.sleep(0.2)


def test_memhog_checksum_across_containers(ctrs, image, tmp_path):
    if not image["memhog"]:
        pytest.skip("memhog not built (LCR_SHARED)")
    vol = _volume(tmp_path)
    cmd = ["/opt/lcr/work/memhog", "-f", "128"]
    c1 = ctrs.run(vol, cmd=cmd)
    ctrs.wait_log(c1, r"ready")
    n1, ok = _hog_probe(ctrs, c1)
    assert ok
    assert ctrs.stop(c1) == 0, ctrs.logs(c1)
    for k in (2, 3):
        c = ctrs.run(vol, cmd=cmd)
        ctrs.wait_log(c, r"resumed from")
        n, ok = _hog_probe(ctrs, c)
        assert ok, ctrs.logs(c)[-2000:]
        assert n >= n1
        n1 = n
        assert ctrs.stop(c) == 0, ctrs.logs(c)


def test_grace_too_short_in_a_container(ctrs, tmp_path):
    vol = _volume(tmp_path)
    cmd = [*JOB, "--mib", "128", "--term-exit", "3"]
    c1 = ctrs.run(vol, cmd=cmd)
    ctrs.wait_log(c1, r"^count 2 ")
    assert ctrs.stop(c1) == 0, ctrs.logs(c1)
    c2 = ctrs.run(vol, "--grace", "1ms", cmd=cmd)
    ctrs.wait_log(c2, r"resumed from")
    code = ctrs.stop(c2)
    log = ctrs.logs(c2)
    assert code == 3, log                               # the command's own exit
    assert "got SIGTERM" in log and "latest stays ckpt-000001.img" in log, log
    assert os.readlink(vol / "latest") == "ckpt-000001.img"
    assert [p.name for p in vol.glob("*.img")] == ["ckpt-000001.img"]


def test_corrupt_latest_in_a_container(ctrs, tmp_path):
    vol = _volume(tmp_path)
    c1 = ctrs.run(vol)
    ctrs.wait_log(c1, r"^count 2 ")
    assert ctrs.stop(c1) == 0
    img = vol / "ckpt-000001.img"
    with open(img, "r+b") as f:
        f.seek(img.stat().st_size // 2)
        f.write(b"\xff" * 64)
    c2 = ctrs.run(vol)
    code = ctrs.wait_exit(c2)
    lines = [ln for ln in ctrs.logs(c2).splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and "ckpt-000001.img" in lines[0], lines
    c3 = ctrs.run(vol, "--fresh-on-bad-image")
    ctrs.wait_log(c3, r"kept aside in /ckpt/bad-")
    ctrs.wait_log(c3, r"^count 0 ")
    assert ctrs.stop(c3) == 0
    assert list(vol.glob("bad-*/ckpt-000001.img"))


@pytest.mark.parametrize("opts", [
    pytest.param(["--cap-drop", "ALL", "--cap-add", "SETFCAP", "--security-opt",
                  f"seccomp={SECCOMP}"], id="root-setfcap-only"),
    # deploy/statefulset.yaml: root, the default seccomp profile
    pytest.param(["--cap-drop", "ALL", "--cap-add", "SYS_PTRACE,SETFCAP", "--security-opt",
                  "no-new-privileges"], id="root-default-seccomp-ptrace-setfcap"),
    # what a Kubernetes "restricted" pod gets (deploy/job.yaml)
    pytest.param(["--cap-drop", "ALL", "--user", "65534:65534", "--security-opt",
                  f"seccomp={SECCOMP}", "--security-opt", "no-new-privileges"],
                 id="nonroot-no-caps-no-new-privs"),
])
def test_fewest_capabilities(ctrs, tmp_path, opts):
    vol = _volume(tmp_path)
    c1 = ctrs.run(vol, opts=opts)
    ctrs.wait_log(c1, r"^count 3 ")
    assert ctrs.stop(c1) == 0, ctrs.logs(c1)
    c2 = ctrs.run(vol, opts=opts)
    ctrs.wait_log(c2, r"resumed from")
    assert ctrs.stop(c2) == 0, ctrs.logs(c2)


def test_missing_permissions_fail_at_start_with_one_line(ctrs, tmp_path):
    vol = _volume(tmp_path)
    c1 = ctrs.run(vol, opts=[])                 # podman's default: kcmp not allowed
    assert ctrs.wait_exit(c1) != 0
    log = ctrs.logs(c1).strip()
    assert log.count("\n") == 0 and "kcmp" in log and "SYS_PTRACE" in log, log
    c2 = ctrs.run(vol, opts=["--cap-drop", "ALL", "--security-opt", f"seccomp={SECCOMP}"])
    assert ctrs.wait_exit(c2) != 0
    log = ctrs.logs(c2).strip()
    assert log.count("\n") == 0 and "SETFCAP" in log, log


def test_rootless_podman(image, tmp_path):
    user = "lcrtest"
    try:
        uid = int(subprocess.run(["id", "-u", user], capture_output=True, text=True,
                                 check=True).stdout)
    except (subprocess.CalledProcessError, ValueError):
        pytest.skip(f"no user {user}")
    run_dir = Path(f"/tmp/lcr-xdg-{uid}")
    run_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(run_dir, uid, uid)
    env = {"XDG_RUNTIME_DIR": str(run_dir), "HOME": f"/tmp/lcr-home-{uid}"}
    Path(env["HOME"]).mkdir(exist_ok=True)
    os.chown(env["HOME"], uid, uid)
    os.chmod(image["tar"], 0o644)
    tag = "localhost/linuxcr:rootless-" + image["tag"].rsplit(":", 1)[1]
    c = Containers(tag, runuser=user, env=env)
    if c.podman("image", "exists", tag, check=False).returncode != 0:
        cp = c.podman("import", "--change", "ENV=PYTHONPATH=/opt/lcr/site:/opt/lcr/src",
                      "--change", 'ENTRYPOINT=["/usr/local/bin/lcr"]', image["tar"], tag,
                      check=False)
        if cp.returncode != 0:
            pytest.skip(f"rootless podman cannot import an image here: {cp.stderr.strip()[:300]}")
    # pytest's tmp_path is private to root: the user's files go elsewhere
    base = Path(tempfile.mkdtemp(prefix="lcr-rootless-"))
    os.chmod(base, 0o755)
    seccomp = base / "seccomp.json"
    shutil.copy(SECCOMP, seccomp)
    os.chmod(seccomp, 0o644)
    # no network: slirp4netns cannot open /dev/net/tun for an ordinary user here
    opts = ["--network", "none", "--security-opt", f"seccomp={seccomp}"]
    vol = base / "vol"
    vol.mkdir()
    os.chown(vol, uid, uid)
    try:
        c1 = c.run(vol, opts=opts)
        c.wait_log(c1, r"^count 3 ")
        assert c.stop(c1) == 0, c.logs(c1)
        last = _counts(c.logs(c1))[-1]
        c2 = c.run(vol, opts=opts)
        c.wait_log(c2, r"resumed from")
        c.wait_log(c2, rf"^count {last + 2} ")
        assert _counts(c.logs(c2))[0] == last + 1
        assert c.stop(c2) == 0
    finally:
        c.remove_all()
        shutil.rmtree(base, ignore_errors=True)
