"""Fan-out of independent work: a function mapped over items, results gathered in the items' order.

Two backends, one interface (`Executor.map`):

- `InProcess` (the default): the calls run one after another in this process; Ray is never
  imported. A compile without `--workers` or `--ray-address` runs exactly as it always has.
- `RayExecutor`: each call is a Ray task. `--workers N` starts a local Ray instance with N CPUs
  (`ray.init(num_cpus=N)`); `--ray-address ADDR` joins a running cluster (`ray.init(address=ADDR)`).
  The read-only inputs every call shares (weights, calibration batches, a serialized graph) are put
  in Ray's object store once (`ray.put`) and each task receives the reference, so a model is
  never pickled per task; numpy arrays are read from the store without a copy on each node.

A function given to `map` is `fn(shared, item) -> result`, pure: it reads `shared` and its item
and nothing else, so that its results do not depend on where or in which order it ran. Callers
that must build something costly per call (an ONNX Runtime session) map over `chunks(items, n)`
with `n = executor.workers`: one chunk per worker, and for `InProcess` one chunk holding every item.
`submit(fn, item, shared=...)` is one such call whose result is asked for later (`.result()`): a
Ray task starts at once, so the caller can work meanwhile; in-process the call runs when its result
is asked for, in the order the caller asks. `share(obj)` puts an input several calls read into
Ray's object store once (in-process: the object itself).

A Ray task that raises or whose worker dies is retried once (`max_retries=1`,
`retry_exceptions=True`); if it fails again the map raises `TaskFailed`, one line naming the task.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from qcompiler.errors import QCompilerError, UserError, first_line

log = logging.getLogger("qcompiler")

RETRIES = 1
INSTALL_HINT = 'pip install "qcompiler[ray]"'


class TaskFailed(QCompilerError):
    """A fanned-out task failed twice (the first failure is retried once)."""

    exit_code = 1


class Deferred:
    """A call run when its result is asked for, once: the result is handed over, not kept (a trial's
    model is freed as soon as its caller is done with it)."""

    def __init__(self, call: Callable[[], Any]):
        self._call = call

    def result(self) -> Any:
        call, self._call = self._call, None
        if call is None:
            raise RuntimeError("a deferred call's result is taken once")
        return call()


class InProcess:
    """Every call in this process, in order."""

    workers = 1

    def share(self, obj: Any) -> Any:
        return obj

    def submit(self, fn: Callable[[Any, Any], Any], item: Any, *, shared: Any = None, name: str | None = None) -> Deferred:
        """`fn(shared, item)`, run when `.result()` is called (once)."""
        return Deferred(lambda: fn(shared, item))

    def map(self, fn: Callable[[Any, Any], Any], items: Iterable[Any], *, shared: Any = None,
            names: Sequence[str] | None = None) -> list[Any]:
        """`fn(shared, item)` for each item in order; `items` may be a generator, so that each
        item is built only when its call comes (and released after it)."""
        return [fn(shared, item) for item in items]

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "in-process"


class RayExecutor:
    """Every call a Ray task; `workers` tasks run at once (a local instance of that many CPUs, or
    the CPUs of the cluster at `address` unless `workers` says fewer)."""

    def __init__(self, workers: int | None = None, address: str | None = None):
        ray = import_ray()
        self._ray = ray
        self._owned = False
        if not ray.is_initialized():
            options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=workers, **options)
            self._owned = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, workers if workers is not None else cpus)
        self.address = address
        self._remotes: dict[Callable, Any] = {}  # each function made a Ray remote function once
        log.info("parallel: Ray with %d workers (%s)", self.workers, f"cluster at {address}" if address else "local")

    def share(self, obj: Any) -> "Shared":
        """`obj` in the object store once, for several `map`/`submit` calls to read."""
        return Shared(self._ray.put(obj))

    def map(self, fn: Callable[[Any, Any], Any], items: Iterable[Any], *, shared: Any = None,
            names: Sequence[str] | None = None) -> list[Any]:
        items = list(items)
        if not items:
            return []
        names = list(names) if names is not None else [f"{fn.__qualname__}[{i}]" for i in range(len(items))]
        shared_ref = self._reference(shared)  # once; every task gets the reference
        remote = self._remote(fn)
        refs = [remote.options(name=name).remote(shared_ref, item) for name, item in zip(names, items)]
        return [self._get(name, ref) for name, ref in zip(names, refs)]

    def submit(self, fn: Callable[[Any, Any], Any], item: Any, *, shared: Any = None, name: str | None = None) -> "Running":
        """`fn(shared, item)` as a Ray task started now; `.result()` waits for it."""
        name = name or fn.__qualname__
        return Running(self, name, self._remote(fn).options(name=name).remote(self._reference(shared), item))

    def _remote(self, fn: Callable) -> Any:
        if fn not in self._remotes:
            self._remotes[fn] = self._ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=True)(fn)
        return self._remotes[fn]

    def _reference(self, shared: Any) -> Any:
        return shared.ref if isinstance(shared, Shared) else self._ray.put(shared)

    def _get(self, name: str, ref: Any) -> Any:
        """A task's result; its failure, after its retry, as `TaskFailed` naming it (our own errors as raised)."""
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, QCompilerError):
                raise cause from None
            shown = f"{type(cause).__name__}: {first_line(str(cause))}" if cause is not None else first_line(str(error))
            raise TaskFailed(f"task '{name}' failed after {RETRIES} retry: {shown}") from None
        except ray.exceptions.RayError as error:  # a worker or node that died, twice
            raise TaskFailed(f"task '{name}' failed after {RETRIES} retry: {type(error).__name__}: "
                             f"{first_line(str(error))}") from None

    def close(self) -> None:
        if self._owned:
            self._ray.shutdown()
            self._owned = False

    def describe(self) -> str:
        return f"ray ({self.workers} workers{', ' + self.address if self.address else ''})"


class Shared:
    """An input in Ray's object store (`RayExecutor.share`)."""

    def __init__(self, ref: Any):
        self.ref = ref


class Running:
    """A submitted Ray task (`RayExecutor.submit`)."""

    def __init__(self, executor: RayExecutor, name: str, ref: Any):
        self._executor, self._name, self._ref = executor, name, ref

    def result(self) -> Any:
        return self._executor._get(self._name, self._ref)


def import_ray():
    """Ray, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--workers and --ray-address run on Ray, which is not installed; {INSTALL_HINT}") from None
    return ray


def check_options(workers: int | None = None, ray_address: str | None = None, host: bool = True) -> None:
    """Bad `workers`/`ray_address`, or (with `host`) Ray missing when asked for: one line, before any slow step."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UserError(f"workers must be a positive integer, got {workers!r}")
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
        raise UserError("ray-address must be an address such as ray://head:10001 or auto")
    if host and (workers is not None or ray_address is not None):
        import_ray()


def executor_for(workers: int | None = None, ray_address: str | None = None) -> InProcess | RayExecutor:
    """The executor the options ask for: none given, `InProcess` (Ray not imported)."""
    check_options(workers, ray_address)
    if workers is None and ray_address is None:
        return InProcess()
    return RayExecutor(workers, ray_address)


def chunks(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """`items` cut into at most `parts` contiguous chunks of near-equal length (order kept)."""
    items = list(items)
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        out.append(items[start:end])
        start = end
    return [chunk for chunk in out if chunk]
