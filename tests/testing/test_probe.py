"""`vcstore_testing.probe`: a lock's state as another process finds it."""

import uuid

import pytest

import vcstore
from vcstore import Item
from vcstore_testing.probe import Prober, blocked_waits, kernel_lists_waiters, probe, wait_until_blocked
from vcstore_testing.workers import WorkerPool


class NoLockStore:
    """A broken backend whose item_lock takes no lock at all."""

    def __init__(self, root):
        self._store = vcstore.open(root)

    def __getattr__(self, name):
        return getattr(self._store, name)

    def item_lock(self, item, exclusive, timeout=None):
        return uuid.uuid4().hex

    def item_unlock(self, item, token):
        pass


@pytest.fixture
def store_path(tmp_path):
    yield str(tmp_path / "store")
    vcstore.delete_all()


@pytest.fixture
def pool():
    with WorkerPool(2) as workers:
        yield workers


@pytest.fixture
def prober():
    with Prober() as process:
        yield process


def test_probe_free(store_path):
    assert probe(store_path, Item.STATE) == "free"


def test_probe_shared(pool, store_path):
    pool[0].item_lock(store_path, Item.STATE, exclusive=False)
    pool[1].item_lock(store_path, Item.STATE, exclusive=False)

    assert probe(store_path, Item.STATE) == "shared"


def test_probe_exclusive(pool, store_path):
    pool[0].item_lock(store_path, Item.LOCK, exclusive=True)

    assert probe(store_path, Item.LOCK) == "exclusive"


def test_probe_free_after_unlock(pool, store_path):
    token = pool[0].item_lock(store_path, Item.LOCK, exclusive=True)
    pool[0].item_unlock(store_path, Item.LOCK, token)

    assert probe(store_path, Item.LOCK) == "free"


def test_probe_other_item_free(pool, store_path):
    pool[0].item_lock(store_path, Item.STATE, exclusive=True)

    assert probe(store_path, Item.NETWORK) == "free"


def test_probe_sees_shared_lock_file(pool, store_path):
    # DEVICES and DEVICE_IDS are both stored in devices.json, so one lock file.
    pool[0].item_lock(store_path, Item.DEVICES, exclusive=True)

    assert probe(store_path, Item.DEVICE_IDS) == "exclusive"


def test_probe_sees_lock_of_parent_process(store_path):
    store = vcstore.open(store_path)
    token = store.item_lock(Item.LOCK, exclusive=False)

    assert probe(store_path, Item.LOCK) == "shared"
    store.item_unlock(Item.LOCK, token)


def test_probe_leaves_lock_free(pool, store_path):
    probe(store_path, Item.LOCK)

    assert pool[0].item_lock(store_path, Item.LOCK, exclusive=True, timeout=0)


def test_probe_uses_store_factory(pool, store_path):
    pool[0].item_lock(store_path, Item.LOCK, exclusive=True)

    # The broken backend takes no lock, so it finds every lock free.
    assert probe(store_path, Item.LOCK, NoLockStore) == "free"


def test_prober_states_every_item(pool, prober, store_path):
    pool[0].item_lock(store_path, Item.STATE, exclusive=True)
    pool[1].item_lock(store_path, Item.MOUNTS, exclusive=False)

    states = prober.states(store_path)

    assert states[Item.STATE] == "exclusive"
    assert states[Item.MOUNTS] == "shared"
    assert set(states) == set(Item)
    assert [item for item, state in states.items() if state == "free"] == [
        item for item in Item if item not in (Item.STATE, Item.MOUNTS)
    ]


def test_prober_follows_changes(pool, prober, store_path):
    token = pool[0].item_lock(store_path, Item.AGENT, exclusive=True)
    assert prober(store_path, Item.AGENT) == "exclusive"

    pool[0].item_unlock(store_path, Item.AGENT, token)

    assert prober(store_path, Item.AGENT) == "free"


def test_prober_runs_in_own_process(pool, prober):
    assert prober.pid not in [worker.pid for worker in pool]


# --- waiters that the kernel lists ------------------------------------------------------

needs_proc_locks = pytest.mark.skipif(not kernel_lists_waiters(), reason="needs Linux /proc/locks")


@needs_proc_locks
def test_blocked_waits_lists_flock_waiter(pool, store_path):
    token = pool[0].item_lock(store_path, Item.STATE, True)
    waiter = pool[1].submit("item_lock", store_path, Item.STATE, True)

    assert wait_until_blocked(pool[1].pid)
    pool[0].item_unlock(store_path, Item.STATE, token)
    waiter.result(5)


@needs_proc_locks
def test_blocked_waits_omits_holder(pool, store_path):
    pool[0].item_lock(store_path, Item.STATE, True)

    assert blocked_waits()[pool[0].pid] == 0


@needs_proc_locks
def test_wait_until_blocked_gives_up(pool, store_path):
    assert not wait_until_blocked(pool[0].pid, timeout=0.05)
