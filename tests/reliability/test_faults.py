"""I/O faults at every file-system call of `store`, `raw`, `item_lock` and store creation.

The calls of each operation are recorded once, at collection, through a
counting I/O seam. Then each call in turn fails with ENOSPC, EIO, EFBIG, EACCES
and EINTR, raised as `os` raises them. After each fault the previous value is
intact (the new one once the rename has happened), no temporary file remains,
no descriptor leaks, and the error names the store's path and the cause.

EINTR is a fault like any other: the store reports it and does not retry.
Python already retries EINTR inside each system call (PEP 475), so an EINTR
that reaches the store comes from a file system that gave up (FUSE, NFS
``intr``), and retrying a failed close(2) is unsafe on Linux.
"""

import dataclasses
import errno
import functools
import json
import os
import tempfile
from pathlib import Path

import pytest

import vcstore
from vcstore import Item
from vcstore.filesystem import FilesystemStore
from helpers import fd_count
from reliability.helpers import (
    StepIO,
    errno_of,
    held_tokens,
    is_flock_free,
    raise_errno,
    record_steps,
    run_python,
    temp_names,
)

pytestmark = [pytest.mark.reliability, pytest.mark.faults]

ERRNOS = [errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EACCES, errno.EINTR]

OLD = {"value": "previous"}
NEW = {"value": "new", "fill": "n" * 4000}

# A temporary file whose writer died, so no process holds its lock.
STALE_NAME = ".state.json.0123456789abcdef.tmp"


# ---------------------------------------------------------------------------
# Scenarios: an operation on a prepared store


@dataclasses.dataclass
class Context:
    """What a scenario prepared: the store's path, the store (if any) and the seam."""

    root: Path
    path: Path
    seam: StepIO
    store: object = None


def _existing_store(root, seam, *, stale=False) -> Context:
    store = FilesystemStore(root / "store", io=seam)
    store.store(Item.STATE, OLD)
    if stale:
        (store.path / STALE_NAME).write_text('"left by a dead writer"')
    return Context(root, store.path, seam, store)


def _new_store_path(root, seam) -> Context:
    return Context(root, root / "parent" / "store", seam)


def _incomplete_store_path(root, seam) -> Context:
    # A directory that another tool made: raw/ and the lock file are missing.
    (root / "store").mkdir(mode=0o750)
    return Context(root, root / "store", seam)


def _create(context):
    context.store = FilesystemStore(context.path, io=context.seam)


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    kind: str
    prepare: object
    operation: object
    lock_name: str = None


SCENARIOS = [
    Scenario("store", "store", _existing_store, lambda c: c.store.store(Item.STATE, NEW)),
    Scenario(
        "store-stale",
        "store",
        functools.partial(_existing_store, stale=True),
        lambda c: c.store.store(Item.STATE, NEW),
    ),
    Scenario("raw-id", "raw", _existing_store, lambda c: c.store.raw("disk0")),
    Scenario("raw-unique", "raw", _existing_store, lambda c: c.store.raw()),
    Scenario(
        "lock-blocking",
        "lock",
        _existing_store,
        lambda c: c.store.item_lock(Item.STATE, exclusive=True),
        lock_name="state.json.lock",
    ),
    Scenario(
        "lock-try",
        "lock",
        _existing_store,
        lambda c: c.store.item_lock(Item.LOCK, exclusive=True, timeout=0),
        lock_name="lock",
    ),
    Scenario(
        "lock-shared-timeout",
        "lock",
        _existing_store,
        lambda c: c.store.item_lock(Item.NETWORK, exclusive=False, timeout=5),
        lock_name="network.json.lock",
    ),
    Scenario("create", "create", _new_store_path, _create),
    Scenario("create-incomplete", "create", _incomplete_store_path, _create),
]

# Each scenario's seam calls, in order, recorded from one successful run.
STEPS = {scenario.name: record_steps(scenario.prepare, scenario.operation) for scenario in SCENARIOS}


@dataclasses.dataclass(frozen=True)
class Case:
    scenario: Scenario
    step: int
    method: str
    number: int

    @property
    def id(self) -> str:
        return f"{self.scenario.name}-{self.step:02d}-{self.method}-{errno.errorcode[self.number]}"

    @property
    def committed(self) -> bool:
        """Whether the fault comes after `store` renamed its temporary file over the item."""
        steps = STEPS[self.scenario.name]
        return "replace" in steps and self.step > steps.index("replace")


def cases(kinds, numbers=ERRNOS) -> list:
    found = []
    for scenario in SCENARIOS:
        if scenario.kind not in kinds:
            continue
        for step, method in enumerate(STEPS[scenario.name]):
            found.extend(Case(scenario, step, method, number) for number in numbers)
    return found


ALL_KINDS = ("store", "raw", "lock", "create")
ALL_CASES = cases(ALL_KINDS)


def case_ids(selected) -> list:
    return [case.id for case in selected]


# ---------------------------------------------------------------------------
# Running one fault


@dataclasses.dataclass
class FaultRecord:
    """What one fault left behind."""

    error: BaseException
    path: str
    named_paths: list
    value: object
    new_temps: list
    descriptor_delta: int
    tokens: list
    lock_free: bool
    layout_complete: bool


@functools.lru_cache(maxsize=None)
def run_fault(case: Case) -> FaultRecord:
    """Run *case*'s operation with its fault injected; record the aftermath.

    Cached, so that the tests of one case, each checking one guarantee, share a run.
    """
    with tempfile.TemporaryDirectory(prefix="vcstore-fault-") as root:
        seam = StepIO(case.step, raise_errno(case.number))
        context = case.scenario.prepare(Path(root), seam)
        temps_before = temp_names(context.path) if context.path.is_dir() else []
        descriptors_before = fd_count()

        seam.armed = True
        try:
            case.scenario.operation(context)
            error = None
        except Exception as raised:  # noqa: BLE001 - the error is what the tests check
            error = raised
        seam.armed = False

        assert len(seam.calls) > case.step and seam.calls[case.step][0] == case.method, (
            f"the fault meant for call {case.step} ({case.method}) hit "
            f"{seam.calls[case.step:case.step + 1]}: the operation's calls changed between runs"
        )

        store = context.store
        tokens = held_tokens(store) if store is not None else []
        # A lock call that absorbed the fault holds its token's descriptor, as it should.
        descriptor_delta = fd_count() - descriptors_before - len(tokens)
        lock_path = context.path / case.scenario.lock_name if case.scenario.lock_name else None
        record = FaultRecord(
            error=error,
            path=str(context.path),
            named_paths=[str(context.path), *(str(parent) for parent in context.path.parents if parent > Path(root))],
            value=_load(store) if store is not None else None,
            new_temps=sorted(set(temp_names(context.path)) - set(temps_before)) if context.path.is_dir() else [],
            descriptor_delta=descriptor_delta,
            tokens=tokens,
            lock_free=is_flock_free(lock_path) if lock_path is not None and lock_path.exists() else True,
            layout_complete=_reopens_complete(context.path) if case.scenario.kind == "create" else True,
        )
        if store is not None:
            store.delete()
        return record


def _load(store):
    try:
        return store.load(Item.STATE)
    except vcstore.StoreError as error:
        return type(error).__name__


def _reopens_complete(path: Path) -> bool:
    store = FilesystemStore(path)
    complete = (path / "raw").is_dir() and (path / "lock").is_file()
    store.delete()
    return complete


# ---------------------------------------------------------------------------
# The value: intact before the rename, new after it


@pytest.mark.parametrize("case", cases(("store",)), ids=case_ids(cases(("store",))))
def test_store_fault_keeps_previous_value(case):
    record = run_fault(case)
    # A fault after the rename cannot bring the old value back: the new one is in place.
    expected = NEW if record.error is None or case.committed else OLD
    assert record.value == expected


@pytest.mark.parametrize("case", cases(("raw", "lock")), ids=case_ids(cases(("raw", "lock"))))
def test_raw_or_lock_fault_keeps_value(case):
    assert run_fault(case).value == OLD


@pytest.mark.parametrize("case", cases(("create",)), ids=case_ids(cases(("create",))))
def test_creation_fault_leaves_store_creatable(case):
    # A half-made store must not stop the next open from completing it.
    assert run_fault(case).layout_complete


# ---------------------------------------------------------------------------
# Nothing left behind


@pytest.mark.parametrize("case", ALL_CASES, ids=case_ids(ALL_CASES))
def test_fault_leaves_no_temporary_file(case):
    assert run_fault(case).new_temps == []


@pytest.mark.parametrize("case", ALL_CASES, ids=case_ids(ALL_CASES))
def test_fault_leaks_no_descriptor(case):
    assert run_fault(case).descriptor_delta == 0


@pytest.mark.parametrize("case", cases(("lock",)), ids=case_ids(cases(("lock",))))
def test_lock_fault_holds_no_lock(case):
    record = run_fault(case)
    if record.error is None:
        # The fault was absorbed and the lock taken: then the token must exist.
        assert len(record.tokens) == 1
    else:
        assert record.tokens == []
        assert record.lock_free


# ---------------------------------------------------------------------------
# The error: path and cause


@pytest.mark.parametrize("case", ALL_CASES, ids=case_ids(ALL_CASES))
def test_fault_error_names_path(case):
    record = run_fault(case)
    if record.error is None:
        return
    message = str(record.error)
    assert any(path in message for path in record.named_paths), f"{type(record.error).__name__}: {message}"


@pytest.mark.parametrize("case", ALL_CASES, ids=case_ids(ALL_CASES))
def test_fault_error_names_cause(case):
    record = run_fault(case)
    if record.error is None:
        return
    assert errno_of(record.error) == case.number, repr(record.error)
    assert os.strerror(case.number) in str(record.error), str(record.error)


@pytest.mark.parametrize("case", cases(ALL_KINDS, [errno.EIO]), ids=case_ids(cases(ALL_KINDS, [errno.EIO])))
def test_fault_raises_unless_absorbed(case):
    # A fault may be absorbed only where the operation then completes anyway
    # (skipping a stale temporary file it cannot open, say).
    record = run_fault(case)
    if record.error is None:
        assert record.value == (NEW if case.scenario.kind == "store" else OLD)


@pytest.mark.parametrize("case", cases(ALL_KINDS, [errno.EIO]), ids=case_ids(cases(ALL_KINDS, [errno.EIO])))
def test_eintr_handled_like_eio(case):
    # The decision: EINTR is reported like any I/O error, never retried in a loop.
    interrupted = run_fault(dataclasses.replace(case, number=errno.EINTR))
    assert (interrupted.error is None) == (run_fault(case).error is None)


def test_every_operation_reaches_the_disk():
    # An empty call list would make every parametrized test above vacuous.
    assert all(len(STEPS[scenario.name]) >= 3 for scenario in SCENARIOS), STEPS


# ---------------------------------------------------------------------------
# A real fault: the file size limit (RLIMIT_FSIZE), in a child process

FILE_SIZE_SCRIPT = """
import json, os, resource, sys
import vcstore
from vcstore import Item

path = sys.argv[1]
store = vcstore.open(path)
store.store(Item.STATE, {"value": "small"})

# Python ignores SIGXFSZ, so a write past the limit fails with EFBIG.
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
report = {"error": None, "errno": None}
try:
    store.store(Item.STATE, {"value": "x" * 100000})
except OSError as error:
    report["error"] = f"{type(error).__name__}: {error}"
    report["errno"] = error.errno
report["value"] = store.load(Item.STATE)
report["temps"] = [name for name in os.listdir(path) if name.endswith(".tmp")]
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def file_size_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsize") / "store"
    completed = run_python(FILE_SIZE_SCRIPT, path)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    report["path"] = str(path)
    return report


def test_file_size_limit_raises_efbig(file_size_report):
    assert file_size_report["errno"] == errno.EFBIG, file_size_report


def test_file_size_limit_keeps_previous_value(file_size_report):
    assert file_size_report["value"] == {"value": "small"}


def test_file_size_limit_removes_temporary_file(file_size_report):
    assert file_size_report["temps"] == []


def test_file_size_limit_error_names_path(file_size_report):
    assert file_size_report["path"] in file_size_report["error"]

