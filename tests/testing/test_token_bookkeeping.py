"""`TokenBookkeepingMachine`: the real backend passes, each broken backend fails."""

import fcntl
import itertools
import os
import uuid

import multiprocess
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

import vcstore
from vcstore import Item, LockTimeoutError, UnknownTokenError
from vcstore_testing.machines import TokenBookkeepingMachine
from vcstore_testing.mutants import MUTANTS

# Small, so the file runs in seconds.
SHORT_RUN = settings(
    max_examples=8,
    stateful_step_count=25,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)

# Finding a failure is enough: shrinking a long failing program is slow.
# Hypothesis also draws literal constants from the local modules already
# imported, so a derandomized run changes with the test files run before it.
# 60 examples missed the sibling-item bug after test_cli.py; 150 leave room.
FIND_ONLY = settings(SHORT_RUN, max_examples=150, phases=[Phase.explicit, Phase.generate])


class WrappedStore:
    """A store that passes every call to the real backend. Each mutant overrides one."""

    def __init__(self, root):
        self._store = vcstore.open(root)

    def __getattr__(self, name):
        return getattr(self._store, name)


# The tokens that the mutants of this process handed out, as the real backend
# keeps its own table per process: wrapper token -> (item, real token).
MAPPED = {}
RELEASED = set()
ISSUE_COUNTER = itertools.count(1)


class MappedTokenStore(WrappedStore):
    """Hands out tokens of its own, each mapped to a token of the real backend."""

    def new_token(self):
        return str(uuid.uuid4())

    def item_lock(self, item, exclusive=True, timeout=None):
        real = self._store.item_lock(item, exclusive, timeout)
        token = self.new_token()
        MAPPED[token] = (item, real)
        return token

    def item_unlock(self, item, token):
        _, real = MAPPED.get(token, (None, token))
        self._store.item_unlock(item, real)
        MAPPED.pop(token, None)
        RELEASED.add(token)


class CollidingTokenStore(MappedTokenStore):
    """Numbers tokens per process, so two workers get the same token."""

    def new_token(self):
        return f"token-{next(ISSUE_COUNTER)}"


class AnyTokenUnlockStore(MappedTokenStore):
    """item_unlock accepts any token and releases the process's latest lock on that file."""

    def item_unlock(self, item, token):
        for mine, (held_item, real) in reversed(list(MAPPED.items())):
            if held_item.lock_name == item.lock_name:
                self._store.item_unlock(held_item, real)
                del MAPPED[mine]
                return


class NonUuidIgnoredStore(MappedTokenStore):
    """item_unlock ignores a token that is not a UUID, as if it were harmless."""

    def item_unlock(self, item, token):
        try:
            uuid.UUID(token)
        except ValueError:
            return
        super().item_unlock(item, token)


class ForeignIgnoredStore(MappedTokenStore):
    """item_unlock ignores a token that another process issued."""

    def new_token(self):
        return f"pid{os.getpid()}:{uuid.uuid4()}"

    def item_unlock(self, item, token):
        if token.startswith("pid") and not token.startswith(f"pid{os.getpid()}:"):
            return
        super().item_unlock(item, token)


class SiblingAcceptedStore(MappedTokenStore):
    """item_unlock accepts a token for any item of the same lock file."""

    def item_unlock(self, item, token):
        held_item, _ = MAPPED.get(token, (item, None))
        if held_item.lock_name == item.lock_name:
            item = held_item
        super().item_unlock(item, token)


class ReleasedIgnoredStore(MappedTokenStore):
    """item_unlock of a token already released returns without an error."""

    def item_unlock(self, item, token):
        if token in RELEASED:
            return
        super().item_unlock(item, token)


class RejectButReleaseStore(MappedTokenStore):
    """An unknown token is rejected, but only after the process's latest lock is released."""

    def item_unlock(self, item, token):
        if token not in MAPPED and MAPPED:
            mine, (held_item, real) = MAPPED.popitem()
            self._store.item_unlock(held_item, real)
        super().item_unlock(item, token)


class LeakyTryLockStore(WrappedStore):
    """A try-lock that fails leaves a descriptor of the lock file open."""

    def item_lock(self, item, exclusive=True, timeout=None):
        try:
            return self._store.item_lock(item, exclusive, timeout)
        except LockTimeoutError:
            os.open(self._store.path / item.lock_name, os.O_RDONLY)
            raise


# Lock descriptors of ForkUnsafeStore in this process: token -> (item, fd, store path).
FLOCKED = {}


class ForkUnsafeStore(WrappedStore):
    """flock(2) locks of its own, in a token table that a forked child inherits.

    The child's item_unlock finds the parent's token and calls LOCK_UN on the
    inherited descriptor, which shares the parent's open file description and
    so releases the parent's lock.
    """

    def item_lock(self, item, exclusive=True, timeout=None):
        path = self._store.path / item.lock_name
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockTimeoutError(f"{item!r} is locked") from None
        token = str(uuid.uuid4())
        FLOCKED[token] = (item, fd, self._store.path)
        return token

    def item_unlock(self, item, token):
        held = FLOCKED.get(token)
        if held is None or held[0] is not item:
            raise UnknownTokenError(f"unknown token {token!r} for {item!r}")
        del FLOCKED[token]
        fcntl.flock(held[1], fcntl.LOCK_UN)
        os.close(held[1])

    def delete(self):
        self._store.delete()
        for token, (_, fd, path) in list(FLOCKED.items()):
            if path == self._store.path:
                del FLOCKED[token]
                os.close(fd)


class DeleteKeepsLocksStore(ForkUnsafeStore):
    """delete removes the store but keeps the descriptors behind its tokens open."""

    def delete(self):
        self._store.delete()


def machine_for(factory, directory, **attributes):
    attributes.update(store_factory=staticmethod(factory), parent_directory=str(directory))
    return type("TokenBookkeepingMachine", (TokenBookkeepingMachine,), attributes)


def test_real_backend_passes(tmp_path):
    run_state_machine_as_test(machine_for(vcstore.open, tmp_path), settings=SHORT_RUN)


def test_real_backend_passes_with_one_worker(tmp_path):
    machine = machine_for(vcstore.open, tmp_path, workers=1)

    run_state_machine_as_test(machine, settings=SHORT_RUN)


def test_run_cleans_up(tmp_path):
    run_state_machine_as_test(machine_for(vcstore.open, tmp_path), settings=SHORT_RUN)

    assert list(tmp_path.iterdir()) == []
    assert multiprocess.active_children() == []


@pytest.mark.parametrize(
    ("broken_store", "attributes", "message"),
    [
        # Two workers' first tokens are both "token-1".
        (CollidingTokenStore, {}, "which item_lock returned before"),
        # The first wrong unlock of any kind returns without an error.
        (AnyTokenUnlockStore, {}, "without an error"),
        (NonUuidIgnoredStore, {}, "with the unknown token"),
        # The fork check would also catch it: the child is another process.
        (ForeignIgnoredStore, {"fork_checks": False}, r"worker \d's (shared|exclusive) token"),
        (SiblingAcceptedStore, {}, "given for Item.DEVICE"),
        (ReleasedIgnoredStore, {}, "with released worker"),
        # The probe finds the lock free, or the worker has one descriptor too few.
        (RejectButReleaseStore, {}, "differ from the model|open file descriptors"),
        (LeakyTryLockStore, {}, "open file descriptors"),
        (ForkUnsafeStore, {}, "forked by worker"),
        # The deleting worker keeps a descriptor for each token it held.
        (DeleteKeepsLocksStore, {"fork_checks": False}, "open file descriptors"),
    ],
)
def test_broken_backend_fails(tmp_path, broken_store, attributes, message):
    machine = machine_for(broken_store, tmp_path, **attributes)

    with pytest.raises(AssertionError, match=message):
        run_state_machine_as_test(machine, settings=FIND_ONLY)


def test_descriptor_checks_switch_off(tmp_path):
    machine = machine_for(LeakyTryLockStore, tmp_path, descriptor_checks=False)

    run_state_machine_as_test(machine, settings=SHORT_RUN)


def test_fork_checks_switch_off(tmp_path):
    # The own-table backend is correct apart from fork, so without the fork
    # check nothing fails it, and the fork check is what catches it above.
    machine = machine_for(ForkUnsafeStore, tmp_path, fork_checks=False)

    run_state_machine_as_test(machine, settings=SHORT_RUN)


def test_failure_prints_readable_steps(tmp_path):
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(machine_for(ForkUnsafeStore, tmp_path), settings=FIND_ONLY)

    steps = "\n".join(caught.value.__notes__)
    assert "= state.item_lock(" in steps
    assert "worker=worker_" in steps
    assert "state.fork_child_unlock(token=token_" in steps


def test_failures_reported_as_one(tmp_path):
    # A backend without locks breaks several checks. Each would be its own
    # "distinct failure", reported as an ExceptionGroup of long programs,
    # unless every check fails through the same line.
    machine = machine_for(MUTANTS["no_lock"], tmp_path)
    shrinking = settings(SHORT_RUN, max_examples=30, phases=[Phase.explicit, Phase.generate, Phase.shrink])

    with pytest.raises(AssertionError):
        run_state_machine_as_test(machine, settings=shrinking)
