"""The stress mode: free-running lock contention for a bounded time, then a history check.

Worker processes, each running a few threads, loop until the time is up:
take a lock on one item (usually exclusive, sometimes shared), and under an
exclusive lock increment a counter kept in that same item (load, add one,
store). Every thread records its operations as a history
(`vcstore_testing.history`), and the checker then reports overlapping
exclusive windows and lost increments::

    result = run_stress("/tmp/stress-store", seconds=2.0)
    assert result.valid, str(result)

Unlike the machines, the outcome depends on timing: a clean run is evidence,
not proof. The counter lives in the locked item on purpose, so that a backend
that locks the file which `store` replaces loses updates too.
"""

from __future__ import annotations

import random
import secrets
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import vcstore
from vcstore import Item

from .history import CheckResult, Recorder, check, read_history
from .workers import Worker, WorkerPool

__all__ = ["run_stress"]

# Share of lock requests that are shared: readers that load the counter.
SHARED_FRACTION = 0.25

# Seconds a worker may take to stop after the time is up before it is killed.
# Under a working lock every waiter gets its turn within milliseconds, so a
# worker still running after this is stuck, most likely on a lock that was
# never released.
STOP_GRACE = 10.0


def run_stress(
    target: Any,
    seconds: float = 2.0,
    workers: int = 3,
    store_factory: Callable[[Any], Any] = vcstore.open,
    start_method: str = "fork",
    history_dir: Any = None,
    *,
    threads: int = 2,
    item: Item = Item.STATE,
) -> CheckResult:
    """Run lock contention on *target* for *seconds*, then check the history.

    *workers* processes of *threads* threads each open *target* (a store URL
    or path) with *store_factory* and loop until the time is up, taking
    blocking locks on *item* and incrementing the integer counter stored in
    *item* under each exclusive lock. A missing counter counts as 0. The
    events go to *history_dir* (which must hold no ``*.jsonl`` file yet) and
    stay there, or to a temporary directory that is removed afterwards.

    Returns the `CheckResult` of `vcstore_testing.history.check`. Its
    ``errors`` also list exceptions raised in a worker (a load of a torn
    file, say) and workers that were still running `STOP_GRACE` seconds after
    the time was up, which were killed. Raises `ValueError` for invalid
    arguments, and what the backend raises when the counter cannot be read
    before the run.
    """
    _check_arguments(seconds, workers, threads, item)
    if history_dir is None:
        directory = Path(tempfile.mkdtemp(prefix="vcstore-history-"))
    else:
        directory = _prepare_history_dir(history_dir)

    try:
        with WorkerPool(workers, store_factory, start_method) as pool:
            initial = _load_counter(pool[0], target, item)
            errors = _contend_everywhere(pool, target, store_factory, directory, threads, item, seconds)
            final = _final_counter(pool, target, item, errors)
        result = check(read_history(directory), final, initial_value=initial)
    finally:
        if history_dir is None:
            shutil.rmtree(directory, ignore_errors=True)

    result.errors.extend(errors)
    return result


def _check_arguments(seconds: float, workers: int, threads: int, item: Item) -> None:
    if not seconds > 0:
        raise ValueError(f"invalid seconds {seconds!r}: expected a duration > 0")
    for name, value in (("workers", workers), ("threads", threads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"invalid {name} {value!r}: expected an int >= 1")
    if not isinstance(item, Item) or item is Item.LOCK:
        raise ValueError(
            f"invalid item {item!r}: the counter needs an Item that holds data, "
            f"such as Item.STATE (Item.LOCK holds none)"
        )


def _prepare_history_dir(history_dir: Any) -> Path:
    directory = Path(history_dir)
    directory.mkdir(parents=True, exist_ok=True)
    # The checker merges every *.jsonl file it finds, so old events would mix in.
    if any(directory.glob("*.jsonl")):
        raise ValueError(
            f"invalid history_dir {str(directory)!r}: it holds events of an earlier run; "
            f"pass an empty directory"
        )
    return directory


def _load_counter(worker: Worker, target: Any, item: Item) -> int:
    try:
        value = worker.load(target, item)
    except vcstore.ItemNotFoundError:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(
            f"cannot stress {target!r}: {item!r} holds {type(value).__name__} {value!r}, "
            f"not an integer counter; use an empty store"
        )
    return value


def _contend_everywhere(
    pool: WorkerPool,
    target: Any,
    store_factory: Callable[[Any], Any],
    directory: Path,
    threads: int,
    item: Item,
    seconds: float,
) -> list[str]:
    """Run the contention loop in every worker; return the errors."""
    # time.monotonic is one clock for every process of the machine.
    deadline = time.monotonic() + seconds
    seed = secrets.randbits(32)
    arguments = (target, store_factory, str(directory))
    running = [
        worker.submit("run", _contend, *arguments, worker.index, threads, item, deadline, seed)
        for worker in pool
    ]

    errors = []
    for worker, pending in zip(pool, running):
        if not pending.wait(max(0.0, deadline + STOP_GRACE - time.monotonic())):
            worker.kill()
            errors.append(
                f"worker {worker.index} was still running {STOP_GRACE:g} s after the end and "
                f"was killed: a lock that is never released, or a lock call that never returns"
            )
            continue
        try:
            errors.extend(pending.result(0))
        except Exception as error:
            errors.append(f"worker {worker.index} failed: {type(error).__name__}: {error}")
    return errors


def _final_counter(pool: WorkerPool, target: Any, item: Item, errors: list[str]) -> int | None:
    reader = pool[0]
    if not reader.alive:
        reader.restart()
    try:
        return _load_counter(reader, target, item)
    except Exception as error:
        errors.append(f"loading the final counter failed: {type(error).__name__}: {error}")
        return None


# ----------------------------------------------------------------------------
# Inside a worker


def _contend(
    target: Any,
    store_factory: Callable[[Any], Any],
    directory: str,
    worker_index: int,
    threads: int,
    item: Item,
    deadline: float,
    seed: int,
) -> list[str]:
    """Run *threads* contention loops until *deadline*; return their errors."""
    store = store_factory(target)
    errors: list[str] = []
    loops = []
    for thread_index in range(threads):
        process = worker_index * threads + thread_index
        rng = random.Random(f"{seed}-{process}")
        loop = threading.Thread(
            target=_contend_in_thread,
            args=(store, directory, process, item, deadline, rng, errors),
            name=f"vcstore-stress-{process}",
        )
        loop.start()
        loops.append(loop)
    for loop in loops:
        loop.join()
    return errors


def _contend_in_thread(
    store: Any,
    directory: str,
    process: int,
    item: Item,
    deadline: float,
    rng: random.Random,
    errors: list[str],
) -> None:
    """Lock, increment or read, unlock, until *deadline*; the first exception ends the loop."""
    with Recorder(directory, process) as recorder:
        try:
            while time.monotonic() < deadline:
                exclusive = rng.random() >= SHARED_FRACTION
                _locked_operation(store, recorder, item, exclusive)
        except Exception:
            # list.append is atomic, so the threads need no lock of their own here.
            errors.append(f"process {process}: {traceback.format_exc().rstrip()}")


def _locked_operation(store: Any, recorder: Recorder, item: Item, exclusive: bool) -> None:
    request = {"item": item.name, "exclusive": exclusive}
    recorder.invoke("lock", request)
    try:
        token = store.item_lock(item, exclusive=exclusive)
    except Exception as error:
        recorder.fail("lock", {**request, "error": repr(error)})
        raise
    held = {"item": item.name, "token": _token_text(token)}
    recorder.ok("lock", {**request, "token": held["token"]})

    try:
        if exclusive:
            _increment(store, recorder, item)
        else:
            _read(store, recorder, item)
    finally:
        recorder.invoke("unlock", held)
        try:
            store.item_unlock(item, token)
        except Exception as error:
            recorder.fail("unlock", {**held, "error": repr(error)})
            raise
        recorder.ok("unlock", held)


def _increment(store: Any, recorder: Recorder, item: Item) -> None:
    recorder.invoke("increment")
    try:
        value = _load_or_zero(store, item)
        store.store(item, value + 1)
    except Exception as error:
        # The store may or may not have taken effect.
        recorder.info("increment", {"error": repr(error)})
        raise
    recorder.ok("increment", {"read": value, "wrote": value + 1})


def _read(store: Any, recorder: Recorder, item: Item) -> None:
    recorder.invoke("read")
    try:
        value = _load_or_zero(store, item)
    except Exception as error:
        recorder.fail("read", {"error": repr(error)})
        raise
    recorder.ok("read", value)


def _load_or_zero(store: Any, item: Item) -> int:
    try:
        return store.load(item)
    except vcstore.ItemNotFoundError:
        return 0


def _token_text(token: Any) -> Any:
    # Tokens are str in vcstore; another backend's token is recorded by its repr.
    return token if isinstance(token, str) else repr(token)
