"""`lcr diff A B`: what changed between two images of the same process,
from their summaries (image/show.summarize): memory areas (added, removed,
changed, saved pages per area), open files (opened, closed, offsets moved),
threads, and the signal state.  Tasks are matched by pid."""
from __future__ import annotations

from typing import Any

from linuxcr.image.stream import printable

Summary = dict[str, Any]


def _area_key(v: dict[str, Any]) -> tuple[int, str]:
    return (v["start"], v["path"] or v["name"] or v["kind"])


def _areas(a: Summary, b: Summary) -> dict[str, list[dict[str, Any]]]:
    old = {_area_key(v): v for v in a["vmas"]}
    new = {_area_key(v): v for v in b["vmas"]}

    def brief(v: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return {"start": v["start"], "end": v["end"], "what": v["path"] or v["name"] or v["kind"],
                "prot": v["prot"], **kw}
    changed = []
    for k in sorted(old.keys() & new.keys()):
        o, n = old[k], new[k]
        if (o["end"], o["prot"], o.get("saved_pages")) != (n["end"], n["prot"], n.get("saved_pages")):
            changed.append(brief(n, old_end=o["end"], old_prot=o["prot"],
                                 pages_a=o.get("saved_pages", 0), pages_b=n.get("saved_pages", 0)))
    return {"added": [brief(new[k], pages=new[k].get("saved_pages", 0))
                      for k in sorted(new.keys() - old.keys())],
            "removed": [brief(old[k], pages=old[k].get("saved_pages", 0))
                        for k in sorted(old.keys() - new.keys())],
            "changed": changed}


def _files(sa: Summary, a: Summary, sb: Summary, b: Summary) -> dict[str, list[dict[str, Any]]]:
    def table(s: Summary, t: Summary) -> dict[int, dict[str, Any]]:
        descs = {d["fid"]: d for d in s.get("tree", {}).get("files", [])}
        out = {}
        for f in t["files"]:
            d = descs.get(f["fid"], {})
            what = d.get("path") or (f"pipe:[{d.get('pipe')}]" if d.get("kind") == "pipe"
                                     else d.get("kind", "?"))
            out[f["fd"]] = {"fd": f["fd"], "what": what, "kind": d.get("kind", "?"),
                            "pos": d.get("pos", 0)}
        return out
    old, new = table(sa, a), table(sb, b)
    moved = [{**new[fd], "pos_a": old[fd]["pos"], "pos_b": new[fd]["pos"]}
             for fd in sorted(old.keys() & new.keys())
             if old[fd]["what"] == new[fd]["what"] and old[fd]["pos"] != new[fd]["pos"]]
    replaced = [{"fd": fd, "a": old[fd]["what"], "b": new[fd]["what"]}
                for fd in sorted(old.keys() & new.keys()) if old[fd]["what"] != new[fd]["what"]]
    return {"opened": [new[fd] for fd in sorted(new.keys() - old.keys())],
            "closed": [old[fd] for fd in sorted(old.keys() - new.keys())],
            "moved": moved, "replaced": replaced}


def _signals(a: Summary, b: Summary) -> dict[str, Any]:
    def state(t: Summary) -> dict[str, Any]:
        return {"mask": t["sigmask"], "handlers": len(t["sigactions"]), "pending": len(t["pending"])}
    sa, sb = state(a), state(b)
    return {"a": sa, "b": sb, "changed": sa != sb}


def diff(sa: Summary, sb: Summary) -> dict[str, Any]:
    """The differences of image B against image A (both summaries)."""
    ta = {t["pid"]: t for t in sa["tasks"]}
    tb = {t["pid"]: t for t in sb["tasks"]}
    tasks = []
    for pid in sorted(ta.keys() & tb.keys()):
        a, b = ta[pid], tb[pid]
        tasks.append({"pid": pid, "pages_a": a["pages"], "pages_b": b["pages"],
                      "areas": _areas(a, b), "files": _files(sa, a, sb, b),
                      "threads": {"a": len(a["threads"]) + 1, "b": len(b["threads"]) + 1},
                      "registers_changed": a.get("regs_digest") != b.get("regs_digest"),
                      "signals": _signals(a, b)})
    return {"a": {"image": sa["image"], "image_id": sa["header"]["image_id"],
                  "pages": sa["total_pages"]},
            "b": {"image": sb["image"], "image_id": sb["header"]["image_id"],
                  "pages": sb["total_pages"]},
            "same_process": bool(tasks),
            "processes_added": sorted(tb.keys() - ta.keys()),
            "processes_removed": sorted(ta.keys() - tb.keys()),
            "tasks": tasks}


def _span(v: dict[str, Any]) -> str:
    return f"{v['start']:012x}-{v['end']:012x} {v['what']}"


def render_diff(d: dict[str, Any]) -> str:
    lines = [f"{d['a']['image']} -> {d['b']['image']}: {d['a']['pages']} -> {d['b']['pages']} pages"]
    for p in d["processes_added"]:
        lines.append(f"  + process {p}")
    for p in d["processes_removed"]:
        lines.append(f"  - process {p}")
    for t in d["tasks"]:
        lines.append(f"pid {t['pid']}: {t['pages_a']} -> {t['pages_b']} pages saved, "
                     f"threads {t['threads']['a']} -> {t['threads']['b']}")
        ar = t["areas"]
        for v in ar["added"]:
            lines.append(f"  + area {_span(v)} ({v['pages']} pages)")
        for v in ar["removed"]:
            lines.append(f"  - area {_span(v)} ({v['pages']} pages)")
        for v in ar["changed"]:
            size = "" if v["old_end"] == v["end"] else f", end {v['old_end']:x} -> {v['end']:x}"
            lines.append(f"  ~ area {_span(v)}: pages {v['pages_a']} -> {v['pages_b']}{size}")
        fl = t["files"]
        for f in fl["opened"]:
            lines.append(f"  + fd {f['fd']} {f['what']}")
        for f in fl["closed"]:
            lines.append(f"  - fd {f['fd']} {f['what']}")
        for f in fl["replaced"]:
            lines.append(f"  ~ fd {f['fd']}: {f['a']} -> {f['b']}")
        for f in fl["moved"]:
            lines.append(f"  ~ fd {f['fd']} {f['what']}: offset {f['pos_a']} -> {f['pos_b']}")
        sg = t["signals"]
        if sg["changed"]:
            lines.append(f"  ~ signals: mask 0x{sg['a']['mask']:x} -> 0x{sg['b']['mask']:x}, "
                         f"handlers {sg['a']['handlers']} -> {sg['b']['handlers']}, "
                         f"pending {sg['a']['pending']} -> {sg['b']['pending']}")
        lines.append(f"  registers {'changed' if t['registers_changed'] else 'unchanged'}")
    return "\n".join(printable(line) for line in lines)
