"""The sandbox's launcher: the first process of a :func:`pktjax.sandbox.run`, started as
``python -I -S sandbox_launcher.py <json>`` by its path (so it imports only the standard library, never pktjax).

It enters the namespaces the machine allows (mount, IPC, user, PID, network), forks an init process that sets
up private tmp dirs, a read-only root and a fresh /proc, applies the resource limits, drops to the run's uid and
executes the program; without a PID namespace it kills every descendant it inherits. Every failure is reported
on the status pipe (``C["status_fd"]``) as ``error ...``; the host reads it (:func:`pktjax.sandbox._pump`).
"""

import ctypes
import json
import os
import resource
import signal
import sys

libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18


def report(line):
    try:
        os.write(ST, (line + "\n").encode())
    except OSError:
        pass


def die(msg):
    report("error " + msg.replace("\n", " "))
    os._exit(125)


def prctl(opt, arg):
    libc.prctl(ctypes.c_int(opt), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def unshare(flags):
    if libc.unshare(ctypes.c_int(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "mount %s: %s" % (dst, os.strerror(e)))

class MountAttr(ctypes.Structure):
    _fields_ = [("set", ctypes.c_uint64), ("clr", ctypes.c_uint64), ("prop", ctypes.c_uint64), ("fd", ctypes.c_uint64)]


def set_readonly(path, on, recursive):
    attr = MountAttr(1 if on else 0, 0 if on else 1, 0, 0)
    flags = 0x8000 if recursive else 0
    if libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), path.encode(), ctypes.c_uint(flags),
                    ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "mount_setattr %s: %s" % (path, os.strerror(e)))


def enter_namespaces():
    """Unshare what the machine allows; returns the list of namespaces entered."""
    root = os.geteuid() == 0
    uid, gid = os.geteuid(), os.getegid()
    user = 0 if root else NEWUSER
    for flags, names in ((NEWNET | NEWPID | NEWNS | NEWIPC, ["net", "pid", "mount", "ipc"]), (NEWNET, ["net"])):
        try:
            unshare(flags | user)
        except OSError:
            continue
        if not root:  # the program runs as "nobody" inside, so its exec drops every capability
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write("65534 %d 1" % uid)
            with open("/proc/self/gid_map", "w") as f:
                f.write("65534 %d 1" % gid)
            names = names + ["user"]
        if "net" in names:
            C["env"]["PKTJAX_SANDBOX_NET"] = "namespace"
        return names
    return []


def setup_mounts(ns):
    """Private tmp dirs, the work dir bound back in, a read-only root (user namespace) and a fresh /proc."""
    wd = C["workdir"]
    wd_fd = os.open(wd, os.O_RDONLY | os.O_DIRECTORY)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    done = []
    if "user" in ns:
        try:
            set_readonly("/", True, True)
            done.append("ro-root")
        except OSError:
            pass
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(d) and not os.path.islink(d):
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,mode=1777" % C["tmpfs_mb"])
    done.append("private-tmp")
    st = os.fstat(wd_fd)
    try:
        same = os.stat(wd).st_ino == st.st_ino and os.stat(wd).st_dev == st.st_dev
    except OSError:
        same = False
    if not same or "user" in ns:
        os.makedirs(wd, exist_ok=True)
        mount("/proc/self/fd/%d" % wd_fd, wd, None, MS_BIND)
        if "ro-root" in done:
            set_readonly(wd, False, False)
    os.close(wd_fd)
    if "pid" in ns:
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            done.append("own-proc")
        except OSError:
            pass
    return done


def exec_program():
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with init
    for name, soft, hard in C["limits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.chdir(C["workdir"])
    if C["uid"] is not None:
        os.setgroups([])
        os.setgid(C["gid"])
        os.setuid(C["uid"])
    elif "user" in C["ns"]:
        os.setgid(65534)
        os.setuid(65534)
    prctl(38, 1)  # PR_SET_NO_NEW_PRIVS
    os.umask(0o077)
    if C["stdin"]:
        fd = os.open(C["stdin"], os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)
    os.closerange(3, 65536)
    os.execve(C["argv"][0], C["argv"], C["env"])


def run_init(ns):
    prctl(1, signal.SIGKILL)
    if "pid" not in ns:
        prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: orphans of the program come back here
    features = []
    if "mount" in ns:
        try:
            features = setup_mounts(ns)
        except OSError as e:
            die(str(e))
    report("isolation " + ",".join(["ns:" + n for n in ns] + features))
    try:
        prog = os.fork()
    except OSError as e:
        die("fork: %s" % e)
    if prog == 0:
        try:
            exec_program()
        except BaseException as e:
            die("exec: %r" % (e,))
    status = None
    while True:
        try:
            pid, st, ru = os.wait4(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == prog:
            cpu = ru.ru_utime + ru.ru_stime
            if os.WIFSIGNALED(st):
                report("signal %d %.3f" % (os.WTERMSIG(st), cpu))
            else:
                report("exit %d %.3f" % (os.WEXITSTATUS(st), cpu))
            break
    if "pid" not in ns:
        kill_children()
    os._exit(0)


def kill_children():
    """Without a pid namespace: SIGKILL every descendant that was re-parented here, until none is left."""
    me = str(os.getpid())
    for _ in range(200):
        kids = []
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    with open("/proc/%s/stat" % p) as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if fields[1] == me:
                    kids.append(int(p))
        if not kids:
            return
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


def main():
    prctl(1, signal.SIGKILL)
    if os.getppid() != C["host_pid"]:
        os._exit(125)
    ns = enter_namespaces() if C["namespaces"] else []
    C["ns"] = ns
    try:
        init = os.fork()
    except OSError as e:
        die("fork: %s" % e)
    if init == 0:
        run_init(ns)
    while True:
        try:
            os.waitpid(init, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            break
    os._exit(0)


if __name__ == "__main__":
    C = json.loads(sys.argv[1])  # the run's settings, from pktjax.sandbox._run_in
    ST = C["status_fd"]
    main()
