"""`CrashSafetyMachine` and its audit hook: the real backend passes, broken backends fail."""

import collections
import fcntl
import json
import os
import tempfile
import threading
import uuid

import multiprocess
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

import vcstore
from vcstore.filesystem import FilesystemStore
from vcstore_testing.machines import CrashSafetyMachine
from vcstore_testing.machines.crash_safety import CRASH_EVENTS, call_and_crash
from vcstore_testing.workers import WorkerDiedError, WorkerPool

# Small, so the file runs in seconds; each broken backend fails within a few steps.
SHORT_RUN = settings(
    max_examples=10,
    stateful_step_count=20,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)

# For a passing run that must reach rarer steps too.
LONGER_RUN = settings(SHORT_RUN, max_examples=40, stateful_step_count=30)

# Finding a failure is enough where the test reads no steps. Most bugs need
# a crash at one step of a store that replaces a value, and the run stops at
# the first failure, so a larger budget costs only a passing run.
FIND_ONLY = settings(
    SHORT_RUN, max_examples=200, stateful_step_count=30, phases=[Phase.explicit, Phase.generate]
)


class WrappedStore:
    """A store that passes every call to the real backend; mutants override one."""

    def __init__(self, root):
        self._store = vcstore.open(root)

    def __getattr__(self, name):
        return getattr(self._store, name)

    def _item_path(self, item):
        return os.path.join(self._store.path, item.file_name)


class InPlaceStore(WrappedStore):
    """store truncates the item file, then writes it, as Kata's original did.

    It takes a flock between the two. os.write raises no audit event, so
    that flock is the step at which a crash can land between them.
    """

    def store(self, item, value):
        fd = os.open(self._item_path(item), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, json.dumps(value).encode())
        finally:
            os.close(fd)


class UnlinkFirstStore(WrappedStore):
    """store removes the old file before it puts the new one in place."""

    def store(self, item, value):
        try:
            os.unlink(self._item_path(item))
        except FileNotFoundError:
            pass
        self._store.store(item, value)


class RandomTempStore(WrappedStore):
    """store renames a temporary file with a random name and never removes stale ones."""

    def store(self, item, value):
        fd, temporary = tempfile.mkstemp(dir=self._store.path)
        with os.fdopen(fd, "w") as file:
            file.write(json.dumps(value))
        os.replace(temporary, self._item_path(item))


class MarkerLockStore(WrappedStore):
    """item_lock creates a marker file and item_unlock removes it, so a dead holder's lock stays."""

    def item_lock(self, item, exclusive, timeout=None):
        prefix = f"{item.lock_name}."
        markers = [name for name in os.listdir(self._store.path) if name.startswith(prefix)]
        if markers and (exclusive or any(name.endswith(".exclusive") for name in markers)):
            raise vcstore.LockTimeoutError(f"{item!r}: timed out")
        token = uuid.uuid4().hex + (".exclusive" if exclusive else ".shared")
        create_files(self._store.path, [prefix + token])
        return token

    def item_unlock(self, item, token):
        os.unlink(os.path.join(self._store.path, f"{item.lock_name}.{token}"))


class NoCleanupStore(FilesystemStore):
    """The real backend without the removal of stale temporary files."""

    def _remove_stale_temps(self, dir_fd, item):
        pass


def machine_for(factory, directory, **attributes):
    attributes.update(store_factory=staticmethod(factory), parent_directory=str(directory))
    return type("CrashSafetyMachine", (CrashSafetyMachine,), attributes)


def create_files(directory, names):
    """Create each file of *names* in *directory*, in order."""
    for name in names:
        os.close(os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT, 0o600))


def read_then_create(directory, existing, new):
    with open(os.path.join(directory, existing)):
        pass
    create_files(directory, [new])


@pytest.fixture
def pool():
    with WorkerPool(1) as workers:
        yield workers


# --- the audit hook ------------------------------------------------------------


def crash_in(worker, directory, fn, args, crash_at, events=CRASH_EVENTS):
    """Call fn(*args) in *worker* under the audit hook; return what call_and_crash returns."""
    return worker.run(call_and_crash, fn, args, crash_at, events, str(directory / "note"))


def create_in_thread_then_here(directory):
    thread = threading.Thread(target=create_files, args=(directory, ["other"]))
    thread.start()
    thread.join()
    create_files(directory, ["here"])


def test_hook_kills_before_chosen_event(tmp_path, pool):
    with pytest.raises(WorkerDiedError):
        crash_in(pool[0], tmp_path, create_files, (str(tmp_path), ["a", "b", "c"]), 2)

    # The hook runs before the audited call, so the second file was never created.
    assert (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "c").exists()


def test_hook_notes_the_event(tmp_path, pool):
    with pytest.raises(WorkerDiedError):
        crash_in(pool[0], tmp_path, create_files, (str(tmp_path), ["a", "b"]), 2)

    assert (tmp_path / "note").read_text().startswith(f"open('{tmp_path / 'b'}'")


def test_hook_skips_read_only_open(tmp_path, pool):
    (tmp_path / "old").touch()

    with pytest.raises(WorkerDiedError):
        crash_in(pool[0], tmp_path, read_then_create, (str(tmp_path), "old", "new"), 1)

    assert not (tmp_path / "new").exists()


def test_hook_skips_other_threads(tmp_path, pool):
    # A worker runs submitted calls on threads of their own, which must not count.
    with pytest.raises(WorkerDiedError):
        crash_in(pool[0], tmp_path, create_in_thread_then_here, (str(tmp_path),), 1)

    assert (tmp_path / "other").exists()
    assert not (tmp_path / "here").exists()


def test_hook_counts_only_chosen_events(tmp_path, pool):
    count = crash_in(pool[0], tmp_path, create_files, (str(tmp_path), ["a"]), 1, {"os.rename"})

    assert count == 0
    assert (tmp_path / "a").exists()


def test_call_finishing_first_returns_count(tmp_path, pool):
    count = crash_in(pool[0], tmp_path, create_files, (str(tmp_path), ["a", "b"]), 3)

    assert count == 2
    assert pool[0].alive


def test_disarmed_hook_keeps_worker_alive(tmp_path, pool):
    crash_in(pool[0], tmp_path, create_files, (str(tmp_path), ["a"]), 2)

    pool[0].run(create_files, str(tmp_path), ["b", "c", "d"])

    assert pool[0].alive


# --- the machine ----------------------------------------------------------------


def test_real_backend_passes(tmp_path):
    run_state_machine_as_test(machine_for(vcstore.open, tmp_path), settings=SHORT_RUN)


def test_real_backend_passes_without_deletes(tmp_path):
    machine = machine_for(vcstore.open, tmp_path, deletes=False, workers=2)

    run_state_machine_as_test(machine, settings=SHORT_RUN)


def test_run_removes_test_case_files(tmp_path):
    run_state_machine_as_test(machine_for(vcstore.open, tmp_path), settings=SHORT_RUN)

    assert list(tmp_path.iterdir()) == []


def test_run_leaves_no_worker(tmp_path):
    run_state_machine_as_test(machine_for(vcstore.open, tmp_path), settings=SHORT_RUN)

    assert multiprocess.active_children() == []


def test_in_place_store_fails(tmp_path):
    # A crash between the truncation and the write leaves an empty item file.
    with pytest.raises(AssertionError, match="corrupt"):
        run_state_machine_as_test(machine_for(InPlaceStore, tmp_path), settings=FIND_ONLY)


def test_unlink_first_store_fails(tmp_path):
    # A crash between the unlink and the rename loses the old value.
    with pytest.raises(AssertionError, match=r"loaded nothing \(ItemNotFoundError\)"):
        run_state_machine_as_test(machine_for(UnlinkFirstStore, tmp_path), settings=FIND_ONLY)


def test_stale_temporary_files_fail(tmp_path):
    # A crash before the rename leaves a temporary file that the next store must remove.
    with pytest.raises(AssertionError, match="temporary files of"):
        run_state_machine_as_test(machine_for(NoCleanupStore, tmp_path), settings=FIND_ONLY)


def test_random_temporary_names_fail(tmp_path):
    # A crash before the rename leaves a file whose name is outside vcstore's layout.
    with pytest.raises(AssertionError, match="neither part of its layout"):
        run_state_machine_as_test(machine_for(RandomTempStore, tmp_path), settings=FIND_ONLY)


def test_leftovers_beyond_bound_fail(tmp_path):
    # Each crash before the rename leaves one more file, which nothing removes.
    machine = machine_for(RandomTempStore, tmp_path, max_leftover_files=1, max_crash_step=2)

    with pytest.raises(AssertionError, match="more than max_leftover_files=1"):
        run_state_machine_as_test(machine, settings=FIND_ONLY)


def test_lock_surviving_death_fails(tmp_path):
    # The marker of a worker killed while it holds the lock stays, and the
    # probe finds the item locked. Markers are extra entries, so the bound on
    # them is lifted.
    machine = machine_for(MarkerLockStore, tmp_path, max_leftover_files=1000)

    with pytest.raises(AssertionError, match="probe differ"):
        run_state_machine_as_test(machine, settings=FIND_ONLY)


def test_failure_prints_readable_steps(tmp_path):
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(machine_for(InPlaceStore, tmp_path), settings=SHORT_RUN)

    steps = "\n".join(caught.value.__notes__)
    assert "state.store_and_crash(" in steps
    assert "crash_at=" in steps


def test_failure_removes_test_case_files(tmp_path):
    with pytest.raises(AssertionError):
        run_state_machine_as_test(machine_for(InPlaceStore, tmp_path), settings=FIND_ONLY)

    assert list(tmp_path.iterdir()) == []


def test_real_backend_survives_crash_at_each_step(tmp_path):
    crashed_at = collections.Counter()

    class Counting(machine_for(vcstore.open, tmp_path)):
        def teardown(self):
            crashed_at.update(self.crashes_by_event)
            super().teardown()

    run_state_machine_as_test(Counting, settings=LONGER_RUN)

    # vcstore's store creates its temporary file, locks it, then renames it.
    assert crashed_at["open"] > 0
    assert crashed_at["fcntl.flock"] > 0
    assert crashed_at["os.rename"] > 0
