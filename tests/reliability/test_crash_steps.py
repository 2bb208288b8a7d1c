"""A writer killed with SIGKILL at every file-system call of `store`.

The calls of `store` are recorded once through a counting I/O seam. For each
call in turn, a forked child runs `store` through a seam that sends SIGKILL to
its own process just before that call. Afterwards `load` returns the old value
until the rename and the new one after it, never the temporary file's
content, and the next `store` of the item removes the dead writer's temporary
files and logs a WARNING that names them.
"""

import dataclasses
import functools
import logging
import os
import re
import signal
import tempfile
from pathlib import Path

import pytest

import vcstore
from vcstore import Item
from vcstore.filesystem import FilesystemStore
from reliability.helpers import StepIO, kill_self, record_steps, temp_names

pytestmark = [pytest.mark.reliability, pytest.mark.crash]

OLD = {"value": "old"}
NEW = {"value": "new", "fill": "n" * 4000}
NEXT = {"value": "after the crash"}

# A temporary file whose writer died before this test's writer started.
STALE_NAME = ".state.json.0123456789abcdef.tmp"

TEMP_NAME = re.compile(r"\.state\.json\.[0-9a-f]+\.tmp")


@dataclasses.dataclass
class Context:
    path: Path
    store: object


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    previous: bool
    stale: bool

    def prepare(self, root: Path, seam=None) -> Context:
        store = FilesystemStore(root / "store", io=seam)
        if self.previous:
            store.store(Item.STATE, OLD)
        if self.stale:
            (store.path / STALE_NAME).write_text('"left by a dead writer"')
        return Context(store.path, store)

    @property
    def old_value(self):
        return OLD if self.previous else "ItemNotFoundError"


SCENARIOS = [
    Scenario("replace", previous=True, stale=False),
    Scenario("first", previous=False, stale=False),
    Scenario("stale", previous=True, stale=True),
]

STEPS = {
    scenario.name: record_steps(scenario.prepare, lambda context: context.store.store(Item.STATE, NEW))
    for scenario in SCENARIOS
}


@dataclasses.dataclass(frozen=True)
class Case:
    scenario: Scenario
    step: int
    method: str

    @property
    def id(self) -> str:
        return f"{self.scenario.name}-{self.step:02d}-{self.method}"

    @property
    def renamed(self) -> bool:
        """Whether the writer died after renaming its temporary file over the item."""
        return self.step > STEPS[self.scenario.name].index("replace")

    @property
    def wrote_temp(self) -> bool:
        """Whether the writer died with the new value written, not yet renamed."""
        steps = STEPS[self.scenario.name]
        return steps.index("write") < self.step <= steps.index("replace")


CASES = [
    Case(scenario, step, method)
    for scenario in SCENARIOS
    for step, method in enumerate(STEPS[scenario.name])
]
WRITTEN_CASES = [case for case in CASES if case.wrote_temp]


@dataclasses.dataclass
class CrashRecord:
    """What a writer killed at one step left, and what the next `store` did with it."""

    value_after_crash: object
    temps_after_crash: list
    temps_after_next_store: list
    warned_names: list


class _WarningRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _kill_writer_at(path: Path, step: int) -> int:
    """Run `store` in a forked child that SIGKILLs itself before seam call *step*; return its wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            seam = StepIO(step, kill_self)
            store = FilesystemStore(path, io=seam)
            seam.armed = True
            store.store(Item.STATE, NEW)
        finally:
            # Reached only if the kill did not happen: never return into pytest.
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return status


@functools.lru_cache(maxsize=None)
def crash(case: Case) -> CrashRecord:
    """Kill a writer at *case*'s step, then load and store again; cached per case."""
    with tempfile.TemporaryDirectory(prefix="vcstore-crash-") as root:
        context = case.scenario.prepare(Path(root))
        status = _kill_writer_at(context.path, case.step)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"the writer was meant to die by SIGKILL at call {case.step} ({case.method}) "
            f"but ended with wait status {status}"
        )

        reader = FilesystemStore(context.path)
        value = _load(reader)
        temps_after_crash = temp_names(context.path)

        logger = logging.getLogger("vcstore")
        handler = _WarningRecords()
        logger.addHandler(handler)
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            reader.store(Item.STATE, NEXT)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)

        warned = sorted({name for record in handler.records for name in TEMP_NAME.findall(record.getMessage())})
        record = CrashRecord(value, temps_after_crash, temp_names(context.path), warned)
        reader.delete()
        return record


def _load(store):
    try:
        return store.load(Item.STATE)
    except vcstore.StoreError as error:
        return type(error).__name__


def test_every_step_recorded():
    # A store without a write, an fsync and a rename would make these tests vacuous.
    for steps in STEPS.values():
        assert {"write", "fsync", "replace"} <= set(steps), steps


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_crash_leaves_old_or_new_value(case):
    # Crash: SIGKILL at any point of store; the rename is the only commit point.
    expected = NEW if case.renamed else case.scenario.old_value
    assert crash(case).value_after_crash == expected


@pytest.mark.parametrize("case", WRITTEN_CASES, ids=[case.id for case in WRITTEN_CASES])
def test_written_temporary_file_never_read(case):
    # The dead writer's temporary file contains the whole new value, but it is not the item.
    assert crash(case).value_after_crash == case.scenario.old_value


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_next_store_removes_dead_writer_files(case):
    assert crash(case).temps_after_next_store == []


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_stale_file_removal_logged_by_name(case):
    record = crash(case)
    assert record.warned_names == record.temps_after_crash


def test_some_crash_leaves_temporary_file():
    # Otherwise the removal and warning checks above would check nothing.
    assert any(crash(case).temps_after_crash for case in CASES)
