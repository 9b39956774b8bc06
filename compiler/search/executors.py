"""Where candidates are scored: in this process, in worker processes, or on Ray.

An executor holds one ``Scorer`` per worker (built once, from the ``Workload``) and runs tasks
``(plan_dict, steps, seed)``; results come back in task order whatever order workers finish in.
A worker that dies while scoring a plan is restarted and the plan retried once; a second death
raises ``WorkerDiedError`` naming the plan. While a CPU pool's workers are still starting (importing
torch, building the model), this process scores the first tasks itself instead of waiting idle: the
score of a plan does not depend on where it runs, so this only shortens the search. ``close()`` stops every worker (the evaluator calls it,
also on Ctrl-C), and workers exit by themselves when the parent goes away.

>>> import torch
>>> from compressc.search.scoring import Workload
>>> ex = get_executor("serial")
>>> ex.start(Workload.in_memory(torch.nn.Linear(4, 2), (torch.randn(3, 4),)))
>>> ex.run([({}, 0, 1), ({}, 0, 2)])
[-0.0, -0.0]
>>> ex.close()
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import signal
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Callable, ClassVar, Protocol, Sequence

from compressc.errors import UserError
from compressc.search.scoring import Scorer, Workload, guarded_score

__all__ = ["Executor", "SerialExecutor", "StartupHelp", "ProcessExecutor", "WorkerDiedError", "get_executor", "EXECUTORS", "Task"]

Task = tuple[dict, int, int]  # (plan.to_dict(), steps, seed)
EXECUTORS = ("serial", "processes", "ray")


class WorkerDiedError(UserError):
    """A worker died twice while scoring the same plan (out of memory, a crash in native code)."""


class Executor(Protocol):
    name: ClassVar[str]
    workers: int

    def start(self, workload: Workload) -> None: ...

    def run(self, tasks: Sequence[Task]) -> list[float]: ...

    def close(self) -> None: ...


def result_of(reply: tuple, task: Task) -> float:
    """The score in a worker's reply, or the error it reports (naming the plan)."""
    if reply[0] == "ok":
        return float(reply[1])
    if reply[0] == "init-error":
        raise UserError(f"a worker could not build the model: {reply[1]}",
                        hint="run with --executor serial to see the error in this process")
    if reply[0] == "user":
        raise UserError(reply[1], hint=reply[2])
    raise RuntimeError(f"scoring plan {task[0]} failed in a worker:\n{reply[1]}")


def died(task: Task, how: str) -> WorkerDiedError:
    return WorkerDiedError(f"a worker died twice while scoring plan {task[0]} ({how})",
                           hint="it may run out of memory (use fewer --workers), or a script that compiles with worker "
                                "processes lacks `if __name__ == \"__main__\":`; --executor serial shows the error")


class StartupHelp:
    """Scores tasks in this process while a pool's workers are still starting (CPU pools only: a plan
    scored on an accelerator need not agree with one scored here to the last bit). ``scored``
    counts the tasks it took; the pool's ``run`` hands it the queue first. A plan that crashes the
    process scoring it (native code, out of memory) takes this process down when it is scored here,
    as with the serial executor: pools built with ``startup_help=False`` never score here."""

    def __init__(self, devices: Sequence[str], enabled: bool = True) -> None:
        self.enabled = enabled and all(d == "cpu" for d in devices)
        self.workload: Workload | None = None
        self.scorer: Scorer | None = None
        self.scored = 0

    def take(self, tasks: Sequence[Task], queue: deque, results: list, starting: Callable[[], bool]) -> None:
        """Score tasks from the front of ``queue`` into ``results`` until ``starting()`` turns false."""
        while self.enabled and self.workload is not None and queue and starting():
            index = queue.popleft()
            if self.scorer is None:
                self.scorer = Scorer(self.workload, "cpu")
            results[index] = result_of(guarded_score(self.scorer, *tasks[index]), tasks[index])
            self.scored += 1

    def close(self) -> None:
        self.scorer = None


class SerialExecutor:
    """Scores in this process, one plan after another."""

    name: ClassVar[str] = "serial"

    def __init__(self, workers: int = 1, devices: Sequence[str] | None = None, scorer: Any = None) -> None:
        self.workers = 1
        self.device = (devices or ["cpu"])[0]
        self.scorer = scorer

    def start(self, workload: Workload) -> None:
        if self.scorer is None:
            self.scorer = Scorer(workload, self.device)

    def run(self, tasks: Sequence[Task]) -> list[float]:
        return [result_of(guarded_score(self.scorer, *t), t) for t in tasks]

    def close(self) -> None:
        self.scorer = None


def _worker_main(conn, payload: bytes, device: str, threads: int) -> None:
    """A worker process: build the scorer once, then score what arrives until None or EOF."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops us
    torch.set_num_threads(threads)
    try:
        scorer = Scorer(pickle.loads(payload), device)
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which raises it
        conn.send(("init-error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        index, task = msg
        try:
            conn.send((index, guarded_score(scorer, *task)))
        except (BrokenPipeError, OSError):
            return


class _Worker:
    def __init__(self, ctx, payload: bytes, device: str, threads: int) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, payload, device, threads), daemon=True)
        self.process.start()
        child.close()
        self.device = device
        self.task: int | None = None
        self.up = False

    def ready(self) -> bool:
        """Whether the worker has built its scorer, without waiting (raises what it could not build)."""
        if self.up:
            return True
        if not self.conn.poll(0):
            return False
        try:
            reply = self.conn.recv()
        except (EOFError, OSError):
            raise UserError(f"a worker process exited while starting (exit code {self.process.exitcode})",
                            hint="run with --executor serial to see the error in this process") from None
        if reply[0] == "init-error":
            result_of(reply, ({}, 0, 0))
        self.up = True
        return True

    def stop(self, timeout: float = 5.0) -> None:
        _stop([self], timeout)


def _stop(workers: list[_Worker], timeout: float) -> None:
    """Ask every worker to exit, give them ``timeout`` seconds together, then terminate and kill."""
    for w in workers:
        try:
            w.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
    deadline = time.monotonic() + timeout
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        if w.process.is_alive():
            w.process.terminate()
            w.process.join(2.0)
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        w.conn.close()


class ProcessExecutor:
    """``workers`` spawned processes (one per entry of ``devices`` when given), each building the
    model once: from the model file, or from the pickled module for library calls; while they start,
    this process scores the first tasks unless ``startup_help`` is false (``StartupHelp``)."""

    name: ClassVar[str] = "processes"

    def __init__(self, workers: int = 2, devices: Sequence[str] | None = None, *, startup_help: bool = True) -> None:
        self.devices = list(devices) if devices else ["cpu"] * int(workers)
        self.workers = len(self.devices)
        self._ctx = mp.get_context("spawn")
        self._pool: list[_Worker] = []
        self._payload = b""
        self._threads = 1
        self.help = StartupHelp(self.devices, startup_help)

    def start(self, workload: Workload) -> None:
        """Launch the workers (they build their scorers while the first ``run`` begins)."""
        self.help.workload = workload
        try:
            self._payload = pickle.dumps(workload.for_workers())
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise UserError(f"the processes executor cannot send the model to worker processes: {e}",
                            hint="define the model class, evaluate and loss_fn at module level (importable), "
                                 "compile a model file, or use the serial or ray executor") from None
        self._threads = workload.threads
        try:
            for d in self.devices:
                self._pool.append(_Worker(self._ctx, self._payload, d, self._threads))
        except BaseException:  # a build error, or Ctrl-C while starting: no worker outlives it
            self.close()
            raise

    def run(self, tasks: Sequence[Task]) -> list[float]:
        results: list[float | None] = [None] * len(tasks)
        queue, tries = deque(range(len(tasks))), [0] * len(tasks)
        self.help.take(tasks, queue, results, lambda: not all(w.ready() for w in self._pool))
        while queue or any(w.task is not None for w in self._pool):
            for i, w in enumerate(self._pool):
                if w.task is None and queue:
                    if not w.process.is_alive():  # died while idle: replace it, no plan was lost
                        w.stop(timeout=0.1)
                        w = self._pool[i] = _Worker(self._ctx, self._payload, w.device, self._threads)
                    w.task = queue.popleft()
                    w.conn.send((w.task, tasks[w.task]))
            busy = [w for w in self._pool if w.task is not None]
            ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for w in busy:
                reply, dead = None, w.process.sentinel in ready
                if w.conn in ready:
                    try:
                        reply = w.conn.recv()
                    except (EOFError, OSError):
                        dead = True
                if reply is not None and reply[0] == "init-error":
                    result_of(reply, tasks[w.task])
                if reply == ("ready",):  # a replacement worker is up; its task is on its way
                    w.up = True
                    continue
                if reply is not None:
                    index, answer = reply
                    results[index] = result_of(answer, tasks[index])
                    w.task = None
                elif dead:
                    index = w.task
                    tries[index] += 1
                    w.stop(timeout=1.0)
                    if tries[index] > 1:
                        raise died(tasks[index], f"exit code {w.process.exitcode}")
                    self._pool[self._pool.index(w)] = _Worker(self._ctx, self._payload, w.device, self._threads)
                    queue.appendleft(index)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        _stop(self._pool, timeout=2.0)
        self._pool = []
        self.help.close()


def get_executor(name: str, *, workers: int = 1, devices: Sequence[str] | None = None,
                 address: str | None = None) -> Executor:
    """The executor called ``name`` (``serial``, ``processes`` or ``ray``)."""
    if name == "serial":
        return SerialExecutor(workers, devices)
    if name == "processes":
        return ProcessExecutor(workers, devices)
    if name == "ray":
        from compressc.search.ray_executor import RayExecutor

        return RayExecutor(workers, devices, address=address)
    raise UserError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
