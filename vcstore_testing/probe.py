"""Find out from another process how a store item's lock is held right now.

The state comes from non-blocking attempts through the backend's own API, in
a process that holds no token: an exclusive attempt with ``timeout=0`` that
succeeds means "free"; else a shared attempt that succeeds means "shared";
else the lock is "exclusive". Each successful attempt is released at once.

The state is exact only while nobody else locks or unlocks the item, so use
it between the steps of a test, not during a race. A probe briefly holds the
lock itself, so a waiter that is blocked on it may stay blocked a little longer,
and a backend whose unlock is broken will keep the probe's lock too.

`blocked_waits` reads the kernel's own list instead: on Linux,
``/proc/locks`` names every process that is blocked in flock(2) or fcntl(2),
whatever backend made the call.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import vcstore

from .workers import DEFAULT_CALL_TIMEOUT, WorkerPool, probe_lock_state

__all__ = [
    "LOCK_STATES",
    "Prober",
    "blocked_waits",
    "kernel_lists_waiters",
    "probe",
    "probe_lock_state",
    "wait_until_blocked",
]

# The lock states a probe returns, from least to most restrictive.
LOCK_STATES = ("free", "shared", "exclusive")

PROC_LOCKS = "/proc/locks"

# Seconds between two reads of PROC_LOCKS while waiting for a waiter to block.
_POLL_SECONDS = 0.0005


class Prober:
    """One probe process, kept for many probes (a probe then costs one round trip).

    ``prober(target, item)`` returns "free", "shared" or "exclusive";
    ``prober.states(target, items)`` probes several items at once. The process
    opens each target once with *store_factory* and keeps the store object.
    Close it with `close` or use it as a context manager::

        with Prober() as prober:
            assert prober(path, Item.LOCK) == "free"
    """

    def __init__(
        self,
        store_factory: Callable[[Any], Any] = vcstore.open,
        start_method: str = "fork",
        *,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        self._pool = WorkerPool(
            1, store_factory, start_method, call_timeout=call_timeout
        )

    def __call__(self, target: Any, item: vcstore.Item) -> str:
        return self.states(target, (item,))[item]

    def states(self, target: Any, items: Iterable[vcstore.Item] = tuple(vcstore.Item)) -> dict:
        """Return ``{item: state}`` for *items* (default: every item) of *target*."""
        return self._pool[0].probe(target, tuple(items))

    @property
    def pid(self) -> int:
        """Process id of the probe process."""
        return self._pool[0].pid

    def close(self) -> None:
        """Stop the probe process. Calling it again does nothing."""
        self._pool.close()

    def __enter__(self) -> Prober:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def probe(
    target: Any,
    item: vcstore.Item,
    store_factory: Callable[[Any], Any] = vcstore.open,
) -> str:
    """Return "free", "shared" or "exclusive" for *item*'s lock in *target*.

    Starts a short-lived process (fork) for the one probe; use a `Prober` to
    probe many times. Raises what the backend raises, for example
    `vcstore.StoreDeletedError` once the store was deleted.
    """
    with Prober(store_factory) as prober:
        return prober(target, item)


def kernel_lists_waiters() -> bool:
    """Return True where the kernel lists blocked lock requests (Linux ``/proc/locks``)."""
    return os.path.exists(PROC_LOCKS)


def blocked_waits() -> Counter:
    """Return how many lock requests each process is blocked in, by process id.

    A blocked request has its own line in ``/proc/locks``, marked ``->``::

        2: -> FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF

    Threads of one process count under the process's id.
    """
    waits: Counter = Counter()
    with open(PROC_LOCKS) as locks:
        for line in locks:
            fields = line.split()
            if len(fields) > 5 and fields[1] == "->":
                waits[int(fields[5])] += 1
    return waits


def wait_until_blocked(
    pid: int, count: int = 1, timeout: float = 1.0, until: Callable[[], bool] | None = None
) -> bool:
    """Wait until process *pid* is blocked in at least *count* lock requests.

    Returns True once ``/proc/locks`` shows them, False after *timeout*
    seconds or as soon as *until* (if given) returns True. A test uses it to
    act on a waiter only once it sits in the kernel's queue, not still on
    its way there; *until* stops the wait for a waiter that returned instead.
    """
    deadline = time.monotonic() + timeout
    while blocked_waits()[pid] < count:
        if time.monotonic() >= deadline or (until is not None and until()):
            return False
        time.sleep(_POLL_SECONDS)
    return True
