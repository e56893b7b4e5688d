"""Per-task isolation for a forked child of the warm interpreter (Linux, Python 3.6+).

The zygote runs in a bubblewrap sandbox S that keeps CAP_SYS_ADMIN and CAP_NET_ADMIN (as
root also CAP_SETUID, CAP_SETGID, CAP_KILL). Each forked child C calls isolate(): C makes
new mount, PID, IPC and network namespaces, covers `hidden_paths` with empty tmpfs of its
own, binds the task folder (rw) and `keep` folders (ro) back, and forks G, PID 1 of the new
PID namespace. G mounts its own /proc, then drops every privilege for good: as root, to
task_uid/task_gid; always, into a user namespace of its own that may make no further user
namespaces, with no capabilities at all. isolate() returns only in the task. C never
returns: it reports the task's pid, waits, reports its status and exits. Every step fails
closed: the task's code never runs, C reports status 125 (FAILED) and why.
"""
import ctypes, fcntl, os, signal, socket, struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
FAILED = 125  # exit code of a task whose isolation failed (its code never ran)


def _ok(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def _b(s):
    return None if s is None else os.fsencode(s)


def unshare(flags):
    _ok(_libc.unshare(flags), "unshare(%#x)" % flags)


def mount(source, target, fstype, flags, data=None):
    _ok(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount %s" % target)


def prctl(option, arg):
    _ok(_libc.prctl(option, arg, 0, 0, 0), "prctl(%d)" % option)


def _write(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _loopback_up():
    # A new network namespace has `lo` down: SIOCSIFFLAGS with IFF_UP | IFF_RUNNING.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH22x", b"lo", 0x1 | 0x40))


def _drop_everything(uid, gid):
    """G's last step: a user namespace of its own, mapping only uid/gid to themselves (so
    no capability over the mount, PID or network namespace it lives in), where no further
    user namespace may be made; then no capabilities at all, even in it."""
    unshare(CLONE_NEWUSER)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", "%d %d 1\n" % (uid, uid))
    _write("/proc/self/gid_map", "%d %d 1\n" % (gid, gid))
    _write("/proc/sys/user/max_user_namespaces", "0")  # a limit of this user namespace
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:
            _ok(-1, "PR_CAPBSET_DROP %d" % cap)
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    _ok(_libc.capset(header, bytes(24)), "capset")
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    with open("/proc/self/status") as f:
        status = f.read()
    if "CapPrm:\t0000000000000000" not in status or "CapEff:\t0000000000000000" not in status:
        raise OSError(1, "capabilities left")


def _exit_code(status):
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _report_and_exit(on_exit, status, message):
    try:
        if on_exit:
            on_exit(status, message)
    finally:
        os._exit(_exit_code(status))


def isolate(task_dir, hidden_paths, task_uid=None, task_gid=None, keep=(), close_fds=(),
            on_pid=None, on_exit=None, init=True, new_net=True, tmpfs_size="256m"):
    """Call in the zygote's forked child C (single-threaded, after setsid). Returns only in
    the task, whose cwd is then task_dir.

    task_dir: the task's folder (under a hidden path), bound back read-write.
    hidden_paths: folders each covered, in order, by an empty tmpfs of the task's own
        (missing ones made first): the work root, the socket folder, /tmp, /dev/shm.
    task_uid, task_gid: ids to run as when the zygote is root; None when it is not (the
        task keeps its uid). As root, task_dir must belong to task_uid.
    keep: folders under hidden paths bound back read-only (report plugin, environments).
    close_fds: fds the task must not have (the node's connection: C keeps it).
    on_pid(pid): in C, the task's PID 1 as the zygote sees it; SIGKILL it to end the task
        and everything it started.
    on_exit(status, message): in C, the wait status of the task's PID 1 (FAILED << 8 if
        isolation failed, message then says why); then C exits.
    init: G stays as a reaping init and the task runs as its child (pid 2), so that it
        keeps the default signal actions that PID 1 does not have (costs one fork).
    new_net: a network namespace of its own, with `lo` up.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote ignores it: waitpid needs it
    umask = os.umask(0o022)  # folders made here must be reachable by the task
    step = "start"
    try:
        r, w = os.pipe()  # G -> C: why isolation failed; closed empty when the task starts
        step = "unshare"
        unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | (CLONE_NEWNET if new_net else 0))
        if new_net:
            step = "loopback"
            _loopback_up()
        step = "mounts"
        mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates to or from S
        # Handles on what is bound back, taken before it is hidden and in the new mount
        # namespace (a bind from a mount of another namespace fails with EINVAL).
        binds = [(task_dir, os.open(task_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW), True)]
        binds += [(path, os.open(path, os.O_PATH | os.O_DIRECTORY), False) for path in keep]
        for path in hidden_paths:
            if not os.path.isdir(path):
                os.makedirs(path, 0o755)
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=" + tmpfs_size)
        for path, fd, writable in binds:
            if not os.path.isdir(path):
                os.makedirs(path, 0o755)
            mount("/proc/self/fd/%d" % fd, path, None, MS_BIND | MS_REC)
            os.close(fd)
            flags = os.statvfs(path).f_flag
            if not writable and not flags & MS_RDONLY:
                mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY
                      | (flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC)))
        os.chdir("/")  # the inherited cwd (the socket folder) would stay reachable
        step = "fork"
        pid = os.fork()
    except BaseException as e:
        _report_and_exit(on_exit, FAILED << 8, "isolation failed in C at %s: %s" % (step, e))

    if pid:  # C: stays in S with its powers; only reports, waits, reports.
        try:
            os.close(w)
            if on_pid:
                on_pid(pid)
            message = b""
            piece = os.read(r, 4096)
            while piece:
                message += piece
                piece = os.read(r, 4096)
            status = os.waitpid(pid, 0)[1]
        except BaseException as e:  # e.g. the node went away: end the task, never return
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status, message = FAILED << 8, ("C failed: %s" % e).encode()
        _report_and_exit(on_exit, status, message.decode("utf-8", "replace"))

    try:  # G: PID 1 of the new PID namespace.
        step = "G setup"
        os.close(r)
        for fd in close_fds:
            os.close(fd)
        step = "mount /proc"  # before the user namespace: it needs CAP_SYS_ADMIN over
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # the PID ns
        if task_uid is not None:
            step = "setuid"
            os.setgroups([])
            os.setresgid(task_gid, task_gid, task_gid)
            os.setresuid(task_uid, task_uid, task_uid)  # clears all capabilities
            prctl(PR_SET_DUMPABLE, 1)  # else /proc/self/* stay root's: uid_map unwritable
        step = "user namespace"
        _drop_everything(os.getuid(), os.getgid())
        step = "finish"
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the last change of credentials
        os.chdir(task_dir)
        os.umask(umask)
        task = os.fork() if init else 0
        os.close(w)
        if task == 0:
            return  # the task: G itself, or G's child H
    except BaseException as e:
        try:
            os.write(w, ("isolation failed in G at %s: %s" % (step, e)).encode())
        finally:
            os._exit(FAILED)
    while True:  # G as init: reap everything; exit as the task did (the kernel then kills
        pid, status = os.wait()  # whatever is left in the namespace)
        if pid == task:
            os._exit(_exit_code(status))
