"""`vcstore_testing.workers`: worker processes, their calls, errors and reaping."""

import gc
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import vcstore
from vcstore import Item
from vcstore_testing.workers import (
    WorkerDiedError,
    WorkerPool,
    WorkerTimeoutError,
)

# How long a test waits to decide that a call is still blocked. Never asserted.
BLOCKED_SECONDS = 0.3

# Bound on a wait for something that should happen (a reply, an exit).
REPLY_SECONDS = 10.0


def process_gone(pid: int) -> bool:
    """Return whether *pid* names no process, or only a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as status:
            state = status.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def wait_until_gone(pids, seconds: float = REPLY_SECONDS) -> list:
    """Return the pids of *pids* still running after at most *seconds*."""
    deadline = time.monotonic() + seconds
    running = [pid for pid in pids if not process_gone(pid)]
    while running and time.monotonic() < deadline:
        time.sleep(0.02)
        running = [pid for pid in running if not process_gone(pid)]
    return running


class TwoArgumentError(Exception):
    """An exception that pickle cannot rebuild: its constructor needs two arguments."""

    def __init__(self, first, second):
        super().__init__(f"{first} and {second}")


def raise_two_argument_error():
    raise TwoArgumentError("left", "right")


OPENED_TARGETS = []


def counting_open(target):
    OPENED_TARGETS.append(target)
    return vcstore.open(target)


def opened_target_count():
    return len(OPENED_TARGETS)


def join_submitted_threads():
    for thread in threading.enumerate():
        if thread.name.startswith("vcstore-submitted-"):
            thread.join()


@pytest.fixture
def store_path(tmp_path):
    yield str(tmp_path / "store")
    vcstore.delete_all()


@pytest.fixture
def pool():
    with WorkerPool(2, call_timeout=REPLY_SECONDS) as workers:
        yield workers


# ---------------------------------------------------------------------------
# Reaping


def test_close_reaps_every_worker():
    pool = WorkerPool(3)
    pids = [worker.pid for worker in pool]

    pool.close()

    assert [pid for pid in pids if not process_gone(pid)] == []


def test_close_twice_is_harmless():
    pool = WorkerPool(1)
    pool.close()

    pool.close()

    assert pool.closed


def test_close_reaps_worker_blocked_in_lock(store_path):
    with WorkerPool(2, call_timeout=BLOCKED_SECONDS) as pool:
        pool[0].item_lock(store_path, Item.LOCK, exclusive=True)
        with pytest.raises(WorkerTimeoutError):
            pool[1].item_lock(store_path, Item.LOCK, exclusive=True)
        pids = [worker.pid for worker in pool]

    assert [pid for pid in pids if not process_gone(pid)] == []


def test_error_in_with_block_reaps_workers():
    with pytest.raises(RuntimeError, match="test body failed"):
        with WorkerPool(3) as pool:
            pids = [worker.pid for worker in pool]
            raise RuntimeError("test body failed")

    assert [pid for pid in pids if not process_gone(pid)] == []


def test_garbage_collected_pool_reaps_workers():
    pool = WorkerPool(2)
    pids = [worker.pid for worker in pool]

    del pool
    gc.collect()

    assert [pid for pid in pids if not process_gone(pid)] == []


def run_script(script: str, output_path) -> list:
    """Run *script* in a new interpreter and return the pids that it printed.

    The output goes to a file, not a pipe: a worker that outlives the script
    would keep a pipe open and hang the wait.
    """
    with open(output_path, "w") as output:
        subprocess.run([sys.executable, "-c", script], stdout=output, timeout=60)
    with open(output_path) as output:
        return [int(pid) for pid in output.read().split()]


def kill_leftovers(pids) -> None:
    for pid in pids:
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_interpreter_exit_reaps_workers(tmp_path):
    script = (
        "from vcstore_testing.workers import WorkerPool\n"
        "pool = WorkerPool(3)\n"
        "print(*(worker.pid for worker in pool), flush=True)\n"
    )
    pids = run_script(script, tmp_path / "pids")
    try:
        assert len(pids) == 3
        assert wait_until_gone(pids) == []
    finally:
        kill_leftovers(pids)


def test_killed_parent_leaves_no_worker(tmp_path):
    # A forked worker inherits the parent's end of its siblings' pipes; if it
    # kept them, a sibling would never see end-of-file and would outlive us.
    script = (
        "import os, signal\n"
        "from vcstore_testing.workers import WorkerPool\n"
        "pool = WorkerPool(3)\n"
        "print(*(worker.pid for worker in pool), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    pids = run_script(script, tmp_path / "pids")
    try:
        assert len(pids) == 3
        assert wait_until_gone(pids) == []
    finally:
        kill_leftovers(pids)


# ---------------------------------------------------------------------------
# The store API and run()


def test_store_then_load_in_another_worker(pool, store_path):
    pool[0].store(store_path, Item.STATE, {"state": "running"})

    assert pool[1].load(store_path, Item.STATE) == {"state": "running"}


def test_raw_returns_url_inside_store(pool, store_path):
    url = pool[0].raw(store_path, "disk0")

    assert url == vcstore.open(store_path).raw("disk0")


def test_factory_called_once_per_target(store_path):
    with WorkerPool(1, counting_open) as pool:
        pool[0].store(store_path, Item.STATE, 1)
        pool[0].load(store_path, Item.STATE)

        assert pool[0].run(opened_target_count) == 1


def test_delete_drops_cached_store(pool, store_path):
    pool[0].store(store_path, Item.STATE, 1)

    pool[0].delete(store_path)

    # A kept store object would raise StoreDeletedError; a new one has no item.
    with pytest.raises(vcstore.ItemNotFoundError):
        pool[0].load(store_path, Item.STATE)


def test_run_returns_result(pool):
    assert pool[1].run(lambda x, y=1: x * 10 + y, 4, y=2) == 42


def test_run_in_worker_process(pool):
    assert pool[1].run(os.getpid) == pool[1].pid


def test_items_return_as_members(pool):
    assert pool[0].run(lambda: Item.DEVICE_IDS) is Item.DEVICE_IDS


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_lambda_factory_works(tmp_path, start_method):
    def factory(name):
        return vcstore.open(tmp_path / name)

    with WorkerPool(1, lambda name: factory(name), start_method) as pool:
        pool[0].store("sandbox", Item.STATE, {"ok": True})

    assert vcstore.open(tmp_path / "sandbox").load(Item.STATE) == {"ok": True}
    vcstore.delete_all()


# ---------------------------------------------------------------------------
# Errors raised in a worker


def test_store_error_same_class(pool, store_path):
    with pytest.raises(vcstore.ItemNotFoundError) as caught:
        pool[0].load(store_path, Item.STATE)

    assert caught.type is vcstore.ItemNotFoundError


def test_error_carries_worker_traceback(pool, store_path):
    with pytest.raises(vcstore.ItemNotFoundError) as caught:
        pool[1].load(store_path, Item.STATE)

    text = caught.value.worker_traceback
    assert f"worker 1 (pid {pool[1].pid})" in text
    assert "Traceback (most recent call last)" in text
    assert "in load" in text


def raise_chained():
    try:
        {}["missing key"]
    except KeyError as error:
        raise RuntimeError("lookup failed") from error


def test_error_traceback_shows_chain(pool):
    with pytest.raises(RuntimeError) as caught:
        pool[0].run(raise_chained)

    text = caught.value.worker_traceback
    assert "KeyError: 'missing key'" in text
    assert "direct cause of the following exception" in text
    assert '{}["missing key"]' in text
    assert text.rstrip().endswith("RuntimeError: lookup failed")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="add_note is new in 3.11")
def test_error_traceback_is_note(pool, store_path):
    with pytest.raises(vcstore.ItemNotFoundError) as caught:
        pool[0].load(store_path, Item.STATE)

    assert caught.value.worker_traceback in caught.value.__notes__


def test_run_error_same_type(pool):
    with pytest.raises(ValueError, match="invalid literal"):
        pool[0].run(int, "not a number")


def test_unpicklable_error_keeps_class(pool):
    with pytest.raises(TwoArgumentError, match="left and right"):
        pool[0].run(raise_two_argument_error)


def test_lock_timeout_error_same_class(pool, store_path):
    pool[0].item_lock(store_path, Item.LOCK, exclusive=True)

    with pytest.raises(vcstore.LockTimeoutError):
        pool[1].item_lock(store_path, Item.LOCK, exclusive=True, timeout=0)


# ---------------------------------------------------------------------------
# Timeouts and dead workers


def test_timeout_names_worker_and_command(store_path):
    with WorkerPool(2, call_timeout=BLOCKED_SECONDS) as pool:
        pool[0].item_lock(store_path, Item.LOCK, exclusive=True)

        with pytest.raises(WorkerTimeoutError) as caught:
            pool[1].item_lock(store_path, Item.LOCK, exclusive=True)

        message = str(caught.value)
        assert f"worker 1 (pid {pool[1].pid})" in message
        assert "item_lock(" in message


def test_kill_drops_lock(pool, store_path):
    pool[0].item_lock(store_path, Item.LOCK, exclusive=True)

    pool[0].kill()

    assert pool[1].item_lock(store_path, Item.LOCK, exclusive=True, timeout=0)


def test_killed_worker_call_raises_died(pool, store_path):
    pid = pool[0].pid
    pool[0].kill()

    with pytest.raises(WorkerDiedError, match=f"worker 0 \\(pid {pid}\\)"):
        pool[0].load(store_path, Item.STATE)


def test_killed_worker_not_alive(pool):
    pool[0].kill()

    assert not pool[0].alive


def test_exited_worker_reports_status(pool):
    with pytest.raises(WorkerDiedError, match="exited with status 3"):
        pool[1].run(os._exit, 3)


def test_restart_starts_new_process(pool, store_path):
    old_pid = pool[0].pid
    pool[0].kill()

    pool[0].restart()

    assert pool[0].pid != old_pid
    assert pool[0].alive
    assert process_gone(old_pid)


def test_restart_drops_tokens(pool, store_path):
    pool[0].item_lock(store_path, Item.LOCK, exclusive=True)

    pool[0].restart()

    assert pool[1].item_lock(store_path, Item.LOCK, exclusive=True, timeout=0)


# ---------------------------------------------------------------------------
# Calls left waiting


def test_submitted_lock_blocks_until_unlock(pool, store_path):
    token = pool[0].item_lock(store_path, Item.LOCK, exclusive=True)
    waiter = pool[1].submit("item_lock", store_path, Item.LOCK, exclusive=True)
    assert not waiter.wait(BLOCKED_SECONDS)

    pool[0].item_unlock(store_path, Item.LOCK, token)

    second = waiter.result(timeout=REPLY_SECONDS)
    assert waiter.done()
    pool[1].item_unlock(store_path, Item.LOCK, second)


def test_worker_serves_while_call_pending(pool, store_path):
    pool[0].item_lock(store_path, Item.LOCK, exclusive=True)
    waiter = pool[1].submit("item_lock", store_path, Item.LOCK, exclusive=True)

    pool[1].store(store_path, Item.STATE, 7)

    assert pool[1].load(store_path, Item.STATE) == 7
    assert not waiter.done()


def test_pending_result_timeout_stays_pending(pool, store_path):
    token = pool[0].item_lock(store_path, Item.LOCK, exclusive=True)
    waiter = pool[1].submit("item_lock", store_path, Item.LOCK, exclusive=True)

    with pytest.raises(WorkerTimeoutError, match="still pending"):
        waiter.result(timeout=BLOCKED_SECONDS)

    pool[0].item_unlock(store_path, Item.LOCK, token)
    assert waiter.result(timeout=REPLY_SECONDS)


def test_pending_error_same_class(pool, store_path):
    waiter = pool[0].submit("load", store_path, Item.STATE)

    with pytest.raises(vcstore.ItemNotFoundError):
        waiter.result(timeout=REPLY_SECONDS)


def test_pending_of_killed_worker_raises_died(pool, store_path):
    pool[0].item_lock(store_path, Item.LOCK, exclusive=True)
    waiter = pool[1].submit("item_lock", store_path, Item.LOCK, exclusive=True)

    pool[1].kill()

    assert waiter.done()
    with pytest.raises(WorkerDiedError):
        waiter.result(timeout=REPLY_SECONDS)


def test_pending_of_restarted_worker_raises_died(pool, store_path):
    pool[0].item_lock(store_path, Item.LOCK, exclusive=True)
    waiter = pool[1].submit("item_lock", store_path, Item.LOCK, exclusive=True)

    pool[1].restart()

    with pytest.raises(WorkerDiedError, match="restarted"):
        waiter.result(timeout=REPLY_SECONDS)


def test_submit_unknown_command_rejected(pool):
    with pytest.raises(ValueError, match="unknown worker command 'lock'"):
        pool[0].submit("lock", "/tmp/x", Item.LOCK, True)


def test_pending_reply_kept_after_worker_death(pool):
    waiter = pool[0].submit("run", os.getpid)
    # The submitted call's reply is sent before this call's, so this call reads it.
    pool[0].run(join_submitted_threads)

    pool[0].kill()

    assert waiter.result(timeout=REPLY_SECONDS) == pool[0].pid


def test_submitted_lock_waits_for_same_worker(pool, store_path):
    # The submitted call runs on another thread of the worker, so the worker's
    # own token blocks it instead of raising DeadlockError.
    token = pool[0].item_lock(store_path, Item.LOCK, exclusive=True)
    waiter = pool[0].submit("item_lock", store_path, Item.LOCK, exclusive=True)
    assert not waiter.wait(BLOCKED_SECONDS)

    pool[0].item_unlock(store_path, Item.LOCK, token)

    assert waiter.result(timeout=REPLY_SECONDS)
