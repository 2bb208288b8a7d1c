"""`LockExclusivityMachine`: the real backend passes, broken backends fail."""

import collections
import fcntl
import os
import threading
import time
import uuid

import multiprocess
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

import vcstore
from vcstore import Item
from vcstore_testing.machines import LockExclusivityMachine
from vcstore_testing.probe import blocked_waits, kernel_lists_waiters

# Small, so the file runs in seconds; each broken backend fails within a few steps.
SHORT_RUN = settings(
    max_examples=10,
    stateful_step_count=20,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)

# Finding a failure is enough where the test reads no steps: a long failing
# program can take hypothesis hundreds of test cases to shrink.
FIND_ONLY = settings(SHORT_RUN, phases=[Phase.explicit, Phase.generate])

# For a passing run that must reach rarer steps too.
LONGER_RUN = settings(SHORT_RUN, max_examples=40, stateful_step_count=30)

# For bugs that need a waiter, a delete or a store at the right moment: the
# run stops at the first failure, so a larger budget costs only a passing run.
FIND_LATER = settings(FIND_ONLY, max_examples=100, stateful_step_count=30)


class WrappedStore:
    """A store that passes every call to the real backend; mutants override one."""

    def __init__(self, root):
        self._store = vcstore.open(root)

    def __getattr__(self, name):
        return getattr(self._store, name)


class NoLockStore(WrappedStore):
    """item_lock takes no lock at all."""

    def item_lock(self, item, exclusive, timeout=None):
        return uuid.uuid4().hex

    def item_unlock(self, item, token):
        pass


class KeptLockStore(WrappedStore):
    """item_unlock does not release the lock."""

    def item_unlock(self, item, token):
        pass


class SharedAsExclusiveStore(WrappedStore):
    """A shared request takes an exclusive lock, so readers exclude each other."""

    def item_lock(self, item, exclusive, timeout=None):
        return self._store.item_lock(item, exclusive=True, timeout=timeout)


class NoTryLockStore(WrappedStore):
    """timeout=0 raises LockTimeoutError without trying the lock."""

    def item_lock(self, item, exclusive, timeout=None):
        if timeout == 0:
            raise vcstore.LockTimeoutError(f"{item!r}: timed out")
        return self._store.item_lock(item, exclusive=exclusive, timeout=timeout)


class ReentrantStore(WrappedStore):
    """A process that holds a lock gets it again, as with one descriptor per process."""

    def __init__(self, root):
        super().__init__(root)
        self._mutex = threading.Lock()
        # lock file name -> (item, real token, tokens handed out for it)
        self._locks = {}

    def item_lock(self, item, exclusive, timeout=None):
        with self._mutex:
            entry = self._locks.get(item.lock_name)
            if entry is None:
                real = self._store.item_lock(item, exclusive=exclusive, timeout=timeout)
                entry = self._locks[item.lock_name] = (item, real, set())
            token = uuid.uuid4().hex
            entry[2].add(token)
            return token

    def item_unlock(self, item, token):
        with self._mutex:
            real_item, real, tokens = self._locks[item.lock_name]
            tokens.remove(token)
            if not tokens:
                del self._locks[item.lock_name]
                self._store.item_unlock(real_item, real)


def machine_for(factory, directory, **attributes):
    attributes.update(store_factory=staticmethod(factory), parent_directory=str(directory))
    return type("LockExclusivityMachine", (LockExclusivityMachine,), attributes)


def test_real_backend_passes(tmp_path):
    run_state_machine_as_test(machine_for(vcstore.open, tmp_path), settings=SHORT_RUN)


def test_real_backend_passes_without_deaths(tmp_path):
    machine = machine_for(vcstore.open, tmp_path, worker_deaths=False, workers=2)

    run_state_machine_as_test(machine, settings=SHORT_RUN)


def test_run_removes_test_case_directories(tmp_path):
    run_state_machine_as_test(machine_for(vcstore.open, tmp_path), settings=SHORT_RUN)

    assert list(tmp_path.iterdir()) == []


def test_run_leaves_no_worker(tmp_path):
    run_state_machine_as_test(machine_for(vcstore.open, tmp_path), settings=SHORT_RUN)

    assert multiprocess.active_children() == []


@pytest.mark.parametrize(
    ("broken_store", "message"),
    [
        # The probe after the first lock finds the item free.
        (NoLockStore, "lock states found by the probe differ"),
        # The probe's own first lock outlives its unlock: the next probe, or
        # the probe of a waiter that stays blocked, finds it held.
        (KeptLockStore, "lock states found by the probe differ|the probe finds its lock"),
        # The probe after a shared lock finds it exclusive.
        (SharedAsExclusiveStore, "lock states found by the probe differ"),
        # The first lock request fails although nothing holds the lock.
        (NoTryLockStore, "could not take"),
    ],
)
def test_broken_backend_fails(tmp_path, broken_store, message):
    with pytest.raises(AssertionError, match=message):
        run_state_machine_as_test(machine_for(broken_store, tmp_path), settings=FIND_ONLY)


def test_reentrant_backend_fails(tmp_path):
    # Each token is its own open file description, so a worker's second
    # exclusive request must fail while it holds the first.
    machine = machine_for(ReentrantStore, tmp_path, worker_deaths=False)

    with pytest.raises(AssertionError, match="took a"):
        run_state_machine_as_test(machine, settings=FIND_ONLY)


def test_failure_prints_readable_steps(tmp_path):
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(machine_for(NoLockStore, tmp_path), settings=SHORT_RUN)

    steps = "\n".join(caught.value.__notes__)
    assert "state.item_lock(" in steps
    assert "worker=worker_" in steps
    assert "item=Item." in steps


def test_failure_removes_test_case_directories(tmp_path):
    # FIND_ONLY: shrinking this failure repeats bounded waits for blocked
    # waiters, which takes minutes.
    with pytest.raises(AssertionError):
        run_state_machine_as_test(machine_for(KeptLockStore, tmp_path), settings=FIND_ONLY)

    assert list(tmp_path.iterdir()) == []


def test_zero_workers_rejected_at_definition():
    with pytest.raises(TypeError, match="workers"):
        type("NoWorkers", (LockExclusivityMachine,), {"workers": 0})


def test_uncallable_factory_rejected_at_definition():
    with pytest.raises(TypeError, match="store_factory"):
        type("NoFactory", (LockExclusivityMachine,), {"store_factory": "vcstore.open"})


# --- pending waiters, stores and deletes ------------------------------------------


class UnlinkOnReleaseStore(WrappedStore):
    """item_unlock removes the lock file after it releases the lock."""

    def item_unlock(self, item, token):
        self._store.item_unlock(item, token)
        try:
            os.unlink(os.path.join(self._store.path, item.lock_name))
        except FileNotFoundError:
            pass


class FlockStore(WrappedStore):
    """A backend with locks of its own: flock(2) on the file that lock_path names.

    It never checks after flock that the file is still in place.
    """

    def __init__(self, root):
        super().__init__(root)
        self._mutex = threading.Lock()
        self._descriptors = {}

    def lock_path(self, item):
        return os.path.join(self._store.path, item.lock_name)

    def item_lock(self, item, exclusive, timeout=None):
        fd = os.open(self.lock_path(item), os.O_RDONLY | os.O_CREAT, 0o640)
        operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, operation | (fcntl.LOCK_NB if timeout == 0 else 0))
        except BlockingIOError:
            os.close(fd)
            raise vcstore.LockTimeoutError(f"{item!r}: timed out") from None
        token = uuid.uuid4().hex
        with self._mutex:
            self._descriptors[token] = fd
        return token

    def item_unlock(self, item, token):
        with self._mutex:
            fd = self._descriptors.pop(token)
        os.close(fd)

    def delete(self):
        self._store.delete()
        with self._mutex:
            for fd in self._descriptors.values():
                os.close(fd)
            self._descriptors.clear()


class NoRecheckStore(FlockStore):
    """Locks the right lock file, but never checks after flock that it still exists."""


class DataFileLockStore(FlockStore):
    """Locks the item's data file, which store replaces, as Kata's original did."""

    def lock_path(self, item):
        return os.path.join(self._store.path, item.file_name)

    def load(self, item):
        # The lock creates an empty data file, which means "never stored" here.
        try:
            return self._store.load(item)
        except vcstore.CorruptItemError:
            raise vcstore.ItemNotFoundError(f"{item!r} was never stored") from None


class EarlyGrantStore(WrappedStore):
    """A blocking item_lock returns a token at once, without waiting for the lock."""

    def item_lock(self, item, exclusive, timeout=None):
        if timeout is None:
            return uuid.uuid4().hex
        return self._store.item_lock(item, exclusive=exclusive, timeout=timeout)

    def item_unlock(self, item, token):
        if not isinstance(token, str) or "-" in token:
            self._store.item_unlock(item, token)


class TryOnlyStore(WrappedStore):
    """A blocking item_lock tries once and raises LockTimeoutError instead of waiting."""

    def item_lock(self, item, exclusive, timeout=None):
        if timeout is None:
            timeout = 0
        return self._store.item_lock(item, exclusive=exclusive, timeout=timeout)


class NoBlockingStore(WrappedStore):
    """A backend without blocking locks."""

    def item_lock(self, item, exclusive, timeout=None):
        if timeout is None:
            raise NotImplementedError("blocking locks are not supported")
        return self._store.item_lock(item, exclusive=exclusive, timeout=timeout)


class NoDeleteStore(WrappedStore):
    """A backend that cannot delete a store."""

    def delete(self):
        raise NotImplementedError("delete is not supported")


def test_real_backend_passes_with_bounded_waiters(tmp_path):
    machine = machine_for(vcstore.open, tmp_path, waiter_timeout=30.0)

    run_state_machine_as_test(machine, settings=SHORT_RUN)


def test_unlinked_lock_file_fails(tmp_path):
    # The next lock creates a new lock file, so its holder and a holder of
    # the unlinked one both hold the item: a try-lock succeeds where it must
    # fail, or the probe finds an exclusive holder beside a shared one.
    with pytest.raises(AssertionError, match="took a|probe differ"):
        run_state_machine_as_test(machine_for(UnlinkOnReleaseStore, tmp_path), settings=FIND_LATER)


def test_lock_on_data_file_fails(tmp_path):
    # A store replaces the data file, so the next lock takes the new file
    # while a holder keeps the old one. Without deletes, the missing check
    # after flock that it shares with NoRecheckStore stays out of the way.
    machine = machine_for(DataFileLockStore, tmp_path, deletes=False)

    with pytest.raises(AssertionError, match="took a|probe differ"):
        run_state_machine_as_test(machine, settings=FIND_LATER)


def test_missing_identity_recheck_fails(tmp_path):
    # A waiter that wakes up when the store is deleted locks a deleted lock file.
    with pytest.raises(AssertionError, match="after the store was deleted"):
        run_state_machine_as_test(machine_for(NoRecheckStore, tmp_path), settings=FIND_LATER)


def test_early_blocking_grant_fails(tmp_path):
    # A conflicting waiter returns at once, or a granted one holds no lock.
    with pytest.raises(AssertionError, match="with a blocking request although|probe differ"):
        run_state_machine_as_test(machine_for(EarlyGrantStore, tmp_path), settings=FIND_LATER)


def test_blocking_lock_that_gives_up_fails(tmp_path):
    with pytest.raises(AssertionError, match="raised LockTimeoutError .* while it must wait"):
        run_state_machine_as_test(machine_for(TryOnlyStore, tmp_path), settings=FIND_LATER)


def test_pending_waiters_switch_off(tmp_path):
    machine = machine_for(NoBlockingStore, tmp_path, pending_waiters=False)

    run_state_machine_as_test(machine, settings=SHORT_RUN)


def test_deletes_switch_off(tmp_path):
    machine = machine_for(NoDeleteStore, tmp_path, deletes=False)

    run_state_machine_as_test(machine, settings=SHORT_RUN)


def test_failure_prints_waiter_steps(tmp_path):
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(machine_for(EarlyGrantStore, tmp_path), settings=FIND_LATER)

    steps = "\n".join(caught.value.__notes__)
    assert "state.wait_for_lock(" in steps
    assert "holder=token_" in steps


def test_real_backend_passes_waiter_checks(tmp_path):
    checked = collections.Counter()

    class Counting(machine_for(vcstore.open, tmp_path)):
        def _collect_grant(self, waiter, reason):
            checked["granted"] += 1
            return super()._collect_grant(waiter, reason)

        def _expect_store_deleted(self, waiter):
            checked["woken by a delete"] += 1
            super()._expect_store_deleted(waiter)

    run_state_machine_as_test(Counting, settings=LONGER_RUN)

    # The run is long enough to wake waiters both ways.
    assert checked["granted"] > 0
    assert checked["woken by a delete"] > 0


# --- waiters in the kernel's queue --------------------------------------------------


class PollingStore(WrappedStore):
    """A blocking item_lock that retries a try-lock, so the kernel never lists it as waiting."""

    def item_lock(self, item, exclusive, timeout=None):
        if timeout is not None:
            return self._store.item_lock(item, exclusive=exclusive, timeout=timeout)
        while True:
            try:
                return self._store.item_lock(item, exclusive=exclusive, timeout=0)
            except vcstore.LockTimeoutError:
                time.sleep(0.001)


needs_proc_locks = pytest.mark.skipif(not kernel_lists_waiters(), reason="needs Linux /proc/locks")


class SlowToWaitStore(WrappedStore):
    """A blocking item_lock that takes a while to reach flock."""

    def item_lock(self, item, exclusive, timeout=None):
        if timeout is None:
            time.sleep(0.1)
        return self._store.item_lock(item, exclusive=exclusive, timeout=timeout)


@needs_proc_locks
def test_waiter_is_in_kernel_queue_after_its_step(tmp_path):
    # A delete in the next step must find the waiter in flock, not on its way there.
    machine = machine_for(SlowToWaitStore, tmp_path)()
    try:
        holder = machine.item_lock(worker=0, item=Item.STATE, exclusive=True)
        machine.wait_for_lock(worker=1, holder=holder, exclusive=False)

        assert blocked_waits()[machine.pool[1].pid] == 1
    finally:
        machine.teardown()


@needs_proc_locks
def test_polling_backend_fails_with_advice(tmp_path):
    with pytest.raises(AssertionError, match="set kernel_waits = False"):
        run_state_machine_as_test(machine_for(PollingStore, tmp_path), settings=FIND_LATER)


def test_polling_backend_passes_without_kernel_waits(tmp_path):
    machine = machine_for(PollingStore, tmp_path, kernel_waits=False)

    run_state_machine_as_test(machine, settings=SHORT_RUN)
