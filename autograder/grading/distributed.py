"""Grading on a Dask cluster: ``grade SUBMISSIONS --scheduler tcp://HOST:8786``.

The grading command (the *client*) discovers the submissions, prepares the course directory and
the gradebook as on one machine, then sends one Dask task per submission to the scheduler. A
task carries everything its worker needs: the submitted files' bytes (never a path: workers
need no shared folder and see no other student's files), the chapter's ``release/`` and
``source/`` notebooks, the limits and the gradebook's URL. On the worker, :func:`grade_task`
writes them into a scratch course directory of that worker process and grades them with the
one grading path there is, :meth:`autograder.grading.worker.Grader.grade` (same sandbox, same
trusted verdicts, nbgrader writing the shared gradebook), under :func:`submission_lock`, and
returns the result with the files it produced (sanitized and autograded notebooks, the
feedback page). The client writes those into ``OUT`` and writes the result file last: the
same "done" mark as on one machine, so a rerun after any crash grades only what is missing.

Faults: a worker that dies mid-task is Dask's to handle: the scheduler gives the task to
another worker, and after ``distributed.scheduler.allowed-failures`` deaths raises
``KilledWorker``, which marks the submission ``crashed`` (not retried by later runs either).
A worker that joins late gets queued tasks. When the scheduler goes away, the client waits for
it (``--scheduler-wait``), reconnects and resubmits what has no result yet.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from autograder.grading.inputs import Submission, hash_files
from autograder.grading.worker import Options, result_path, write_json_atomic
from autograder.sandbox import Limits, SandboxUnavailable

SLOT_BASE = 32  # sandbox uid offset of cluster workers (61032...), apart from the local pool's 61000 + i
AREAS = ("sanitized", "autograded", "feedback")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot grade: no scheduler, no worker, or a worker that is not fit to grade."""


class WorkerUnfit(RuntimeError):
    """Raised on a worker that cannot grade safely or identically (no sandbox, another course version...)."""


# -- the client ------------------------------------------------------------------------


def worker_args(scheduler: str, name: str) -> list[str]:
    """``dask`` arguments for one grading worker process: one thread, no memory limit, the grader preloaded."""
    return ["worker", scheduler, "--name", name, "--nthreads", "1", "--memory-limit", "0", "--no-dashboard",
            "--preload", "autograder.grading.distributed"]  # fmt: skip


def worker_config(opts: Options) -> dict:
    """What every task carries besides its submission: options and the chapters' notebooks.

    ``{"fingerprint": str, "db": url, "sandbox": bool, "kernel_start": str, "limits": {...},
    "max_notebook_mb": int, "figures": bool, "hidden_seed": str, "source_sha": {slug: sha},
    "chapters": {slug: {"release": bytes, "source": bytes}}}``
    """
    chapters = {}
    for slug in opts.source_sha:
        chapters[slug] = {
            "release": (opts.out / "release" / slug / f"{slug}.ipynb").read_bytes(),
            "source": (opts.out / "source" / slug / f"{slug}.ipynb").read_bytes(),
        }
    config = {
        "db": opts.db_url,
        "sandbox": opts.sandbox,
        "kernel_start": opts.kernel_start,
        "limits": opts.limits.to_dict(),
        "max_notebook_mb": opts.max_notebook_mb,
        "figures": opts.figures,
        "hidden_seed": opts.hidden_seed,
        "source_sha": dict(opts.source_sha),
    }
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for slug in sorted(chapters):
        h.update(chapters[slug]["release"] + chapters[slug]["source"])
    config["fingerprint"] = h.hexdigest()
    config["chapters"] = chapters
    return config


def make_task(sub: Submission, opts: Options) -> dict:
    """One submission as data: ``{"student", "assignment", "notes", "folder": bool, "notebook": rel | None,
    "files": [{"rel", "data": bytes} | {"rel", "link": target} | {"rel", "size": int}]}``.

    Files larger than the worker would read (the notebook limit, the copy budget) travel as their
    size only; the worker stands a sparse file of that size in for them and refuses them as it
    would the original.
    """
    too_big = max(opts.max_notebook_mb, opts.limits.copy_mb) * 1024 * 1024
    base = Path(sub.folder) if sub.folder else None
    wanted = sub.files if base else ([sub.notebook] if sub.notebook else [])
    files = []
    for name in wanted:
        rel = str(Path(name).relative_to(base)) if base else Path(name).name
        entry: dict = {"rel": rel}
        try:
            if os.path.islink(name):
                entry["link"] = os.readlink(name)
            elif os.path.getsize(name) > too_big:
                entry["size"] = os.path.getsize(name)
            else:
                entry["data"] = Path(name).read_bytes()
        except OSError:
            continue  # unreadable here: graded as missing, and the integrity hash says so
        files.append(entry)
    notebook = None
    if sub.notebook:
        notebook = str(Path(sub.notebook).relative_to(base)) if base else Path(sub.notebook).name
    return {
        "student": sub.student,
        "assignment": sub.assignment,
        "notes": list(sub.notes),
        "folder": base is not None,
        "notebook": notebook,
        "files": files,
    }


def task_key(sub: Submission, opts: Options) -> str:
    """The same key for the same submission and chapter source, so a resubmission after a crash of the
    client joins a task the scheduler still runs instead of grading it a second time."""
    return f"ahh-grade-{sub.assignment}-{sub.student}-{sub.sha256[:10]}-{opts.source_sha.get(sub.assignment, '')[:10]}"


def store(opts: Options, sub: Submission, reply: dict) -> dict:
    """Write a worker's files into ``OUT`` and then (unless the grader failed) the result file; returns the result."""
    out = Path(opts.out)
    for area in AREAS:
        shutil.rmtree(out / area / sub.student / sub.assignment, ignore_errors=True)
    for rel, data in reply["artifacts"].items():
        target = out / rel
        if not target.resolve().is_relative_to(out.resolve()) or rel.split("/")[0] not in AREAS:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    result = dict(reply["result"])
    result["input_sha"] = sub.sha256
    result["files"] = sub.files
    result["unchanged"] = bool(result.get("unchanged")) and hash_files(sub.files) == sub.sha256
    result["worker"] = reply["worker"]
    if result["status"] != "error":
        write_json_atomic(result_path(out, sub.assignment, sub.student), result)
    return result


def _allowed_failures(dask_scheduler=None) -> int:
    return int(dask_scheduler.allowed_failures)


def _connect(scheduler: str, wait: float, log):
    from distributed import Client

    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            return Client(scheduler, timeout=10, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise ClusterUnavailable(
                    f"no Dask scheduler answers at {scheduler} ({exc}); start one with `dask scheduler`"
                ) from None
            if not said:
                log(f"waiting for the Dask scheduler at {scheduler} (up to {wait:.0f} s) ...")
                said = True
            time.sleep(2)


def check_scheduler(scheduler: str, wait: float, log=print) -> None:
    """Raise :class:`ClusterUnavailable` unless a scheduler answers at ``scheduler`` within ``wait`` seconds."""
    _connect(scheduler, wait, log).close()


class _Lost(Exception):
    pass


def run_cluster(
    pending: list[Submission], opts: Options, scheduler: str, progress, notebook_timeout: int, log=print, wait: float = 300
) -> dict:
    """Grade ``pending`` on the workers of the Dask cluster at ``scheduler``; returns ``{key: result}``."""
    from distributed.scheduler import KilledWorker

    from autograder.grade import _crash_result, mark_crashed

    config = worker_config(opts)
    remaining = {s.key: s for s in pending}
    results: dict[str, dict] = {}
    modes: set[str] = set()
    seen_workers: set[str] = set()
    reconnects = 0
    while remaining:
        client = _connect(scheduler, wait, log)
        try:
            try:
                client.wait_for_workers(1, timeout=wait)
            except TimeoutError:
                raise ClusterUnavailable(f"no worker joined the scheduler at {scheduler} within {wait:.0f} s") from None
            allowed = client.run_on_scheduler(_allowed_failures)
            if reconnects == 0:
                log(
                    f"cluster: {len(client.scheduler_info()['workers'])} workers now; a submission is given up on after "
                    f"{allowed + 1} worker deaths (distributed.scheduler.allowed-failures = {allowed})"
                )
            queue = list(remaining)
            in_flight: dict = {}  # future -> (key, submitted at)
            while queue or in_flight:
                info = client.scheduler_info(n_workers=-1)["workers"] if queue else {}
                if queue:
                    threads = sum(w.get("nthreads", 1) for w in info.values()) or 1
                    while queue and len(in_flight) < 2 * threads + 2:  # a bounded window: tasks carry bytes
                        sub = remaining[queue.pop(0)]
                        fut = client.submit(grade_task, config, make_task(sub, opts), key=task_key(sub, opts), pure=False)
                        in_flight[fut] = (sub.key, time.monotonic())
                done = [f for f in in_flight if f.done()]
                if not done:
                    time.sleep(0.25)
                for fut in done:
                    key, _started = in_flight.pop(fut)
                    sub = remaining[key]
                    if fut.status == "finished":
                        reply = fut.result()
                        result = store(opts, sub, reply)
                        modes.add(reply.get("mode", ""))
                        if reply.get("fallback") and reply["worker"] not in seen_workers:
                            log(f"worker {reply['worker']}: kernels start in a fresh sandbox each ({reply['fallback']})")
                        seen_workers.add(reply["worker"])
                    elif fut.status == "error":
                        exc = fut.exception()
                        if isinstance(exc, KilledWorker):
                            result = mark_crashed(sub, opts, allowed + 1, "the worker process died (KilledWorker)")
                            result["worker"] = "(several)"
                        elif isinstance(exc, (WorkerUnfit, SandboxUnavailable)):
                            raise ClusterUnavailable(str(exc))
                        else:
                            result = _crash_result(sub, opts, f"the grader failed on this submission on the cluster: {exc!r}")
                    else:  # cancelled: the scheduler went away
                        raise _Lost(fut.status)
                    fut.release()
                    results[key] = result
                    remaining.pop(key)
                    progress.update(result)
                now = time.monotonic()
                for fut, (key, started) in list(in_flight.items()):
                    if now - started > notebook_timeout:
                        fut.cancel()
                        in_flight.pop(fut)
                        results[key] = _crash_result(
                            remaining.pop(key),
                            opts,
                            f"grading took longer than {notebook_timeout} s on the cluster; the grader stopped waiting (rerun to retry)",
                        )
                        progress.update(results[key])
                if client.status not in ("running", "connecting"):
                    raise _Lost(client.status)
                progress.update()
        except (_Lost, OSError, TimeoutError) as exc:
            reconnects += 1
            log(
                f"\nlost the Dask scheduler ({type(exc).__name__}: {exc}); reconnecting, then resubmitting the "
                f"{len(remaining)} submissions without a result"
            )
        finally:
            client.close(timeout=10)
    opts.modes = modes - {""}  # type: ignore[attr-defined]
    opts.cluster_workers = f"{len(seen_workers)} cluster workers"  # type: ignore[attr-defined]
    return results


# -- the worker -------------------------------------------------------------------------


def dask_setup(worker=None) -> None:
    """``dask worker --preload autograder.grading.distributed``: import the grader's libraries when the worker
    starts (PyTorch, nbgrader, nbconvert: seconds of CPU), not in its first task."""
    import nbconvert.exporters  # noqa: F401
    import nbgrader.apps  # noqa: F401
    import torch  # noqa: F401

    import autograder.check  # noqa: F401
    import autograder.grading.execute  # noqa: F401
    import autograder.grading.feedback  # noqa: F401
    import autograder.grading.sanitize  # noqa: F401


_GRADING = threading.Lock()  # one submission at a time per process, whatever --nthreads says
_STATE: _WorkerState | None = None


def grade_task(config: dict, task: dict) -> dict:
    """Runs on a Dask worker: grade one submission; returns ``{"result", "artifacts": {rel: bytes}, "worker", "mode"}``."""
    global _STATE
    with _GRADING:
        if _STATE is None or _STATE.fingerprint != config["fingerprint"]:
            if _STATE is not None:
                _STATE.close()
                _STATE = None
            _STATE = _WorkerState(config)
        return _STATE.grade(task)


def _worker_name() -> str:
    try:
        from distributed import get_worker

        w = get_worker()
        name = str(w.name)
        return name if "://" not in name else name.split("://", 1)[1]
    except ValueError:
        return f"{socket.gethostname()}:{os.getpid()}"


def _claim_slot() -> tuple[int, object]:
    """A per-machine worker number (held by an ``flock`` for the process's life): its sandbox uid and scratch name."""
    slots = Path(tempfile.gettempdir()) / "ag-slots"
    slots.mkdir(exist_ok=True)
    for i in range(256):
        fh = open(slots / f"{i}.lock", "w")  # noqa: SIM115  (held for the life of the process)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        for stale in Path(tempfile.gettempdir()).glob(f"ag-d{i}-*"):  # left by a killed holder of this slot
            shutil.rmtree(stale, ignore_errors=True)
        return i, fh
    raise WorkerUnfit("more than 256 grading workers on one machine")


class _WorkerState:
    """A worker process's sandbox, scratch course directory and :class:`Grader`, kept between tasks."""

    def __init__(self, config: dict):
        from autograder.grading.gradebook import is_sqlite, redact, sqlite_file
        from autograder.grading.worker import Grader

        self.fingerprint = config["fingerprint"]
        self.db = config["db"]
        if is_sqlite(self.db) and not sqlite_file(self.db).exists():
            raise WorkerUnfit(
                f"worker {_worker_name()}: the gradebook {redact(self.db)} is a SQLite file this machine cannot see; "
                "graders on several machines share a PostgreSQL gradebook: grade --db postgresql://..."
            )
        self.slot, self._slot_lock = _claim_slot()
        self.root = Path(tempfile.mkdtemp(prefix=f"ag-d{self.slot}-", dir=tempfile.gettempdir()))
        os.chmod(self.root, 0o755)
        write_json_atomic(self.root / "worker.json", {"pid": os.getpid(), "name": _worker_name(), "slot": self.slot})
        self.course = self.root / "c"
        self.sandbox = None
        try:
            self._write_chapters(config)
            if not config["figures"]:
                os.environ["MPLBACKEND"] = "agg"
            try:
                import torch

                torch.set_num_threads(1)
            except ImportError:
                pass
            limits = Limits(**config["limits"])
            opts = Options(
                out=self.course,
                workers=1,
                sandbox=config["sandbox"],
                kernel_start=config["kernel_start"],
                limits=limits,
                max_notebook_mb=config["max_notebook_mb"],
                run_root=self.root,
                source_sha=config["source_sha"],
                figures=config["figures"],
                hidden_seed=config["hidden_seed"],
                db=self.db,
            )
            if config["sandbox"]:
                from autograder.sandbox import Sandbox, activate

                try:
                    self.sandbox = Sandbox(
                        self.root / "w", limits, SLOT_BASE + self.slot, config["kernel_start"], figures=config["figures"]
                    ).start()
                except SandboxUnavailable as exc:
                    raise WorkerUnfit(f"worker {_worker_name()} cannot grade safely: {exc}") from None
                activate(self.sandbox)
            self.grader = Grader(opts, self.sandbox)
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)

    def _write_chapters(self, config: dict) -> None:
        from autograder.course import find_chapter
        from autograder.grade import grading_sha

        for slug, files in config["chapters"].items():
            for area in ("release", "source"):
                target = self.course / area / slug / f"{slug}.ipynb"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(files[area])
            mine = grading_sha(find_chapter(slug), self.course / "source" / slug / f"{slug}.ipynb", config["hidden_seed"])
            if mine != config["source_sha"][slug]:
                raise WorkerUnfit(
                    f"worker {_worker_name()}: its course package grades {slug} differently from the grading command's "
                    "(another version of the checks or the judge); install the same version on every machine"
                )

    def grade(self, task: dict) -> dict:
        from autograder.grading.gradebook import submission_lock

        student, assignment = task["student"], task["assignment"]
        inbox = self.root / "in" / student / assignment
        shutil.rmtree(inbox, ignore_errors=True)
        inbox.mkdir(parents=True)
        paths = []
        for entry in task["files"]:
            target = inbox / entry["rel"]
            if not target.resolve().is_relative_to(inbox.resolve()):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if "link" in entry:
                os.symlink(entry["link"], target)  # never followed: the grader refuses links
            elif "size" in entry:
                with open(target, "wb") as f:
                    f.truncate(entry["size"])
            else:
                target.write_bytes(entry["data"])
            paths.append(str(target))
        sub = Submission(
            student,
            assignment,
            str(inbox / task["notebook"]) if task["notebook"] else None,
            folder=str(inbox) if task["folder"] else None,
            files=paths,
            notes=list(task["notes"]),
        )
        sub.sha256 = hash_files(paths)
        try:
            with submission_lock(self.db, assignment, student):
                result = self.grader.grade(sub)
            artifacts = {}
            for area in AREAS:
                folder = self.course / area / student / assignment
                for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
                    if path.is_file() and not path.is_symlink():
                        artifacts[path.relative_to(self.course).as_posix()] = path.read_bytes()
            return {
                "result": result,
                "artifacts": artifacts,
                "worker": _worker_name(),
                "mode": self.sandbox.mode if self.sandbox else "no sandbox",
                "fallback": self.sandbox.fallback_reason if self.sandbox else "",
            }
        finally:
            shutil.rmtree(inbox, ignore_errors=True)
            for area in AREAS:
                shutil.rmtree(self.course / area / student / assignment, ignore_errors=True)
            result_file = result_path(self.course, assignment, student)
            result_file.unlink(missing_ok=True)

    def close(self) -> None:
        if self.sandbox is not None:
            from autograder.sandbox import activate

            self.sandbox.close()
            activate(None)
            self.sandbox = None
        shutil.rmtree(self.root, ignore_errors=True)
