"""The Ray executor: one actor per worker, the workload put in the object store once.

Ray is the optional extra ``compressc[ray]``; it is imported only when this executor starts. With
no ``address`` a local cluster is started (and shut down again by ``close``); with one, the
executor joins that cluster and leaves it running. Actors that die are replaced and their plan
retried once, as in the processes executor.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar, Sequence

from compressc.errors import UserError
from compressc.search.executors import StartupHelp, Task, died, result_of
from compressc.search.scoring import Scorer, Workload, guarded_score

__all__ = ["RayExecutor"]


class _Actor:
    def __init__(self, workload: Workload, device: str) -> None:
        import torch

        torch.set_num_threads(workload.threads)
        self.scorer, self.error = None, None
        try:
            self.scorer = Scorer(workload, device)
        except Exception as e:  # reported with the first task, by result_of
            self.error = f"{type(e).__name__}: {e}"

    def score(self, task: Task) -> tuple:
        return ("init-error", self.error) if self.error else guarded_score(self.scorer, *task)

    def pid(self) -> int:
        import os

        return os.getpid()


class RayExecutor:
    """``workers`` Ray actors (one per entry of ``devices`` when given; ``cuda`` devices reserve one GPU
    each); while they start, this process scores the first tasks unless ``startup_help`` is false."""

    name: ClassVar[str] = "ray"

    def __init__(self, workers: int = 2, devices: Sequence[str] | None = None, *, address: str | None = None,
                 startup_help: bool = True) -> None:
        self.devices = list(devices) if devices else ["cpu"] * int(workers)
        self.workers = len(self.devices)
        self.address = address
        self._owns_cluster = False
        self._actors: list[Any] = []
        self._ref = None
        self._starting: list[Any] = []  # the actors' pid() calls, answered once each has built its scorer
        self.help = StartupHelp(self.devices, startup_help)

    def start(self, workload: Workload) -> None:
        """Join or start the cluster and create the actors (they build their scorers while the first
        ``run`` begins)."""
        try:
            import ray
        except ImportError:
            raise UserError("the ray executor needs Ray, which is not installed",
                            hint="pip install 'compressc[ray]', or use --executor processes") from None
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if self.address is None:
                kwargs["num_cpus"] = self.workers
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise UserError(f"could not reach the Ray cluster at {self.address!r}: {e}",
                                hint="check --ray-address (e.g. ray://host:10001 or auto), or omit it for a local cluster") from None
            self._owns_cluster = self.address is None
        self._ray = ray
        try:
            self._ref = ray.put(workload.for_workers())
            self._actors = [self._spawn(d) for d in self.devices]
            self._starting = [a.pid.remote() for a in self._actors]
            self.help.workload = workload
        except BaseException:  # Ctrl-C while starting: no actor (or local cluster) outlives it
            self.close()
            raise

    def _spawn(self, device: str):
        gpus = 1 if device.startswith("cuda") else 0
        actor_cls = self._ray.remote(num_cpus=1, num_gpus=gpus)(_Actor)
        return actor_cls.remote(self._ref, "cuda" if gpus else device)

    def run(self, tasks: Sequence[Task]) -> list[float]:
        ray = self._ray
        results: list[float | None] = [None] * len(tasks)
        queue, tries = deque(range(len(tasks))), [0] * len(tasks)
        if self._starting:
            self.help.take(tasks, queue, results, self._still_starting)
            self._starting = []  # the actors' first tasks queue behind their construction
        idle = list(range(len(self._actors)))
        pending: dict[Any, tuple[int, int]] = {}
        while queue or pending:
            while idle and queue:
                a, index = idle.pop(0), queue.popleft()
                pending[self._actors[a].score.remote(tasks[index])] = (a, index)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            a, index = pending.pop(ref)
            try:
                reply = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                tries[index] += 1
                if tries[index] > 1:
                    raise died(tasks[index], type(e).__name__) from None
                self._actors[a] = self._spawn(self.devices[a])
                queue.appendleft(index)
                idle.append(a)
                continue
            results[index] = result_of(reply, tasks[index])
            idle.append(a)
        return results  # type: ignore[return-value]

    def _still_starting(self) -> bool:
        done, _ = self._ray.wait(self._starting, num_returns=len(self._starting), timeout=0)
        return len(done) < len(self._starting)

    def close(self) -> None:
        self.help.close()
        self._starting = []
        if not self._actors and not self._owns_cluster:
            return
        ray = self._ray
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []
        self._ref = None
        if self._owns_cluster:
            ray.shutdown()
            self._owns_cluster = False
