#!/usr/bin/env python3
"""Build a local container image with lcr in it (no registry needed).

    python3 scripts/build_image.py [--tag localhost/linuxcr:dev] [--extra FILE ...]

The root file system is assembled from this machine: the running Python
interpreter (its binary, standard library and the shared libraries they
load, at the same paths), linuxcr (from this checkout) and every
distribution it depends on (into /opt/lcr/site), /bin/sh, and the --extra
files (workloads) into /opt/lcr/work.  Then `podman import` makes it an
image whose entrypoint-to-be is /usr/local/bin/lcr.  The tag names a hash
of everything that went in: building again with nothing changed is a no-op
(the tar is cached under /var/tmp/lcr-image/).

Used by tests/test_podman.py (once per session) and by docs/containers.md.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LCR_IMAGE_CACHE", "/var/tmp/lcr-image"))
SKIP_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
               "site-packages", "dist-packages", "config-3.11-x86_64-linux-gnu", "pydoc_data"}
LCR_SH = """#!/bin/sh
PYTHONPATH=/opt/lcr/site:/opt/lcr/src${PYTHONPATH:+:$PYTHONPATH} exec %s -m linuxcr "$@"
"""


def _dists(root: str = "linuxcr") -> list[md.Distribution]:
    """linuxcr's runtime dependencies, recursively (extras left out)."""
    seen: dict[str, md.Distribution] = {}
    todo = [Path(REPO / "pyproject.toml")]
    names: list[str] = []
    text = todo[0].read_text()
    deps = re.search(r"dependencies = \[(.*?)\]", text, re.S)
    names = re.findall(r'"([A-Za-z0-9_.\-]+)', deps.group(1)) if deps else []
    while names:
        n = names.pop()
        key = n.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            d = md.distribution(n)
        except md.PackageNotFoundError:
            continue
        seen[key] = d
        for req in d.requires or []:
            name, _, marker = req.partition(";")
            if "extra" in marker or "nt" in marker or "Windows" in marker or "PyPy\"" in marker:
                continue
            if "python_version <" in marker or "python_full_version <" in marker:
                continue
            names.append(re.match(r"[A-Za-z0-9_.\-]+", name.strip()).group(0))
    return list(seen.values())


def _ldd(path: str) -> set[str]:
    try:
        out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    except OSError:
        return set()
    libs = set()
    for line in out.splitlines():
        m = re.search(r"(/\S+)", line.split("=>")[-1])
        if m and os.path.exists(m.group(1)):
            libs.add(m.group(1))
    return libs


def _inputs(extra: list[str]) -> dict[str, str]:
    """rootfs path -> host path, everything the image holds."""
    files: dict[str, str] = {}
    exe = os.path.realpath(sys.executable)
    files[exe] = exe
    for key in ("stdlib", "platstdlib"):
        top = Path(sysconfig.get_paths()[key])
        for dirpath, dirnames, names in os.walk(top):
            dirnames[:] = [d for d in dirnames if not (Path(dirpath) == top and d in SKIP_STDLIB)]
            for n in names:
                p = os.path.join(dirpath, n)
                files[p] = p
    dynload = Path(sysconfig.get_paths()["platstdlib"]) / "lib-dynload"
    if dynload.is_dir():
        for p in dynload.iterdir():
            if not p.name.startswith("_tkinter"):
                files[str(p)] = str(p)
    for d in _dists():
        for f in d.files or []:
            src = Path(d.locate_file(f)).resolve()
            if src.is_file() and "__pycache__" not in src.parts and not str(f).startswith(".."):
                files[os.path.normpath(f"/opt/lcr/site/{f}")] = str(src)
    files["/opt/lcr/build_image.py"] = str(Path(__file__).resolve())   # how it was built
    for p in (REPO / "linuxcr").rglob("*.py"):
        files[f"/opt/lcr/src/{p.relative_to(REPO)}"] = str(p)
    sh = os.path.realpath("/bin/sh")
    files["/bin/sh"] = sh
    for e in extra:
        files[f"/opt/lcr/work/{os.path.basename(e)}"] = os.path.realpath(e)
    libs: set[str] = set()
    for dst, src in list(files.items()):
        if src.endswith(".so") or ".so." in src or dst in (exe, "/bin/sh") \
                or dst.startswith("/opt/lcr/work/") and os.access(src, os.X_OK):
            libs |= _ldd(src)
    for lib in libs:
        files[lib] = lib
    return files


def _entries(files: dict[str, str]) -> dict[str, tuple[str, str]]:
    """arcname -> ("file", host path) | ("link", target): host paths reached
    through symlinks (merged /usr: /lib -> usr/lib, library version links)
    keep those links in the image, so every path resolves as on the host."""
    out: dict[str, tuple[str, str]] = {}

    def host_path(p: str, depth: int = 0) -> str:
        """Add the links on the way to host path p; its real path."""
        cur = "/"
        for comp in Path(p).parts[1:]:
            nxt = os.path.join(cur, comp)
            if os.path.islink(nxt) and depth < 20:
                out[nxt] = ("link", os.readlink(nxt))
                nxt = host_path(os.path.join(cur, os.readlink(nxt)) if not
                                os.readlink(nxt).startswith("/") else os.readlink(nxt), depth + 1)
            cur = os.path.normpath(nxt)
        return cur

    for dst, src in files.items():
        if dst == src:
            real = host_path(src)
            out[real] = ("file", real)
        else:
            out[dst] = ("file", os.path.realpath(src))
    return out


def _digest(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for dst in sorted(files):
        st = os.stat(files[dst])
        if dst.startswith("/opt/lcr/"):       # ours: by content (rebuilt often, same bytes)
            h.update(f"{dst}\0{st.st_mode & 0o111}\n".encode() + Path(files[dst]).read_bytes())
        else:
            h.update(f"{dst}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode}\n".encode())
    return h.hexdigest()[:16]


def build_tar(extra: list[str]) -> tuple[Path, str]:
    files = _inputs(extra)
    digest = _digest(files)
    out = CACHE / f"rootfs-{digest}.tar"
    if out.exists():
        return out, digest
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    exe = os.path.realpath(sys.executable)
    with tarfile.open(tmp, "w") as tar:
        def add_dir(path: str) -> None:
            info = tarfile.TarInfo(path.lstrip("/"))
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if path == "/tmp" else 0o755
            tar.addfile(info)
        for d in ("/tmp", "/ckpt", "/proc", "/sys", "/dev", "/etc", "/run", "/var", "/var/tmp",
                  "/usr", "/usr/local", "/usr/local/bin", "/root"):
            add_dir(d)
        for dst, (kind, what) in sorted(_entries(files).items()):
            if kind == "link":
                info = tarfile.TarInfo(dst.lstrip("/"))
                info.type, info.linkname = tarfile.SYMTYPE, what
                tar.addfile(info)
            else:
                tar.add(what, arcname=dst.lstrip("/"), recursive=False)
        for name, text, mode in (("usr/local/bin/lcr", LCR_SH % exe, 0o755),
                                 ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"
                                  "nobody:x:65534:65534:nobody:/:/bin/sh\n", 0o644),
                                 ("etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644)):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            import io
            tar.addfile(info, io.BytesIO(data))
        # /usr/bin/python3 and python3 on PATH, whatever the interpreter is
        for link in ("usr/local/bin/python3",):
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, exe
            tar.addfile(info)
    os.replace(tmp, out)
    return out, digest


def podman_import(tar: Path, tag: str, podman: list[str]) -> str:
    if subprocess.run([*podman, "image", "exists", tag]).returncode == 0:
        return tag
    subprocess.run([*podman, "import", "--change", "ENV=PATH=/usr/local/bin:/usr/bin:/bin",
                    "--change", "ENV=PYTHONPATH=/opt/lcr/site:/opt/lcr/src",
                    "--change", "ENTRYPOINT=[\"/usr/local/bin/lcr\"]", str(tar), tag],
                   check=True, capture_output=True)
    return tag


def build(extra: list[str], name: str = "localhost/linuxcr", podman: list[str] | None = None) -> str:
    """Build (or find) the image; returns its tag."""
    tar, digest = build_tar(extra)
    return podman_import(tar, f"{name}:{digest}", podman or ["podman"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="localhost/linuxcr")
    ap.add_argument("--extra", action="append", default=[], help="a workload file to include")
    a = ap.parse_args()
    if not shutil.which("podman"):
        sys.exit("build_image: podman not found")
    print(build(a.extra, a.name))


if __name__ == "__main__":
    main()
