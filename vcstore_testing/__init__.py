"""Tools to test vcstore and other store backends with real processes.

- `WorkerPool`, `Worker`, `Pending`: worker processes that compete for stores
  (`vcstore_testing.workers`).
- `Prober`: how an item's lock is held right now, seen from another process
  (`vcstore_testing.probe`, which also has the one-shot `probe` function).
- `vcstore_testing.machines`: hypothesis state machines. Importing this
  package does not import hypothesis; importing the machines does.

The names below are imported on first use, so that ``import vcstore_testing``
(which the pytest plugin triggers in every test run) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "Pending",
    "Prober",
    "Worker",
    "WorkerDiedError",
    "WorkerError",
    "WorkerPool",
    "WorkerTimeoutError",
]

_HOMES = {
    "Pending": "workers",
    "Worker": "workers",
    "WorkerDiedError": "workers",
    "WorkerError": "workers",
    "WorkerPool": "workers",
    "WorkerTimeoutError": "workers",
    "Prober": "probe",
}

if TYPE_CHECKING:
    from .probe import Prober
    from .workers import (
        Pending,
        Worker,
        WorkerDiedError,
        WorkerError,
        WorkerPool,
        WorkerTimeoutError,
    )


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
