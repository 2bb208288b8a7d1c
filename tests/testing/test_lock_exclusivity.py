"""`LockExclusivityMachine`: the real backend passes, broken backends fail."""

import threading
import uuid

import multiprocess
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

import vcstore
from vcstore import Item
from vcstore_testing.machines import LockExclusivityMachine

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
        # The probe's own first lock outlives its unlock.
        (KeptLockStore, "lock states found by the probe differ"),
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
    with pytest.raises(AssertionError):
        run_state_machine_as_test(machine_for(KeptLockStore, tmp_path), settings=SHORT_RUN)

    assert list(tmp_path.iterdir()) == []


def test_zero_workers_rejected_at_definition():
    with pytest.raises(TypeError, match="workers"):
        type("NoWorkers", (LockExclusivityMachine,), {"workers": 0})


def test_uncallable_factory_rejected_at_definition():
    with pytest.raises(TypeError, match="store_factory"):
        type("NoFactory", (LockExclusivityMachine,), {"store_factory": "vcstore.open"})
