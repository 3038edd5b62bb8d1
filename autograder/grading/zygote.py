"""What runs *inside* the bubblewrap sandbox: the kernel launcher and the zygote.

Both start as the first process of a sandbox and run only trusted code until a kernel
starts:

1. drop privileges (when the grader runs as root, bwrap keeps CAP_SETUID/SETGID/SETPCAP
   for this step only: the process switches to an unprivileged uid, empties its bounding
   set and clears every capability set, so ``CapInh/CapPrm/CapEff/CapBnd/CapAmb`` are 0);
2. import the heavy modules (NumPy, PyTorch, matplotlib, the course's checks, ipykernel),
   so the checks capture their trusted references before any student code exists;
3. apply the resource limits (address space, CPU time, processes, file size, open files).

``kernel_main`` then runs one IPython kernel (one sandbox per kernel). ``zygote_main`` is a
fork server: one sandbox per worker, and for each notebook a forked child that moves into
fresh user, mount, PID and IPC namespaces of its own (a private ``/tmp``, only its own
kernel directory visible and writable, PID 1 of its own PID namespace so that everything
it starts dies with it), drops every capability, applies the limits and becomes the
kernel. Forking a warmed-up interpreter saves the 2 to 3 CPU-seconds that starting Python
and importing PyTorch costs per notebook.

Only the standard library is imported at module level.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import sys

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 63


def clear_capabilities() -> None:
    """Empty the bounding and ambient sets, then the effective, permitted and inheritable sets."""
    for cap in range(_last_cap() + 1):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # fails harmlessly without CAP_SETPCAP
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _check(_libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), (_CapData * 2)()), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with no capabilities (used when the grader runs as root)."""
    for cap in range(_last_cap() + 1):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    clear_capabilities()


def preload(modules: list[str]) -> None:
    """Import the modules every notebook needs (trusted code, before any student code)."""
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001  (a chapter without torch still grades)
                print(f"preload: cannot import {name}: {exc}", file=sys.stderr)
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # noqa: BLE001
        pass


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def apply_limits(limits: dict) -> None:
    """Resource limits of a kernel; the address-space cap comes on top of what is loaded already."""
    mb = 1024 * 1024

    def setlimit(which: int, value: int) -> None:
        soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))

    setlimit(resource.RLIMIT_CORE, 0)
    if limits.get("memory_mb"):
        setlimit(resource.RLIMIT_AS, _vm_size() + limits["memory_mb"] * mb)
    if limits.get("cpu_seconds"):
        used = resource.getrusage(resource.RUSAGE_SELF)
        setlimit(resource.RLIMIT_CPU, int(used.ru_utime + used.ru_stime) + limits["cpu_seconds"])
    if limits.get("processes"):
        setlimit(resource.RLIMIT_NPROC, limits["processes"])
    if limits.get("file_mb"):
        setlimit(resource.RLIMIT_FSIZE, limits["file_mb"] * mb)
    if limits.get("open_files"):
        setlimit(resource.RLIMIT_NOFILE, limits["open_files"])


def _redirect_stdio(log_path: str | None) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    target = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_path else devnull
    os.dup2(target, 1)
    os.dup2(target, 2)


def set_environment(env: dict[str, str]) -> None:
    """Make ``env`` the whole environment, and read this notebook's hidden-test salt from it.

    The checks were preloaded before this kernel's student existed, so their salt is read
    again here, in trusted code, before any student code runs.
    """
    os.environ.clear()
    os.environ.update(env)
    seeding = sys.modules.get("autograder.checks.seeding")
    if seeding is not None:
        seeding.load_salt()


def run_kernel(spec: dict) -> None:
    """Become an IPython kernel (never returns)."""
    os.chdir(spec["cwd"])
    set_environment(spec["env"])
    for d in ("/tmp/home", "/tmp/matplotlib", "/tmp/ipython"):
        os.makedirs(d, exist_ok=True)
    sys.argv = ["ipykernel_launcher", *spec["argv"]]
    if sys.path and sys.path[0] in ("", "."):
        del sys.path[0]
    code = 0
    try:
        from ipykernel.kernelapp import IPKernelApp

        IPKernelApp.launch_instance(argv=spec["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def kernel_main(config: dict, spec: dict) -> None:
    """One sandbox per kernel ("fresh" mode): drop privileges, preload, limit, run the kernel."""
    if config.get("drop_privileges"):
        drop_privileges(config["uid"], config["gid"])
    else:
        clear_capabilities()
    os.environ.update(config["env"])
    preload(config["preload"])
    _redirect_stdio(spec.get("log"))
    apply_limits(config["limits"])
    run_kernel(spec)


# ---------------------------------------------------------------------------------------
# The zygote


def _python_dirs_under_tmp() -> list[str]:
    """The interpreter, virtual environment and course package directories that live under /tmp."""
    import autograder

    dirs = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(autograder.__file__))}
    return sorted(d for d in dirs if (d.rstrip("/") + "/").startswith("/tmp/"))


def _isolate(worker_dir: str, kernel_dir: str, limits: dict) -> None:
    """In a forked child: new user/mount/PID/IPC namespaces where only ``kernel_dir`` is visible."""
    uid, gid = os.getuid(), os.getgid()
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # a process that changed uid must be dumpable to write its maps
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    keep = os.open(kernel_dir, os.O_PATH | os.O_DIRECTORY)  # reachable after /tmp is replaced
    # A checkout or venv under /tmp (a CI clone, say) must stay visible over the private /tmp.
    python_dirs = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in _python_dirs_under_tmp()]
    tmp_size = f"size={int(limits.get('tmp_mb') or 256)}m"
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,{tmp_size}")
    for path, fd in python_dirs:
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,{tmp_size}")
    under_tmp = (worker_dir.rstrip("/") + "/").startswith("/tmp/")
    if not under_tmp:  # hide the other kernels' directories
        _mount("tmpfs", worker_dir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
    os.makedirs(kernel_dir, exist_ok=True)
    _mount(f"/proc/self/fd/{keep}", kernel_dir, None, MS_BIND | MS_REC)
    os.close(keep)
    if not under_tmp:
        _mount(None, worker_dir, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _child(spec: dict, config: dict, parent_fds: list[int]) -> None:
    """The forked child: isolate, fork the kernel as PID 1 of a new PID namespace, wait for it."""
    try:
        for fd in parent_fds:
            os.close(fd)
        os.setsid()
        _redirect_stdio(spec.get("log"))
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # nothing of the zygote's leaks in
        _isolate(config["worker_dir"], spec["dir"], config["limits"])
        kernel = os.fork()
        if kernel == 0:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            clear_capabilities()
            apply_limits(config["limits"])
            run_kernel(spec)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: os.kill(kernel, s))
        while True:
            try:
                _, status = os.waitpid(kernel, 0)
                break
            except InterruptedError:
                continue
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        os._exit(121)


def zygote_main(config: dict) -> None:
    """Serve ``spawn``/``kill`` requests (JSON lines on stdin); report ``spawned``/``exited`` on stdout."""
    if config.get("drop_privileges"):
        drop_privileges(config["uid"], config["gid"])
    else:
        clear_capabilities()
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # kernels of the same uid cannot ptrace or read the zygote
    os.environ.update(config["env"])
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    proto_in = sys.stdin.buffer
    os.dup2(2, 1)  # anything imported that prints goes to the log, not into the protocol
    preload(config["preload"])
    os.makedirs("/tmp/matplotlib", exist_ok=True)

    def send(msg: dict) -> None:
        proto_out.write(json.dumps(msg) + "\n")

    children: dict[int, str] = {}
    send({"op": "ready", "pid": os.getpid(), "vm": _vm_size()})
    buf = b""
    fds = [proto_in.fileno(), proto_out.fileno()]
    while True:
        ready, _, _ = select.select([proto_in.fileno()], [], [], 0.05)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            kid = children.pop(pid, None)
            if kid is not None:
                send({"op": "exited", "id": kid, "status": os.waitstatus_to_exitcode(status)})
        if not ready:
            continue
        chunk = os.read(proto_in.fileno(), 65536)
        if not chunk:
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            os._exit(0)
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            if msg["op"] == "spawn":
                pid = os.fork()
                if pid == 0:
                    _child(msg, config, fds)
                children[pid] = msg["id"]
                send({"op": "spawned", "id": msg["id"], "pid": pid})
            elif msg["op"] == "probe":
                pid = os.fork()
                if pid == 0:
                    try:
                        for fd in fds:
                            os.close(fd)
                        _isolate(config["worker_dir"], msg["dir"], config["limits"])
                        os._exit(0)
                    except BaseException as exc:  # noqa: BLE001
                        print(f"probe: {exc}", file=sys.stderr)
                        os._exit(1)
                children[pid] = msg["id"]
            elif msg["op"] == "kill":
                for pid, kid in list(children.items()):
                    if kid == msg["id"]:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            elif msg["op"] == "exit":
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
                os._exit(0)


def main() -> None:
    """``python -I .../zygote.py MODE CONFIG [SPEC]`` (run as a script: no package import as root)."""
    mode, config = sys.argv[1], json.loads(sys.argv[2])
    if mode == "zygote":
        zygote_main(config)
    else:
        kernel_main(config, json.loads(sys.argv[3]))


if __name__ == "__main__":
    main()
