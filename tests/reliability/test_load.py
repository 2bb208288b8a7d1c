"""Concurrency under load: threads, processes, and forks while locks are held.

The durations are short by default (2 s for 16 threads, 3 s for 8 processes)
so that CI stays fast. ``VCSTORE_LONG=1`` runs them for 10 s and 30 s. A clean
run is evidence, not proof: the outcome depends on timing. Each checker is
shown able to fail on a broken lock in the same file.
"""

import dataclasses
import multiprocessing
import os
import random
import signal
import threading
import time

import pytest

import vcstore
from vcstore import Item
from vcstore.filesystem import FilesystemStore
from vcstore_testing.stress import run_stress
from helpers import fd_count, fds_open_on
from reliability.helpers import (
    PROCESS_LOAD_SECONDS,
    THREAD_LOAD_SECONDS,
    IgnoredFlockIO,
    held_tokens,
    is_flock_free,
    lock_once_in_child,
    put_child_report,
)

pytestmark = [pytest.mark.reliability, pytest.mark.load]

THREADS = 16
PROCESSES = 8
LOCKED_ITEMS = [Item.LOCK, Item.STATE, Item.NETWORK]
DATA_ITEMS = [Item.STATE, Item.NETWORK, Item.AGENT]

# Seconds a thread may take to finish after the load ends. Under a working lock
# each waiter gets its turn within milliseconds; it bounds a hang and is never asserted.
STOP_GRACE = 10.0


# ---------------------------------------------------------------------------
# 16 threads of mixed operations on one store


@dataclasses.dataclass
class ThreadLoad:
    """What the threads did and what they found wrong."""

    operations: int = 0
    tokens: list = dataclasses.field(default_factory=list)
    unlocked: list = dataclasses.field(default_factory=list)
    raw_urls: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)
    overlaps: list = dataclasses.field(default_factory=list)
    torn: list = dataclasses.field(default_factory=list)
    descriptors_before: int = 0
    descriptors_after: int = 0
    tokens_left: list = dataclasses.field(default_factory=list)
    locks_free: bool = True


class Occupancy:
    """Who holds each item's lock, as the threads report it, checked on every entry.

    A thread enters after `item_lock` returns and leaves before `item_unlock`,
    so its window lies inside the real lock's window.
    """

    def __init__(self):
        self._mutex = threading.Lock()
        self._holders = {item: [0, 0] for item in Item}

    def enter(self, item, exclusive) -> str:
        with self._mutex:
            shared, exclusive_count = self._holders[item]
            if exclusive_count or (exclusive and shared):
                problem = f"{item!r}: {'exclusive' if exclusive else 'shared'} entry beside {shared} shared and {exclusive_count} exclusive"
            else:
                problem = None
            self._holders[item][1 if exclusive else 0] += 1
            return problem

    def leave(self, item, exclusive) -> None:
        with self._mutex:
            self._holders[item][1 if exclusive else 0] -= 1


def _thread_loop(store, index, deadline, load, occupancy, results_lock):
    rng = random.Random(index)
    sequence = 0
    while time.monotonic() < deadline:
        choice = rng.random()
        try:
            if choice < 0.25:
                sequence += 1
                store.store(rng.choice(DATA_ITEMS), {"thread": index, "sequence": sequence, "fill": "x" * rng.randrange(2000)})
            elif choice < 0.45:
                _check_loaded(store, rng.choice(DATA_ITEMS), load, results_lock)
            elif choice < 0.55:
                url = store.raw() if rng.random() < 0.5 else store.raw("shared-disk")
                with results_lock:
                    load.raw_urls.append(url)
            else:
                _locked_section(store, rng, load, occupancy, results_lock)
        except Exception as error:  # noqa: BLE001 - every error is a finding
            with results_lock:
                load.errors.append(f"thread {index}: {type(error).__name__}: {error}")
        with results_lock:
            load.operations += 1


def _check_loaded(store, item, load, results_lock):
    try:
        value = store.load(item)
    except vcstore.ItemNotFoundError:
        return
    if not (isinstance(value, dict) and {"thread", "sequence", "fill"} <= value.keys()):
        with results_lock:
            load.torn.append(repr(value)[:80])


def _locked_section(store, rng, load, occupancy, results_lock):
    item = rng.choice(LOCKED_ITEMS)
    exclusive = rng.random() < 0.6
    # Blocking waits, try-locks and short timeouts; each thread holds one token at most.
    timeout = rng.choice([None, 0, 0.05])
    try:
        token = store.item_lock(item, exclusive=exclusive, timeout=timeout)
    except vcstore.LockTimeoutError:
        return
    with results_lock:
        load.tokens.append(token)
    problem = occupancy.enter(item, exclusive)
    if problem:
        with results_lock:
            load.overlaps.append(problem)
    time.sleep(rng.random() * 0.002)
    occupancy.leave(item, exclusive)
    store.item_unlock(item, token)
    with results_lock:
        load.unlocked.append(token)


def run_thread_load(store, seconds: float) -> ThreadLoad:
    load = ThreadLoad()
    occupancy = Occupancy()
    results_lock = threading.Lock()
    # Creates the lock files and raw/shared-disk first, so that they do not count as growth.
    for item in LOCKED_ITEMS:
        store.item_unlock(item, store.item_lock(item))
    store.raw("shared-disk")
    load.descriptors_before = fd_count()

    deadline = time.monotonic() + seconds
    # Daemons, so that a thread stuck on a lock that is never released cannot keep pytest alive.
    threads = [
        threading.Thread(target=_thread_loop, args=(store, index, deadline, load, occupancy, results_lock), daemon=True)
        for index in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline + STOP_GRACE - time.monotonic()))
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        load.errors.append(f"{len(stuck)} threads still running {STOP_GRACE} s after the end: a lock never released")

    load.descriptors_after = fd_count()
    load.tokens_left = held_tokens(store)
    load.locks_free = all(is_flock_free(store.path / item.lock_name) for item in LOCKED_ITEMS)
    return load


@pytest.fixture(scope="module")
def thread_load(tmp_path_factory):
    store = vcstore.open(tmp_path_factory.mktemp("threads") / "store")
    load = run_thread_load(store, THREAD_LOAD_SECONDS)
    yield load
    store.delete()


def test_threads_raise_no_unexpected_error(thread_load):
    assert thread_load.errors == []


def test_threads_did_work(thread_load):
    assert len(thread_load.tokens) > THREADS


def test_threads_get_unique_tokens(thread_load):
    assert len(set(thread_load.tokens)) == len(thread_load.tokens)


def test_threads_lose_no_token(thread_load):
    assert sorted(thread_load.unlocked) == sorted(thread_load.tokens)
    assert thread_load.tokens_left == []
    assert thread_load.locks_free


def test_threads_never_overlap_exclusive(thread_load):
    assert thread_load.overlaps == []


def test_threads_never_load_torn_value(thread_load):
    assert thread_load.torn == []


def test_threads_get_unique_raw_files(thread_load):
    unique = [url for url in thread_load.raw_urls if not url.endswith("/shared-disk")]
    assert len(set(unique)) == len(unique)


def test_threads_leak_no_descriptor(thread_load):
    assert thread_load.descriptors_after == thread_load.descriptors_before


def test_thread_checker_catches_ignored_lock(tmp_path):
    # The same load on a lock that excludes nothing must show overlaps.
    store = FilesystemStore(tmp_path / "store", io=IgnoredFlockIO())
    load = run_thread_load(store, 0.5)
    store.delete()
    assert load.overlaps != []


# ---------------------------------------------------------------------------
# 8 processes incrementing a counter under the lock, checked as a history


@pytest.fixture(scope="module")
def process_history(tmp_path_factory):
    path = tmp_path_factory.mktemp("processes") / "store"
    return run_stress(str(path), seconds=PROCESS_LOAD_SECONDS, workers=PROCESSES, threads=1)


def test_processes_never_overlap(process_history):
    assert process_history.overlaps == [], str(process_history)


def test_processes_lose_no_update(process_history):
    assert process_history.lost_updates == [], str(process_history)


def test_processes_raise_no_error(process_history):
    assert process_history.errors == [], str(process_history)


def test_processes_did_work(process_history):
    assert process_history.increments > PROCESSES


def _no_flock_store(target):
    return FilesystemStore(target, io=IgnoredFlockIO())


def test_history_checker_catches_ignored_lock(tmp_path):
    # A lock that excludes nothing loses increments: the check above can fail.
    result = run_stress(str(tmp_path / "store"), seconds=1.0, workers=4, threads=1, store_factory=_no_flock_store)
    assert not result.valid


# ---------------------------------------------------------------------------
# Children started while the parent holds a lock, with each start method

START_METHODS = ["fork", "forkserver", "spawn"]


@pytest.fixture(params=START_METHODS)
def child_report(request, tmp_path):
    """Start a child with one start method while holding Item.LOCK; return its report."""
    context = multiprocessing.get_context(request.param)
    store = vcstore.open(tmp_path / "store")
    token = store.item_lock(Item.LOCK, exclusive=True)
    queue = context.Queue()
    child = context.Process(target=put_child_report, args=(queue, str(store.path), token))
    child.start()
    try:
        report = queue.get(timeout=60)
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()
            child.join()
        queue.close()
        queue.join_thread()
    assert "error" not in report, report
    yield store, token, report
    store.delete()


def test_child_cannot_unlock_parent_token(child_report):
    _, _, report = child_report
    assert report["unlock"] == "UnknownTokenError"


def test_child_has_no_parent_lock_descriptor(child_report):
    _, _, report = child_report
    assert report["lock fds"] == []


def test_child_cannot_take_parent_lock(child_report):
    _, _, report = child_report
    assert report["relock"] == "LockTimeoutError"


def test_child_locks_other_items(child_report):
    _, _, report = child_report
    assert report["other item"] == "locked and unlocked"


def test_parent_keeps_lock_after_child_exits(child_report):
    store, _, _ = child_report
    assert not is_flock_free(store.path / "lock")


def test_parent_unlocks_after_child_exits(child_report):
    store, token, _ = child_report
    store.item_unlock(Item.LOCK, token)
    assert is_flock_free(store.path / "lock")


def test_parent_keeps_one_lock_descriptor(child_report):
    store, _, _ = child_report
    assert len(fds_open_on(store.path / "lock")) == 1


def _churn(store, stop, errors):
    rng = random.Random()
    while not stop.is_set():
        item = rng.choice(LOCKED_ITEMS)
        try:
            token = store.item_lock(item, exclusive=rng.random() < 0.5, timeout=0.05)
        except vcstore.LockTimeoutError:
            continue
        except Exception as error:  # noqa: BLE001 - reported by the test
            errors.append(repr(error))
            return
        store.item_unlock(item, token)


def test_fork_during_lock_churn_never_hangs(tmp_path):
    # Race: a fork while another thread holds the token table's mutex.
    store = vcstore.open(tmp_path / "store")
    stop = threading.Event()
    errors = []
    churners = [threading.Thread(target=_churn, args=(store, stop, errors), daemon=True) for _ in range(4)]
    for thread in churners:
        thread.start()
    statuses = []
    try:
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                os._exit(lock_once_in_child(str(store.path), 10.0))
            statuses.append(_wait_or_kill(pid, 20.0))
    finally:
        stop.set()
        for thread in churners:
            thread.join(10)
        store.delete()
    assert errors == []
    assert statuses == [0] * 20


def test_fork_while_token_table_busy(tmp_path):
    # Race: fork while another thread holds the token table's mutex, which the
    # child inherits locked with no thread left to release it.
    from vcstore.tokens import TOKENS

    store = vcstore.open(tmp_path / "store")
    mutex_held, release = threading.Event(), threading.Event()

    def hold_mutex():
        with TOKENS._mutex:
            mutex_held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_mutex, daemon=True)
    holder.start()
    try:
        assert mutex_held.wait(10)
        pid = os.fork()
        if pid == 0:
            os._exit(lock_once_in_child(str(store.path), 5.0))
    finally:
        release.set()
        holder.join(10)
    status = _wait_or_kill(pid, 15.0)
    store.delete()
    assert status == 0


def _wait_or_kill(pid: int, seconds: float) -> int:
    """Return the exit status of child *pid*, or -SIGKILL if it had to be killed as hung."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -signal.SIGKILL

