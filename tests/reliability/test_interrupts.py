"""File systems without flock(2), and KeyboardInterrupt while a lock call waits.

On a file system whose flock fails with ENOLCK, EOPNOTSUPP or ENOSYS (some NFS
and FUSE mounts), every lock call and `store` raise `LockUnsupportedError`
naming the path, and leave no descriptor, token or temporary file.

A SIGINT that arrives while `item_lock` waits raises KeyboardInterrupt in the
caller and leaves no descriptor, no token and no pending lock request behind.
It is sent for real to a child process blocked in flock(2) or in the timeout's
polling loop. A KeyboardInterrupt injected at each seam call of `item_lock`
and `store` covers the moments that a real signal rarely hits.
"""

import dataclasses
import errno
import functools
import json
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import vcstore
from vcstore import Item
from vcstore.filesystem import FilesystemStore
from helpers import BLOCKED_SECONDS, REPLY_SECONDS, fd_count, temp_files, wait_blocked_in_flock
from reliability.helpers import (
    NoFlockIO,
    StepIO,
    child_environment,
    held_tokens,
    interrupt,
    is_flock_free,
    record_steps,
    temp_names,
)

pytestmark = [pytest.mark.reliability, pytest.mark.interrupts]

UNSUPPORTED = [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS]

OLD = {"value": "old"}
NEW = {"value": "new"}

LOCK_CALLS = {
    "blocking": lambda store: store.item_lock(Item.LOCK, exclusive=True),
    "try": lambda store: store.item_lock(Item.LOCK, exclusive=True, timeout=0),
    "shared-timeout": lambda store: store.item_lock(Item.LOCK, exclusive=False, timeout=0.5),
    "new-lock-file": lambda store: store.item_lock(Item.STATE, exclusive=True),
    "locked": lambda store: store.locked(Item.NETWORK).__enter__(),
}
LOCK_FILES = {
    "blocking": "lock",
    "try": "lock",
    "shared-timeout": "lock",
    "new-lock-file": "state.json.lock",
    "locked": "network.json.lock",
}


# ---------------------------------------------------------------------------
# flock(2) not supported


@pytest.fixture
def no_flock_store(tmp_path, request):
    """A store whose value was stored normally, opened again on a seam without flock."""
    FilesystemStore(tmp_path / "store").store(Item.STATE, OLD)
    return FilesystemStore(tmp_path / "store", io=NoFlockIO(request.param))


@pytest.mark.parametrize("no_flock_store", UNSUPPORTED, ids=errno.errorcode.get, indirect=True)
@pytest.mark.parametrize("call", LOCK_CALLS)
def test_lock_without_flock_raises_unsupported(no_flock_store, call):
    with pytest.raises(vcstore.LockUnsupportedError):
        LOCK_CALLS[call](no_flock_store)


@pytest.mark.parametrize("no_flock_store", UNSUPPORTED, ids=errno.errorcode.get, indirect=True)
@pytest.mark.parametrize("call", LOCK_CALLS)
def test_lock_without_flock_names_path(no_flock_store, call):
    with pytest.raises(vcstore.LockUnsupportedError) as raised:
        LOCK_CALLS[call](no_flock_store)
    assert str(no_flock_store.path / LOCK_FILES[call]) in str(raised.value)


@pytest.mark.parametrize("no_flock_store", UNSUPPORTED, ids=errno.errorcode.get, indirect=True)
@pytest.mark.parametrize("call", LOCK_CALLS)
def test_lock_without_flock_leaves_nothing(no_flock_store, call):
    before = fd_count()
    with pytest.raises(vcstore.LockUnsupportedError):
        LOCK_CALLS[call](no_flock_store)
    assert fd_count() == before
    assert held_tokens(no_flock_store) == []


@pytest.mark.parametrize("no_flock_store", UNSUPPORTED, ids=errno.errorcode.get, indirect=True)
def test_store_without_flock_raises_unsupported(no_flock_store):
    # store locks its temporary file so that a live writer's file is never removed.
    with pytest.raises(vcstore.LockUnsupportedError):
        no_flock_store.store(Item.STATE, NEW)


@pytest.mark.parametrize("no_flock_store", UNSUPPORTED, ids=errno.errorcode.get, indirect=True)
def test_store_without_flock_keeps_value(no_flock_store):
    with pytest.raises(vcstore.LockUnsupportedError):
        no_flock_store.store(Item.STATE, NEW)
    assert no_flock_store.load(Item.STATE) == OLD
    assert temp_files(no_flock_store.path, Item.STATE) == []


# ---------------------------------------------------------------------------
# A real SIGINT while a lock call waits, in a child process

WAITER_SCRIPT = """
import json, os, sys
import vcstore
from vcstore import Item
from vcstore.tokens import TOKENS
from helpers import fd_count, fds_open_on

path, timeout = sys.argv[1], json.loads(sys.argv[2])
store = vcstore.open(path)
before = fd_count()
print("waiting", flush=True)
try:
    store.item_lock(Item.LOCK, exclusive=True, timeout=timeout)
    outcome = "locked"
except KeyboardInterrupt:
    outcome = "KeyboardInterrupt"
print(json.dumps({
    "outcome": outcome,
    "descriptor delta": fd_count() - before,
    "tokens": len(TOKENS._held),
    "lock fds": fds_open_on(os.path.join(path, "lock")),
}), flush=True)

sys.stdin.readline()
try:
    store.item_unlock(Item.LOCK, store.item_lock(Item.LOCK, exclusive=True, timeout=0))
    after = "locked"
except vcstore.LockTimeoutError:
    after = "LockTimeoutError"
print(json.dumps({"after": after}), flush=True)
"""


def _read_line(process, seconds: float = REPLY_SECONDS) -> str:
    readable, _, _ = select.select([process.stdout], [], [], seconds)
    if not readable:
        raise AssertionError(f"child {process.pid} wrote nothing within {seconds} s")
    line = process.stdout.readline()
    if not line:
        raise AssertionError(f"child {process.pid} exited: {process.stderr.read()}")
    return line


def wait_sleeping(pid: int, seconds: float = REPLY_SECONDS) -> bool:
    """Return True once process *pid* sleeps in the kernel (the timeout's polling loop sleeps).

    Where /proc/PID/wchan shows no function name, wait `BLOCKED_SECONDS` instead.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/wchan") as wchan:
                where = wchan.read()
        except OSError:
            where = ""
        if where in ("", "0"):
            time.sleep(BLOCKED_SECONDS)
            return True
        if "sleep" in where:
            return True
        time.sleep(0.005)
    return False


@pytest.fixture(scope="module", params=[None, 30.0], ids=["blocking", "timeout"])
def interrupted_waiter(request, tmp_path_factory):
    """Interrupt a child waiting for a lock that this process holds; return its reports."""
    store = vcstore.open(tmp_path_factory.mktemp("interrupted") / "store")
    token = store.item_lock(Item.LOCK, exclusive=True)
    child = subprocess.Popen(
        [sys.executable, "-c", WAITER_SCRIPT, str(store.path), json.dumps(request.param)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_environment(),
    )
    try:
        assert _read_line(child).strip() == "waiting"
        if request.param is None:
            assert wait_blocked_in_flock(child.pid)
        else:
            assert wait_sleeping(child.pid)
        child.send_signal(signal.SIGINT)
        report = json.loads(_read_line(child))

        store.item_unlock(Item.LOCK, token)
        report["free after parent unlock"] = is_flock_free(store.path / "lock")
        child.stdin.write("go\n")
        child.stdin.flush()
        report.update(json.loads(_read_line(child)))
    finally:
        child.kill()
        child.communicate()
    yield report
    store.delete()


def test_interrupted_wait_raises_keyboard_interrupt(interrupted_waiter):
    assert interrupted_waiter["outcome"] == "KeyboardInterrupt"


def test_interrupted_wait_leaves_no_descriptor(interrupted_waiter):
    assert interrupted_waiter["descriptor delta"] == 0
    assert interrupted_waiter["lock fds"] == []


def test_interrupted_wait_leaves_no_token(interrupted_waiter):
    assert interrupted_waiter["tokens"] == 0


def test_interrupted_wait_leaves_no_lock_request(interrupted_waiter):
    # A flock request left pending would be granted to the child once the parent unlocks.
    assert interrupted_waiter["free after parent unlock"]


def test_interrupted_waiter_can_lock_later(interrupted_waiter):
    assert interrupted_waiter["after"] == "locked"


# ---------------------------------------------------------------------------
# KeyboardInterrupt at each seam call


@dataclasses.dataclass
class Context:
    path: Path
    store: object


def _prepare(root, seam):
    store = FilesystemStore(root / "store", io=seam)
    store.store(Item.STATE, OLD)
    return Context(store.path, store)


INTERRUPTED_CALLS = {
    "lock-new-file": (lambda c: c.store.item_lock(Item.STATE, exclusive=True), "state.json.lock"),
    "lock-timeout": (lambda c: c.store.item_lock(Item.LOCK, exclusive=True, timeout=0.5), "lock"),
    "store": (lambda c: c.store.store(Item.STATE, NEW), None),
}
STEPS = {name: record_steps(_prepare, call) for name, (call, _) in INTERRUPTED_CALLS.items()}
CASES = [(name, step, method) for name, steps in STEPS.items() for step, method in enumerate(steps)]
LOCK_CASES = [case for case in CASES if case[0] != "store"]
STORE_CASES = [case for case in CASES if case[0] == "store"]


def case_ids(cases) -> list:
    return [f"{name}-{step:02d}-{method}" for name, step, method in cases]


@dataclasses.dataclass
class InterruptRecord:
    raised: str
    descriptor_delta: int
    tokens: list
    lock_free: bool
    value: object
    new_temps: list


@functools.lru_cache(maxsize=None)
def interrupt_at(name: str, step: int, method: str) -> InterruptRecord:
    call, lock_name = INTERRUPTED_CALLS[name]
    with tempfile.TemporaryDirectory(prefix="vcstore-interrupt-") as root:
        seam = StepIO(step, interrupt)
        context = _prepare(Path(root), seam)
        temps_before = temp_names(context.path)
        before = fd_count()
        seam.armed = True
        try:
            call(context)
            raised = "nothing"
        except KeyboardInterrupt:
            raised = "KeyboardInterrupt"
        seam.armed = False
        assert seam.calls[step][0] == method, f"call {step} was {seam.calls[step:step + 1]}, not {method}"

        tokens = held_tokens(context.store)
        record = InterruptRecord(
            raised=raised,
            descriptor_delta=fd_count() - before - len(tokens),
            tokens=tokens,
            lock_free=is_flock_free(context.path / lock_name) if lock_name and (context.path / lock_name).exists() else True,
            value=context.store.load(Item.STATE),
            new_temps=sorted(set(temp_names(context.path)) - set(temps_before)),
        )
        context.store.delete()
        return record


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_interrupt_propagates(case):
    assert interrupt_at(*case).raised == "KeyboardInterrupt"


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_interrupt_leaks_no_descriptor(case):
    assert interrupt_at(*case).descriptor_delta == 0


@pytest.mark.parametrize("case", LOCK_CASES, ids=case_ids(LOCK_CASES))
def test_interrupted_lock_holds_nothing(case):
    record = interrupt_at(*case)
    assert record.tokens == []
    assert record.lock_free


@pytest.mark.parametrize("case", STORE_CASES, ids=case_ids(STORE_CASES))
def test_interrupted_store_keeps_value(case):
    name, step, _ = case
    renamed = step > STEPS[name].index("replace")
    record = interrupt_at(*case)
    assert record.value == (NEW if renamed else OLD)
    assert record.new_temps == []
