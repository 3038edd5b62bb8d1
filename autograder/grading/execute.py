"""``SandboxedExecute``: nbgrader's Execute preprocessor, hardened for untrusted notebooks.

It replaces :class:`nbgrader.preprocessors.Execute` in the autograde pipeline and adds:

* **kernel death** (``os._exit``, a segfault, the CPU limit, ``exit()``): the cell gets an
  error saying what happened, a new kernel starts, the cells that ran before are run again
  (their outputs discarded) and grading goes on with the next cell; at most
  ``max_restarts`` times per notebook, after which the remaining cells are marked not run;
* **a cell that ignores the timeout's interrupt**: the kernel is killed and restarted the
  same way (nbgrader alone aborts the whole notebook);
* **an output cap** per cell (``output_limit_kb``): more output is discarded, and a cell
  that keeps printing far beyond it is interrupted;
* **harmless stderr** in graded cells (Python warnings, PyTorch's ``[W ...]`` log lines)
  no longer costs the test its points: those lines move to stdout with a note;
* **a numeric result** in a graded cell is shown as text, not taken as partial credit;
* **confirmation**: a graded cell passes only if its output holds the checks' success line
  (``success_pattern``, printed by ``autograder.checks.common.passed``); a notebook that
  replaced IPython's ``run_cell`` or swallowed exceptions therefore cannot pass tests it
  did not run;
* **clearer messages** for timeouts, ``SystemExit``, ``MemoryError``, process and file limits;
* **trusted verdicts** (when the grader sets :data:`JUDGE`): a test cell of an exercise whose
  checks run on the trusted side is not executed in the kernel at all. Its checks run here, in
  the grader's process (:mod:`autograder.grading.judge`), calling the student's objects through
  the kernel's agent with data only, and the cell's output is the checks' own verdict.

What happened is also recorded in :data:`EVENTS` for the grader's summary.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import queue
import re
import time
from dataclasses import dataclass, field

from jupyter_core.utils import run_sync
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat.v4 import new_output
from nbgrader.preprocessors import Execute
from traitlets import Integer, Unicode

DEFAULT_HARMLESS_STDERR = "|".join(
    [
        r"^.*:\d+: [A-Za-z]*Warning: .*$",  # warnings.showwarning's first line
        r"^  (?:warnings\.warn|  ).*$",  # ...and the source line it quotes
        r"^\[W[\d :.]*[^\]]*\] .*$",  # PyTorch C++ warnings, e.g. [W NNPACK.cpp:64] Could not initialize NNPACK!
        r"^Matplotlib is building the font cache.*$",
        r"^Fontconfig (?:error|warning): .*$",
        r"^\s*$",
    ]
)

# Events of the last notebook executed in this process: {"cell", "grade_id", "kind", "message"}.
EVENTS: list[dict] = []
# Set by the grading worker: the kernel manager that starts kernels in its sandbox (nbgrader's
# Execute passes its own class as a constructor argument, which config cannot override).
KERNEL_MANAGER_CLASS = None


@dataclass
class JudgeContext:
    """What the trusted side of one notebook's grading needs: its chapter and released skeleton."""

    chapter: object  # autograder.course.Chapter
    skeleton: object  # the released notebook (nbformat), for "is this exercise still the skeleton?"
    flags: list = field(default_factory=list)


# Set by the grading worker around each autograde: None runs every test cell in the kernel.
JUDGE: JudgeContext | None = None


def _grade_id(cell) -> str | None:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def _is_graded(cell) -> bool:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return cell.get("cell_type") == "code" and bool(meta.get("grade")) and not meta.get("solution")


def _error(ename: str, evalue: str):
    return new_output("error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


def _msg_size(msg: dict) -> int:
    content = msg.get("content", {})
    if "text" in content:
        return len(content["text"])
    data = content.get("data") or {}
    return sum(len(v) if isinstance(v, str) else len(str(v)) for v in data.values()) + len(str(content.get("traceback", "")))


class SandboxedExecute(Execute):
    output_limit_kb = Integer(1024, help="Output kept per cell, in KiB; the rest is discarded.").tag(config=True)
    max_restarts = Integer(10, help="Kernel restarts per notebook after a crash or a stuck cell.").tag(config=True)
    success_pattern = Unicode(
        r"\u2714 .*checks? passed",
        help="A graded cell passes only if its stdout matches this (empty: no such requirement).",
    ).tag(config=True)
    harmless_stderr = Unicode(DEFAULT_HARMLESS_STDERR, help="stderr lines that do not fail a graded cell.").tag(config=True)
    memory_mb = Integer(0, help="The kernel's memory limit, for messages.").tag(config=True)
    processes = Integer(0, help="The kernel's process limit, for messages.").tag(config=True)

    # -- the notebook ---------------------------------------------------------------------

    def preprocess(self, nb, resources=None, km=None):
        EVENTS.clear()
        self._ran: list[int] = []
        self._culprits: set[int] = set()
        self._restarts = 0
        self._dead = False
        self._replaying = False
        self._last_reply = None
        self._harmless = re.compile(self.harmless_stderr) if self.harmless_stderr else None
        return super().preprocess(nb, resources, km)

    async def _async_cleanup_kernel(self) -> None:
        if self.km is not None:  # None after the kernel died too often
            await super()._async_cleanup_kernel()

    _cleanup_kernel = run_sync(_async_cleanup_kernel)

    def create_kernel_manager(self):
        if KERNEL_MANAGER_CLASS is not None:
            self.kernel_manager_class = KERNEL_MANAGER_CLASS
        return super().create_kernel_manager()

    def _event(self, index: int, kind: str, message: str) -> None:
        EVENTS.append({"cell": index, "grade_id": _grade_id(self.nb.cells[index]), "kind": kind, "message": message})

    def on_cell_executed(self, **kwargs):
        self._last_reply = kwargs.get("execute_reply")
        return super().on_cell_executed(**kwargs)

    def preprocess_cell(self, cell, resources, index):
        self._check_assign_resources(resources)
        if cell.cell_type != "code" or not cell.source.strip():
            return cell, self.resources
        if self._dead:
            cell.outputs = [_error("NotRun", "not run: the kernel died too many times in this notebook.")]
            self._event(index, "not_run", "not run: the kernel died too many times")
            return cell, self.resources
        judged = self._judged(cell)
        if judged is not None:
            cell = self._judge_cell(cell, index, *judged)
            return cell, self.resources
        cell = run_sync(self._run_cell)(cell, index)
        self._post_process(cell, index)
        return cell, self.resources

    async def _run_cell(self, cell, index):
        self._cell_bytes = 0
        self._dropped = 0
        self._interrupted_for_output = False
        self._killed_for_output = False
        self._last_reply = None
        try:
            cell = await self.async_execute_cell(cell, index, store_history=True)
        except DeadKernelError:
            status = self._exit_status()
            from autograder.sandbox import describe_exit

            message = f"The kernel died while running this cell: {describe_exit(status)}."
            if self._killed_for_output:
                message = "The grader stopped the kernel: this cell kept printing far beyond the output limit."
            cell.outputs.append(_error("KernelDied", message + self._restart_note()))
            self._event(index, "kernel_died", message)
            await self._restart(index)
            return cell
        except CellTimeoutError:
            message = (
                f"This cell did not finish within {self.timeout} s and did not stop when interrupted; "
                "the grader killed the kernel."
            )
            cell.outputs.append(_error("CellTimeoutError", message + self._restart_note()))
            self._event(index, "stuck", message)
            await self._restart(index)
            return cell
        if self._interrupted_for_output:  # it may still be flushing output that would land in the next cells
            message = "This cell printed far more than the output limit; the grader stopped it."
            cell.outputs.append(new_output("stream", name="stdout", text=f"[grader] {message}{self._restart_note()}\n"))
            self._event(index, "output_flood", message)
            await self._restart(index)
            return cell
        self._ran.append(index)
        payload = (self._last_reply or {}).get("content", {}).get("payload", []) or []
        if any(p.get("source") == "ask_exit" for p in payload):
            message = "This cell called exit() or quit(), which stops the kernel."
            cell.outputs.append(new_output("stream", name="stdout", text=f"[grader] {message}{self._restart_note()}\n"))
            self._event(index, "exit", message)
            await self._wait_dead(5)
            await self._restart(index)
        return cell

    def _exit_status(self) -> int | None:
        if self.km is None:
            return None
        status = getattr(self.km, "exit_status", None)
        process = getattr(self.km.provisioner, "process", None)
        if status is None and process is not None:
            status = process.poll()
            status = -status if status is not None and status > 128 else status
        return status

    def _restart_note(self) -> str:
        if self._restarts >= self.max_restarts:
            return " It died too often: the cells after this one were not run."
        return " A new kernel was started and the earlier cells were run again, so the cells after this one still ran."

    async def _wait_dead(self, seconds: float) -> None:
        for _ in range(int(seconds * 20)):
            if not await self.km.is_alive():
                return
            await asyncio.sleep(0.05)

    async def _restart(self, culprit: int) -> None:
        self._culprits.add(culprit)
        if culprit in self._ran:
            self._ran.remove(culprit)
        try:
            if self.km is not None and await self.km.is_alive():
                await self.km.shutdown_kernel(now=True)
        except Exception:  # noqa: BLE001
            pass
        await self._async_cleanup_kernel()
        if self._restarts >= self.max_restarts:
            self._dead = True
            return
        self._restarts += 1
        self.km = self.create_kernel_manager()
        await self.async_start_new_kernel()
        await self.async_start_new_kernel_client()
        self._replaying = True
        try:
            for i in list(self._ran):
                original = self.nb.cells[i]
                replay = copy.deepcopy(original)
                try:
                    await self.async_execute_cell(replay, i, store_history=False)
                except (DeadKernelError, CellTimeoutError):
                    self._event(i, "replay_failed", "the kernel died again while re-running the earlier cells")
                    self._dead = True
                    await self._async_cleanup_kernel()
                    return
                finally:
                    self.nb.cells[i] = original
        finally:
            self._replaying = False

    # -- trusted verdicts ---------------------------------------------------------------

    def _judged(self, cell):
        """(exercise, hidden) when this test cell's verdict comes from the trusted side."""
        if JUDGE is None or not _is_graded(cell):
            return None
        from autograder.grading.judge import exercise_of, is_trusted

        found = exercise_of(JUDGE.chapter, _grade_id(cell))
        return found if found is not None and is_trusted(found[0]) else None

    def _judge_cell(self, cell, index: int, ex, hidden: bool):
        from autograder.grading.judge import cell_facts, run_remote_check
        from autograder.grading.remote import Remote

        facts = cell_facts(self.nb, JUDGE.skeleton, ex.name)
        self._judge_deadline = time.monotonic() + self.timeout
        self._judge_broken = None
        remote = Remote(self._transport)
        verdict = run_remote_check(ex, remote, facts, hidden)
        outputs = []
        stdout = verdict.stdout if len(verdict.stdout) < self.output_limit_kb * 1024 else verdict.stdout[-4096:]
        if verdict.passed:
            outputs.append(new_output("stream", name="stdout", text=stdout or f"\u2714 {ex.name}: checks passed\n"))
        else:
            if stdout:
                outputs.append(new_output("stream", name="stdout", text=stdout))
            outputs.append(_error("CheckFailure", verdict.message))
        cell.outputs = outputs
        for flag in verdict.flags:
            JUDGE.flags.append(flag)
            self._event(index, "flag", flag)
        if self._judge_broken is not None:
            self._event(index, self._judge_broken, verdict.message.splitlines()[0] if verdict.message else self._judge_broken)
            if cell.outputs and cell.outputs[-1].get("output_type") == "error":
                cell.outputs[-1]["evalue"] += self._restart_note()
            run_sync(self._restart)(index)
        return cell

    def _transport(self, request: str) -> str:
        from autograder.grading.remote import RemoteCallError

        if self._judge_broken is not None:
            raise RemoteCallError("the kernel stopped answering earlier in this check")
        return run_sync(self._rpc)(request)

    async def _rpc(self, request: str) -> str:
        """Send one request to the kernel's agent (``user_expressions``: no cell, no transformers)."""
        from autograder.grading.agent import expression
        from autograder.grading.remote import RemoteCallError

        msg_id = self.kc.execute(
            "", silent=True, store_history=False, user_expressions={"r": expression(request)}, allow_stdin=False
        )
        interrupted = False
        while True:
            left = self._judge_deadline - time.monotonic()
            if left <= 0 and not interrupted:
                interrupted = True
                self._judge_deadline = time.monotonic() + 5
                await self.km.interrupt_kernel()
                continue
            if left <= 0:
                self._judge_broken = "stuck"
                raise RemoteCallError(
                    f"your code did not finish within {self.timeout} s on the check's inputs and did not stop when interrupted"
                )
            try:
                msg = await self.kc.get_shell_msg(timeout=min(left, 1.0))
            except queue.Empty:
                if not await self.km.is_alive():
                    from autograder.sandbox import describe_exit

                    self._judge_broken = "kernel_died"
                    raise RemoteCallError(
                        f"the kernel died while running your code on the check's inputs: {describe_exit(self._exit_status())}"
                    ) from None
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            break
        await self._drain_iopub()
        if interrupted:
            raise RemoteCallError(f"your code did not finish within {self.timeout} s on the check's inputs (interrupted)")
        content = msg.get("content", {})
        if content.get("status") != "ok":
            raise RemoteCallError(
                f"the kernel refused the request ({content.get('ename', 'error')}: {content.get('evalue', '')})"
            )
        answer = (content.get("user_expressions") or {}).get("r") or {}
        if answer.get("status") != "ok":
            raise RemoteCallError(
                f"the kernel could not answer ({answer.get('ename', 'error')}: {answer.get('evalue', '')})"[:500]
            )
        text = (answer.get("data") or {}).get("text/plain")
        try:
            value = ast.literal_eval(text) if type(text) is str and text[:1] in "'\"" else None
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = None
        if type(value) is not str:
            raise RemoteCallError("the kernel's answer is not a string")
        return value

    async def _drain_iopub(self) -> None:
        """Drop what the student's code printed while the judge called it (it is not part of the verdict)."""
        while True:
            try:
                await self.kc.get_iopub_msg(timeout=0.01)
            except queue.Empty:
                return

    # -- output cap ---------------------------------------------------------------------

    def output(self, outs, msg, display_id, cell_index):
        if self._replaying:  # outputs of re-run cells are discarded
            return None
        limit = self.output_limit_kb * 1024
        size = _msg_size(msg)
        if self._cell_bytes + size <= limit:
            self._cell_bytes += size
            return super().output(outs, msg, display_id, cell_index)
        room = max(0, limit - self._cell_bytes)
        self._cell_bytes = limit
        self._dropped += size - room
        if room and msg["msg_type"] == "stream":
            msg = copy.deepcopy(msg)
            msg["content"]["text"] = msg["content"]["text"][:room]
            super().output(outs, msg, display_id, cell_index)
        if self._dropped > 20 * limit and not self._interrupted_for_output and self.km is not None:
            self._interrupted_for_output = True
            asyncio.ensure_future(self.km.interrupt_kernel())
        elif self._dropped > 200 * limit and not self._killed_for_output and self.km is not None:
            self._killed_for_output = True  # printing on regardless of the interrupt
            if self.km.provisioner is not None:
                asyncio.ensure_future(self.km.provisioner.kill())
        return None

    # -- after each cell ----------------------------------------------------------------

    def _post_process(self, cell, index: int) -> None:
        if self._dropped:
            mb = self._dropped / 1e6
            note = (
                f"[grader] output truncated: {mb:.1f} MB more were discarded "
                f"(the limit is {self.output_limit_kb} KiB per cell)"
                + (" and the cell was interrupted" if self._interrupted_for_output else "")
            )
            cell.outputs.append(new_output("stream", name="stdout", text=note + "\n"))
            self._event(index, "output_truncated", note[9:])
        for out in cell.outputs:
            if out.get("output_type") == "error":
                self._explain(out, index)
        if not _is_graded(cell):
            return
        self._filter_stderr(cell)
        for i, out in enumerate(cell.outputs):
            if out.get("output_type") == "execute_result":  # no partial credit from a returned number
                text = out.get("data", {}).get("text/plain", "")
                cell.outputs[i] = new_output("stream", name="stdout", text=f"{text}\n")
        failed = any(
            o.get("output_type") == "error" or (o.get("output_type") == "stream" and o.get("name") == "stderr")
            for o in cell.outputs
        )
        if not failed and self.success_pattern:
            stdout = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
            if not re.search(self.success_pattern, stdout):
                message = (
                    "the test did not confirm that it passed: its output lacks the checks' success line. "
                    "Something in the notebook kept the test from running normally (for example code that "
                    "replaces IPython's run_cell, hides errors or prints instead of running the test)."
                )
                cell.outputs.append(_error("GradingError", message))
                self._event(index, "unconfirmed", message)

    def _filter_stderr(self, cell) -> None:
        if self._harmless is None:
            return
        kept, moved = [], []
        for out in cell.outputs:
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                lines = out.get("text", "").splitlines()
                bad = [ln for ln in lines if not self._harmless.match(ln)]
                if bad:
                    kept.append(out)
                else:
                    moved.extend(ln for ln in lines if ln.strip())
            else:
                kept.append(out)
        if moved:
            text = "[grader] warnings on stderr (they do not cost points):\n" + "\n".join(moved) + "\n"
            kept.append(new_output("stream", name="stdout", text=text))
        cell.outputs = kept

    def _explain(self, out, index: int) -> None:
        """Student-facing wording for errors the grader causes or that need context."""
        ename, evalue = out.get("ename", ""), out.get("evalue", "")
        better = None
        if ename == "CellTimeoutError" and "No reply from kernel" in "".join(out.get("traceback", [])) + evalue:
            better = f"This cell did not finish within {self.timeout} s; the grader interrupted it (the later cells still ran)."
            self._event(index, "timeout", better)
        elif ename == "KeyboardInterrupt":
            better = "interrupted by the grader (time limit reached, or too much output)."
        elif ename == "SystemExit":
            better = f"the code called sys.exit() or exit() (SystemExit: {evalue or 0})."
            self._event(index, "system_exit", better)
        elif ename == "MemoryError" or "can't allocate memory" in evalue or "Cannot allocate memory" in evalue:
            limit = f" (the limit is {self.memory_mb} MB per notebook)" if self.memory_mb else ""
            better = f"out of memory{limit}: {ename}: {evalue}".rstrip(": ")
            self._event(index, "memory", better)
        elif ename == "BlockingIOError" or "Resource temporarily unavailable" in evalue:
            limit = f" (the limit is {self.processes})" if self.processes else ""
            better = f"too many processes or threads{limit}: {ename}: {evalue}"
            self._event(index, "processes", better)
        elif "File too large" in evalue:
            better = f"a file grew past the size limit: {ename}: {evalue}"
            self._event(index, "file_size", better)
        if better:
            out["evalue"] = better
            out["traceback"] = [f"{ename}: {better}"]
