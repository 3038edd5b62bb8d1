"""Run the kernels of student notebooks in a bubblewrap sandbox (the grader's side).

Every kernel runs under ``bwrap`` with ``--cap-drop ALL``, in new PID, network, IPC and UTS
namespaces (no network at all: the kernel talks to the grader over IPC sockets in its own
directory), on a read-only view of the system and of the Python installation, with a
private ``/tmp``, and with nothing of the course directory, the gradebook, ``solutions/``,
the source notebooks or other students in view: the one writable directory is a scratch
copy of the student's own folder. Limits: address space, CPU time, processes, file size,
open files (see :class:`Limits`); the per-cell timeout and the output cap are enforced by
the grader (:mod:`autograder.grading.execute`).

Two ways to start kernels (``--kernel-start``):

* ``fork`` (default when the kernel allows it): one sandbox per worker runs a fork server
  (:func:`autograder.grading.zygote.zygote_main`) that has imported NumPy, PyTorch and the
  checks once; each notebook gets a forked child in fresh user, mount, PID and IPC
  namespaces of its own, so students never share ``/tmp``, files or processes.
* ``fresh``: one ``bwrap`` per kernel. Slower (Python and PyTorch start for every
  notebook); used where nested user namespaces are not allowed.

When the grader runs as root, bwrap is given ``CAP_SETUID``/``CAP_SETGID``/``CAP_SETPCAP`` on
top of ``--cap-drop ALL`` for the launcher's first step only: it switches to an unprivileged
uid (so the process limit applies; root is exempt from it) and clears every capability set
before importing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import autograder

ZYGOTE_SCRIPT = Path(__file__).resolve().parent / "grading" / "zygote.py"
UID_BASE = 61000  # sandbox uids when the grader runs as root: UID_BASE + worker index
PRELOAD = ["numpy", "torch", "matplotlib", "matplotlib.pyplot", "autograder", "ipykernel.kernelapp"]
INSTALL_HINT = (
    "bubblewrap (bwrap) is required to grade untrusted notebooks in a sandbox, and it is not installed.\n"
    "  Install it:  sudo apt-get install -y bubblewrap   (Debian/Ubuntu)\n"
    "               sudo dnf install -y bubblewrap       (Fedora/RHEL)\n"
    "  or, only for notebooks you trust, grade without a sandbox: --no-sandbox"
)


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run here; the message says how to fix it or opt out."""


@dataclass(frozen=True)
class Limits:
    """Per-kernel limits. ``memory_mb`` is address space on top of the preloaded libraries."""

    cell_timeout: int = 60
    memory_mb: int = 4096
    cpu_seconds: int = 900
    processes: int = 128
    file_mb: int = 64
    open_files: int = 1024
    tmp_mb: int = 256
    output_kb: int = 1024
    copy_mb: int = 200

    def to_dict(self) -> dict:
        return asdict(self)


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def require_sandbox() -> str:
    """The path of ``bwrap``, or ``SandboxUnavailable`` saying how to install it or opt out."""
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(
            f"the sandbox needs Linux (bubblewrap); this is {sys.platform}. "
            "Grade on Linux, or, only for notebooks you trust, pass --no-sandbox."
        )
    path = bwrap_path()
    if path is None:
        raise SandboxUnavailable(INSTALL_HINT)
    probe = subprocess.run(
        [path, *_namespace_args(), "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        raise SandboxUnavailable(
            f"bubblewrap is installed but cannot create a sandbox here: {probe.stderr.strip()}\n"
            "  Unprivileged user namespaces may be disabled (sysctl kernel.unprivileged_userns_clone=1, or "
            "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu 24.04), or run the grader as root.\n"
            "  Only for notebooks you trust: --no-sandbox"
        )
    return path


def _namespace_args() -> list[str]:
    args = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() != 0:
        args.insert(0, "--unshare-user")
    return args


def _system_binds() -> list[str]:
    """Read-only view of the system: /usr, the /bin and /lib links, a few files of /etc."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for etc in (
        "/etc/ld.so.cache",
        "/etc/ld.so.conf",
        "/etc/ld.so.conf.d",
        "/etc/alternatives",
        "/etc/localtime",
        "/etc/passwd",
        "/etc/group",
        "/etc/nsswitch.conf",
        "/etc/ssl",
        "/etc/ca-certificates",
        "/etc/fonts",
        "/etc/mime.types",
    ):
        args += ["--ro-bind-try", etc, etc]
    return args


def _python_paths() -> list[str]:
    """The interpreter, the environment and the installed ``autograder`` package (not the repository)."""
    paths = []
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        paths.append(os.path.realpath(p))
    exe = sys.executable
    while os.path.islink(exe):
        exe = os.path.join(os.path.dirname(exe), os.readlink(exe))
        paths.append(os.path.dirname(os.path.realpath(exe)))
    pkg = str(Path(autograder.__file__).resolve().parent)
    paths.append(pkg)
    unique: list[str] = []
    for p in sorted(set(paths), key=len):
        if p.startswith("/usr/") or p == "/usr":
            continue
        if not any(p == u or p.startswith(u + "/") for u in unique):
            unique.append(p)
    return unique


def kernel_env(figures: bool = False) -> dict[str, str]:
    """The kernel's whole environment. Without ``figures``, matplotlib draws nothing (the Agg
    backend: ``plt.show()`` does nothing), which saves most of a notebook's CPU time."""
    return {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp/home",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline" if figures else "agg",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        "IPYTHONDIR": "/tmp/ipython",
        "JUPYTER_PLATFORM_DIRS": "1",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "TORCH_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "NBGRADER_EXECUTION": "autograde",
    }


class Sandbox:
    """The sandbox of one grading worker: its scratch directory, its uid and (fork mode) its zygote."""

    def __init__(self, root: Path, limits: Limits, index: int = 0, mode: str = "auto", figures: bool = False):
        self.root = Path(root)
        self.figures = figures
        self.limits = limits
        self.index = index
        self.mode = mode
        self.bwrap = require_sandbox()
        self.as_root = os.geteuid() == 0
        self.uid = UID_BASE + index if self.as_root else os.getuid()
        self.gid = UID_BASE + index if self.as_root else os.getgid()
        self.fallback_reason = ""
        self.kernel_extra: dict[str, str] = {}  # per notebook: the hidden tests' salt
        self._zygote: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._exited: dict[str, int] = {}
        self._spawned: dict[str, threading.Event] = {}
        self._reader: threading.Thread | None = None

    # -- directories -------------------------------------------------------------------

    def _own(self, path: Path) -> None:
        if self.as_root:
            os.chown(path, self.uid, self.gid)

    def start(self) -> Sandbox:
        self.root.mkdir(parents=True, exist_ok=True)
        self._own(self.root)
        if self.mode in ("auto", "fork"):
            try:
                self._start_zygote()
                self._probe()
                self.mode = "fork"
            except Exception as exc:  # noqa: BLE001
                self._stop_zygote()
                if self.mode == "fork":
                    raise SandboxUnavailable(f"the fork server cannot isolate kernels here: {exc}") from None
                self.fallback_reason = str(exc)
                self.mode = "fresh"
        return self

    def new_kernel_dir(self, source: str | os.PathLike | None) -> Path:
        """A scratch directory with a copy of the student's folder (no notebooks, no links) in ``work/``."""
        kdir = self.root / f"k{uuid.uuid4().hex[:8]}"
        work = kdir / "work"
        work.mkdir(parents=True)
        budget = self.limits.copy_mb * 1024 * 1024
        if source and os.path.isdir(source):
            for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
                rel = os.path.relpath(dirpath, source)
                dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)) and not d.startswith(".")]
                for name in filenames:
                    src = os.path.join(dirpath, name)
                    if name.endswith(".ipynb") or os.path.islink(src) or not os.path.isfile(src):
                        continue
                    size = os.path.getsize(src)
                    if size > budget:
                        continue
                    budget -= size
                    dst = work / rel / name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)
        for dirpath, _dirnames, filenames in os.walk(kdir):
            self._own(Path(dirpath))
            for name in filenames:
                self._own(Path(dirpath) / name)
        return kdir

    def remove_kernel_dir(self, kdir: Path) -> None:
        shutil.rmtree(kdir, ignore_errors=True)

    def kernel_env(self) -> dict[str, str]:
        """The environment of the next kernel: :func:`kernel_env` plus this notebook's ``kernel_extra``."""
        return {**kernel_env(self.figures), **self.kernel_extra}

    def close(self) -> None:
        self._stop_zygote()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- bwrap ---------------------------------------------------------------------------

    def config(self, mpl_dir: Path | None = None) -> dict:
        env = kernel_env(self.figures)
        if mpl_dir is not None:
            env["MPLCONFIGDIR"] = str(mpl_dir)
        return {
            "uid": self.uid,
            "gid": self.gid,
            "drop_privileges": self.as_root,
            "limits": self.limits.to_dict(),
            "preload": PRELOAD,
            "env": env,
            "worker_dir": str(self.root),
        }

    def seed_matplotlib(self, target: Path) -> Path:
        """Copy the grader's matplotlib font cache, so no sandbox rebuilds it (seconds each time)."""
        target.mkdir(parents=True, exist_ok=True)
        try:
            import matplotlib
            from matplotlib import font_manager  # noqa: F401  (builds the cache once if missing)

            for cached in Path(matplotlib.get_cachedir()).glob("fontlist-*.json"):
                shutil.copyfile(cached, target / cached.name)
        except Exception:  # noqa: BLE001  (no matplotlib: nothing to seed)
            pass
        for path in [target, *target.iterdir()]:
            self._own(path)
        return target

    def bwrap_argv(self, writable: list[str], command: list[str]) -> list[str]:
        argv = [self.bwrap, *_namespace_args(), "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
        if self.as_root:
            argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
        argv += ["--hostname", "sandbox", "--clearenv"]
        for key, value in kernel_env(self.figures).items():
            argv += ["--setenv", key, value]
        argv += _system_binds()
        made: set[str] = {"/", "/usr", "/tmp"}

        def parents(path: str) -> list[str]:  # bwrap would create them 0700: unreadable after dropping root
            out = []
            for parent in reversed(Path(path).parents):
                if str(parent) not in made:
                    made.add(str(parent))
                    out += ["--perms", "0755", "--dir", str(parent)]
            return out

        # The private /tmp first: a checkout or venv that lives under /tmp is bound on top of it.
        argv += ["--perms", "1777", "--size", str(self.limits.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp"]
        for path in _python_paths():
            argv += [*parents(path), "--ro-bind", path, path]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        for path in writable:
            argv += [*parents(path), "--bind", path, path]
        argv += ["--chdir", writable[0] if writable else "/tmp", "--", *command]
        return argv

    def python_command(self, mode: str, *payload: dict, mpl_dir: Path | None = None) -> list[str]:
        config = json.dumps(self.config(mpl_dir))
        return [sys.executable, "-I", str(ZYGOTE_SCRIPT), mode, config, *(json.dumps(p) for p in payload)]

    # -- fork server ---------------------------------------------------------------------

    def _start_zygote(self) -> None:
        log = open(self.root.parent / f"zygote-{self.index}.log", "ab")  # noqa: SIM115
        mpl = self.seed_matplotlib(self.root / ".matplotlib")
        argv = self.bwrap_argv([str(self.root)], self.python_command("zygote", mpl_dir=mpl))
        self._zygote = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, close_fds=True)
        log.close()
        line = self._zygote.stdout.readline()
        if not line:
            self._zygote.wait(timeout=10)
            tail = (self.root.parent / f"zygote-{self.index}.log").read_text(errors="replace")[-800:]
            raise SandboxUnavailable(f"the sandboxed fork server did not start (exit {self._zygote.returncode}):\n{tail}")
        if json.loads(line).get("op") != "ready":
            raise SandboxUnavailable(f"unexpected message from the fork server: {line!r}")
        self._exited.clear()
        self._reader = threading.Thread(target=self._read_zygote, args=(self._zygote,), daemon=True)
        self._reader.start()

    def _read_zygote(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if msg["op"] == "exited":
                    self._exited[msg["id"]] = int(msg["status"])
                if msg["op"] in ("spawned", "exited") and msg["id"] in self._spawned:
                    self._spawned[msg["id"]].set()
        with self._lock:  # the zygote is gone: so are all its kernels
            for kid, event in self._spawned.items():
                self._exited.setdefault(kid, -signal.SIGKILL)
                event.set()

    def _send(self, msg: dict) -> None:
        assert self._zygote is not None and self._zygote.stdin is not None
        self._zygote.stdin.write((json.dumps(msg) + "\n").encode())
        self._zygote.stdin.flush()

    def _probe(self) -> None:
        kdir = self.new_kernel_dir(None)
        try:
            kid = f"probe-{kdir.name}"
            with self._lock:
                self._spawned[kid] = threading.Event()
            self._send({"op": "probe", "id": kid, "dir": str(kdir)})
            deadline = time.monotonic() + 30
            while kid not in self._exited and time.monotonic() < deadline:
                time.sleep(0.01)
            status = self._exited.get(kid)
            if status != 0:
                tail = (self.root.parent / f"zygote-{self.index}.log").read_text(errors="replace").strip()[-400:]
                raise SandboxUnavailable(f"nested namespaces are not allowed here ({tail or status})")
        finally:
            self.remove_kernel_dir(kdir)

    def _stop_zygote(self) -> None:
        proc, self._zygote = self._zygote, None
        if proc is None:
            return
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def spawn(self, kid: str, kdir: Path, argv: list[str]) -> None:
        """Start a kernel in the fork server (restarting it if it died)."""
        if self._zygote is None or self._zygote.poll() is not None:
            self._stop_zygote()
            self._start_zygote()
        event = threading.Event()
        with self._lock:
            self._spawned[kid] = event
        spec = {
            "op": "spawn",
            "id": kid,
            "dir": str(kdir),
            "cwd": str(kdir / "work"),
            "argv": argv,
            "env": self.kernel_env(),
            "log": str(kdir / "kernel.log"),
        }
        self._send(spec)
        if not event.wait(30):
            raise RuntimeError("the sandbox fork server did not answer")

    def status(self, kid: str) -> int | None:
        """None while the kernel runs, else its exit status (negative: killed by that signal)."""
        with self._lock:
            return self._exited.get(kid)

    def kill(self, kid: str) -> None:
        if self.status(kid) is None and self._zygote is not None and self._zygote.poll() is None:
            try:
                self._send({"op": "kill", "id": kid})
            except OSError:
                pass

    def forget(self, kid: str) -> None:
        with self._lock:
            self._spawned.pop(kid, None)
            self._exited.pop(kid, None)


# ---------------------------------------------------------------------------------------
# jupyter_client integration: a kernel manager whose kernels live in the worker's sandbox

_ACTIVE: Sandbox | None = None


def activate(sandbox: Sandbox | None) -> None:
    """Make ``sandbox`` the one :class:`SandboxKernelManager` uses in this process."""
    global _ACTIVE
    _ACTIVE = sandbox


def active() -> Sandbox:
    if _ACTIVE is None:
        raise RuntimeError("no sandbox is active in this process")
    return _ACTIVE


def describe_exit(status: int | None) -> str:
    """Words for a kernel's exit status."""
    if status is None:
        return "it stopped (its exit status is unknown)"
    if status < 0 or status > 128:
        num = -status if status < 0 else status - 128
        try:
            name = signal.Signals(num).name
        except ValueError:
            name = f"signal {num}"
        extra = {
            "SIGSEGV": " (a segmentation fault)",
            "SIGKILL": " (killed: out of memory, or stopped by the grader)",
            "SIGXCPU": " (CPU time limit reached)",
            "SIGXFSZ": " (file size limit reached)",
            "SIGABRT": " (aborted)",
            "SIGBUS": " (bus error)",
        }.get(name, "")
        return f"it was killed by {name}{extra}"
    return f"it exited with status {status} (sys.exit, os._exit or exit() ends the kernel)"


def _kernel_classes():
    """Defined lazily so that importing this module does not import jupyter_client."""
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning import LocalProvisioner

    class _SandboxProvisionerMixin:
        kdir: Path | None = None

        async def pre_launch(self, **kwargs):
            kwargs = await super().pre_launch(**kwargs)
            sandbox = active()
            sandbox._own(Path(self.parent.connection_file))
            return kwargs

    class ForkProvisioner(_SandboxProvisionerMixin, LocalProvisioner):
        """Kernels forked by the worker's sandboxed fork server."""

        kid: str | None = None
        exit_status: int | None = None

        @property
        def has_process(self) -> bool:
            return self.kid is not None

        async def launch_kernel(self, cmd, **kwargs):
            sandbox = active()
            self.kid = self.kdir.name
            argv = cmd[cmd.index("-f") :] if "-f" in cmd else cmd[3:]
            sandbox.spawn(self.kid, self.kdir, argv)
            self.pid = None
            self.cwd = kwargs.get("cwd")
            return self.connection_info

        async def poll(self):
            if self.kid is None:
                return 0
            status = active().status(self.kid)
            if status is not None:
                self.exit_status = status
            return status

        async def wait(self):
            import asyncio

            if self.kid is None:
                return 0
            while (status := await self.poll()) is None:
                await asyncio.sleep(0.05)
            active().forget(self.kid)
            self.kid = None
            return status

        async def send_signal(self, signum: int) -> None:
            if self.kid is not None and signum in (signal.SIGKILL, signal.SIGTERM):
                active().kill(self.kid)

        async def kill(self, restart: bool = False) -> None:
            if self.kid is not None:
                active().kill(self.kid)

        async def terminate(self, restart: bool = False) -> None:
            await self.kill(restart)

    class FreshProvisioner(_SandboxProvisionerMixin, LocalProvisioner):
        """One bwrap per kernel."""

        exit_status: int | None = None

        async def launch_kernel(self, cmd, **kwargs):
            sandbox = active()
            argv = cmd[cmd.index("-f") :] if "-f" in cmd else cmd[3:]
            spec = {
                "cwd": str(self.kdir / "work"),
                "argv": argv,
                "env": sandbox.kernel_env(),
                "log": str(self.kdir / "kernel.log"),
            }
            mpl = sandbox.seed_matplotlib(self.kdir / ".matplotlib")
            wrapped = sandbox.bwrap_argv([str(self.kdir)], sandbox.python_command("kernel", spec, mpl_dir=mpl))
            kwargs.pop("cwd", None)
            kwargs["env"] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
            return await super().launch_kernel(wrapped, **kwargs)

        async def poll(self):
            status = await super().poll()
            if status is not None and self.process is not None:
                self.exit_status = status
            return status

    class SandboxKernelManager(AsyncKernelManager):
        """An IPython kernel in the active sandbox, reached over IPC sockets in its own directory."""

        kdir: Path | None = None

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.autorestart = False

        @property
        def kernel_spec(self):
            if self._kernel_spec is None:
                self._kernel_spec = KernelSpec(
                    argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    display_name="Python 3 (sandboxed)",
                    language="python",
                    interrupt_mode="message",
                    metadata={},
                )
            return self._kernel_spec

        async def _async_pre_start_kernel(self, **kw):
            sandbox = active()
            self.kernel_id = self.kernel_id or kw.pop("kernel_id", None) or str(uuid.uuid4())
            self.kdir = sandbox.new_kernel_dir(kw.pop("cwd", None))
            self.connection_file = str(self.kdir / "kernel.json")
            self.ip = str(self.kdir / "ipc")
            cls = ForkProvisioner if sandbox.mode == "fork" else FreshProvisioner
            self.provisioner = cls(kernel_id=self.kernel_id, kernel_spec=self.kernel_spec, parent=self)
            self.provisioner.kdir = self.kdir
            kw["cwd"] = str(self.kdir / "work")
            return await super()._async_pre_start_kernel(**kw)

        @property
        def exit_status(self) -> int | None:
            return getattr(self.provisioner, "exit_status", None) if self.provisioner else None

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            await super()._async_cleanup_resources(restart=restart)
            if self.kdir is not None and _ACTIVE is not None:
                _ACTIVE.remove_kernel_dir(self.kdir)
                self.kdir = None

    return SandboxKernelManager


_KM = None


def kernel_manager_class():
    """The :class:`jupyter_client.AsyncKernelManager` subclass that starts kernels in the sandbox."""
    global _KM
    if _KM is None:
        _KM = _kernel_classes()
    return _KM
