"""Item locks, checked against other real processes, threads and forks."""

import errno
import os
import random
import threading

import pytest

import vcstore
from vcstore import Item
from vcstore.filesystem import FilesystemStore
from vcstore.fsio import OsIO
from helpers import (
    Background,
    Peer,
    failing_io,
    fd_count,
    fds_open_on,
    is_flock_request,
    run_in_fork,
    run_in_thread,
    snapshot,
    wait_blocked_in_flock,
)


@pytest.fixture
def store(tmp_path):
    opened = vcstore.open(tmp_path / "store")
    yield opened
    opened.delete()


@pytest.fixture
def peer():
    with Peer() as process:
        yield process


@pytest.fixture
def other_peer():
    with Peer() as process:
        yield process


def where(store) -> str:
    return str(store.path)


def outcome_of(peer) -> str:
    """Return "blocked", "token" or the exception's type name for a peer's pending lock."""
    if peer.is_blocked(0.5):
        return "blocked"
    try:
        result = peer.reply()
    except Exception as error:  # noqa: BLE001 - the type is the outcome
        return type(error).__name__
    return "token" if isinstance(result, str) else repr(result)


# ---------------------------------------------------------------------------
# Exclusion between processes


def test_exclusive_excludes_other_process_exclusive(store, peer):
    store.item_lock(Item.LOCK, exclusive=True)
    with pytest.raises(vcstore.LockTimeoutError):
        peer.call("lock", where(store), "LOCK", True, 0)


def test_exclusive_excludes_other_process_shared(store, peer):
    store.item_lock(Item.LOCK, exclusive=True)
    with pytest.raises(vcstore.LockTimeoutError):
        peer.call("lock", where(store), "LOCK", False, 0)


def test_shared_excludes_other_process_exclusive(store, peer):
    store.item_lock(Item.LOCK, exclusive=False)
    with pytest.raises(vcstore.LockTimeoutError):
        peer.call("lock", where(store), "LOCK", True, 0)


def test_shared_coexists_with_other_process_shared(store, peer):
    store.item_lock(Item.LOCK, exclusive=False)
    assert isinstance(peer.call("lock", where(store), "LOCK", False, 0), str)


def test_other_process_exclusive_excludes_this_process(store, peer):
    peer.call("lock", where(store), "LOCK", True, None)
    with pytest.raises(vcstore.LockTimeoutError):
        store.item_lock(Item.LOCK, exclusive=True, timeout=0)


def test_unlock_frees_lock_for_other_process(store, peer):
    token = store.item_lock(Item.LOCK, exclusive=True)
    store.item_unlock(Item.LOCK, token)
    assert peer.probe(store.path, "LOCK") == "free"


def test_waiting_process_gets_lock_after_unlock(store, peer):
    token = store.item_lock(Item.LOCK, exclusive=True)
    peer.send("lock", where(store), "LOCK", True, None)
    assert peer.is_blocked()
    store.item_unlock(Item.LOCK, token)
    assert isinstance(peer.reply(), str)


def test_waiting_process_with_timeout_gets_lock_after_unlock(store, peer):
    token = store.item_lock(Item.LOCK, exclusive=True)
    peer.send("lock", where(store), "LOCK", True, 30)
    assert peer.is_blocked()
    store.item_unlock(Item.LOCK, token)
    assert isinstance(peer.reply(), str)


def test_killed_holder_loses_lock(store, peer):
    # Crash: a holder killed with SIGKILL unlocks nothing itself.
    peer.call("lock", where(store), "LOCK", True, None)
    peer.kill()
    assert isinstance(store.item_lock(Item.LOCK, exclusive=True, timeout=10), str)


def test_killed_holder_wakes_waiter(store, peer, other_peer):
    peer.call("lock", where(store), "LOCK", True, None)
    other_peer.send("lock", where(store), "LOCK", True, None)
    assert other_peer.is_blocked()
    peer.kill()
    assert isinstance(other_peer.reply(), str)


# ---------------------------------------------------------------------------
# Timeouts


def test_try_once_raises_lock_timeout(store, peer):
    peer.call("lock", where(store), "LOCK", True, None)
    with pytest.raises(vcstore.LockTimeoutError):
        store.item_lock(Item.LOCK, exclusive=True, timeout=0)


def test_lock_timeout_is_timeout_error(store, peer):
    peer.call("lock", where(store), "LOCK", True, None)
    with pytest.raises(TimeoutError):
        store.item_lock(Item.LOCK, exclusive=True, timeout=0)


def test_lock_timeout_names_item(store, peer):
    peer.call("lock", where(store), "STATE", True, None)
    with pytest.raises(vcstore.LockTimeoutError) as raised:
        store.item_lock(Item.STATE, exclusive=True, timeout=0)
    assert "STATE" in str(raised.value)


def test_positive_timeout_raises_lock_timeout(store, peer):
    peer.call("lock", where(store), "LOCK", True, None)
    with pytest.raises(vcstore.LockTimeoutError):
        store.item_lock(Item.LOCK, exclusive=True, timeout=0.2)


def test_try_once_on_free_lock_succeeds(store):
    assert isinstance(store.item_lock(Item.LOCK, exclusive=True, timeout=0), str)


@pytest.mark.parametrize("timeout", [-1, -0.001, float("-inf")])
def test_negative_timeout_raises_value_error(store, timeout):
    with pytest.raises(ValueError):
        store.item_lock(Item.LOCK, exclusive=True, timeout=timeout)


def test_negative_timeout_locks_nothing(store, peer):
    with pytest.raises(ValueError):
        store.item_lock(Item.LOCK, exclusive=True, timeout=-1)
    assert peer.probe(store.path, "LOCK") == "free"


def test_failed_try_lock_holds_nothing(store, peer):
    peer.call("lock", where(store), "LOCK", False, None)
    with pytest.raises(vcstore.LockTimeoutError):
        store.item_lock(Item.LOCK, exclusive=True, timeout=0)
    assert fds_open_on(store.path / "lock") == []


# ---------------------------------------------------------------------------
# Items and lock files


@pytest.mark.parametrize("item", list(Item), ids=lambda item: item.name)
def test_every_item_lockable_exclusive(store, peer, item):
    store.item_lock(item, exclusive=True)
    assert peer.probe(store.path, item.name) == "exclusive"


@pytest.mark.parametrize("item", list(Item), ids=lambda item: item.name)
def test_every_item_lockable_shared(store, peer, item):
    store.item_lock(item, exclusive=False)
    assert peer.probe(store.path, item.name) == "shared"


@pytest.mark.parametrize("item", list(Item), ids=lambda item: item.name)
def test_lock_is_on_lock_file(store, peer, item):
    # The path is fixed so that tools outside vcstore lock the same file.
    store.item_lock(item, exclusive=True)
    assert peer.call("flock_probe", str(store.path / item.lock_name)) == "exclusive"


def test_lock_item_lock_file_is_lock(store, peer):
    store.item_lock(Item.LOCK, exclusive=False)
    assert peer.call("flock_probe", str(store.path / "lock")) == "shared"


def test_state_lock_file_is_state_json_lock(store, peer):
    store.item_lock(Item.STATE, exclusive=False)
    assert peer.call("flock_probe", str(store.path / "state.json.lock")) == "shared"


def test_data_file_never_locked(store, peer):
    store.store(Item.STATE, "value")
    store.item_lock(Item.STATE, exclusive=True)
    assert peer.call("flock_probe", str(store.path / "state.json")) == "free"


def test_store_works_while_other_process_holds_item_lock(store, peer):
    peer.call("lock", where(store), "STATE", True, None)
    store.store(Item.STATE, "written under a foreign lock")
    assert store.load(Item.STATE) == "written under a foreign lock"


def test_item_lock_survives_store(store, peer):
    # A lock on the data file would be lost when store replaces that file.
    peer.call("lock", where(store), "STATE", True, None)
    store.store(Item.STATE, "new value")
    with pytest.raises(vcstore.LockTimeoutError):
        store.item_lock(Item.STATE, exclusive=True, timeout=0)


def test_store_keeps_lock_file_inode(store):
    store.item_lock(Item.STATE, exclusive=True)
    inode = os.stat(store.path / "state.json.lock").st_ino
    store.store(Item.STATE, "value")
    assert os.stat(store.path / "state.json.lock").st_ino == inode


def test_devices_and_device_ids_share_lock(store, peer):
    peer.call("lock", where(store), "DEVICES", True, None)
    with pytest.raises(vcstore.LockTimeoutError):
        store.item_lock(Item.DEVICE_IDS, exclusive=True, timeout=0)


def test_other_items_independent(store, peer):
    peer.call("lock", where(store), "STATE", True, None)
    assert isinstance(store.item_lock(Item.NETWORK, exclusive=True, timeout=0), str)


def test_other_stores_independent(tmp_path, store, peer):
    peer.call("lock", where(store), "LOCK", True, None)
    other = vcstore.open(tmp_path / "other")
    try:
        assert isinstance(other.item_lock(Item.LOCK, exclusive=True, timeout=0), str)
    finally:
        other.delete()


def test_locked_holds_inside_block(store, peer):
    with store.locked(Item.LOCK, exclusive=True, timeout=5.0):
        assert peer.probe(store.path, "LOCK") == "exclusive"


def test_locked_releases_after_block(store, peer):
    with store.locked(Item.LOCK, exclusive=True, timeout=5.0):
        pass
    assert peer.probe(store.path, "LOCK") == "free"


def test_locked_releases_after_exception(store, peer):
    with pytest.raises(KeyError):
        with store.locked(Item.LOCK, exclusive=True):
            raise KeyError("inside")
    assert peer.probe(store.path, "LOCK") == "free"


def test_locked_shared(store, peer):
    with store.locked(Item.LOCK, exclusive=False, timeout=5.0) as token:
        assert isinstance(token, str)
        assert peer.probe(store.path, "LOCK") == "shared"


# ---------------------------------------------------------------------------
# Plain flock(2) interoperability on <store>/lock


def test_plain_flock_excludes_lock_item(store, peer):
    assert peer.call("flock", str(store.path / "lock"), True) is True
    with pytest.raises(vcstore.LockTimeoutError):
        store.item_lock(Item.LOCK, exclusive=True, timeout=0)


def test_plain_shared_flock_coexists_with_shared_lock_item(store, peer):
    assert peer.call("flock", str(store.path / "lock"), False) is True
    assert isinstance(store.item_lock(Item.LOCK, exclusive=False, timeout=0), str)


def test_lock_item_excludes_plain_flock(store, peer):
    store.item_lock(Item.LOCK, exclusive=True)
    assert peer.call("flock", str(store.path / "lock"), False) is False


# ---------------------------------------------------------------------------
# Conflicts within one thread


def test_same_thread_exclusive_twice_raises_deadlock(store):
    def lock_twice():
        store.item_lock(Item.LOCK, exclusive=True)
        store.item_lock(Item.LOCK, exclusive=True, timeout=None)

    with pytest.raises(vcstore.DeadlockError):
        run_in_thread(lock_twice)


@pytest.mark.parametrize(("first", "second"), [(True, False), (False, True)], ids=["exclusive-shared", "shared-exclusive"])
def test_same_thread_mixed_raises_deadlock(store, first, second):
    def lock_twice():
        store.item_lock(Item.LOCK, exclusive=first)
        store.item_lock(Item.LOCK, exclusive=second, timeout=None)

    with pytest.raises(vcstore.DeadlockError):
        run_in_thread(lock_twice)


def test_deadlock_is_runtime_error(store):
    def lock_twice():
        store.item_lock(Item.LOCK, exclusive=True)
        store.item_lock(Item.LOCK, exclusive=True)

    with pytest.raises(RuntimeError):
        run_in_thread(lock_twice)


def test_same_thread_shared_lock_file_raises_deadlock(store):
    def lock_both():
        store.item_lock(Item.DEVICES, exclusive=True)
        store.item_lock(Item.DEVICE_IDS, exclusive=True)

    with pytest.raises(vcstore.DeadlockError):
        run_in_thread(lock_both)


def test_deadlock_keeps_first_token(store, peer):
    def lock_twice():
        token = store.item_lock(Item.LOCK, exclusive=True)
        try:
            store.item_lock(Item.LOCK, exclusive=True)
        except vcstore.DeadlockError:
            return token

    run_in_thread(lock_twice)
    assert peer.probe(store.path, "LOCK") == "exclusive"


def test_same_thread_exclusive_try_once_raises_timeout(store):
    store.item_lock(Item.LOCK, exclusive=True)
    with pytest.raises(vcstore.LockTimeoutError):
        store.item_lock(Item.LOCK, exclusive=True, timeout=0)


def test_same_thread_timeout_names_own_token(store):
    # Waiting can never help here, so the message must not advise a longer timeout.
    token = store.item_lock(Item.LOCK, exclusive=True)
    with pytest.raises(vcstore.LockTimeoutError) as raised:
        store.item_lock(Item.LOCK, exclusive=True, timeout=0.01)
    assert "this thread holds token" in str(raised.value)
    assert token in str(raised.value)


def test_exited_thread_token_is_no_deadlock(store):
    # Python reuses an exited thread's ident; its tokens must not count as the new thread's.
    taken = {}

    def take_shared():
        taken["ident"] = threading.get_ident()
        taken["token"] = store.item_lock(Item.STATE, exclusive=False)

    first = threading.Thread(target=take_shared)
    first.start()
    first.join()

    for _ in range(50):
        waiter = Background(store.item_lock, Item.STATE, exclusive=True)
        if waiter.ident == taken["ident"]:
            break
        store.item_unlock(Item.STATE, taken["token"])
        store.item_unlock(Item.STATE, waiter.result())
        first = threading.Thread(target=take_shared)
        first.start()
        first.join()
    else:
        pytest.skip("no thread reused the exited thread's ident")

    assert waiter.is_blocked()
    store.item_unlock(Item.STATE, taken["token"])
    store.item_unlock(Item.STATE, waiter.result())


def test_same_thread_shared_twice_blocking(store):
    def lock_twice():
        return [store.item_lock(Item.LOCK, exclusive=False, timeout=None) for _ in range(2)]

    assert len(set(run_in_thread(lock_twice))) == 2


def test_same_thread_other_items(store):
    def lock_two_items():
        return [store.item_lock(item, exclusive=True, timeout=None) for item in (Item.STATE, Item.NETWORK)]

    assert len(run_in_thread(lock_two_items)) == 2


def test_same_thread_relock_after_unlock(store):
    def lock_unlock_lock():
        token = store.item_lock(Item.LOCK, exclusive=True)
        store.item_unlock(Item.LOCK, token)
        return store.item_lock(Item.LOCK, exclusive=True, timeout=None)

    assert isinstance(run_in_thread(lock_unlock_lock), str)


# ---------------------------------------------------------------------------
# Conflicts between threads of one process


def test_other_thread_blocks_on_exclusive(store):
    token = store.item_lock(Item.LOCK, exclusive=True)
    waiter = Background(store.item_lock, Item.LOCK, True, None)
    assert waiter.is_blocked()
    store.item_unlock(Item.LOCK, token)


def test_other_thread_gets_lock_after_unlock(store):
    token = store.item_lock(Item.LOCK, exclusive=True)
    waiter = Background(store.item_lock, Item.LOCK, True, None)
    assert wait_blocked_in_flock(os.getpid())
    store.item_unlock(Item.LOCK, token)
    assert isinstance(waiter.result(), str)


def test_other_thread_shared_blocks_on_exclusive(store):
    token = store.item_lock(Item.LOCK, exclusive=True)
    waiter = Background(store.item_lock, Item.LOCK, False, None)
    assert waiter.is_blocked()
    store.item_unlock(Item.LOCK, token)
    assert isinstance(waiter.result(), str)


def test_other_thread_try_once_raises_timeout(store):
    store.item_lock(Item.LOCK, exclusive=True)
    with pytest.raises(vcstore.LockTimeoutError):
        run_in_thread(store.item_lock, Item.LOCK, True, 0)


# ---------------------------------------------------------------------------
# Unlock errors: nothing is released


def test_unlock_unknown_token_raises(store):
    with pytest.raises(vcstore.UnknownTokenError):
        store.item_unlock(Item.LOCK, "not-a-token")


def test_unknown_token_is_lookup_error(store):
    with pytest.raises(LookupError):
        store.item_unlock(Item.LOCK, "not-a-token")


@pytest.mark.parametrize("token", [None, 1, b"token", ["token"]], ids=repr)
def test_unlock_non_str_token_raises(store, token):
    with pytest.raises(vcstore.UnknownTokenError):
        store.item_unlock(Item.LOCK, token)


def test_unknown_token_names_token(store):
    with pytest.raises(vcstore.UnknownTokenError) as raised:
        store.item_unlock(Item.LOCK, "not-a-token")
    assert "not-a-token" in str(raised.value)


def test_unlock_twice_raises(store):
    token = store.item_lock(Item.LOCK, exclusive=True)
    store.item_unlock(Item.LOCK, token)
    with pytest.raises(vcstore.UnknownTokenError):
        store.item_unlock(Item.LOCK, token)


def test_unlock_twice_keeps_newer_token(store, peer):
    # A second unlock must not release a newer token that reuses the descriptor number.
    old_token = store.item_lock(Item.LOCK, exclusive=False)
    store.item_unlock(Item.LOCK, old_token)
    store.item_lock(Item.LOCK, exclusive=True)
    with pytest.raises(vcstore.UnknownTokenError):
        store.item_unlock(Item.LOCK, old_token)
    assert peer.probe(store.path, "LOCK") == "exclusive"


def test_unlock_with_other_item_raises(store):
    token = store.item_lock(Item.STATE, exclusive=True)
    with pytest.raises(vcstore.UnknownTokenError):
        store.item_unlock(Item.NETWORK, token)


def test_unlock_with_other_item_keeps_lock(store, peer):
    token = store.item_lock(Item.STATE, exclusive=True)
    with pytest.raises(vcstore.UnknownTokenError):
        store.item_unlock(Item.NETWORK, token)
    assert peer.probe(store.path, "STATE") == "exclusive"


def test_unlock_with_item_sharing_lock_file_raises(store):
    token = store.item_lock(Item.DEVICES, exclusive=True)
    with pytest.raises(vcstore.UnknownTokenError):
        store.item_unlock(Item.DEVICE_IDS, token)


def test_unlock_with_right_item_after_wrong_item(store, peer):
    token = store.item_lock(Item.STATE, exclusive=True)
    with pytest.raises(vcstore.UnknownTokenError):
        store.item_unlock(Item.NETWORK, token)
    store.item_unlock(Item.STATE, token)
    assert peer.probe(store.path, "STATE") == "free"


def test_unlock_on_other_store_raises(tmp_path, store):
    other = vcstore.open(tmp_path / "other")
    token = store.item_lock(Item.LOCK, exclusive=True)
    try:
        with pytest.raises(vcstore.UnknownTokenError):
            other.item_unlock(Item.LOCK, token)
    finally:
        other.delete()


def test_unlock_on_other_store_keeps_lock(tmp_path, store, peer):
    other = vcstore.open(tmp_path / "other")
    token = store.item_lock(Item.LOCK, exclusive=True)
    try:
        with pytest.raises(vcstore.UnknownTokenError):
            other.item_unlock(Item.LOCK, token)
    finally:
        other.delete()
    assert peer.probe(store.path, "LOCK") == "exclusive"


def test_unlock_other_process_token_raises(store, peer):
    token = peer.call("lock", where(store), "LOCK", True, None)
    with pytest.raises(vcstore.UnknownTokenError):
        store.item_unlock(Item.LOCK, token)


def test_unlock_other_process_token_keeps_lock(store, peer):
    token = peer.call("lock", where(store), "LOCK", True, None)
    with pytest.raises(vcstore.UnknownTokenError):
        store.item_unlock(Item.LOCK, token)
    with pytest.raises(vcstore.LockTimeoutError):
        store.item_lock(Item.LOCK, exclusive=True, timeout=0)


# ---------------------------------------------------------------------------
# Tokens and thread safety


def test_tokens_are_str(store):
    assert isinstance(store.item_lock(Item.LOCK, exclusive=False), str)


def test_tokens_unique(tmp_path, store):
    other = vcstore.open(tmp_path / "other")
    try:
        tokens = [s.item_lock(item, exclusive=False) for s in (store, other) for item in Item for _ in range(10)]
    finally:
        other.delete()
    assert len(set(tokens)) == len(tokens)


def test_tokens_not_reused_after_unlock(store):
    seen = set()
    for _ in range(100):
        token = store.item_lock(Item.LOCK, exclusive=True, timeout=0)
        store.item_unlock(Item.LOCK, token)
        seen.add(token)
    assert len(seen) == 100


def test_concurrent_lock_and_unlock_across_threads(store, peer):
    # Race: an unguarded token table loses or duplicates entries under threads.
    items = [Item.LOCK, Item.STATE, Item.NETWORK]
    pool, pool_lock = [], threading.Lock()
    errors = []
    barrier = threading.Barrier(8)
    before = fd_count()

    def work(seed):
        chooser = random.Random(seed)
        barrier.wait()
        try:
            for _ in range(40):
                item = chooser.choice(items)
                token = store.item_lock(item, exclusive=False, timeout=10)
                with pool_lock:
                    pool.append((item, token))
                    item, token = pool.pop(chooser.randrange(len(pool)))
                # Often a token that another thread took.
                store.item_unlock(item, token)
        except Exception as error:  # noqa: BLE001 - collected for the assert
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert pool == []
    assert fd_count() == before
    assert [peer.probe(store.path, item.name) for item in items] == ["free"] * 3


def test_concurrent_double_unlock_releases_once(store):
    # Race: two threads unlocking one token must not both succeed.
    for _ in range(20):
        token = store.item_lock(Item.LOCK, exclusive=False)
        barrier = threading.Barrier(2)
        results = []

        def unlock():
            barrier.wait()
            try:
                store.item_unlock(Item.LOCK, token)
                results.append("unlocked")
            except vcstore.UnknownTokenError:
                results.append("unknown")

        threads = [threading.Thread(target=unlock) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) == ["unknown", "unlocked"]


# ---------------------------------------------------------------------------
# Fork: a child does not own its parent's tokens


def _child_unlock_parent_token(store_path, token):
    store = vcstore.open(store_path)
    lock_fds = fds_open_on(os.path.join(store_path, "lock"))
    try:
        store.item_unlock(Item.LOCK, token)
        unlock = "unlocked"
    except vcstore.UnknownTokenError:
        unlock = "UnknownTokenError"
    try:
        store.item_lock(Item.LOCK, exclusive=True, timeout=0)
        relock = "locked"
    except vcstore.LockTimeoutError:
        relock = "LockTimeoutError"
    return {"lock fds": lock_fds, "unlock": unlock, "relock": relock}


@pytest.fixture
def forked_child_report(store):
    token = store.item_lock(Item.LOCK, exclusive=True)
    report = run_in_fork(_child_unlock_parent_token, str(store.path), token)
    return token, report


def test_fork_child_cannot_unlock_parent_token(forked_child_report):
    _, report = forked_child_report
    assert report["unlock"] == "UnknownTokenError"


def test_fork_child_closes_parent_lock_descriptors(forked_child_report):
    _, report = forked_child_report
    assert report["lock fds"] == []


def test_fork_child_cannot_take_parent_lock(forked_child_report):
    _, report = forked_child_report
    assert report["relock"] == "LockTimeoutError"


def test_fork_parent_keeps_lock(store, forked_child_report, peer):
    # A child that unlocked with LOCK_UN on the shared description would free it.
    assert peer.probe(store.path, "LOCK") == "exclusive"


def test_fork_parent_can_unlock(store, forked_child_report, peer):
    token, _ = forked_child_report
    store.item_unlock(Item.LOCK, token)
    assert peer.probe(store.path, "LOCK") == "free"


def test_fork_parent_keeps_lock_fd(store, forked_child_report):
    assert len(fds_open_on(store.path / "lock")) == 1


# ---------------------------------------------------------------------------
# Descriptors


def test_lock_cycles_leak_no_descriptor(store, peer):
    store.item_lock(Item.NETWORK, exclusive=True)  # creates the lock file first
    peer.call("lock", where(store), "STATE", True, None)
    before = fd_count()

    for _ in range(30):
        for exclusive in (True, False):
            token = store.item_lock(Item.LOCK, exclusive=exclusive)
            store.item_unlock(Item.LOCK, token)
        with store.locked(Item.AGENT):
            pass
        for timeout in (0, 0.01):
            with pytest.raises(vcstore.LockTimeoutError):
                store.item_lock(Item.STATE, exclusive=False, timeout=timeout)
        with pytest.raises(vcstore.UnknownTokenError):
            store.item_unlock(Item.LOCK, "not-a-token")

    assert fd_count() == before


def test_held_lock_uses_one_descriptor(store):
    before = fd_count()
    token = store.item_lock(Item.LOCK, exclusive=True)
    assert fd_count() == before + 1
    store.item_unlock(Item.LOCK, token)


def test_deadlock_error_leaks_no_descriptor(store):
    def lock_twice():
        token = store.item_lock(Item.LOCK, exclusive=True)
        before = fd_count()
        try:
            store.item_lock(Item.LOCK, exclusive=True)
        except vcstore.DeadlockError:
            pass
        after = fd_count()
        store.item_unlock(Item.LOCK, token)
        return after - before

    assert run_in_thread(lock_twice) == 0


# ---------------------------------------------------------------------------
# Delete while another process waits for the lock


@pytest.mark.parametrize("item", ["LOCK", "STATE"])
@pytest.mark.parametrize("exclusive", [True, False], ids=["exclusive-waiter", "shared-waiter"])
def test_delete_wakes_waiter_with_store_deleted(store, peer, item, exclusive):
    # Race (Go original): delete released the lock first, so the waiter took it.
    store.item_lock(Item[item], exclusive=True)
    peer.call("open", where(store))
    peer.send("lock", where(store), item, exclusive, None)
    assert wait_blocked_in_flock(peer.pid)
    store.delete()
    with pytest.raises(vcstore.StoreDeletedError):
        peer.reply()


def test_delete_wakes_waiter_that_locked_before(store, peer):
    # A waiter that already knows the lock file must still see it was unlinked.
    peer.call("open", where(store))
    token = peer.call("lock", where(store), "LOCK", True, None)
    peer.call("unlock", where(store), "LOCK", token)

    store.item_lock(Item.LOCK, exclusive=True)
    peer.send("lock", where(store), "LOCK", True, None)
    assert wait_blocked_in_flock(peer.pid)
    store.delete()

    with pytest.raises(vcstore.StoreDeletedError):
        peer.reply()


class ReleaseWatchingIO(OsIO):
    """An I/O seam noting, at each flock or close of one descriptor, whether a path exists."""

    def __init__(self):
        super().__init__()
        self.watched_fd = None
        self.watched_path = None
        self.path_existed = []

    def _note(self, fd):
        if fd == self.watched_fd:
            self.path_existed.append(os.path.exists(self.watched_path))

    def flock(self, fd, operation):
        self._note(fd)
        return super().flock(fd, operation)

    def close(self, fd):
        self._note(fd)
        return super().close(fd)


def test_delete_releases_token_after_removing_tree(tmp_path):
    # Race: released first, a waiter would take the lock of a store about to vanish.
    seam = ReleaseWatchingIO()
    store = FilesystemStore(tmp_path / "store", io=seam)
    store.item_lock(Item.LOCK, exclusive=True)
    (seam.watched_fd,) = fds_open_on(store.path / "lock")
    seam.watched_path = store.path

    store.delete()

    assert seam.path_existed
    assert True not in seam.path_existed


def test_delete_by_other_process_wakes_waiter(store, peer, other_peer):
    token = store.item_lock(Item.LOCK, exclusive=True)
    peer.send("lock", where(store), "LOCK", True, None)
    assert wait_blocked_in_flock(peer.pid)
    other_peer.call("delete", where(store))
    store.item_unlock(Item.LOCK, token)
    with pytest.raises(vcstore.StoreDeletedError):
        peer.reply()


def test_delete_and_recreate_never_two_exclusive_holders(tmp_path):
    # Race: the waiter's flock succeeds on the old lock file of a deleted store
    # while a new holder locks the recreated store's lock file.
    path = str(tmp_path / "store")
    with Peer() as holder, Peer() as waiter, Peer() as deleter, Peer() as newcomer:
        token = holder.call("lock", path, "LOCK", True, None)
        waiter.call("open", path)
        waiter.send("lock", path, "LOCK", True, None)
        assert wait_blocked_in_flock(waiter.pid)

        deleter.call("delete", path)
        newcomer.call("lock", path, "LOCK", True, None)
        holder.call("unlock", path, "LOCK", token)

        assert outcome_of(waiter) in ("blocked", "StoreDeletedError")


# ---------------------------------------------------------------------------
# A store deleted in this or another process stays deleted

STALE_CALLS = {
    "load": lambda store: store.load(Item.STATE),
    "store": lambda store: store.store(Item.STATE, "late write"),
    "raw": lambda store: store.raw("disk0"),
    "raw-unique": lambda store: store.raw(),
    "item_lock": lambda store: store.item_lock(Item.LOCK, exclusive=True, timeout=0),
    "item_lock-blocking": lambda store: store.item_lock(Item.STATE, exclusive=True),
    "locked": lambda store: store.locked(Item.NETWORK).__enter__(),
}


@pytest.mark.parametrize("call", STALE_CALLS.values(), ids=STALE_CALLS.keys())
def test_call_after_delete_raises(store, call):
    store.store(Item.STATE, "before")
    store.delete()
    with pytest.raises(vcstore.StoreDeletedError):
        run_in_thread(call, store)


@pytest.mark.parametrize("call", STALE_CALLS.values(), ids=STALE_CALLS.keys())
def test_call_after_delete_recreates_nothing(store, call):
    # Race: a late writer must not resurrect a removed sandbox.
    store.delete()
    with pytest.raises(vcstore.StoreDeletedError):
        run_in_thread(call, store)
    assert not store.path.exists()


@pytest.mark.parametrize("call", STALE_CALLS.values(), ids=STALE_CALLS.keys())
def test_call_after_other_process_delete_raises(store, peer, call):
    store.store(Item.STATE, "before")
    peer.call("delete", where(store))
    with pytest.raises(vcstore.StoreDeletedError):
        run_in_thread(call, store)


@pytest.mark.parametrize("call", STALE_CALLS.values(), ids=STALE_CALLS.keys())
def test_call_after_other_process_delete_recreates_nothing(store, peer, call):
    peer.call("delete", where(store))
    with pytest.raises(vcstore.StoreDeletedError):
        run_in_thread(call, store)
    assert not store.path.exists()


@pytest.mark.parametrize("call", STALE_CALLS.values(), ids=STALE_CALLS.keys())
def test_call_after_other_process_recreate_raises(store, peer, call):
    # Holding the old directory open keeps its inode number from being reused,
    # so the recreated store is told apart for certain.
    old_directory = os.open(store.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        peer.call("delete", where(store))
        peer.call("store", where(store), "STATE", "new store")
        before = snapshot(store.path)

        with pytest.raises(vcstore.StoreDeletedError):
            run_in_thread(call, store)

        assert snapshot(store.path) == before
    finally:
        os.close(old_directory)


def test_store_deleted_is_file_not_found(store):
    store.delete()
    with pytest.raises(FileNotFoundError):
        store.load(Item.STATE)


def test_delete_releases_tokens(store):
    before = fd_count()
    store.item_lock(Item.LOCK, exclusive=True)
    store.item_lock(Item.STATE, exclusive=False)
    store.delete()
    assert fd_count() == before


def test_unlock_after_delete_raises(store):
    token = store.item_lock(Item.LOCK, exclusive=True)
    store.delete()
    with pytest.raises(vcstore.UnknownTokenError):
        store.item_unlock(Item.LOCK, token)


def test_locked_block_may_delete_store(store):
    with store.locked(Item.LOCK, exclusive=True):
        store.delete()
    assert not store.path.exists()


# ---------------------------------------------------------------------------
# File systems without flock(2)


@pytest.mark.parametrize("number", [errno.EOPNOTSUPP, errno.ENOLCK, errno.ENOSYS], ids=errno.errorcode.get)
def test_flock_unsupported_raises(tmp_path, number):
    store = FilesystemStore(tmp_path / "store", io=failing_io("flock", number, when=is_flock_request))
    with pytest.raises(vcstore.LockUnsupportedError):
        store.item_lock(Item.LOCK, exclusive=True)


def test_lock_unsupported_is_store_error(tmp_path):
    store = FilesystemStore(tmp_path / "store", io=failing_io("flock", errno.EOPNOTSUPP, when=is_flock_request))
    with pytest.raises(vcstore.StoreError):
        store.item_lock(Item.LOCK, exclusive=True)


def test_lock_unsupported_names_path(tmp_path):
    store = FilesystemStore(tmp_path / "store", io=failing_io("flock", errno.EOPNOTSUPP, when=is_flock_request))
    with pytest.raises(vcstore.LockUnsupportedError) as raised:
        store.item_lock(Item.LOCK, exclusive=True, timeout=1)
    assert str(store.path) in str(raised.value)


def test_lock_unsupported_leaks_no_descriptor(tmp_path):
    store = FilesystemStore(tmp_path / "store", io=failing_io("flock", errno.EOPNOTSUPP, when=is_flock_request))
    before = fd_count()
    with pytest.raises(vcstore.LockUnsupportedError):
        store.item_lock(Item.LOCK, exclusive=True)
    assert fd_count() == before


def test_busy_flock_is_not_unsupported(tmp_path, peer):
    # EWOULDBLOCK means busy: it must become a timeout, never LockUnsupportedError.
    store = FilesystemStore(tmp_path / "store")
    peer.call("flock", str(store.path / "lock"), True)
    with pytest.raises(vcstore.LockTimeoutError):
        store.item_lock(Item.LOCK, exclusive=True, timeout=0)


# ---------------------------------------------------------------------------
# A lock file replaced while a process waits on it


def test_waiter_retries_on_replaced_lock_file(store, peer):
    # Race: the waiter's flock succeeds on a lock file that no longer has the name.
    token = peer.call("lock", where(store), "LOCK", True, None)
    waiter = Background(store.item_lock, Item.LOCK, True, None)
    assert wait_blocked_in_flock(os.getpid())

    replacement = store.path / "lock.new"
    replacement.touch()
    os.replace(replacement, store.path / "lock")
    peer.call("unlock", where(store), "LOCK", token)
    waiter.result()

    assert peer.call("flock_probe", str(store.path / "lock")) == "exclusive"
