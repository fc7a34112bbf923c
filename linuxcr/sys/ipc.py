"""System V IPC through libc (x86_64 glibc structs); setns, mount,
setdomainname (what resources/namespaces.py needs inside a namespace).

Only what resources/sysvipc.py needs: read an object's attributes and
content without changing it (IPC_STAT, GETALL, msgrcv MSG_COPY), create one
(with the id chosen through the ipc namespace's next_id sysctls) and give it
its owner and mode back (IPC_SET).
"""
from __future__ import annotations

import ctypes
import errno
import os

from linuxcr.sys.syscalls import libc

IPC_CREAT, IPC_EXCL, IPC_NOWAIT = 0o1000, 0o2000, 0o4000
IPC_RMID, IPC_SET, IPC_STAT = 0, 1, 2
SHM_LOCK, SHM_UNLOCK = 11, 12
SHM_RDONLY, SHM_EXEC = 0o10000, 0o100000
SHM_DEST, SHM_LOCKED = 0o1000, 0o2000          # in shm_perm.mode
GETPID, GETVAL, GETALL, GETNCNT, GETZCNT, SETVAL, SETALL = 11, 12, 13, 14, 15, 16, 17
MSG_NOERROR, MSG_COPY = 0o10000, 0o40000
SEM_UNDO = 0x1000
MSGMAX_READ = 1 << 20         # the largest message we read (msgmax is 8 KiB by default)


class IpcPerm(ctypes.Structure):
    _fields_ = [("key", ctypes.c_int), ("uid", ctypes.c_uint), ("gid", ctypes.c_uint),
                ("cuid", ctypes.c_uint), ("cgid", ctypes.c_uint), ("mode", ctypes.c_ushort),
                ("pad1", ctypes.c_ushort), ("seq", ctypes.c_ushort), ("pad2", ctypes.c_ushort),
                ("unused1", ctypes.c_ulong), ("unused2", ctypes.c_ulong)]


class ShmidDs(ctypes.Structure):
    _fields_ = [("perm", IpcPerm), ("segsz", ctypes.c_size_t), ("atime", ctypes.c_long),
                ("dtime", ctypes.c_long), ("ctime", ctypes.c_long), ("cpid", ctypes.c_int),
                ("lpid", ctypes.c_int), ("nattch", ctypes.c_ulong), ("u4", ctypes.c_ulong),
                ("u5", ctypes.c_ulong)]


class SemidDs(ctypes.Structure):
    _fields_ = [("perm", IpcPerm), ("otime", ctypes.c_long), ("u1", ctypes.c_ulong),
                ("ctime", ctypes.c_long), ("u2", ctypes.c_ulong), ("nsems", ctypes.c_ulong),
                ("u3", ctypes.c_ulong), ("u4", ctypes.c_ulong)]


class MsqidDs(ctypes.Structure):
    _fields_ = [("perm", IpcPerm), ("stime", ctypes.c_long), ("rtime", ctypes.c_long),
                ("ctime", ctypes.c_long), ("cbytes", ctypes.c_ulong), ("qnum", ctypes.c_ulong),
                ("qbytes", ctypes.c_ulong), ("lspid", ctypes.c_int), ("lrpid", ctypes.c_int),
                ("u4", ctypes.c_ulong), ("u5", ctypes.c_ulong)]


class SemBuf(ctypes.Structure):
    _fields_ = [("num", ctypes.c_ushort), ("op", ctypes.c_short), ("flg", ctypes.c_short)]


libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
libc.msgrcv.restype = ctypes.c_ssize_t
libc.msgrcv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long, ctypes.c_int]
libc.msgsnd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _ok(ret: int) -> int:
    if ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def setns(fd: int, nstype: int = 0) -> None:
    _ok(libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)))


MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MOUNT_FLAGS = {"ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _ok(libc.mount(os.fsencode(source), os.fsencode(target),
                   None if fstype is None else fstype.encode(), ctypes.c_ulong(flags),
                   None if not data else data.encode()))


def setdomainname(name: bytes) -> None:
    """The syscall: /proc/sys/kernel/domainname is root's file even inside a
    user namespace, where CAP_SYS_ADMIN suffices for the call."""
    _ok(libc.setdomainname(name, ctypes.c_size_t(len(name))))


# --- shared memory -------------------------------------------------------------

def shm_stat(shmid: int) -> ShmidDs:
    ds = ShmidDs()
    _ok(libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(IPC_STAT), ctypes.byref(ds)))
    return ds


def shm_read(shmid: int, size: int) -> bytes:
    """The segment's bytes, through a read-only attach of our own."""
    addr = libc.shmat(shmid, None, SHM_RDONLY)
    if addr in (None, ctypes.c_void_p(-1).value):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    try:
        return ctypes.string_at(addr, size)
    finally:
        libc.shmdt(ctypes.c_void_p(addr))


def shm_write(shmid: int, pieces: list[tuple[int, bytes]]) -> None:
    addr = libc.shmat(shmid, None, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    try:
        for off, data in pieces:
            ctypes.memmove(addr + off, data, len(data))
    finally:
        libc.shmdt(ctypes.c_void_p(addr))


def shm_get(key: int, size: int, flags: int) -> int:
    return _ok(libc.shmget(ctypes.c_int(key), ctypes.c_size_t(size), ctypes.c_int(flags)))


def shm_set(shmid: int, uid: int, gid: int, mode: int) -> None:
    ds = shm_stat(shmid)
    ds.perm.uid, ds.perm.gid, ds.perm.mode = uid, gid, mode
    _ok(libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(IPC_SET), ctypes.byref(ds)))


def shm_ctl(shmid: int, cmd: int) -> None:
    _ok(libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(cmd), None))


# --- semaphores ----------------------------------------------------------------

def sem_stat(semid: int) -> SemidDs:
    ds = SemidDs()
    _ok(libc.semctl(ctypes.c_int(semid), ctypes.c_int(0), ctypes.c_int(IPC_STAT), ctypes.byref(ds)))
    return ds


def sem_values(semid: int, nsems: int) -> list[int]:
    arr = (ctypes.c_ushort * max(nsems, 1))()
    _ok(libc.semctl(ctypes.c_int(semid), ctypes.c_int(0), ctypes.c_int(GETALL), arr))
    return list(arr[:nsems])


def sem_pids(semid: int, nsems: int) -> list[int]:
    """The pid of the last semop on each semaphore (GETPID)."""
    return [_ok(libc.semctl(ctypes.c_int(semid), ctypes.c_int(i), ctypes.c_int(GETPID)))
            for i in range(nsems)]


def sem_get(key: int, nsems: int, flags: int) -> int:
    return _ok(libc.semget(ctypes.c_int(key), ctypes.c_int(nsems), ctypes.c_int(flags)))


def sem_setall(semid: int, values: list[int]) -> None:
    arr = (ctypes.c_ushort * max(len(values), 1))(*values)
    _ok(libc.semctl(ctypes.c_int(semid), ctypes.c_int(0), ctypes.c_int(SETALL), arr))


def sem_set(semid: int, uid: int, gid: int, mode: int) -> None:
    ds = sem_stat(semid)
    ds.perm.uid, ds.perm.gid, ds.perm.mode = uid, gid, mode
    _ok(libc.semctl(ctypes.c_int(semid), ctypes.c_int(0), ctypes.c_int(IPC_SET), ctypes.byref(ds)))


def sem_rm(semid: int) -> None:
    _ok(libc.semctl(ctypes.c_int(semid), ctypes.c_int(0), ctypes.c_int(IPC_RMID)))


# --- message queues ---------------------------------------------------------------

def msg_stat(msqid: int) -> MsqidDs:
    ds = MsqidDs()
    _ok(libc.msgctl(ctypes.c_int(msqid), ctypes.c_int(IPC_STAT), ctypes.byref(ds)))
    return ds


def msg_peek(msqid: int, count: int) -> list[tuple[int, bytes]]:
    """Every queued message (type, text), oldest first, left in the queue
    (MSG_COPY reads the message at an index without taking it)."""
    buf = ctypes.create_string_buffer(8 + MSGMAX_READ)
    out = []
    for i in range(count):
        n = libc.msgrcv(msqid, buf, MSGMAX_READ, i, IPC_NOWAIT | MSG_COPY | MSG_NOERROR)
        if n < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        mtype = ctypes.c_long.from_buffer(buf).value
        out.append((mtype, buf.raw[8:8 + n]))
    return out


def msg_drain(msqid: int) -> int:
    """Take every queued message out (thrown away); how many there were."""
    buf = ctypes.create_string_buffer(8 + MSGMAX_READ)
    n = 0
    while libc.msgrcv(msqid, buf, MSGMAX_READ, 0, IPC_NOWAIT | MSG_NOERROR) >= 0:
        n += 1
    e = ctypes.get_errno()
    if e != errno.ENOMSG:
        raise OSError(e, os.strerror(e))
    return n


def msg_get(key: int, flags: int) -> int:
    return _ok(libc.msgget(ctypes.c_int(key), ctypes.c_int(flags)))


def msg_send(msqid: int, mtype: int, text: bytes) -> None:
    buf = ctypes.create_string_buffer(8 + len(text))
    ctypes.c_long.from_buffer(buf).value = mtype
    ctypes.memmove(ctypes.addressof(buf) + 8, text, len(text))
    _ok(libc.msgsnd(msqid, buf, len(text), IPC_NOWAIT))


def msg_set(msqid: int, uid: int, gid: int, mode: int, qbytes: int) -> None:
    ds = msg_stat(msqid)
    ds.perm.uid, ds.perm.gid, ds.perm.mode, ds.qbytes = uid, gid, mode, qbytes
    _ok(libc.msgctl(ctypes.c_int(msqid), ctypes.c_int(IPC_SET), ctypes.byref(ds)))


def msg_rm(msqid: int) -> None:
    _ok(libc.msgctl(ctypes.c_int(msqid), ctypes.c_int(IPC_RMID), None))
