"""Pre-copy live migration: the order of things, on both sides.

Source (``migrate``):
 1. connect, authenticate (migration/protocol.py);
 2. round 0: freeze the tree briefly, collect preliminary metadata (tree
    shape and memory layout), start a write tracker per process
    (resources/dirty.py), thaw; send the metadata; while the tree runs,
    send every present page of its private areas;
 3. rounds 1..n, the tree running: the pages written since the last round
    (tracker.collect) are sent again, until what is left would fit in
    --max-downtime at the bandwidth measured, or rounds stop shrinking, or
    --max-rounds;
 4. stop-and-copy: dump.checkpoint writes an incremental image whose parent
    is "what the destination holds" (PrecopyBase): pages sent and not
    written since, in areas that did not change, are left out (depth 1);
    a full image if the tree's shape changed;
 5. the destination answers RUNNING: the frozen tree is killed.  Anything
    else (FAILED, a broken connection, a timeout, an error here): the
    trackers are closed, the tree thawed, it runs on unchanged.

Destination (``receive``): accept connections until one authenticates
(the others, failing, are logged and dropped: protocol.Gate); on the
preliminary metadata build the skeleton (migration/skeleton.py: blank
tasks, areas mapped) and write every page received straight into the
tasks; on the final image reconcile areas, write its pages, drop pages
the process no longer has, hand over the fds and finish each task as a
restart does; release the tree and answer RUNNING <pid>.  On any error
everything made is killed and FAILED <reason> goes back.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field

import msgspec

from linuxcr.engine import dump, restore
from linuxcr.engine.incremental import Trackers
from linuxcr.errors import ImageError, ImageWriteError, LcrError, NoSuchProcess, NotCheckpointable
from linuxcr.image import runs
from linuxcr.image.schema import MAX_TASKS, Pages, ParentRef, Task, Tree
from linuxcr.image.stream import PAGE, ImageReader
from linuxcr.migration import protocol as P
from linuxcr.migration.protocol import AuthError, Conn, MigrationError, Msg
from linuxcr.migration.skeleton import Skeleton, identical_areas, in_skeleton, skeleton_vmas
from linuxcr.procfs import PagemapReader, read_smaps
from linuxcr.remote.task import Tracee
from linuxcr.resources import exe_identity, files, memory, namespaces, process, sysvipc

EPOCH = "pre-copy"
DEFAULT_MAX_DOWNTIME = 0.05
DEFAULT_MAX_ROUNDS = 8
DEFAULT_TIMEOUT = 60.0
FIXED_PER_PROCESS = 0.015        # both sides' work per process at the end (estimate)
PER_RUN = 40e-6                  # seconds per run of pages in the final image, first guess
SHRINK = 0.9                     # a round must send less than this share of the previous one
CHECK_EVERY = 64 << 20           # bytes between looks for a FAILED from the destination
FAULT_ENV = "LCR_MIGRATE_FAULT"  # tests: kill this side at a named point (see _fault)


@dataclass
class Round:
    n: int
    pages: int
    bytes: int
    seconds: float


@dataclass
class MigrateResult:
    pid: int
    to: str
    dest_pid: int = 0             # the root as the destination's lcr sees it
    dest_vpid: int = 0            # as it sees itself
    namespace: bool = False
    rounds: list[Round] = field(default_factory=list)
    stop_reason: str = ""
    final_pages: int = 0          # pages in the final image
    inherited_pages: int = 0      # pages the final image left to the pre-copied state
    final_bytes: int = 0
    downtime: float = 0.0         # from the final freeze to RUNNING
    frozen_collect: float = 0.0   # of which: freezing and collecting the tree
    dest_seconds: float = 0.0     # of which: the destination, from FINAL to RUNNING
    seconds: float = 0.0
    full_image: bool = False
    processes: int = 1
    warnings: list[str] = field(default_factory=list)


@dataclass
class ReceiveResult:
    pid: int
    original_pid: int
    vpid: int
    namespace: bool
    peer: str
    rounds: int = 0
    precopied_pages: int = 0
    final_pages: int = 0
    inherited_pages: int = 0
    full_image: bool = False
    seconds: float = 0.0
    processes: int = 1
    warnings: list[str] = field(default_factory=list)


_T0 = [0.0]


def _mark(what: str) -> None:
    if os.environ.get("LCR_MIGRATE_TIMING"):
        import sys
        now = time.monotonic()
        print(f"[{os.getpid()}] {what}: +{(now - _T0[0]) * 1e3:.1f} ms", file=sys.stderr)
        _T0[0] = now


def _fault(name: str) -> None:
    """LCR_MIGRATE_FAULT=<name>: this lcr SIGKILLs itself there (tests)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
        while True:
            time.sleep(1)


# =============================================================================
# source

class _TreeChanged(Exception):
    """The tree's processes differ from the preliminary metadata's."""


@dataclass
class _Prelim:
    tree: Tree
    tasks: list[Task]
    order: list[int]
    zombies: list[int]
    frozen: float
    sysv: bool = False       # it uses System V IPC objects: the final round sends a full image


class PrecopyBase:
    """``base`` of dump.checkpoint: the state the destination holds."""

    def __init__(self, session: bytes, pre: _Prelim, sent: dict[int, list[tuple[int, int]]],
                 trackers: Trackers) -> None:
        self.session = session
        self.pre = pre
        self.sent = sent
        self.trackers = trackers
        self._held: dict[int, list[tuple[int, int, int]]] = {}
        self.frozen_at = 0.0

    def on_frozen(self, tree) -> None:
        """The final freeze: same processes?  What changed since the last round?"""
        self.frozen_at = time.monotonic()
        _mark("source frozen and collected")
        zombies = sorted(z.pid for z in tree.zombies)
        ppids = {k.pid: k.ppid for k in self.pre.tasks}
        if list(tree.order) != self.pre.order or zombies != self.pre.zombies or \
                any(tree.parent.get(p, ppids[p]) != ppids[p] for p in tree.order):
            raise _TreeChanged()
        self.trackers.on_frozen(tree, EPOCH)
        by_pid = {k.pid: k for k in self.pre.tasks}
        for p in tree.order:
            final = memory.collect(read_smaps(p))
            same = identical_areas(by_pid[p].vmas, final)
            self._held[p] = [(s, e, 1) for s, e in memory.clip(runs.normalize(self.sent.get(p, [])), same)]
        _mark("source held computed")
        _fault("source.final")

    def ref(self) -> ParentRef:
        return ParentRef(id=self.session, digest=0, path="", depth=1)

    def held(self, pid: int) -> list[tuple[int, int, int]]:
        return self._held.get(pid, [])

    def written(self, pid: int):
        return self.trackers.written(pid)

    def hashes(self, pid: int):
        return None        # no tracker: every page goes in the final image

    def method(self, pid: int) -> str:
        return "pre-copy" if self.written(pid) is not None else "full"


def migrate(pid: int, host: str, port: int, *, token: str | bytes | None = None,
            max_downtime: float = DEFAULT_MAX_DOWNTIME, max_rounds: int = DEFAULT_MAX_ROUNDS,
            timeout: float = DEFAULT_TIMEOUT, progress=None) -> MigrateResult:
    """Move process ``pid`` (and its descendants) to ``lcr receive`` at host:port.
    The source tree is killed only once the destination reports it running;
    on any failure it runs on as it was.  ``progress(text)``: one line per step."""
    t0 = time.monotonic()
    key = P.load_token(token)
    say = progress or (lambda _text: None)
    reasons = dump.check_tree(pid) + namespaces.migrate_reasons(pid)
    if reasons:
        raise NotCheckpointable(pid, reasons)
    res = MigrateResult(pid=pid, to=f"{host}:{port}")
    conn = Conn.connect(host, port, timeout)
    trackers = Trackers(track=True)
    try:
        session = conn.handshake_source(key)
        say(f"connected to {conn.peer}, authenticated")
        pre = _start(pid, trackers)
        res.warnings += trackers.warnings
        res.processes = len(pre.tasks)
        conn.send(Msg.TREE, pre.tree)
        for k in pre.tasks:
            conn.send(Msg.TASK, k)
        conn.send(Msg.META_END, P.MetaEnd(tasks=len(pre.tasks)))
        conn.recv((Msg.READY,))
        sent = _precopy(conn, pre, trackers, res, max_downtime, max_rounds, say)
        _final(conn, session, pre, sent, trackers, res, say)
    except BaseException as e:
        if isinstance(e, LcrError):
            conn_note = e.message
        else:
            conn_note = "interrupted" if isinstance(e, KeyboardInterrupt) else type(e).__name__
        try:
            if not isinstance(e, MigrationError) or "lost" not in e.message:
                conn.send(Msg.ABORT, P.Reason(f"the source gave up: {conn_note}"[:4096]))
        except (MigrationError, OSError):
            pass
        raise
    finally:
        trackers.close()         # unregisters the userfaultfds: the process is as before
        conn.close()
    res.seconds = time.monotonic() - t0
    return res


def _start(pid: int, trackers: Trackers) -> _Prelim:
    """Round 0's short freeze: preliminary metadata, trackers started."""
    tree = dump.FrozenTree(pid)
    t0 = time.monotonic()
    try:
        tree.freeze()
        smaps = tree.checked(keep=lambda r: not dump.checkpoint_saves(r))   # SysV: final round
        table = files.Table()
        tasks = [dump.collect_task(tree.procs[p], smaps[p], table, tree.files_with.get(p))
                 for p in tree.order]
        collected = time.monotonic() - t0     # what the final freeze will take again
        sysv = _uses_sysv(pid, tasks)
        trackers.on_frozen(tree, None)
        trackers.set_epoch(EPOCH)
        trackers.track = False
        zombies = list(tree.zombies)
        order = list(tree.order)
    finally:
        tree.thaw()
    light = [msgspec.structs.replace(k, vmas=skeleton_vmas(k.vmas), files=[], pending=[],
                                     posix_timers=[], locks=[]) for k in tasks]
    # an `lcr run` tree's own namespaces: the skeleton is made in new ones
    # (the mounts come with the final image, whose content they hold)
    ns = namespaces.dump(pid, tasks[0].pidns_init)
    ns = msgspec.structs.replace(ns, mounts=[]) if ns is not None else None
    return _Prelim(tree=Tree(root=pid, zombies=zombies, ns=ns), tasks=light, order=order,
                   zombies=sorted(z.pid for z in zombies), frozen=collected, sysv=sysv)


def _uses_sysv(pid: int, tasks: list[Task]) -> bool:
    """Whether the tree uses System V IPC objects (frozen).  The skeleton
    the destination builds has no ipc namespace and no objects to attach:
    such a tree moves by a full final image, which carries the IPC record
    and is restored as `lcr restart` does (objects made before the tasks,
    in a new ipc namespace when the tree had its own)."""
    return sysvipc.dump(pid, tasks, namespaces.own_ipc(pid, tasks[0].pidns_init)) is not None


def _send_ranges(conn: Conn, pid: int, ranges: list[tuple[int, int]],
                 sent: list[tuple[int, int]]) -> int:
    """Read the ranges from the running process and send them; what was sent
    joins ``sent``.  A range that cannot be read (unmapped meanwhile) is
    skipped: it is not counted as held, the final image has it if it exists."""
    t = Tracee(pid)
    total = 0
    since = 0
    try:
        for _tag, pieces, view in memory.read_ahead(memory.runs_work(t, ranges), skip_unreadable=True):
            if view is None:
                continue
            s = pieces[0][0]
            conn.send(Msg.PAGES, Pages(pid=pid, addr=s, npages=len(view) // PAGE), view)
            sent.append((s, s + len(view)))
            total += len(view) // PAGE
            since += len(view)
            if since >= CHECK_EVERY:
                since = 0
                why = conn.peer_failed()
                if why:
                    raise MigrationError(f"the destination failed: {why}")
    finally:
        t.close()
    return total


def _present(pid: int, vmas, within: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Present pages of the skeleton areas (clipped to ``within``), as ranges."""
    out: list[tuple[int, int]] = []
    try:
        with PagemapReader(pid) as pm:
            for v in vmas:
                if not in_skeleton(v):
                    continue
                parts = [(v.start, v.end)] if within is None else memory.clip(within, [(v.start, v.end)])
                for s, e in parts:
                    out += [(a, a + n * PAGE) for a, n in pm.runs(s, e, anon_only=v.kind == "file")]
    except FileNotFoundError:
        raise NoSuchProcess(f"pid {pid} exited during the migration") from None
    return runs.normalize(out)


def _precopy(conn: Conn, pre: _Prelim, trackers: Trackers, res: MigrateResult,
             max_downtime: float, max_rounds: int, say) -> dict[int, list[tuple[int, int]]]:
    """Round 0 (everything) and the rounds of pages written meanwhile."""
    sent: dict[int, list[tuple[int, int]]] = {k.pid: [] for k in pre.tasks}
    t0 = time.monotonic()
    pages = 0
    for k in pre.tasks:
        pages += _send_ranges(conn, k.pid, _present(k.pid, k.vmas), sent[k.pid])
    conn.send(Msg.ROUND_END, P.RoundEnd(round=0, pages=pages))
    took = max(time.monotonic() - t0, 1e-6)
    res.rounds.append(Round(0, pages, pages * PAGE, took))
    say(f"round 0: {pages} pages ({pages * PAGE / 2**20:.1f} MiB) in {took:.3f} s")
    _fault("source.round1")
    bandwidth = max(pages * PAGE / took, 1 << 20)
    per_run = PER_RUN
    fixed = pre.frozen + FIXED_PER_PROCESS * len(pre.tasks)
    prev = float("inf")
    n = 0
    while True:
        n += 1
        todo: dict[int, list[tuple[int, int]]] = {}
        for k in pre.tasks:
            tr = trackers.by_pid.get(k.pid)
            if tr is None:
                continue          # not tracked: all of it in the final image
            d = tr.collect(reset=True)  # type: ignore[attr-defined]
            written = runs.normalize((a, a + c * PAGE) for a, c in d.written)
            untracked = runs.normalize(d.untracked)
            sent[k.pid] = runs.subtract(runs.normalize(sent[k.pid]),
                                        runs.normalize(written + untracked))
            areas = runs.normalize((v.start, v.end) for v in k.vmas if in_skeleton(v))
            todo[k.pid] = runs.normalize(memory.clip(written, areas) + _present(k.pid, k.vmas, untracked))
        nbytes = sum(runs.total(r) for r in todo.values())
        nruns = sum(len(r) for r in todo.values())
        # what copying these would cost, frozen: bytes, and a cost per run
        # (a record each, on both sides), and the fixed work of the end
        cost = nbytes / bandwidth + nruns * per_run
        estimate = cost + fixed
        left = f"{nbytes // PAGE} pages in {nruns} runs left, estimated downtime " \
               f"{estimate * 1e3:.0f} ms"
        if estimate <= max_downtime:
            res.stop_reason = left
            break
        if n > max_rounds:
            res.stop_reason = f"--max-rounds {max_rounds} reached; {left}"
            break
        if cost >= prev * SHRINK:
            res.stop_reason = f"rounds stopped shrinking; {left}"
            break
        t1 = time.monotonic()
        pages = sum(_send_ranges(conn, pid, r, sent[pid]) for pid, r in todo.items())
        conn.send(Msg.ROUND_END, P.RoundEnd(round=n, pages=pages))
        took = max(time.monotonic() - t1, 1e-6)
        res.rounds.append(Round(n, pages, pages * PAGE, took))
        if nruns >= 100:
            per_run = 0.5 * per_run + 0.5 * max(took - pages * PAGE / bandwidth, 0) / nruns
        say(f"round {n}: {pages} pages ({pages * PAGE / 2**20:.1f} MiB) in {took:.3f} s")
        prev = cost
    return sent


def _final(conn: Conn, session: bytes, pre: _Prelim, sent, trackers: Trackers,
           res: MigrateResult, say) -> None:
    """Stop-and-copy; the tree dies once the destination runs it."""
    got: dict = {}

    def wait_running() -> None:
        conn.shutdown_send()
        _mark("source image written")
        _, obj, _ = conn.recv((Msg.RUNNING,))
        _mark("source got RUNNING")
        got["running"] = obj
        got["at"] = time.monotonic()
        _fault("source.running")

    conn.send(Msg.FINAL)
    _mark("source sends FINAL")
    base = PrecopyBase(session, pre, sent, trackers)
    name = f"the migration stream to {conn.peer}"
    say(f"stop-and-copy ({res.stop_reason})")
    try:
        d = None
        if pre.sysv:
            say("the tree uses System V IPC objects: sending a full image")
        else:
            try:
                d = dump.checkpoint(pre.tree.root, conn.fd, base=base, on_frozen=base.on_frozen,
                                    on_written=wait_running, name=name)
            except _TreeChanged:
                say("the process tree changed: sending a full image")
        if d is None:
            res.full_image = True
            d = dump.checkpoint(pre.tree.root, conn.fd, on_written=wait_running, name=name)
    except ImageWriteError as e:
        raise MigrationError(f"connection to {conn.peer} lost during the stop-and-copy "
                             f"({e.message})") from None
    done = time.monotonic()
    r: P.Running = got["running"]
    res.dest_pid, res.dest_vpid, res.namespace = r.pid, r.vpid, r.namespace
    res.final_pages = d.pages
    res.inherited_pages = d.incremental.get("inherited", 0) if not res.full_image else 0
    res.final_bytes = d.bytes_written
    res.downtime = got["at"] - (done - d.frozen_seconds)
    res.frozen_collect = base.frozen_at - (done - d.frozen_seconds) if base.frozen_at else 0.0
    res.dest_seconds = r.seconds
    res.warnings += d.warnings


# =============================================================================
# destination

def receive(listen_addr: str, *, token: str | bytes | None = None, timeout: float | None = None,
            io_timeout: float = DEFAULT_TIMEOUT, trust=(), on_listening=None,
            progress=None, log=None, max_failures: int | None = None,
            limits: P.Limits | None = None) -> ReceiveResult:
    """Accept one migration on ``listen_addr`` (HOST:PORT) and restart it.
    ``timeout``: how long to wait for it (None: forever); ``io_timeout``:
    the longest silence of the source once authenticated.

    Connections that fail before authenticating (closed, garbage, wrong
    token, silent for P.HANDSHAKE_TIMEOUT) are dropped, one ``log(line)``
    each, rate-limited per address, and the wait goes on (P.Gate), up to
    ``max_failures`` of them (0: no limit).  Once a source authenticated,
    its session is this call's outcome: it succeeds, or everything built
    for it is torn down and the error raised (the source runs on)."""
    key = P.load_token(token)
    trusted = process.parse_trust(trust)
    lim = limits or P.Limits()
    if max_failures is not None:
        lim = dataclasses.replace(lim, max_failures=max_failures)
    lsock, where = P.listen(listen_addr)
    try:
        if on_listening:
            on_listening(where)
        gate = P.Gate(lsock, key, io_timeout, lim, log or (lambda _text: None))
        conn, session = gate.wait(timeout)
    finally:
        lsock.close()           # one session at a time: later peers are refused by the kernel
    try:
        return _Receiver(conn, session, trusted, progress).run()
    finally:
        conn.close()


class _Receiver:
    def __init__(self, conn: Conn, session: bytes, trusted, progress) -> None:
        self.conn = conn
        self.session = session
        self.trusted = trusted
        self.say = progress or (lambda _text: None)
        self.sk: Skeleton | None = None
        self.made_full: list[int] = []
        self.final_at = 0.0

    def run(self) -> ReceiveResult:
        t0 = time.monotonic()
        res: ReceiveResult | None = None
        try:
            res = self._run()
        except BaseException as e:
            if self.sk is not None:
                self.sk.destroy()
            reason = e.message if isinstance(e, LcrError) else (
                "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}")
            try:
                self.conn.send(Msg.FAILED, P.Reason(f"the destination failed: {reason}"[:4096]))
            except (MigrationError, OSError):
                pass
            raise
        try:
            self.conn.send(Msg.RUNNING, P.Running(pid=res.pid, vpid=res.vpid,
                                                  namespace=res.namespace,
                                                  processes=res.processes,
                                                  seconds=time.monotonic() - self.final_at))
        except MigrationError as e:
            # The source cannot learn that the tree runs here: it thaws its own.
            self._kill_released(res)
            raise MigrationError(f"the source did not take the confirmation ({e.message}); "
                                 "the restored tree was killed, the source keeps running") from None
        res.seconds = time.monotonic() - t0
        return res

    def _kill_released(self, res: ReceiveResult) -> None:
        pids = [res.pid] + self.made_full
        if self.sk is not None:
            pids = [r.t.pid for r in self.sk.made]
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _policy(self, tree: Tree, tasks: list[Task]):
        policy = process.RestorePolicy(trust=self.trusted, image_name="the migration stream")
        policy.tree, policy.tasks = tree, list(tasks)
        return policy

    def _check(self, tree: Tree, tasks: list[Task]) -> None:
        restore.validate_tree(tree, tasks)
        with process.restore_policy(self._policy(tree, tasks)):
            for k in tasks:
                reason = process.check_creds(k)
                if reason:
                    raise MigrationError(reason)
        restore.check_vdso(tasks[0])
        exe_identity.verify(tree.identities)     # as restart: no task runs code that changed

    def _run(self) -> ReceiveResult:
        conn = self.conn
        mt, tree, _ = conn.recv((Msg.TREE,))
        tasks: list[Task] = []
        while True:
            mt, obj, _ = conn.recv((Msg.TASK, Msg.META_END))
            if mt is Msg.META_END:
                break
            if len(tasks) >= MAX_TASKS:      # before keeping one more
                raise MigrationError(f"{conn.peer} sent more than {MAX_TASKS} task records")
            tasks.append(obj)  # type: ignore[arg-type]
        if len(tasks) != obj.tasks:  # type: ignore[attr-defined]
            raise MigrationError("the preliminary metadata lost a task record")
        self._check(tree, tasks)  # type: ignore[arg-type]
        self.say(f"pid {tasks[0].pid} from {conn.peer}: {len(tasks)} process(es); "
                 "building the skeleton")
        self.sk = sk = Skeleton.build(tree, tasks)  # type: ignore[arg-type]
        conn.send(Msg.READY)
        rounds = 0
        seen_pages = False
        while True:
            mt, obj, data = conn.recv((Msg.PAGES, Msg.ROUND_END, Msg.FINAL))
            if mt is Msg.PAGES:
                if not seen_pages:
                    _fault(f"dest.round{rounds}")
                    seen_pages = True
                sk.write(obj.pid, obj.addr, obj.npages, data)  # type: ignore[attr-defined]
            elif mt is Msg.ROUND_END:
                if obj.round != rounds:  # type: ignore[attr-defined]
                    raise MigrationError(f"round {obj.round} came after round {rounds - 1}")  # type: ignore[attr-defined]
                self.say(f"round {rounds}: {obj.pages} pages")  # type: ignore[attr-defined]
                rounds += 1
                seen_pages = False
            else:
                break
        _fault("dest.final")
        self.final_at = time.monotonic()
        _mark("FINAL received")
        reader = ImageReader(conn.fd, name=f"the migration stream from {conn.peer}")
        try:
            header, ftree, ftasks, first = restore.read_meta(reader)
            _mark("final metadata read")
            self._check(ftree, ftasks)
            _mark("checked")
            if header.parent is None:
                res = self._full(reader, ftree, ftasks, first)
            else:
                if header.parent.id != self.session or header.parent.depth != 1:
                    raise MigrationError("the final image does not build on this migration")
                if not sk.same_tree(ftree, ftasks):
                    raise MigrationError("the process tree changed, but the source sent an "
                                         "incremental image")
                res = self._finish(reader, ftree, ftasks, first)
        except ImageError as e:
            raise MigrationError(f"stop-and-copy failed: {e.message}", e.hint) from None
        finally:
            reader.close()
        res.rounds = rounds
        res.precopied_pages = sk.pages
        res.peer = conn.peer
        _fault("dest.finished")
        return res

    def _full(self, reader: ImageReader, tree: Tree, tasks: list[Task], first) -> ReceiveResult:
        """The tree changed shape: a plain restore from the stream."""
        assert self.sk is not None
        self.sk.destroy()
        self.say("the source sent a full image: plain restore")
        memory.forget_objects()
        restore.raise_nofile(tree)
        from linuxcr.migration.skeleton import spawn_blank
        ours = files.open_all(tree.files, tree.pipes, tree.unix)
        shm: dict = {}
        try:
            shm = memory.open_shm(tree.shm, tree.mapped)
            blank, mode = spawn_blank(tasks[0], tree, tasks)
            made_ipc = restore.fill_namespaces(blank, tree)     # System V objects: before the tasks
            try:
                with process.restore_policy(self._policy(tree, tasks)):
                    r = restore.restore_tree(blank, mode, False, tree, tasks, reader, first, ours,
                                             shm)
            except BaseException:
                sysvipc.remove(os.getpid(), made_ipc)      # objects made in lcr's ipc namespace
                raise
            sysvipc.finish(r.pid, tree.ipc)
        finally:
            files.close_all(ours)
            files.close_all(shm)
        self.made_full = [r.pid]
        return ReceiveResult(pid=r.pid, original_pid=r.original_pid, vpid=r.vpid,
                             namespace=r.namespace, peer="", final_pages=r.pages, full_image=True,
                             processes=r.processes, warnings=r.warnings)

    def _finish(self, reader: ImageReader, tree: Tree, tasks: list[Task], first) -> ReceiveResult:
        sk = self.sk
        assert sk is not None
        memory.forget_objects()
        restore.raise_nofile(tree)
        ours = files.open_all(tree.files, tree.pipes, tree.unix)
        shm: dict = {}
        warnings: list[str] = []
        try:
            shm = memory.open_shm(tree.shm, tree.mapped)
            _mark("files opened")
            sk.fill_namespaces(tree)
            given: dict[int, dict[int, int]] = {}
            for r, k in zip(sk.made, tasks):
                need = {ours[f.fid] for f in k.files}
                need |= {fd for key, fd in shm.items()
                         if any(v.kind in ("shmem",) + memory.OBJECT_KINDS and
                                (v.shm if v.kind == "shmem" else (v.dev, v.shm)) == key
                                for v in k.vmas)}
                m = sk.give_fds(r, need)
                given[k.pid] = m
                sk.reconcile(r, k, {key: m[fd] for key, fd in shm.items() if fd in m})
            _mark("fds given, areas reconciled")
            fill = memory.PageFill({k.pid: (r.t, k.vmas) for r, k in zip(sk.made, tasks)},
                                   reader.name)
            final_pages = fill.pour(reader, first)
            _mark("pages written")
            inherited = 0
            for r, k in zip(sk.made, tasks):
                inherited += sk.drop_stale(r, k, fill)
            _mark("stale pages dropped")
            with process.restore_policy(self._policy(tree, tasks)):
                for r, k in zip(sk.made, tasks):
                    r.task = k
                    m = given[k.pid]
                    warnings += restore.finish_task(r, {fid: m[fd] for fid, fd in ours.items()
                                                    if fd in m}, tree)
        finally:
            files.close_all(ours)
            files.close_all(shm)
        _mark("tasks finished")
        sk.release()
        _mark("released")
        root = tasks[0]
        return ReceiveResult(pid=sk.root.pid, original_pid=root.pid, vpid=root.vpid or root.pid,
                             namespace=sk.mode != "host", peer="", final_pages=final_pages,
                             inherited_pages=inherited, processes=len(tasks), warnings=warnings)


__all__ = ["migrate", "receive", "MigrateResult", "ReceiveResult", "Round", "MigrationError",
           "AuthError"]
