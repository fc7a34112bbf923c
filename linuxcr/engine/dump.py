"""Checkpoint orchestration: the order of things, no resource details.

check every process of the tree (no stop) -> freeze the tree top-down (a
frozen parent cannot fork, so the walk converges) -> check again -> collect
each task (a few injected queries for what /proc cannot tell) and what they
share (open files, pipes, shared memory) -> HEADER, TREE, TASK..., PAGES...,
TRAILER -> kill the tree (default) or thaw it exactly as it was.
Any failure thaws every thread of every process before it is reported.
"""
from __future__ import annotations

import os
import platform
import socket
import time
from dataclasses import dataclass, field

import msgspec

from linuxcr import __version__, faults
from linuxcr.errors import (LcrError, NoSuchProcess, NotCheckpointable, PermissionDenied, TaskGone,
                            hold_signals, release_signals)
from linuxcr.image.schema import (
    ARCH, FORMAT_VERSION, MAGIC, CowRun, Header, PageMap, PageRun, RecType, Task, Tree, Vma, Zombie,
)
from linuxcr.image.stream import PAGE, ImageWriter
from linuxcr.procfs import SmapsEntry, read_maps, read_smaps, read_stat, read_status
from linuxcr.remote.freezer import Frozen
from linuxcr.remote.task import Arena, traced_by
from linuxcr.resources import (cpu, files, fsroot, guards, locks, memory, namespaces,
                               posix_timers, procattrs, process, pstree, sched, security, signals,
                               sysvipc, threads)
from linuxcr.resources import exe_identity, external


PF_KTHREAD = 0x00200000
PAGEMAP_RUNS = 100_000      # runs per PAGEMAP record


@dataclass
class DumpResult:
    pid: int
    pages: int
    bytes_written: int
    seconds: float
    frozen_seconds: float
    processes: int = 1
    warnings: list[str] = field(default_factory=list)
    image_id: bytes = b""
    digest: int = 0              # the trailer's: what a child image names its parent by
    incremental: dict = field(default_factory=dict)   # stored/inherited pages, method per pid


def check_process(pid: int, smaps=None, *, maps_only: bool = False) -> list[str]:
    """Every reason, known without stopping the process, that it cannot be saved.
    ``maps_only``: judge the memory by /proc/PID/maps (cheap) instead of
    smaps (which walks every page): what only VmFlags tell (hugetlbfs,
    device memory not under /dev) is then left to the check of the frozen
    process, which reads smaps anyway."""
    if pid == os.getpid():
        return ["lcr cannot checkpoint itself"]
    try:
        st = read_status(pid)
        stat = read_stat(pid)
        if smaps is None:
            smaps = [SmapsEntry(map=m) for m in read_maps(pid)] if maps_only else read_smaps(pid)
    except (FileNotFoundError, ProcessLookupError):   # ESRCH: reaped after open()
        raise NoSuchProcess(f"pid {pid}: no such process") from None
    except PermissionError:
        from linuxcr.remote.task import explain_eperm
        raise explain_eperm(pid) from None
    if st.tracer_pid and not os.path.exists(f"/proc/self/task/{st.tracer_pid}"):   # not us
        raise traced_by(pid, st.tracer_pid)     # a debugger holds it: lcr cannot even look
    reasons = []
    if st.state == "Z":
        reasons.append("it is a zombie (it has exited; only its parent can reap it)")
    if stat.flags & PF_KTHREAD:
        reasons.append("it is a kernel thread")
    elif not smaps and st.state not in ("Z", "X"):
        raise NoSuchProcess(f"pid {pid} is exiting")    # its memory is gone already
    if st.tgid != pid:
        reasons.append(f"it is a thread of process {st.tgid}; checkpoint that pid instead")
    if pid == 1 and os.path.samefile("/proc/1/ns/pid", "/proc/self/ns/pid"):
        reasons.append("it is the init of the pid namespace lcr runs in")
    reasons += memory.check(smaps)
    try:
        reasons += files.check(pid)
        reasons += locks.check(pid)
        reasons += security.check(pid) + sched.check(pid) + procattrs.check(pid)
        reasons += sysvipc.check(pid)
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"pid {pid}: no such process (it exited)") from None
    return reasons


def _gone_or_dying(pid: int) -> bool:
    """A child that exited (or is exiting) while we looked: not an obstacle."""
    try:
        return read_stat(pid).state in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def snapshot_child(pid: int) -> bool:
    """A held in-memory snapshot of a process of the tree (engine/snapshots.py):
    a stopped fork traced by the agent, or one the agent's death left dead
    and not yet reaped; never part of what is saved."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() != "lcr-snapshot":
                return False
        st = read_status(pid)
        return st.tracer_pid != 0 or st.state == "Z"
    except (OSError, AttributeError):
        return False


def checkpoint_saves(reason: str) -> bool:
    """A reason of check_process that only snapshots and migration have
    (System V shared memory: ``lcr checkpoint`` saves it)."""
    return sysvipc.CHECKPOINT_ONLY in reason


def _root_is_ns_init(root: int) -> bool | None:
    """Is the root pid 1 of its own pid namespace (None: gone)?  Read once
    per check_tree, not once per process."""
    try:
        st = read_status(root)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return st.pidns_init


def _ns_reasons(pid: int, root: int, root_init: bool | None) -> list[str]:
    if root_init is None:
        return []      # gone: the callers find out
    try:
        return namespaces.check(pid, root, root_init)
    except (FileNotFoundError, ProcessLookupError):
        return []      # gone: the callers find out


def check_tree(root: int, *, maps_only: bool = False) -> list[str]:
    """Reasons for the root and all its descendants (live processes only)
    that ``lcr checkpoint`` has; ``maps_only`` as for check_process."""
    with namespaces.sockets_of(root):     # `lcr run --net`: sockets seen from inside
        return _check_tree(root, maps_only)


def _check_tree(root: int, maps_only: bool) -> list[str]:
    reasons = [r for r in check_process(root, maps_only=maps_only) if not checkpoint_saves(r)]
    root_init = _root_is_ns_init(root)
    reasons += _ns_reasons(root, root, root_init)
    seen = {root}
    order = [root]                  # parents before children, for sharing_reasons
    queue = pstree.children(root)
    while queue:
        p = queue.pop(0)
        if p in seen or pstree.is_zombie(p):
            continue
        seen.add(p)
        if snapshot_child(p):
            continue
        try:
            found = check_process(p, maps_only=maps_only)
        except NoSuchProcess:
            continue                # gone, or on its way out
        except PermissionDenied:
            if _gone_or_dying(p):
                continue
            raise
        found = [r for r in found if not checkpoint_saves(r)] + _ns_reasons(p, root, root_init)
        if found and _gone_or_dying(p):
            continue        # what it "holds" is what it is letting go of
        reasons += [f"child pid {p}: {r}" for r in found]
        order.append(p)
        queue += pstree.children(p)
    reasons += _sharing(order)
    return reasons + external.reasons(seen, root)   # pipes and sockets leading out of the tree


def _sharing(order: list[int]) -> list[str]:
    """Memory or fd tables shared between processes that restore cannot
    build again (a process that vanished meanwhile is skipped)."""
    try:
        return pstree.sharing_reasons(order)
    except (OSError, LcrError):
        return []       # one went away during the look: checkpoint checks again, frozen


class FrozenTree:
    """Every process of the tree frozen, parents before children."""

    def __init__(self, root: int, skip=None) -> None:
        self.root = root
        # children never taken in: held snapshots of the tree's processes
        # (engine/snapshots.py passes its own rule, with the pids it excludes)
        self.skip = skip or snapshot_child
        self.procs: dict[int, Frozen] = {}
        self.order: list[int] = []
        self.parent: dict[int, int] = {}
        self.zombies: list[Zombie] = []
        self.files_with: dict[int, int] = {}    # pid -> earlier pid whose fd table it shares

    def freeze(self) -> None:
        queue = [self.root]
        while queue:
            p = queue.pop(0)
            f = Frozen(p)
            try:
                f.freeze()
            except (NoSuchProcess, TaskGone, PermissionDenied):
                # A child that exits as we seize it (an exiting task refuses
                # ptrace with EPERM) is gone or a zombie, not an obstacle.
                f.thaw()
                if p == self.root or not _gone_or_dying(p):
                    raise
                if pstree.is_zombie(p):
                    self.zombies.append(pstree.zombie(p, self.parent[p]))
                continue
            self.procs[p] = f
            self.order.append(p)
            faults.point("dump.seized")
            for k in pstree.children(p):
                if k in self.procs or k in self.parent or self.skip(k):
                    continue
                self.parent[k] = p
                if pstree.is_zombie(k):
                    self.zombies.append(pstree.zombie(k, p))
                else:
                    queue.append(k)

    def checked(self, smaps_of=read_smaps, keep=None) -> dict:
        """Once frozen: every process's smaps (``smaps_of(pid)``) and every
        reason it cannot be saved, checked again (nothing can change now);
        NotCheckpointable with all of them (``keep(reason)`` filters), a
        child found exiting let go.  Returns the smaps by pid."""
        smaps = {p: smaps_of(p) for p in self.order}
        reasons = []
        for p in list(self.order):
            try:
                found = check_process(p, smaps[p])
            except NoSuchProcess:
                if p == self.root:
                    raise
                self.drop_exiting(p)       # seized while it was already exiting
                continue
            reasons += [r if p == self.root else f"child pid {p}: {r}"
                        for r in found if keep is None or keep(r)]
        reasons += pstree.sharing_reasons(self.order, self.parent)
        reasons += pstree.zombie_reasons(self.zombies, [
            (p, st.ns_pid[-1], st.ns_sid[-1]) for p, st in ((p, read_status(p)) for p in self.order)])
        if reasons:
            raise NotCheckpointable(self.root, reasons)
        self.files_with = pstree.files_sharing(self.order)    # frozen: cannot change now
        return smaps

    def drop_exiting(self, p: int) -> None:
        """A child caught on its way out: let it finish; it is not saved."""
        if any(self.parent.get(k) == p for k in self.order):
            raise NotCheckpointable(self.root, [f"child pid {p} exited while being checkpointed "
                                                "(its children stay): try again"])
        self.procs.pop(p).thaw()
        self.order.remove(p)

    def thaw(self) -> None:
        for p in reversed(self.order):
            self.procs[p].thaw()

    def kill(self) -> None:
        """Kill all, then wait deepest first: a namespace's init cannot finish
        dying before the tasks under it are gone, and those wait for us."""
        for p in self.order:
            self.procs[p].send_kill()
        for p in reversed(self.order):
            self.procs[p].reap()


def checkpoint(pid: int, fd: int, **kw) -> DumpResult:
    """_checkpoint, with the sockets of an `lcr run --net` tree seen from
    inside its network namespace."""
    with namespaces.sockets_of(pid):
        return _checkpoint(pid, fd, **kw)


def _checkpoint(pid: int, fd: int, *, leave_running: bool = False, compress: bool = False,
                name: str = "image", on_written=None, progress=None, base=None,
                on_frozen=None) -> DumpResult:
    """Write an image of process pid and all its descendants to fd.
    ``on_written`` runs after the trailer is written and before the tree is
    killed (files: the rename that makes the image visible); if it raises,
    the tree is thawed.  ``on_frozen(tree)`` runs once every task is
    collected, the tree still frozen (write trackers start there).
    ``base`` (engine/incremental.py) makes an incremental image: what the
    reader already holds, and how to tell what changed since."""
    t0 = time.monotonic()
    reasons = check_tree(pid, maps_only=True)    # all of it again once frozen, with smaps
    if reasons:
        raise NotCheckpointable(pid, reasons)
    image_id = os.urandom(16)
    stats: dict = {}
    tree = FrozenTree(pid)
    frozen_at = time.monotonic()
    try:
        tree.freeze()
        smaps = tree.checked(keep=lambda r: not checkpoint_saves(r))   # final: nothing changes now
        ext = external.reasons(tree.order, pid)
        if ext:
            raise NotCheckpointable(pid, ext)
        faults.point("dump.frozen")
        table = files.Table()
        tasks = [collect_task(tree.procs[p], smaps[p], table, tree.files_with.get(p))
                 for p in tree.order]
        external.mark(table, tree.order)                 # --external: kept as "external" fds
        faults.point("dump.collected")
        shm, vmas = memory.shm_objects([t.vmas for t in tasks])
        tasks = [_with_vmas(t, v) for t, v in zip(tasks, vmas)]
        mapped = memory.mapped_objects(pid, [(t.pid, t.vmas) for t in tasks], table.descs)
        shared: dict[int, list[tuple[int, int]]] = {}
        if base is None:        # an incremental image stores what changed, shares nothing
            tasks, shared = _mark_shared(tree, tasks)
        ns = namespaces.dump(pid, tasks[0].pidns_init)
        if namespaces.check_saved(ns, table.descs, tasks):
            raise NotCheckpointable(pid, namespaces.check_saved(ns, table.descs, tasks))
        ipcs = sysvipc.dump(pid, tasks, ns is not None and "ipc" in ns.kinds)
        if on_frozen:
            on_frozen(tree)
        w = ImageWriter(fd, compress=compress, name=name)
        w.header(_header(pid, tasks, compress, image_id, base.ref() if base is not None else None))
        w.record(RecType.TREE, Tree(root=pid, files=table.descs, pipes=table.pipe_list(),
                                    unix=table.unix_list(), shm=shm, zombies=tree.zombies,
                                    mapped=mapped, identities=exe_identity.collect(tasks),
                                    ipc=ipcs, ns=ns))
        for task in tasks:
            w.record(RecType.TASK, task)
        if base is None:
            pages = memory.dump_pages([(tree.procs[t.pid].leader, t.vmas) for t in tasks], w,
                                      progress, shared)
        else:
            pages = _dump_changed(tree, tasks, w, base, progress, stats)
        w.finish()
        if on_written:
            on_written()
        # the job is done but for killing (or thawing) the tree, which ^C,
        # SIGTERM or SIGHUP must not cut short half-way through a tree
        held = hold_signals()
    except BaseException:
        tree.thaw()
        raise
    try:
        faults.point("dump.kill")
        if leave_running:
            tree.thaw()
        else:
            tree.kill()
    finally:
        release_signals(held)
    done = time.monotonic()
    return DumpResult(pid=pid, pages=pages, bytes_written=w.bytes_written, seconds=done - t0,
                      frozen_seconds=done - frozen_at, processes=len(tasks),
                      image_id=image_id, digest=w.digest, incremental=stats)


def _mark_shared(tree: FrozenTree, tasks: list[Task]) -> tuple[list[Task], dict]:
    """Each child's pages that are its parent's very pages (copy-on-write
    since a fork): marked in its TASK record (cow), not stored; restart
    forks it from its filled parent.  Pages go out in the order of the
    TASK records, each task's together (dump_pages): restart relies on it."""
    vmas = {t.pid: t.vmas for t in tasks}
    out, shared = [], {}
    for t in tasks:
        parent = tree.parent.get(t.pid)
        if parent in vmas:
            got = memory.cow_shared(parent, vmas[parent], t.pid, t.vmas)
            if got:
                shared[t.pid] = got
                t = msgspec.structs.replace(t, cow=[CowRun(addr=s, npages=(e - s) // PAGE)
                                                    for s, e in got])
        out.append(t)
    return out, shared


def _dump_changed(tree: FrozenTree, tasks: list[Task], w: ImageWriter, base, progress,
                  stats: dict) -> int:
    """PAGES of what changed since ``base``, then every task's PAGEMAP."""
    stored = inherited = 0
    maps = []
    for t in tasks:
        written = base.written(t.pid)
        ch = memory.dump_changed(tree.procs[t.pid].leader, t.vmas, w, base.held(t.pid), written,
                                 None if written is not None else base.hashes(t.pid), progress)
        maps.append((t.pid, ch.runs))
        stored += ch.stored
        inherited += ch.inherited
        stats.setdefault("method", {})[t.pid] = base.method(t.pid)
    for p, rr in maps:
        for i in range(0, max(len(rr), 1), PAGEMAP_RUNS):
            w.record(RecType.PAGEMAP, PageMap(pid=p, runs=[
                PageRun(addr=s, npages=(e - s) // PAGE, depth=d) for s, e, d in rr[i:i + PAGEMAP_RUNS]]))
    stats.update(stored=stored, inherited=inherited)
    return stored


def write_image(fd: int, root_pid: int, tasks: list[Task], tree: Tree, write_pages, *,
                compress: bool = False, name: str = "image") -> ImageWriter:
    """HEADER, TREE, TASK..., the pages (``write_pages(writer)`` writes the
    PAGES records and returns how many pages), TRAILER: an image made from
    Task records collected earlier (in-memory snapshots write theirs so)."""
    w = ImageWriter(fd, compress=compress, name=name)
    w.header(_header(root_pid, tasks, compress, os.urandom(16), None))
    w.record(RecType.TREE, tree)
    for task in tasks:
        w.record(RecType.TASK, task)
    write_pages(w)
    w.finish()
    return w


def _header(root_pid: int, tasks: list[Task], compress: bool, image_id: bytes, parent) -> Header:
    xfeat, xsize = cpu.xstate_features(tasks[0].xstate)
    return Header(magic=MAGIC, version=FORMAT_VERSION, arch=ARCH, kernel=platform.release(),
                  page_size=PAGE, created=time.time(), hostname=socket.gethostname(),
                  tool=f"linuxcr {__version__}", xfeatures=xfeat, xstate_size=xsize,
                  root_pid=root_pid, flags=["compressed"] if compress else [],
                  image_id=image_id, parent=parent)


def _with_vmas(task: Task, vmas: list[Vma]) -> Task:
    import msgspec
    return msgspec.structs.replace(task, vmas=vmas)


def collect_task(frozen: Frozen, smaps, table: files.Table, files_with: int | None = None) -> Task:
    """Everything of one process but its pages, with it frozen (also the
    snapshots' and the migration source's collection).  ``files_with``: the
    earlier task whose fd table it shares (FrozenTree.files_with)."""
    pid, t = frozen.pid, frozen.leader
    status, stat = read_status(pid), read_stat(pid)
    vmas = memory.collect(smaps)     # taken before our scratch page exists
    insn = t.find_syscall_insn(memory.vdso_text(vmas))
    for th in frozen.threads.values():
        th.insn = insn
    frozen.block_signals()           # nothing gets delivered while we work
    locked_before = procattrs.vmlck(pid)
    with t.scratch() as addr:
        scratch_locked = procattrs.vmlck(pid) != locked_before     # mlockall(MCL_FUTURE)
        arena = Arena(t, addr, PAGE)
        actions = signals.dump_actions(t, arena, status.sig_cgt, status.sig_ign)
        faults.point("dump.inject")
        altstack = signals.dump_altstack(t, arena)
        itimers = signals.dump_itimers(t, arena)
        brk = t.syscall("brk", 0)
        tinfo = process.dump_threadinfo(t, arena)
        others = [threads.dump_thread(pid, th, arena, frozen.masks[th.pid]) for th in frozen.others()]
        ptimers = posix_timers.dump(t, arena)
        attrs, proc = threads.dump_attrs(pid, t), procattrs.dump(t, arena, scratch_locked)
    memory.see_shared(t, smaps, vmas)   # no root: shared anonymous pages by mincore
    frozen.unblock_signals()         # masks and registers back: safe to die from here on
    cwd = os.readlink(f"/proc/{pid}/cwd")
    return Task(
        pid=pid, tid=pid, ppid=stat.ppid, pgid=status.ns_pgid[-1], sid=status.ns_sid[-1],
        comm=stat.comm, cwd=cwd, root=os.readlink(f"/proc/{pid}/root"),
        cwd_deleted=fsroot.dump_cwd_deleted(pid, cwd), guards=guards.dump(pid, vmas),
        creds=process.dump_creds(status), umask=status.umask or 0,
        personality=process.read_personality(pid), rlimits=process.dump_rlimits(pid),
        mm=process.dump_mm(pid, stat, brk), vmas=vmas, files=table.task_files(pid),
        sigmask=frozen.masks[pid], sigactions=actions, pending=signals.dump_pending(pid),
        altstack=altstack, threads=others, itimers=itimers, starttime=stat.starttime,
        vpid=status.ns_pid[-1], pidns_init=status.pidns_init,
        caps=[status.cap_inh, status.cap_prm, status.cap_eff, status.cap_bnd, status.cap_amb],
        boot_id=_boot_id(), files_with=files_with, posix_timers=ptimers, locks=locks.dump(pid), attrs=attrs, proc=proc,
        stopped=frozen.stop_signal,
        **cpu.dump(t), **tinfo)


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


__all__ = ["checkpoint", "check_process", "check_tree", "DumpResult", "LcrError"]


