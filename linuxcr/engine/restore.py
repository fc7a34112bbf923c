"""Restart orchestration: the order of things, no resource details.

1. Read and validate everything but the pages (HEADER, TREE, TASKs).
2. lcr opens every shared thing itself: open files, pipes refilled with
   their bytes, shared-memory objects; the tasks will inherit them.
3. Make the root's blank task (a fork of lcr, see spawn.py) and seize it
   (PTRACE_O_EXITKILL: if lcr dies, every task it holds dies).
4. Build the tree top-down: each blank parent forks its children with the
   saved pids (injected clone3 set_tid); sessions and groups; zombies.
5. Empty each blank's address space but for a trampoline page and map the
   saved areas; pour the pages in from the stream; check the trailer.
6. Per task: mm fields, fds, cwd, signals, limits, threads, identity, and
   last the trampoline goes and the saved registers come back.
Any failure kills every task made so far: a restart yields a running tree
or nothing.
"""
from __future__ import annotations

import os
import resource
import signal
import time
from dataclasses import dataclass, field

from linuxcr import faults
from linuxcr.engine import spawn
from linuxcr.errors import (ImageError, KernelError, LcrError, PidTaken, RestoreError, hold_signals,
                            release_signals)
from linuxcr.image.chain import Chain
from linuxcr.image.schema import Header, RecType, Task, Tree
from linuxcr.image.stream import PAGE, ImageReader, Record
from linuxcr.procfs import read_maps, read_stat, read_status
from linuxcr.remote.task import ALL_SIGNALS, Arena, Tracee
from linuxcr.resources import (cpu, fdkinds, files, finish, memory, namespaces, process, pstree,
                               sysvipc)
from linuxcr.resources import exe_identity, external, jobstop, lazy as lazy_pages
from linuxcr.sys import ptrace, sockdiag
from linuxcr.sys.syscalls import TASK_SIZE
from linuxcr.resources.pstree import restore_mode  # (it moved to resources: process.py asks it too)

PID_WAIT = 30.0                 # seconds to wait for the original to be reaped


@dataclass
class RestoreResult:
    pid: int                  # root, as lcr sees it
    original_pid: int
    pages: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    vpid: int = 0             # as the root sees itself
    namespace: bool = False   # restored into a new pid namespace
    processes: int = 1
    lazy: lazy_pages.Lazy | None = None   # --lazy: pages left to the page server


@dataclass
class LazyOpts:
    """restart(lazy=...): the log of the page server; when the restart began."""
    log: str | None = None
    t0: float = 0.0


@dataclass
class Rebuild:
    """One task being rebuilt (restart, and the migration destination's
    skeleton): its saved record, the blank under ptrace, its trampoline."""
    task: Task
    t: Tracee
    tramp: int = 0
    arena: Arena | None = None
    inherited_exe: str = ""
    inherited_sigs: int = 0
    made: list[Tracee] = field(default_factory=list)


# --- validation -------------------------------------------------------------

def validate_task(task: Task) -> None:
    """Reject layouts the kernel would refuse or that would overlap, before
    any process exists."""
    prev_end = 0
    for v in task.vmas:
        if v.start % PAGE or v.end % PAGE or not v.start < v.end <= TASK_SIZE or v.start < prev_end:
            raise ImageError(f"image holds an invalid memory area 0x{v.start:x}-0x{v.end:x}")
        if v.kind not in ("anon", "file", "shmem", "sysv") + memory.VDSO_KINDS + memory.OBJECT_KINDS:
            raise ImageError(f"image holds a memory area of unknown kind {v.kind!r}")
        if v.kind == "file" and not v.path.startswith("/"):
            raise ImageError(f"image holds a file mapping with a relative path {v.path!r}")
        prev_end = v.end
    seen = set()
    for f in task.files:
        if f.fd in seen:
            raise ImageError(f"image holds an inconsistent fd table at fd {f.fd}")
        seen.add(f.fd)
    if len(task.regs) != 216 or len(task.altstack) != 3 or len(task.robust_list) != 2 \
            or len(task.rseq) not in (0, 3) or len(task.creds.uid) != 4 or len(task.creds.gid) != 4:
        raise ImageError("image holds a malformed task record")
    for th in task.threads:
        if len(th.altstack) != 3 or len(th.robust_list) != 2 or len(th.rseq) not in (0, 3):
            raise ImageError(f"image holds a malformed record for thread {th.tid}")


def validate_tree(tree: Tree, tasks: list[Task]) -> None:
    if not tasks or tasks[0].pid != tree.root:
        raise ImageError("image's first task is not the root of its tree")
    pids = set()
    for k in tasks:
        if k.pid in pids:
            raise ImageError(f"image holds pid {k.pid} twice")
        if k is not tasks[0] and k.ppid not in pids:
            raise ImageError(f"image holds pid {k.pid} before its parent {k.ppid}")
        pids.add(k.pid)
        validate_task(k)
    check_shared(tasks)
    check_files_with(tasks)
    for z in tree.zombies:
        if z.ppid not in pids:
            raise ImageError(f"image holds zombie {z.pid} whose parent is not in the tree")
    shm = {o.id for o in tree.shm}
    segs = {s.perm.id for s in tree.ipc.shm} if tree.ipc else set()
    for k in tasks:
        for v in k.vmas:
            if v.kind == "shmem" and v.shm not in shm or v.kind == "sysv" and v.shm not in segs:
                raise ImageError(f"image holds a shared memory area 0x{v.start:x} with no object")
    fids = [d.fid for d in tree.files]
    if len(set(fids)) != len(fids):
        raise ImageError("image holds an open file description twice")
    known = set(fids)
    for k in tasks:
        for f in k.files:
            if f.fid not in known:
                raise ImageError(f"image's pid {k.pid} fd {f.fd} refers to a missing open file")
    for o in tree.shm:
        if o.size > TASK_SIZE or o.size % PAGE:
            raise ImageError(f"image holds a shared memory object of impossible size {o.size}")
    pipes_ = {p.ino for p in tree.pipes}
    socks = {u.ino for u in tree.unix}
    for d in tree.files:
        if d.kind == "unix" and d.sock not in socks:
            raise ImageError(f"image holds socket:[{d.sock}] with no saved state")
        if d.kind == "pipe" and d.pipe not in pipes_:
            raise ImageError(f"image holds pipe:[{d.pipe}] with no saved state")
        if d.kind not in files.BUILTIN_KINDS and d.kind not in fdkinds.BY_NAME:
            raise ImageError(f"image holds an open file of unknown kind {d.kind!r}")
        if d.kind in fdkinds.BY_NAME and (d.state is None or
                                          getattr(type(d.state), "__struct_config__").tag != d.kind):
            raise ImageError(f"image holds a {d.kind} whose saved state does not match its kind")
        if d.kind in ("reg", "dir", "chr") and not d.path.startswith("/"):
            raise ImageError(f"image holds an open file with a relative path {d.path!r}")
        if d.kind == "chr" and d.path not in files.SAFE_DEVICES:
            raise ImageError(f"image holds an open device {d.path!r} that lcr does not restore")


def cow_spans(task: Task) -> list[tuple[int, int]]:
    """The pages a task shares with its parent (Task.cow), as byte ranges."""
    return [(r.addr, r.addr + r.npages * PAGE) for r in task.cow]


def check_shared(tasks: list[Task]) -> None:
    """Pages marked shared with the parent: not in the root, and only in
    areas the parent has the same."""
    by_pid = {k.pid: k for k in tasks}
    for k in tasks:
        if not k.cow:
            continue
        if k is tasks[0]:
            raise ImageError(f"image is corrupt: its root pid {k.pid} has pages marked shared "
                             "with a parent it does not hold")
        memory.inherited_areas(k.vmas, by_pid[k.ppid].vmas, cow_spans(k), "image")


def check_files_with(tasks: list[Task]) -> None:
    """A task sharing an fd table (Task.files_with) names the first, earlier
    task of its group, has the same fds, and is forked from a parent of the
    group (fork with CLONE_FILES is the only way to share it again)."""
    by_pid: dict[int, Task] = {}
    for k in tasks:
        head = by_pid.get(k.files_with) if k.files_with is not None else None
        if k.files_with is not None:
            parent = by_pid.get(k.ppid)
            if head is None or head.files_with is not None:
                raise ImageError(f"image is corrupt: pid {k.pid} shares the fd table of "
                                 f"{k.files_with}, not an earlier task that owns one")
            if parent is None or k.ppid != head.pid and parent.files_with != head.pid:
                raise ImageError(f"image is corrupt: pid {k.pid} shares the fd table of "
                                 f"{head.pid}, which its parent does not share")
            if sorted((f.fd, f.fid, f.cloexec) for f in k.files) != \
                    sorted((f.fd, f.fid, f.cloexec) for f in head.files):
                raise ImageError(f"image is corrupt: pid {k.pid} shares the fd table of "
                                 f"{head.pid} but holds other fds")
        by_pid[k.pid] = k


def check_vdso(task: Task) -> None:
    """The new task gets this kernel's vDSO; glibc holds pointers into the
    saved one, so both must have the same layout."""
    saved = [(v.kind, v.end - v.start) for v in task.vmas if v.kind in memory.VDSO_KINDS]
    local = [(m.path.strip("[]"), m.end - m.start) for m in read_maps(os.getpid())
             if m.path in ("[vvar]", "[vvar_vclock]", "[vdso]")]
    if saved and saved != local:
        raise RestoreError(f"the image's vDSO layout {saved} differs from this kernel's {local}",
                           "restart on a machine running the same kernel")


# --- where the tree is born --------------------------------------------------

def _is_original(pid: int, task: Task) -> tuple[bool, str]:
    """Is pid still held by the very process the image was taken from?"""
    try:
        st = read_stat(pid)
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return False, ""
    return st.starttime == task.starttime and boot == task.boot_id, st.state


def _claim_pids(tasks: list[Task], tree: Tree, reader: ImageReader, need_pids: bool = True) -> None:
    """Make sure every saved pid is free, waiting for the originals to go.

    `lcr checkpoint P -o - | lcr restart -` kills P only after the trailer,
    so when the image comes through a pipe and P still runs we take the rest
    of the stream into memory first, then wait for P to be gone."""
    busy = [k for k in tasks if os.path.exists(f"/proc/{k.pid}")]
    busy_z = [z.pid for z in tree.zombies if os.path.exists(f"/proc/{z.pid}")]
    if not busy and not busy_z:
        return
    if not need_pids:
        # Only the pipe case matters (the originals die once we have read the
        # trailer); from a file, a running original is no obstacle here.
        if _seekable(reader.fd):
            return
        busy = [k for k in busy if _is_original(k.pid, k)[0]]
        busy_z = []
    buffered = False
    for k in busy:
        original, state = _is_original(k.pid, k)
        if not original and os.path.exists(f"/proc/{k.pid}"):
            raise PidTaken(f"pid {k.pid} is in use by another process",
                           "stop that process, or restart with --any-pid")
        if state not in ("Z", "X") and not buffered and not _seekable(reader.fd):
            reader.buffer_rest()
            buffered = True
    deadline = time.monotonic() + PID_WAIT
    for pid in [k.pid for k in busy] + busy_z:
        while os.path.exists(f"/proc/{pid}"):
            if time.monotonic() > deadline:
                raise PidTaken(f"pid {pid} is still held by the process the image was taken from",
                               "was it checkpointed with --leave-running? kill it, or restart "
                               "with --any-pid")
            time.sleep(0.02)


def _seekable(fd: int) -> bool:
    try:
        os.lseek(fd, 0, os.SEEK_CUR)
        return True
    except OSError:
        return False


def _make_blank(root: Task, tasks: list[Task], tree: Tree, reader: ImageReader,
                any_pid: bool, net=None) -> tuple[spawn.Blank, str]:
    mode = restore_mode(root, any_pid)
    vpid = root.vpid or root.pid
    if mode == "host":
        return spawn.in_host(None if any_pid else vpid), mode
    join = net.ns_fds() if net is not None else None     # the sockets' network namespace
    try:
        return spawn.in_new_namespaces(1 if mode == "ns-init" else vpid, user_ns=os.geteuid() != 0,
                                       extra=namespaces.unshare_flags(tree.ns), join=join), mode
    finally:
        for fd in join or ():
            os.close(fd)


def fill_namespaces(blank: spawn.Blank, tree: Tree) -> list[tuple[str, int]]:
    """Before any task: the hostname of a tree's own uts namespace, the
    System V IPC objects (in its own ipc namespace, or lcr's); what was made
    in lcr's.  On failure the blank goes."""
    try:
        namespaces.restore(blank.pid, tree.ns)
        made = sysvipc.restore(blank.pid, tree.ipc)
        return [] if tree.ns and "ipc" in tree.ns.kinds else made
    except BaseException:
        os.close(blank.keep)
        destroy([], blank.init_pid)
        try:
            os.kill(blank.pid, signal.SIGKILL)
            os.waitpid(blank.pid, ptrace.WALL)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise


# --- the restart --------------------------------------------------------------

def read_meta(reader: ImageReader) -> tuple[Header, Tree, list[Task], Record]:
    """HEADER, TREE and every TASK of an image; the first record after them."""
    header = reader.read_header()
    rec = reader.next()
    if rec.type is not RecType.TREE:
        raise ImageError(f"{reader.name} is corrupt: expected the process tree after the header")
    tree: Tree = rec.meta  # type: ignore[assignment]
    tasks: list[Task] = []
    while True:
        rec = reader.next()
        if rec.type is not RecType.TASK:
            return header, tree, tasks, rec
        tasks.append(rec.meta)  # type: ignore[arg-type]


def restart(fd: int, *, any_pid: bool = False, name: str = "image",
            images_dir: str | None = None, lazy: bool = False,
            lazy_log: str | None = None) -> RestoreResult:
    t0 = time.monotonic()
    lz = LazyOpts(log=lazy_log, t0=t0) if lazy else None
    if lz is not None:
        lazy_pages.check_source(fd, name)
    reader = ImageReader(fd, name=name, skim=lazy)
    chain: Chain | None = None
    try:
        header, tree, tasks, first = read_meta(reader)
        validate_tree(tree, tasks)
        if lz is not None:
            lazy_pages.check_image(reader, header, tasks)
        exe_identity.verify(tree.identities)     # no task made for code that is gone
        if header.parent is not None:      # all parents found and matched before any process
            chain = Chain.open(header.parent, name, images_dir)
        for k in tasks:
            reason = process.check_creds(k)
            if reason:
                raise RestoreError(reason)
        check_vdso(tasks[0])
        raise_nofile(tree)
        memory.forget_objects()
        # Before anything is opened: the originals may still hold the pids,
        # the addresses their sockets are bound to, their locks.
        _claim_pids(tasks, tree, reader,
                    need_pids=restore_mode(tasks[0], any_pid) == "host" and not any_pid)
        ours = external.resolve(tree.files, tasks)      # --fd N=...: refused if not given
        net = namespaces.net_helper(tree.ns)     # `lcr run --net`: its sockets are made there
        shm: dict[int, int] = {}
        try:
            try:
                with sockdiag.inside(net):
                    ours.update(files.open_all([d for d in tree.files if d.fid not in ours],
                                               tree.pipes, tree.unix))
                shm = memory.open_shm(tree.shm, tree.mapped)
                blank, mode = _make_blank(tasks[0], tasks, tree, reader, any_pid, net)
            finally:
                if net is not None:      # the blank is in its namespaces now, or never will be
                    net.close()
            made_ipc = fill_namespaces(blank, tree)
            try:
                res = restore_tree(blank, mode, any_pid, tree, tasks, reader, first, ours, shm,
                                   chain, lz)
            except BaseException:
                sysvipc.remove(os.getpid(), made_ipc)   # objects made in lcr's ipc namespace
                raise
            sysvipc.finish(res.pid, tree.ipc)
        finally:   # the tasks inherited what they need; lcr's copies go
            files.close_all(ours)
            files.close_all(shm)
            fdkinds.pty.release()
    finally:
        reader.close()
        if chain is not None:
            chain.close()
    res.seconds = time.monotonic() - t0
    return res


def restore_tree(blank: spawn.Blank, mode: str, any_pid: bool, tree: Tree, tasks: list[Task],
                 reader: ImageReader, first: Record, ours: dict[int, int],
                 shm: dict[int, int], chain: Chain | None = None,
                 lazy: LazyOpts | None = None) -> RestoreResult:
    """The whole tree from the image's records after its metadata (``first``):
    blanks made and seized, areas mapped, pages poured in, every task
    finished; then released to run.  ``ours``: lcr's fds of the tree's open
    files (fid -> fd), ``shm``: its shared memory objects.  On any failure
    every task made is killed."""
    root = Tracee(blank.pid, exitkill=True, traceclone=True)
    made: list[Rebuild] = []
    lz: lazy_pages.Lazy | None = None
    try:
        try:
            faults.point("restore.spawned")
            root.seize()
            root.stop()
            if any(k.cow for k in tasks):
                if chain is not None:
                    raise ImageError(f"{reader.name} is corrupt: pages marked shared with a "
                                     "parent task in an incremental image")
                pages = build_shared(root, tasks, tree, any_pid, made, shm, reader, first)
            else:
                build_tree(root, tasks, tree, any_pid, made)
                for r in made:
                    prepare(r, shm)
                targets = {r.task.pid: (r.t, r.task.vmas) for r in made}
                if lazy is not None:     # the page server fills the private anonymous pages
                    lz = lazy_pages.start(targets, reader, first, root=root.pid, t0=lazy.t0,
                                          log=lazy.log)
                    pages = lz.eager_pages + lz.lazy_pages
                else:
                    pages = memory.fill_image(targets, reader, first, chain)
            warnings: list[str] = []
            for r in made:
                warnings += finish_task(r, ours, tree)
            # saved stopped: the signal that stops it again once let go, queued
            # while a failure still tears the whole tree down
            for r in reversed(made):
                warnings += jobstop.arm(r.t.pid, r.task)
            faults.point("restore.finished")
        finally:
            os.close(blank.keep)
    except BaseException as e:
        destroy([root] + [r.t for r in made if r.t is not root] + [th for r in made for th in r.made],
                blank.init_pid)    # threads too: a traced zombie thread blocks its leader's wait
        if isinstance(e, OSError):
            raise RestoreError(f"restore of pid {tasks[0].pid} failed: {e}") from None
        raise
    # Every task finished: the job is done but for letting them go, which a
    # ^C, SIGTERM or SIGHUP must not cut short half-way through the tree (the
    # tasks still attached would die with lcr: PTRACE_O_EXITKILL); nothing in
    # this loop can fail but a detach of a task gone meanwhile (ignored)
    held = hold_signals()
    try:
        faults.point("restore.release")
        for r in reversed(made):
            for th in r.made:
                th.detach()
            r.t.detach()
        warnings += jobstop.settle([r.t.pid for r in made if r.task.stopped])
    finally:
        release_signals(held)
    return RestoreResult(pid=root.pid, original_pid=tasks[0].pid, pages=pages, seconds=0.0,
                         warnings=warnings, vpid=tasks[0].vpid or tasks[0].pid,
                         namespace=mode != "host", processes=len(tasks), lazy=lz)


def build_tree(root: Tracee, tasks: list[Task], tree: Tree, any_pid: bool,
                made: list[Rebuild]) -> None:
    """Every task as a blank, forked by its blank parent; then groups, zombies.
    Each blank is emptied (empty) before it forks: the root blank is a copy
    of lcr, and a child forked from that copy would have to have it copied
    (page tables) and torn down again; forked from an emptied parent it
    holds one trampoline page.
    ``made`` grows as tasks are made, so a failure can kill them all."""
    root.insn = root.find_syscall_insn(_own_vdso(root.pid))
    by_pid: dict[int, Rebuild] = {}
    for k in tasks:
        if not made:
            t = root
        else:
            parent = by_pid[k.ppid]
            t = pstree.fork_child(parent.t, _blank_arena(parent), None if any_pid else (k.vpid or k.pid),
                                  pstree.clone_flags(k))
        r = Rebuild(task=k, t=t)
        by_pid[k.pid] = r
        made.append(r)
        ptrace.set_sigmask(t.pid, ALL_SIGNALS)
        pstree.set_session(t, k)
        empty(r, inherited=None if t is root else by_pid[k.ppid])
        faults.point("restore.tree")
    zs = [(pstree.fork_child(by_pid[z.ppid].t, _blank_arena(by_pid[z.ppid]),
                             None if any_pid else z.vpid), z) for z in tree.zombies]
    pstree.make_zombies(zs, [_blank_arena(by_pid[z.ppid]).addr for z in tree.zombies])
    pstree.set_groups([(r.t, r.task) for r in made] + zs)
    for zt, z in zs:
        zt.exit_now(z.status)


def build_shared(root: Tracee, tasks: list[Task], tree: Tree, any_pid: bool, made: list[Rebuild],
                 shm: dict[int, int], reader: ImageReader, first: Record) -> int:
    """build_tree, prepare and the fill for an image whose children share
    pages with their parents (Task.cow): task by task, in the image's
    order, a parent's memory is mapped and filled before its children are
    forked from it; each child keeps the areas it inherits copy-on-write
    (their pages shared again, as they were), loses the rest of its
    parent's, has its own areas mapped and its own pages written.  Every
    fork comes before any task's finish.  The pages written."""
    root.insn = root.find_syscall_insn(_own_vdso(root.pid))
    by_pid: dict[int, Rebuild] = {}
    pages = memory.TaskPages(reader, first)
    total = 0
    for k in tasks:
        parent = by_pid.get(k.ppid) if made else None
        if parent is None:
            t = root
        else:
            faults.point("restore.cow_fork")
            assert parent.arena is not None
            t = pstree.fork_child(parent.t, parent.arena, None if any_pid else (k.vpid or k.pid),
                                  pstree.clone_flags(k))
        r = Rebuild(task=k, t=t)
        by_pid[k.pid] = r
        made.append(r)
        ptrace.set_sigmask(t.pid, ALL_SIGNALS)
        pstree.set_session(t, k)
        keep: list[tuple[int, int]] = []
        if parent is None:
            empty(r)
        else:
            keep = memory.inherited_areas(k.vmas, parent.task.vmas, cow_spans(k), reader.name) \
                if k.cow else []
            r.inherited_sigs = (lambda st: st.sig_cgt | st.sig_ign)(read_status(t.pid))
            r.inherited_exe = parent.inherited_exe
            r.tramp, r.arena = memory.empty_but_inherited(t, k.vmas, keep, parent.tramp)
        faults.point("restore.tree")
        kept = set(keep)
        prepare(r, shm, [v for v in k.vmas if (v.start, v.end) not in kept])
        total += pages.pour(k.pid, t, k.vmas)
        if keep:
            memory.drop_unshared(t, keep, cow_spans(k), pages.stored.get(k.pid, []))
    pages.end()
    # as build_tree: zombies made (and leading their sessions) before the
    # groups are joined, since a zombie may lead a group a live task is in
    zs = []
    for z in tree.zombies:
        parent = by_pid[z.ppid]
        assert parent.arena is not None
        zs.append((pstree.fork_child(parent.t, parent.arena, None if any_pid else z.vpid), z))
    pstree.make_zombies(zs, [by_pid[z.ppid].arena.addr for _zt, z in zs])   # type: ignore[union-attr]
    pstree.set_groups([(r.t, r.task) for r in made] + zs)
    for zt, z in zs:
        zt.exit_now(z.status)
    return total


def _blank_arena(r: Rebuild) -> Arena:
    """Scratch memory in a blank: its trampoline's once emptied, else a
    page of its own."""
    if r.arena is None:
        addr = r.t.syscall("mmap", 0, PAGE, 3, 0x22, (1 << 64) - 1, 0)
        r.arena = Arena(r.t, addr, PAGE)
    return r.arena


def _own_vdso(pid: int) -> tuple[int, int] | None:
    return next(((m.start, m.end) for m in read_maps(pid) if m.path == "[vdso]"), None)


def empty(r: Rebuild, inherited: Rebuild | None = None) -> None:
    """Empty the blank's address space but for a trampoline page (code, then
    scratch for arguments) at an address the image leaves free.  A blank
    forked from an emptied parent (``inherited``) holds nothing but the
    parent's trampoline: kept where the image leaves its place free."""
    t, task = r.t, r.task
    r.inherited_sigs = (lambda st: st.sig_cgt | st.sig_ign)(read_status(t.pid))
    r.inherited_exe = inherited.inherited_exe if inherited is not None \
        else os.readlink(f"/proc/{t.pid}/exe")
    if inherited is None:
        cpu.unregister_rseq(t)          # a fork of lcr: glibc's registration goes
    r.tramp, r.arena = memory.empty_but_trampoline(t, task.vmas,
                                                   inherited.tramp if inherited is not None else 0)


def prepare(r: Rebuild, shm: dict[int, int], vmas: list | None = None) -> None:
    """The emptied blank (empty, done by build_tree): map the saved areas
    (``vmas``: only those; the others it holds already)."""
    t, task = r.t, r.task
    reason = cpu.check_restorable(task.xstate, ptrace.get_xstate(t.pid))
    if reason:
        raise RestoreError(reason, "restart on a machine with the same CPU features")
    if not r.tramp:
        empty(r)
    assert r.arena is not None
    memory.prepare_areas(t, task.vmas if vmas is None else vmas, r.arena, shm)


def finish_task(r: Rebuild, ours: dict[int, int], tree: Tree) -> list[str]:
    """Everything after the pages, in the one finish order (resources/finish.py);
    last, return into the saved registers.  The warnings."""
    assert r.arena is not None
    f = finish.Finish(t=r.t, arena=r.arena, task=r.task, tramp=r.tramp,
                      inherited_sigs=r.inherited_sigs, ours=ours, descs=tree.files,
                      inherited_exe=r.inherited_exe, is_root=r.task.pid == tree.root)
    try:
        return finish.run(f)
    finally:
        r.made = [new for new, _th in f.threads]


def raise_nofile(tree: Tree | None = None, need: int = 64) -> None:
    """Room for lcr's fds: those of the tree's open files and objects, and ``need`` more."""
    if tree is not None:
        need += len(tree.files) + len(tree.pipes) * 2 + len(tree.unix) + len(tree.shm) \
            + len(tree.mapped)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need + 3:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need + 3, soft)), hard))


def destroy(ts: list[Tracee], init_pid: int | None) -> None:
    """Kill everything this restart made (a failed restart leaves nothing)."""
    for t in ts:
        try:
            os.kill(t.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        t.attached = False
        t.close()
    if init_pid:
        try:
            os.kill(init_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for t in reversed(ts):   # deepest first; SIGKILL'ed, so each wait is short
        try:
            os.waitpid(t.pid, ptrace.WALL)
        except ChildProcessError:
            pass


__all__ = ["restart", "RestoreResult", "LcrError", "KernelError"]
