"""`StoreMachine`: what every machine shares, worker processes on a fresh directory."""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, NoReturn

from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, multiple

import vcstore

from ..probe import Prober
from ..workers import Worker, WorkerPool

__all__ = ["StoreMachine", "fail"]


def fail(message: str) -> NoReturn:
    """Raise the AssertionError that reports a broken expectation.

    Every check of the machines fails through this one line, outside any
    ``except`` block, so that hypothesis treats all of them as one failure
    and reports one shortest program for it.
    """
    raise AssertionError(message)


class StoreMachine(RuleBasedStateMachine):
    """Base of the machines: one pool of workers and one store root per test case.

    Class attributes, for subclasses to set:

    - ``store_factory``: a callable that takes a root directory and returns an
      object with the store API. Every worker (and the probe process) calls it
      with the same existing, empty directory, unique to the test case.
    - ``workers``: how many worker processes compete (default 3).
    - ``start_method``: the `multiprocess` start method (default "fork").
    - ``parent_directory``: where each test case makes its directory (default
      None: the system's temporary directory). The directory is removed at
      teardown.
    - ``worker_deaths``: whether rules that SIGKILL a worker run (default
      True). Set it to False for a backend whose locks do not die with their
      process.

    ``steps`` counts the rules run so far in the test case.
    """

    store_factory: Any = vcstore.open
    workers: int = 3
    start_method: str = "fork"
    parent_directory: str | None = None
    worker_deaths: bool = True

    worker_ids = Bundle("worker")

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.pool: WorkerPool | None = None
        self.prober: Prober | None = None
        self.root = tempfile.mkdtemp(prefix="vcstore-machine-", dir=self.parent_directory)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Misuse is reported when the subclass is defined, not as a confusing failure later.
        if not isinstance(cls.workers, int) or isinstance(cls.workers, bool) or cls.workers < 1:
            raise TypeError(f"invalid {cls.__name__}.workers {cls.workers!r}: use an int >= 1")
        if not callable(cls.store_factory):
            raise TypeError(
                f"invalid {cls.__name__}.store_factory {cls.store_factory!r}: use a "
                f"callable that takes a root directory and returns a store"
            )

    # The class attribute is read through the class: a plain function stored
    # on a class would become a bound method when read through an instance.
    def _factory(self) -> Any:
        return type(self).store_factory

    @initialize(target=worker_ids)
    def start_workers(self):
        return multiple(*range(self.workers))

    def _start_pool(self) -> None:
        # The processes start at the first command: hypothesis gives up on
        # many test cases before that, when its swarm testing turns off every
        # rule that could run.
        if self.pool is None:
            factory = self._factory()
            self.pool = WorkerPool(self.workers, factory, self.start_method)
            self.prober = Prober(factory, self.start_method)

    def _worker(self, index: int) -> Worker:
        self._start_pool()
        return self.pool[index]

    def teardown(self) -> None:
        try:
            if self.pool is not None:
                self.pool.close()
            if self.prober is not None:
                self.prober.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
