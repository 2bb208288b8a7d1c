"""Hostile file trees: links and special files planted where a store expects its own files.

A store runs as root in shared directories such as /run. Any user who can
write there can plant a symbolic link to a file elsewhere, a FIFO (opening it
for reading waits for a writer), a socket or a directory. Each case plants one
entry and runs one operation, bounded in time, while inotify watches a
directory outside the store. That directory contains what the planted links
point to: a JSON canary, a FIFO, and a directory laid out like a store. The
test holds the canary and the fake store's lock file locked while the
operation runs, so a store that follows a link to lock one of them blocks.

An operation that would open the planted entry rejects it with a `StoreError`
that names its path. Every operation returns in time and never opens, reads,
writes, locks or creates anything outside the store. `store` may instead
replace a planted non-directory entry, because rename(2) replaces a link or a
FIFO without following or opening it. `delete` removes planted entries without
following them.
"""

import dataclasses
import fcntl
import functools
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest

import vcstore
from vcstore import Item
from vcstore.filesystem import FilesystemStore
from helpers import StillBlocked, snapshot
from reliability.helpers import (
    DirectoryWatch,
    call_bounded,
    make_outside,
    open_descriptors_under,
    plant,
    release_fifos,
    remove_entry,
)

pytestmark = [pytest.mark.reliability, pytest.mark.hostile]

OLD = {"value": "old"}
NEW = {"value": "new"}
TEMP_NAME = ".state.json.0123456789abcdef.tmp"

OPERATIONS = {
    "open": lambda env: FilesystemStore(env.path),
    "vcstore.open": lambda env: vcstore.open(env.path),
    "open-existing": lambda env: vcstore.open(env.path, create=False),
    "load": lambda env: env.store.load(Item.STATE),
    "store": lambda env: env.store.store(Item.STATE, NEW),
    "raw-id": lambda env: env.store.raw("disk0"),
    "raw-unique": lambda env: env.store.raw(),
    "lock": lambda env: env.store.item_lock(Item.LOCK, exclusive=True),
    "lock-try": lambda env: env.store.item_lock(Item.LOCK, exclusive=True, timeout=0),
    "lock-shared-timeout": lambda env: env.store.item_lock(Item.LOCK, exclusive=False, timeout=0.5),
    "state-lock": lambda env: env.store.item_lock(Item.STATE, exclusive=True),
    "state-lock-try": lambda env: env.store.item_lock(Item.STATE, exclusive=True, timeout=0),
    "delete": lambda env: env.store.delete(),
}

SYMLINKS = ("symlink-file", "symlink-fifo", "symlink-dir", "symlink-missing")
SPECIAL = ("fifo", "socket", "directory")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where an entry is planted, and which operations must reject it or may go on.

    *relative* is the path inside the store, or None for the store's directory.
    *planted_before_open* plants it before the store exists, so there is no
    store object and only the open operations run.
    """

    name: str
    relative: str
    kinds: tuple
    rejecting: tuple
    tolerant: tuple = ()
    planted_before_open: bool = False


TARGETS = [
    Target(
        "store-dir",
        None,
        (*SYMLINKS, "fifo", "socket", "file"),
        rejecting=("open", "vcstore.open", "open-existing"),
        planted_before_open=True,
    ),
    Target(
        "store-dir-replaced",
        None,
        ("symlink-dir", "symlink-missing", "fifo", "file"),
        rejecting=("load", "store", "raw-id", "raw-unique", "lock", "lock-try", "state-lock"),
        tolerant=("delete",),
    ),
    Target("item", "state.json", (*SYMLINKS, *SPECIAL), rejecting=("load",), tolerant=("store", "delete")),
    Target(
        "lock",
        "lock",
        (*SYMLINKS, *SPECIAL),
        rejecting=("lock", "lock-try", "lock-shared-timeout", "open"),
        tolerant=("delete",),
    ),
    Target(
        "item-lock",
        "state.json.lock",
        (*SYMLINKS, *SPECIAL),
        rejecting=("state-lock", "state-lock-try"),
        tolerant=("delete",),
    ),
    Target(
        "raw-dir",
        "raw",
        (*SYMLINKS, "fifo", "socket", "file"),
        rejecting=("raw-id", "raw-unique"),
        tolerant=("open", "delete"),
    ),
    Target("raw-file", "raw/disk0", (*SYMLINKS, *SPECIAL), rejecting=("raw-id",), tolerant=("raw-unique", "delete")),
    Target("temp", TEMP_NAME, (*SYMLINKS, *SPECIAL), rejecting=(), tolerant=("store", "load", "delete")),
]


@dataclasses.dataclass(frozen=True)
class Case:
    target: Target
    kind: str
    operation: str

    @property
    def id(self) -> str:
        return f"{self.target.name}-{self.kind}-{self.operation}"

    @property
    def rejecting(self) -> bool:
        return self.operation in self.target.rejecting


CASES = [
    Case(target, kind, operation)
    for target in TARGETS
    for kind in target.kinds
    for operation in (*target.rejecting, *target.tolerant)
]
REJECTING = [case for case in CASES if case.rejecting]
TOLERANT = [case for case in CASES if not case.rejecting]
STORE_OVER_ITEM = [case for case in CASES if case.target.name == "item" and case.operation == "store"]
DELETES = [case for case in CASES if case.operation == "delete" and case.target.relative is not None]


def ids(cases) -> list:
    return [case.id for case in cases]


# ---------------------------------------------------------------------------
# Running one case


@dataclasses.dataclass
class Environment:
    path: Path
    store: object


@dataclasses.dataclass
class HostileRecord:
    """What one operation did with a planted entry, and what it touched outside."""

    error: BaseException
    hung: bool
    planted_path: str
    outside_events: list
    outside_changes: bool
    outside_descriptors: list
    outside_lockable: bool
    item_mode: int
    item_value: object
    store_dir_exists: bool


@functools.lru_cache(maxsize=None)
def run_case(case: Case) -> HostileRecord:
    """Plant *case*'s entry, run its operation bounded in time, and record the aftermath."""
    with tempfile.TemporaryDirectory(prefix="vcstore-hostile-") as root:
        root = Path(root)
        outside = make_outside(root / "outside")
        env = Environment(root / "store", None)
        planted = env.path if case.target.relative is None else env.path / case.target.relative

        if not case.target.planted_before_open:
            env.store = FilesystemStore(env.path)
            env.store.store(Item.STATE, OLD)
        if case.target.relative is None and env.store is not None:
            # The directory goes away as a whole, as a rename by another user would do it.
            os.rename(env.path, root / "moved-store")
        else:
            remove_entry(planted)
        plant(planted, case.kind, outside)

        outside_before = snapshot(outside.root)
        watch = DirectoryWatch(outside.directories())
        # Held locks outside: a store that follows a link to lock one of them blocks.
        held_locks = [os.open(path, os.O_RDONLY | os.O_CLOEXEC) for path in outside.lockable()]
        for fd in held_locks:
            fcntl.flock(fd, fcntl.LOCK_EX)
        watch.events()  # the test's own opens
        fifos = [*outside.fifos(), planted]
        try:
            outcome = call_bounded(OPERATIONS[case.operation], env, fifos=fifos)
            error, hung = outcome.error, False
        except StillBlocked as blocked:
            outcome, error, hung = None, blocked, True
        finally:
            events = watch.events()
            watch.close()
            # Read before the test's locks are released, which lets a hung call go on.
            outside_descriptors = open_descriptors_under(outside.root, ignore=held_locks)
            for fd in held_locks:
                os.close(fd)

        record = HostileRecord(
            error=error,
            hung=hung,
            planted_path=str(planted),
            outside_events=events,
            outside_changes=snapshot(outside.root) != outside_before,
            outside_descriptors=outside_descriptors,
            outside_lockable=not hung and all(_lockable(path) for path in outside.lockable()),
            item_mode=_mode(env.path / "state.json"),
            item_value=_read_json(env.path / "state.json"),
            store_dir_exists=os.path.lexists(env.path),
        )
        _clean_up(env, outcome, fifos)
        return record


def _lockable(path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _mode(path):
    try:
        return os.lstat(path).st_mode
    except OSError:
        return None


def _read_json(path):
    # Only a regular file is read: the planted entry may still be a FIFO.
    mode = _mode(path)
    if mode is None or not stat.S_ISREG(mode):
        return None
    return json.loads(Path(path).read_text())


def _clean_up(env, outcome, fifos) -> None:
    release_fifos(fifos)
    opened = outcome.result if outcome is not None else None
    for store in (env.store, opened):
        if isinstance(store, vcstore.Store):
            try:
                store.delete()
            except (OSError, vcstore.StoreError):
                pass


def describe(record: HostileRecord) -> str:
    if record.hung:
        return f"hung: {record.error}"
    return f"{type(record.error).__name__}: {record.error}" if record.error else "returned without error"


# ---------------------------------------------------------------------------
# Rejection


@pytest.mark.parametrize("case", REJECTING, ids=ids(REJECTING))
def test_planted_entry_rejected(case):
    record = run_case(case)
    assert not record.hung, describe(record)
    assert isinstance(record.error, vcstore.StoreError), describe(record)


@pytest.mark.parametrize("case", REJECTING, ids=ids(REJECTING))
def test_rejection_names_planted_path(case):
    record = run_case(case)
    assert record.error is not None and record.planted_path in str(record.error), describe(record)


@pytest.mark.parametrize("case", TOLERANT, ids=ids(TOLERANT))
def test_tolerated_entry_raises_only_store_errors(case):
    record = run_case(case)
    assert not record.hung, describe(record)
    assert record.error is None or isinstance(record.error, vcstore.StoreError), describe(record)


@pytest.mark.parametrize("case", STORE_OVER_ITEM, ids=ids(STORE_OVER_ITEM))
def test_store_over_planted_item_rejected_or_replaced(case):
    record = run_case(case)
    if record.error is None:
        # rename(2) replaced the planted entry itself: the item is now an ordinary file.
        assert record.item_mode is not None and stat.S_ISREG(record.item_mode)
        assert record.item_value == NEW
    else:
        assert isinstance(record.error, vcstore.StoreError), describe(record)


@pytest.mark.parametrize("case", DELETES, ids=ids(DELETES))
def test_delete_removes_store_with_planted_entry(case):
    record = run_case(case)
    assert record.error is None, describe(record)
    assert not record.store_dir_exists


# ---------------------------------------------------------------------------
# Nothing outside the store is touched


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_planted_entry_never_opens_outside(case):
    record = run_case(case)
    assert record.outside_events == [], describe(record)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_planted_entry_never_changes_outside(case):
    record = run_case(case)
    assert not record.outside_changes


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_planted_entry_leaves_nothing_open_outside(case):
    record = run_case(case)
    assert record.outside_descriptors == [], describe(record)
    assert record.outside_lockable, describe(record)


# ---------------------------------------------------------------------------
# The watch itself reports what a store that follows links would do


def test_watch_sees_link_followed(tmp_path):
    # A check that cannot fail shows nothing: opening through a link must register.
    outside = make_outside(tmp_path / "outside")
    plant(tmp_path / "link", "symlink-file", outside)
    watch = DirectoryWatch(outside.directories())
    try:
        Path(tmp_path / "link").read_text()
        events = watch.events()
    finally:
        watch.close()
    assert any(event.startswith("open") for event in events)
