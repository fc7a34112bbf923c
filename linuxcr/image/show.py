"""`lcr show`: what is inside an image, as text or JSON (reads the whole
stream, so it also validates it)."""
from __future__ import annotations

import datetime as dt
import hashlib
import signal
from typing import Any

import msgspec

from linuxcr.image.schema import PageMap, Pages, RecType, Task
from linuxcr.image.stream import PAGE, ImageReader, printable


def summarize(fd: int, name: str) -> dict[str, Any]:
    r = ImageReader(fd, name=name)
    header = r.read_header()
    tasks: list[Task] = []
    tree = None
    pages_by_pid: dict[int, int] = {}
    parents_by_pid: dict[int, int] = {}
    runs_by_pid: dict[int, list[tuple[int, int, int]]] = {}    # (addr, npages, depth)
    stored = 0
    while not r.done:
        rec = r.next()
        if rec.type is RecType.TREE:
            tree = rec.meta
        elif rec.type is RecType.TASK:
            tasks.append(rec.meta)  # type: ignore[arg-type]
        elif rec.type is RecType.PAGES:
            m: Pages = rec.meta  # type: ignore[assignment]
            pages_by_pid[m.pid] = pages_by_pid.get(m.pid, 0) + m.npages
            runs_by_pid.setdefault(m.pid, []).append((m.addr, m.npages, 0))
        elif rec.type is RecType.PAGEMAP:
            pm: PageMap = rec.meta  # type: ignore[assignment]
            parents_by_pid[pm.pid] = parents_by_pid.get(pm.pid, 0) + sum(
                x.npages for x in pm.runs if x.depth > 0)
            runs_by_pid.setdefault(pm.pid, []).extend(
                (x.addr, x.npages, x.depth) for x in pm.runs if x.depth > 0)
    r.expect_end()
    stored = r.offset
    hdr = msgspec.to_builtins(header)
    hdr["magic"] = header.magic.decode(errors="replace").rstrip("\0")
    hdr["image_id"] = header.image_id.hex()
    if header.parent is not None:
        hdr["parent"]["id"] = header.parent.id.hex()
    out_tasks = []
    for t in tasks:
        d = msgspec.to_builtins(t)
        for k in ("regs", "xstate"):
            d[k] = f"<{len(getattr(t, k))} bytes>"
        # registers compared by `lcr diff`, not shown
        d["regs_digest"] = hashlib.sha256(t.regs + t.xstate).hexdigest()[:16]
        d["mm"]["auxv"] = f"<{len(t.mm.auxv)} bytes>"
        d["pending"] = [{"shared": p.shared, "signo": int.from_bytes(p.siginfo[:4], "little")}
                        for p in t.pending]
        d["pages"] = pages_by_pid.get(t.pid, 0)
        d["cow"] = f"<{len(t.cow)} runs>"
        d["pages_shared_with_parent"] = sum(r.npages for r in t.cow)   # not stored
        if header.parent is not None:
            d["pages_in_parents"] = parents_by_pid.get(t.pid, 0)
        _area_pages(d, runs_by_pid.get(t.pid, []))
        out_tasks.append(d)
    tr = msgspec.to_builtins(tree) if tree is not None else {}
    for p, saved in zip(tr.get("pipes", []), tree.pipes if tree is not None else []):
        p["data"] = f"<{len(saved.data)} bytes>"   # not of its base64 text
    if tree is not None and tree.ipc is not None:   # sizes, not base64 text
        for seg, saved_seg in zip(tr["ipc"]["shm"], tree.ipc.shm):
            seg["extents"] = f"<{sum(len(e.data) for e in saved_seg.extents)} bytes>"
        for q, saved_q in zip(tr["ipc"]["msg"], tree.ipc.msg):
            q["messages"] = [{"mtype": m.mtype, "bytes": len(m.text)} for m in saved_q.messages]
    if tree is not None and tree.ns is not None:
        for m, saved_m in zip(tr["ns"]["mounts"], tree.ns.mounts):
            for f, saved_f in zip(m["files"], saved_m.files):
                f["data"] = f"<{len(saved_f.data)} bytes>"
    return {"image": name, "header": hdr, "tree": tr, "tasks": out_tasks,
            "total_pages": sum(pages_by_pid.values()), "image_bytes": stored}


def _area_pages(task: dict[str, Any], runs: list[tuple[int, int, int]]) -> None:
    """Each area's saved pages ("saved_pages"), and of the task, how many
    pages each image of the chain holds ("pages_by_depth": 0 is this image,
    k its k-th parent): what `lcr diff` compares, and what each parent of an
    incremental image contributes (`lcr show`)."""
    by_depth: dict[int, int] = {}
    for v in task["vmas"]:
        v["saved_pages"] = 0
    vmas = sorted(task["vmas"], key=lambda v: v["start"])
    for addr, n, depth in runs:
        by_depth[depth] = by_depth.get(depth, 0) + n
        end = addr + n * PAGE
        for v in vmas:
            lo, hi = max(addr, v["start"]), min(end, v["end"])
            if lo < hi:
                v["saved_pages"] += (hi - lo) // PAGE
    task["pages_by_depth"] = {str(k): by_depth[k] for k in sorted(by_depth)}


def _prot(p: int) -> str:
    return ("r" if p & 1 else "-") + ("w" if p & 2 else "-") + ("x" if p & 4 else "-")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _when(t: float) -> str:
    try:   # the image says when: any float, NaN and 1e300 included
        return dt.datetime.fromtimestamp(t).isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):
        return f"at an impossible time ({t})"


_ACC = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR"}
_FLAG_NAMES = [(0o100, "O_CREAT"), (0o1000, "O_TRUNC"), (0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"),
               (0o10000, "O_DSYNC"), (0o20000, "O_ASYNC"), (0o40000, "O_DIRECT"),
               (0o100000, "O_LARGEFILE"), (0o200000, "O_DIRECTORY"), (0o400000, "O_NOFOLLOW"),
               (0o1000000, "O_NOATIME"), (0o4010000, "O_SYNC"), (0o10000000, "O_PATH"),
               (0o20000000, "O_TMPFILE")]


def flag_names(flags: int) -> str:
    """open(2) flags by name: O_WRONLY|O_APPEND (O_LARGEFILE, always set on
    64-bit, left out)."""
    names = [_ACC.get(flags & 3, f"access{flags & 3}")]
    rest = flags & ~3 & ~0o100000
    for bit, name in _FLAG_NAMES:
        if bit != 0o100000 and rest & bit == bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(f"0o{rest:o}")
    return "|".join(names)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _sock_addr(d: dict[str, Any]) -> str | None:
    """A socket's addresses from its saved state, where it has them."""
    st = d.get("state") or {}
    if not isinstance(st, dict):
        return None
    local = st.get("local") or st.get("src") or st.get("addr") or st.get("path")
    peer = st.get("peer") or st.get("remote") or st.get("dst")

    def fmt(a: Any) -> str:
        if isinstance(a, dict) and "host" in a:
            a = (a["host"], a.get("port", "?"))
        if isinstance(a, bytes):
            a = a.decode(errors="replace")
        if isinstance(a, (list, tuple)) and len(a) >= 2:
            host = str(a[0])
            return f"[{host}]:{a[1]}" if ":" in host else f"{host}:{a[1]}"
        return str(a)
    if local is None and peer is None:
        return None
    kind = str(st.get("type") or d.get("kind") or "socket")
    state = f" {st['state']}" if isinstance(st.get("state"), str) else ""
    return (f"{kind}{state} {fmt(local) if local is not None else '?'}"
            + (f" -> {fmt(peer)}" if peer else ""))


def render_text(s: dict[str, Any]) -> str:
    h = s["header"]
    created = _when(h["created"])
    lines = [f"{s['image']}: linuxcr image v{h['version']}, {h['arch']}, kernel {h['kernel']}, "
             f"made {created} on {h['hostname']} by {h['tool']}",
             f"  {_size(s['image_bytes'])} in all, {s['total_pages']} pages "
             f"({_size(s['total_pages'] * PAGE)}) of memory"
             + (", compressed" if "compressed" in h["flags"] else "")]
    if h.get("parent"):
        p = h["parent"]
        lines.append(f"  incremental: parent {p['path']} (id {p['id'][:12]}, {p['depth']} "
                     f"image{'s' if p['depth'] > 1 else ''} up the chain); restart needs them all")
    tree = s.get("tree", {})
    if tree.get("ns"):
        ns = tree["ns"]
        lines.append(f"  namespaces of its own: {' '.join(ns['kinds'])}"
                     + (f"; hostname {ns['hostname']}" if "uts" in ns["kinds"] else "")
                     + (f"; {len(ns['mounts'])} mounts made inside" if ns.get("mounts") else ""))
    if tree.get("ipc"):
        ipc = tree["ipc"]
        lines.append(f"  System V IPC: {len(ipc['shm'])} shared memory segments, "
                     f"{len(ipc['sem'])} semaphore sets, {len(ipc['msg'])} message queues")
    for t in s["tasks"]:
        lines.append(f"task pid {t['pid']} ({t['comm']}) ppid {t['ppid']} pgid {t['pgid']} "
                     f"sid {t['sid']} uid {(t['creds']['uid'] or ['?'])[0]} cwd {t['cwd']}"
                     + (f"; stopped ({_signame(t['stopped'])})" if t.get("stopped") else ""))
        lines.append(f"  exe {t['mm']['exe']}; {len(t['vmas'])} memory areas, {t['pages']} pages saved"
                     + (f", {t['pages_shared_with_parent']} shared with its parent"
                        if t.get('pages_shared_with_parent') else "")
                     + (f", {t['pages_in_parents']} in its parents" if "pages_in_parents" in t else ""))
        if "pages_in_parents" in t:
            lines.append("  pages per image of the chain: " + ", ".join(
                f"{'this image' if k == '0' else 'parent ' + k}: {n}"
                for k, n in t.get("pages_by_depth", {}).items()))
        for v in t["vmas"]:
            what = v["path"] or v["name"] or v["kind"]
            lines.append(f"    {v['start']:012x}-{v['end']:012x} {_prot(v['prot'])}"
                         f"{'s' if v['shared'] else 'p'} {_size(v['end'] - v['start']):>10} "
                         f"{v['kind']:<6} {what}")
        descs = {d["fid"]: d for d in s.get("tree", {}).get("files", [])}
        lines.append(f"  {_plural(len(t['files']), 'open file')}, "
                     f"{_plural(len(t['threads']) + 1, 'thread')}"
                     + (f", fd table shared with pid {t['files_with']}"
                        if t.get("files_with") is not None else ""))
        for f in t["files"]:
            d = descs.get(f["fid"], {})
            what = d.get("path") or (f"pipe:[{d.get('pipe')}]" if d.get("kind") == "pipe" else None) \
                or _sock_addr(d) or "?"
            lines.append(f"    fd {f['fd']:<3} {d.get('kind', '?'):<4} {what} flags {flag_names(d.get('flags', 0))} "
                         f"pos {d.get('pos', 0)}{' cloexec' if f['cloexec'] else ''} (file #{f['fid']})")
        lines.append(f"  signals: {_plural(len(t['sigactions']), 'handler')}, mask 0x{t['sigmask']:x}, "
                     f"{len(t['pending'])} pending")
    # names, paths, hostname come from the image: no newlines or terminal escapes
    return "\n".join(printable(line) for line in lines)


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
