"""A hypothesis state machine that kills a worker inside ``store`` and checks the store.

The ``store_and_crash`` rule makes a worker store a value and kills it with
SIGKILL just before its N-th file-system step inside ``store``; hypothesis
chooses N. Steps are counted by an audit hook (`sys.addaudithook`) in the
worker, so any backend written in Python can be crashed this way, not only
vcstore's. The hook counts the audit events below (`crash_events`). Their
names are CPython's, as the audit events table of the Python documentation
lists them, and were checked with CPython 3.11.

- ``open``, but only an open that can change the file system (with
  O_WRONLY, O_RDWR, O_CREAT, O_TRUNC or O_APPEND): a read-only open changes
  nothing, so a crash before it equals a crash after the step before;
- ``os.rename`` (raised by `os.rename` and `os.replace`), ``os.remove``
  (`os.remove`, `os.unlink`), ``os.truncate`` (`os.truncate`,
  `os.ftruncate`), ``os.mkdir``, ``os.rmdir``, ``os.link``, ``os.symlink``,
  ``os.chmod``, ``os.chown`` and ``os.utime``: the steps that change a
  directory or a file's metadata;
- ``fcntl.flock``, ``fcntl.lockf`` and ``fcntl.fcntl``: locks, such as the
  one vcstore takes on its temporary file;
- ``shutil.copyfile``, ``shutil.move`` and ``shutil.rmtree``.

`os.write`, `os.fsync` and `os.close` raise no audit event, so a crash
cannot land between two writes or between a write and its fsync. The
nearest step is the next event, such as the ``os.rename`` that follows
``write`` and ``fsync`` in an atomic store. Directory listings
(``os.listdir``, ``os.scandir``) are left out because they change nothing.

After a crash another worker loads the item. It must find the old value or
the new one: never `vcstore.CorruptItemError` and never a third value, and
`vcstore.ItemNotFoundError` only if the item had no old value and the crash
came before the new file took its place. Each store
writes a value that no earlier store in the test case wrote, so a loaded
value names the store that wrote it. Later stores by live workers must
succeed and load back, locks held by the dead worker must be free, and
leftover temporary files must stay bounded (see ``max_leftover_files``).
Try-locks on every item, plain stores and loads, and deletes are mixed in.

A downstream project checks its own backend by subclassing::

    class TestMyCrashes(CrashSafetyMachine):
        store_factory = my_backend.open_store   # takes a root directory
        max_leftover_files = 4                  # its own temporary files

    TestMyCrashes = TestMyCrashes.TestCase
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from vcstore import CorruptItemError, Item, ItemNotFoundError

from ..workers import WorkerDiedError
from .lock_exclusivity import DATA_ITEMS, ItemLockMachine, describe_value, fail

__all__ = ["CRASH_EVENTS", "CrashSafetyMachine", "call_and_crash", "crash_store"]

# The audit events that count as file-system steps, described in the module docstring.
CRASH_EVENTS = frozenset(
    {
        "open",
        "os.rename",
        "os.remove",
        "os.truncate",
        "os.mkdir",
        "os.rmdir",
        "os.link",
        "os.symlink",
        "os.chmod",
        "os.chown",
        "os.utime",
        "fcntl.flock",
        "fcntl.lockf",
        "fcntl.fcntl",
        "shutil.copyfile",
        "shutil.move",
        "shutil.rmtree",
    }
)

# Open flags that can change the file system. An ``open`` without any of them is not counted.
_WRITING_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

# The items that stores and crashes use. They are few, so that a crash often
# replaces an old value, and DEVICES and DEVICE_IDS share one file.
STORED_ITEMS = (Item.STATE, Item.DEVICES, Item.DEVICE_IDS)

# The names that vcstore's filesystem backend keeps in a store's directory.
VCSTORE_LAYOUT = frozenset(
    {"raw"} | {item.file_name for item in DATA_ITEMS} | {item.lock_name for item in Item}
)


# ----------------------------------------------------------------------------
# The worker side: an audit hook that kills its own process


class _Trap:
    """The state that the audit hook of a worker process reads: what to count and when to kill.

    Audit hooks cannot be removed, so the hook stays installed for the
    worker's life and does nothing while ``remaining`` is 0.
    """

    def __init__(self) -> None:
        self.events: frozenset = frozenset()
        self.remaining = 0
        self.counted = 0
        self.thread: int | None = None
        self.note_fd = -1


_TRAP = _Trap()
_hook_installed = False


def _audit_hook(event: str, args: tuple) -> None:
    trap = _TRAP
    if trap.remaining <= 0 or event not in trap.events:
        return
    if threading.get_ident() != trap.thread:
        return
    if event == "open" and not _may_write(args):
        return

    trap.counted += 1
    trap.remaining -= 1
    if trap.remaining > 0:
        return
    # os.write raises no audit event, so the note cannot call this hook again.
    os.write(trap.note_fd, f"{event}{args!r}".encode("utf-8", "backslashreplace"))
    os.kill(os.getpid(), signal.SIGKILL)


def _may_write(open_args: tuple) -> bool:
    # The "open" event's arguments are (path, mode, flags).
    flags = open_args[2] if len(open_args) > 2 else None
    return isinstance(flags, int) and bool(flags & _WRITING_FLAGS)


def call_and_crash(
    fn: Callable[..., Any],
    args: tuple,
    crash_at: int,
    events: Iterable[str],
    note_path: str,
) -> int:
    """Call ``fn(*args)`` and SIGKILL this process just before its *crash_at*-th counted event.

    Meant to run in a worker (`Worker.run`), which the kill ends. *events*
    are the audit event names that count (an ``open`` counts only if it can
    change the file system), raised by the calling thread only. Before the
    kill, the event and its arguments are written to *note_path*. Returns
    the number of counted events if *fn* returned first.
    """
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit_hook)
        _hook_installed = True

    # The note is opened before the trap is armed, so its open does not count.
    note_fd = os.open(note_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    trap = _TRAP
    trap.events = frozenset(events)
    trap.counted = 0
    trap.thread = threading.get_ident()
    trap.note_fd = note_fd
    trap.remaining = crash_at
    try:
        fn(*args)
    finally:
        trap.remaining = 0
        os.close(note_fd)
    return trap.counted


def crash_store(
    store_factory: Callable[[Any], Any],
    target: Any,
    item: Item,
    value: Any,
    crash_at: int,
    events: Iterable[str],
    note_path: str,
) -> int:
    """Open *target* and store *value* in *item*, crashing as `call_and_crash` does.

    Opening the store happens before the trap is armed, so only the steps of
    ``store`` itself count.
    """
    store = store_factory(target)
    return call_and_crash(store.store, (item, value), crash_at, events, note_path)


# ----------------------------------------------------------------------------
# The machine


class CrashSafetyMachine(ItemLockMachine):
    """Kill workers inside ``store`` and check what the store contains afterwards.

    The class attributes of `StoreMachine` (``store_factory``, ``workers``,
    ``start_method``, ``parent_directory``, ``worker_deaths``) apply; with
    ``worker_deaths`` False the ``store_and_crash`` rule is off. More class
    attributes:

    - ``crash_events``: the audit event names counted as steps (default
      `CRASH_EVENTS`, described in the module docstring).
    - ``max_crash_step`` (default 5): N is chosen from 1 to this. A store
      with fewer counted steps finishes and stores the new value. vcstore's
      store makes 3 (open, flock and rename of its temporary file), and 2
      more when it removes a stale temporary file (flock, unlink).
    - ``max_leftover_files`` (default None): None applies vcstore's rule to
      the entries of the store directory outside ``layout_entries``. Each
      must be a temporary file ``.<item file>.<random>.tmp``. An item may
      have at most one per crash inside its stores since its last completed
      store, so none right after a completed store. A number is instead a
      bound on how many entries outside ``layout_entries`` the directory may
      contain, for a backend with other temporary files.
    - ``layout_entries``: the names in the store directory that belong to
      its layout (default vcstore's: ``raw``, item files, lock files).
    - ``deletes`` (default True): the ``delete`` rule.
    - ``death_spacing`` (default 3): ``store_and_crash`` runs only on steps
      whose number is a multiple of this, because each crash starts a new
      worker process, which costs several times as much as another step.
      1 allows a crash at any step.

    After a test case, ``crashes_by_event`` counts the crashes by the audit
    event they came before.
    """

    worker_ids = ItemLockMachine.worker_ids
    held_tokens = ItemLockMachine.held_tokens

    crash_events: frozenset = CRASH_EVENTS
    max_crash_step: int = 5
    max_leftover_files: int | None = None
    layout_entries: frozenset = VCSTORE_LAYOUT
    deletes: bool = True
    death_spacing: int = 3

    # Only the locks of a dead worker get a probe.
    probe_lock_steps = False

    def __init__(self) -> None:
        super().__init__()
        # The values that each data file may contain, by file name.
        # ItemNotFoundError means that the file does not exist.
        self.candidates: dict[str, list] = {}
        # Crashes inside stores of each data file since its last completed store.
        self.crashes: collections.Counter = collections.Counter()
        self.stores_made = 0
        # How many crashes hit each audit event, for a test or a benchmark to read.
        self.crashes_by_event: collections.Counter = collections.Counter()
        # The file in which a crashing worker names the event it died at.
        self.note_path = f"{self.root}.crash-note"

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            try:
                os.unlink(self.note_path)
            except FileNotFoundError:
                pass

    # --- stores and loads --------------------------------------------------------

    @rule(worker=worker_ids, item=st.sampled_from(STORED_ITEMS))
    def store(self, worker: int, item: Item):
        """Store a new value, which must succeed after any earlier crash."""
        self.steps += 1
        value = self._new_value()
        self._store_worker(worker).store(self.root, item, value)
        self._completed_store(item, value)

    @rule(worker=worker_ids, item=st.sampled_from(STORED_ITEMS))
    def load(self, worker: int, item: Item):
        self.steps += 1
        self._check_load(worker, item, "")

    @precondition(lambda self: self.worker_deaths and self.steps % self.death_spacing == 0)
    @rule(
        worker=worker_ids,
        item=st.sampled_from(STORED_ITEMS),
        crash_at=st.runner().flatmap(lambda machine: st.integers(1, machine.max_crash_step)),
    )
    def store_and_crash(self, worker: int, item: Item, crash_at: int):
        """Store a new value and SIGKILL the worker before its crash_at-th step in store."""
        self.steps += 1
        value = self._new_value()
        try:
            self._worker(worker).run(
                crash_store,
                self._factory(),
                self.root,
                item,
                value,
                crash_at,
                frozenset(self.crash_events),
                self.note_path,
            )
        except WorkerDiedError:
            pass
        else:
            # The store made fewer than crash_at steps and finished.
            self._completed_store(item, value)
            return

        with open(self.note_path, encoding="utf-8") as note_file:
            event = note_file.read()
        if not event:
            fail(
                f"worker {worker} died while it stored {value!r} in {item!r}, before "
                f"its counted step {crash_at} at which it was to be killed"
            )
        self._restart_worker(worker)
        self.crashes_by_event[event.partition("(")[0]] += 1

        # The file contains the old value or the new one, depending on whether
        # the crash came before or after the new file took its place.
        file_name = item.file_name
        self.candidates[file_name] = self._candidates(item) + [value]
        self.crashes[file_name] += 1

        # Another worker loads the item at once. Later stores by any worker
        # must succeed, which the store rule checks.
        reader = (worker + 1) % self.workers
        self._check_load(
            reader,
            item,
            f" after worker {worker} was killed before its counted step {crash_at} "
            f"({event}) while it stored {value!r}",
        )

    # --- deletes ----------------------------------------------------------------

    # Deleting a store that holds no value and no lock adds little, and costs
    # a round trip to every worker.
    @precondition(lambda self: self.deletes and bool(self.candidates or self.model.tokens))
    @rule(worker=worker_ids)
    def delete(self, worker: int):
        """Delete the store, after which every worker opens a new, empty one."""
        self.steps += 1
        self._worker(worker).delete(self.root)
        self.opened.discard(worker)
        self._drop_stale_stores()
        self.candidates = {}
        self.crashes = collections.Counter()

    # --- leftover files -----------------------------------------------------------

    @invariant()
    def leftover_files_bounded(self) -> None:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return  # Deleted, and no command has opened it again yet.
        leftovers = sorted(name for name in names if name not in self.layout_entries)
        if not leftovers:
            return

        if self.max_leftover_files is not None:
            if len(leftovers) > self.max_leftover_files:
                fail(
                    f"the store directory holds {len(leftovers)} entries outside its layout, "
                    f"more than max_leftover_files={self.max_leftover_files}: "
                    f"{', '.join(leftovers)}"
                )
            return

        per_file: collections.Counter = collections.Counter()
        for name in leftovers:
            file_name = temporary_file_owner(name)
            if file_name is None:
                fail(
                    f"the store directory holds {name!r}, which is neither part of its "
                    f"layout nor a temporary file .<item file>.<random>.tmp; for a backend "
                    f"with other files set layout_entries or max_leftover_files"
                )
            per_file[file_name] += 1
        for file_name, count in sorted(per_file.items()):
            allowed = self.crashes[file_name]
            if count > allowed:
                names = [name for name in leftovers if temporary_file_owner(name) == file_name]
                fail(
                    f"the store directory holds {count} temporary files of {file_name} "
                    f"({', '.join(names)}), but only {allowed} stores of it crashed since "
                    f"its last completed store, which must remove stale temporary files"
                )

    # --- the model -------------------------------------------------------------

    def _new_value(self) -> dict:
        self.stores_made += 1
        return {"store": self.stores_made}

    def _candidates(self, item: Item) -> list:
        return self.candidates.get(item.file_name, [ItemNotFoundError])

    def _completed_store(self, item: Item, value: Any) -> None:
        self.candidates[item.file_name] = [value]
        self.crashes[item.file_name] = 0

    def _check_load(self, worker: int, item: Item, context: str) -> None:
        """Load *item* in *worker* and check it against the model's candidates."""
        expected = self._candidates(item)
        try:
            found = self._store_worker(worker).load(self.root, item)
        except ItemNotFoundError:
            found = ItemNotFoundError
        except CorruptItemError as error:
            found = error
        if isinstance(found, CorruptItemError):
            fail(f"worker {worker} found {item!r} corrupt{context}: {found}")
        if found not in expected:
            fail(
                f"worker {worker} loaded {describe_value(found)} from {item!r}{context}, "
                f"expected " + " or ".join(describe_value(value) for value in expected)
            )
        # What one load found is what the file contains until the next store.
        self.candidates[item.file_name] = [found]


def temporary_file_owner(name: str) -> str | None:
    """Return the data file whose temporary file *name* is, or None.

    vcstore names a temporary file ``.<item file>.<random hex>.tmp``.
    """
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    file_name, _, random_part = name[1 : -len(".tmp")].rpartition(".")
    if not random_part or file_name not in {item.file_name for item in DATA_ITEMS}:
        return None
    return file_name
