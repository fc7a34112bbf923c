"""The destination's early tree: blank tasks with the saved address spaces,
filled with pages while the source still runs, then reconciled with the
final (incremental) image.

Which areas take part (both sides use the same rule, ``in_skeleton``):
private anonymous and private file mappings, whose pages are pre-copied.
Shared areas (MAP_SHARED files, shared anonymous memory, memfds, unlinked
files) are mapped only at the end, from the final image's objects, with
their pages: another process may write them, which no tracker sees.

An area of the skeleton is kept at the end only if it is *identical* in
the final layout (``area_key``: start, end, protection, kind, path, offset,
name, flags but the userfaultfd ones); then only the pages written since
they were sent come again.  Any other area is unmapped and mapped anew.
"""
from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field

import msgspec

from linuxcr.engine import restore, spawn
from linuxcr.engine.restore import Rebuild
from linuxcr.errors import ImageError, RestoreError
from linuxcr.image import runs
from linuxcr.image.schema import Task, Tree, Vma
from linuxcr.image.stream import PAGE
from linuxcr.remote.task import Tracee
from linuxcr.resources import jobstop, memory, namespaces
from linuxcr.resources.memory import TRAMPOLINE, PageFill
from linuxcr.migration.protocol import MigrationError

SKELETON_KINDS = ("anon", "file")
IGNORED_VMFLAGS = frozenset({"uw", "um", "ui"})   # userfaultfd registrations (the tracker's)


def in_skeleton(v: Vma) -> bool:
    return not v.shared and v.kind in SKELETON_KINDS and v.pages


def skeleton_vmas(vmas: list[Vma]) -> list[Vma]:
    """What the preliminary metadata carries: pre-copied areas and the vDSO."""
    return [v for v in vmas if in_skeleton(v) or v.kind in memory.VDSO_KINDS]


def area_key(v: Vma) -> tuple:
    return (v.start, v.end, v.prot, v.shared, v.kind, v.path, v.offset, v.name, v.pages,
            tuple(sorted(set(v.vmflags) - IGNORED_VMFLAGS)))


def identical_areas(prelim: list[Vma], final: list[Vma]) -> list[tuple[int, int]]:
    """(start, end) of the skeleton areas the final layout keeps as they were."""
    keys = {area_key(v) for v in prelim if in_skeleton(v)}
    return runs.normalize((v.start, v.end) for v in final if in_skeleton(v) and area_key(v) in keys)


def area_in_skeleton(v: Vma) -> tuple | None:
    """memory.plan's key: skeleton areas identical in both layouts are kept."""
    return area_key(v) if in_skeleton(v) else None


@dataclass
class Skeleton:
    """The tree being rebuilt at the destination, before the final image."""
    tree: Tree
    tasks: list[Task]
    blank: spawn.Blank
    mode: str
    root: Tracee
    courier: socket.socket                   # lcr's end of a socket pair: fds go through it
    inherited: int                           # the other end, inherited by every blank at this number
    made: list[Rebuild] = field(default_factory=list)
    filled: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    pages: int = 0
    closed: bool = False

    @classmethod
    def build(cls, tree: Tree, tasks: list[Task]) -> "Skeleton":
        for k in tasks:
            bad = [v for v in k.vmas if not (in_skeleton(v) or v.kind in memory.VDSO_KINDS)]
            if bad:
                raise ImageError(f"the preliminary metadata of pid {k.pid} holds a shared area "
                                 f"at 0x{bad[0].start:x}")
        restore.raise_nofile()
        # the blanks inherit one end: how the final files reach them later
        # (SCM_RIGHTS; pidfd_getfd would need ptrace rights over lcr, which
        # a task in a user namespace of its own does not have)
        courier, end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            blank, mode = spawn_blank(tasks[0], tree, tasks)
        except BaseException:
            courier.close()
            end.close()
            raise
        sk = cls(tree=tree, tasks=tasks, blank=blank, mode=mode, courier=courier,
                 inherited=end.detach(), root=Tracee(blank.pid, exitkill=True, traceclone=True))
        try:
            if tree.ns is not None:     # the hostname now; the mounts with the final image
                namespaces.restore(blank.pid, msgspec.structs.replace(tree.ns, mounts=[]))
            sk.root.seize()
            sk.root.stop()
            restore.build_tree(sk.root, tasks, tree, False, sk.made)
            for r in sk.made:
                restore.prepare(r, {})
        except BaseException as e:
            sk.destroy()
            if isinstance(e, OSError):
                raise RestoreError(f"cannot build the tree of pid {tasks[0].pid}: {e}") from None
            raise
        sk.filled = {r.task.pid: [] for r in sk.made}
        return sk

    def by_pid(self) -> dict[int, Rebuild]:
        return {r.task.pid: r for r in self.made}

    # --- pre-copy ---------------------------------------------------------------------
    def write(self, pid: int, addr: int, npages: int, data: memoryview) -> None:
        r = next((x for x in self.made if x.task.pid == pid), None)
        if r is None or not memory.put_pages(r.t, [v for v in r.task.vmas if in_skeleton(v)],
                                             addr, npages, data):
            raise MigrationError(f"the source sent pages at 0x{addr:x} of pid {pid}, outside "
                                 "every pre-copied area")
        self.filled[pid].append((addr, addr + npages * PAGE))
        self.pages += npages

    # --- the end ----------------------------------------------------------------------------
    def same_tree(self, tree: Tree, tasks: list[Task]) -> bool:
        def shape(ts: list[Task], t: Tree):
            return ([(k.pid, k.ppid, k.vpid or k.pid) for k in ts],
                    sorted((z.pid, z.ppid) for z in t.zombies))
        return shape(tasks, tree) == shape(self.tasks, self.tree)

    def fill_namespaces(self, tree: Tree) -> None:
        """The final image's namespaces: the same kinds the skeleton was made
        in; their hostname (again: it may have changed) and mounts, before
        any task is finished (as restart does them before the tasks)."""
        kinds = lambda t: sorted(t.ns.kinds) if t.ns is not None else []   # noqa: E731
        if kinds(tree) != kinds(self.tree):
            raise MigrationError(f"the tree's own namespaces changed during the migration "
                                 f"({'/'.join(kinds(self.tree)) or 'none'} -> "
                                 f"{'/'.join(kinds(tree)) or 'none'})")
        namespaces.restore(self.root.pid, tree.ns)

    def give_fds(self, r: Rebuild, fds: set[int]) -> dict[int, int]:
        """lcr's fds, passed into task r: lcr sends them (SCM_RIGHTS) on its
        end of the socket pair, the task receives them (an injected recvmsg
        on the end it inherited).  lcr fd -> the task's fd."""
        out: dict[int, int] = {}
        todo = sorted(fds)
        for i in range(0, len(todo), FDS_PER_MESSAGE):
            batch = todo[i:i + FDS_PER_MESSAGE]
            try:
                socket.send_fds(self.courier, [b"f"], batch)
                got = _recv_fds(r, self.inherited, len(batch))
            except OSError as e:
                raise RestoreError(f"cannot hand fds {batch[0]}.. to pid {r.task.pid}: "
                                   f"{os.strerror(e.errno) if e.errno else e}") from None
            out.update(zip(batch, got))
        return out

    def reconcile(self, r: Rebuild, final: Task, shm: dict) -> None:
        """Unmap the areas that changed, map the final ones (pages come later)."""
        if memory.vdso_area(r.task.vmas) != memory.vdso_area(final.vmas):
            raise MigrationError(f"pid {final.pid}: its vDSO moved during the migration")
        if not memory.free_in(final.vmas, r.tramp):
            r.tramp, r.arena = memory.move_trampoline(r.t, r.tramp, final.vmas)
        assert r.arena is not None
        plan = memory.plan(r.task.vmas, final.vmas, area_in_skeleton,
                           reserved=[(r.tramp, r.tramp + TRAMPOLINE)])
        memory.reconcile(r.t, plan, r.arena, shm)

    def drop_stale(self, r: Rebuild, final: Task, fill: PageFill) -> int:
        """Check the final page map against what we hold; drop pages we filled
        that the process no longer has.  Returns the pages it inherited."""
        pid = final.pid
        rr = fill.page_map(pid)
        if any(d > 1 for _, _, d in rr):
            raise ImageError(f"{fill.name} is corrupt: its page map of pid {pid} reaches beyond "
                             "the pre-copied state")
        held = memory.clip(runs.normalize(self.filled.get(pid, [])),
                           identical_areas(r.task.vmas, final.vmas))
        inherited = runs.normalize((s, e) for s, e, d in rr if d == 1)
        missing = runs.subtract(inherited, held)
        if missing:
            raise MigrationError(f"the source counts pages of pid {pid} at 0x{missing[0][0]:x} as "
                                 "already sent, but they were not")
        memory.drop_pages(r.t, runs.subtract(held, runs.normalize((s, e) for s, e, _ in rr)))
        return runs.total(inherited) // PAGE

    def release(self) -> None:
        for r in reversed(self.made):
            jobstop.arm(r.t.pid, r.task)         # saved stopped: stops again once let go
            for th in r.made:
                th.detach()
            r.t.detach()
        jobstop.settle([r.t.pid for r in self.made if r.task.stopped])
        self._close_fds()

    def destroy(self) -> None:
        if self.closed:
            return
        restore.destroy([self.root] + [r.t for r in self.made if r.t is not self.root],
                         self.blank.init_pid)
        self._close_fds()

    def _close_fds(self) -> None:
        if not self.closed:
            self.closed = True
            self.courier.close()
            for fd in (self.blank.keep, self.inherited):
                try:
                    os.close(fd)
                except OSError:
                    pass


FDS_PER_MESSAGE = 250          # SCM_MAX_FD is 253
SOL_SOCKET, SCM_RIGHTS = 1, 1


def _recv_fds(r: Rebuild, sock: int, n: int) -> list[int]:
    """recvmsg injected into task r: one message of n fds (msghdr, iovec,
    byte and control buffer in its arena); the fd numbers read back."""
    t, arena = r.t, r.arena
    assert arena is not None
    arena.reset()
    byte = arena.alloc(8)
    iov = arena.put(struct.pack("<QQ", byte, 1))
    clen = 16 + 4 * n + 8                          # CMSG_SPACE(4 n)
    control = arena.alloc(clen)
    msg = arena.put(struct.pack("<QIIQQQQi4x", 0, 0, 0, iov, 1, control, clen, 0))
    got = t.syscall("recvmsg", sock, msg, 0)
    if got != 1:
        raise RestoreError(f"pid {r.task.pid} received {got} bytes instead of its files")
    raw = t.read(msg, 56)
    ctl_len = struct.unpack_from("<Q", raw, 40)[0]
    flags = struct.unpack_from("<i", raw, 48)[0]
    head = t.read(control, 16)
    length, level, ctype = struct.unpack("<QiI", head)
    if flags & 0x8 or level != SOL_SOCKET or ctype != SCM_RIGHTS or length != 16 + 4 * n \
            or ctl_len < length:                     # MSG_CTRUNC, or not what lcr sent
        raise RestoreError(f"pid {r.task.pid} did not receive its {n} files")
    return list(struct.unpack(f"<{n}i", t.read(control + 16, 4 * n)))


def spawn_blank(root: Task, tree: Tree, tasks: list[Task]) -> tuple[spawn.Blank, str]:
    """The root's blank: with the saved pids where they are free, else in a
    new pid namespace (always so on the machine the process comes from: the
    source still holds them)."""
    mode = restore.restore_mode(root, False)
    if mode == "host":
        pids = [k.vpid or k.pid for k in tasks] + [z.vpid for z in tree.zombies]
        if any(os.path.exists(f"/proc/{p}") for p in pids):
            mode = "ns"
    vpid = root.vpid or root.pid
    if mode == "host":
        return spawn.in_host(vpid), mode
    return spawn.in_new_namespaces(1 if mode == "ns-init" else vpid, user_ns=os.geteuid() != 0,
                                   extra=namespaces.unshare_flags(tree.ns)), mode
