"""A hypothesis state machine that checks lock tokens: who may unlock what.

Worker processes take item locks on one store with ``timeout=0`` and try to
release them in every wrong way. The model is the set of tokens each worker
holds; it predicts whether each lock request succeeds (the rules of
`LockExclusivityMachine`) and it checks that:

- every token that ``item_lock`` returns differs from every token returned
  before, by any worker;
- an unknown token, another worker's token, a token given with the wrong
  item and a token already released each raise `vcstore.UnknownTokenError`
  and release nothing. DEVICES and DEVICE_IDS share a lock file, but a token
  belongs to the item it was taken for, so the other one is a wrong item;
- a worker has exactly one more open file descriptor per token it holds than
  after it first opened the store, so neither a lock, a failed try-lock, an
  unlock, a store nor a delete leaks one;
- a child that a worker forks while it holds a token cannot release that
  token: its ``item_unlock`` raises `vcstore.UnknownTokenError` and the
  parent's lock stays held.

After each step, the acting worker's descriptors are counted. Some steps
must leave the locks as they were (a rejected unlock, a fork) or release
some (a death, a delete). After those, a probe from a separate process also
compares the lock states of the items involved ("free", "shared" or
"exclusive") with the model. Worker deaths (SIGKILL) and stores are mixed in.

A delete runs only while the deleting worker, and no other, holds tokens: the
delete must release them. Another worker's token would belong to a removed
store, and what unlocking it does is up to the backend. vcstore, for one,
cannot tell a store recreated at the same path from the removed one when the
file system reuses the directory's inode. After a delete, every worker opens
the store again, which starts from an empty directory.

A downstream project checks its own backend by subclassing::

    class TestMyTokens(TokenBookkeepingMachine):
        store_factory = my_backend.open_store   # takes a root directory
        fork_checks = False                      # if the backend cannot fork

    TestMyTokens = TestMyTokens.TestCase
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import Bundle, consumes, invariant, multiple, precondition, rule

from vcstore import Item, UnknownTokenError

from ..probe import LOCK_STATES
from ..workers import Worker, WorkerError
from .base import StoreMachine, fail
from .model import LockModel, ModelToken

__all__ = [
    "DeletableStoreMachine",
    "GenerationFactory",
    "LockModel",
    "ModelToken",
    "StoreGeneration",
    "TokenBookkeepingMachine",
]

# Items that have a value to store: Item.LOCK is only locked.
DATA_ITEMS = tuple(item for item in Item if item is not Item.LOCK)

# The items that share a lock file with another item, and that other item.
SIBLINGS = {Item.DEVICES: Item.DEVICE_IDS, Item.DEVICE_IDS: Item.DEVICES}

# Seconds that the fork check waits for its child to report.
FORK_CHILD_TIMEOUT = 5.0

# The report of a forked child whose item_unlock raised UnknownTokenError.
CHILD_REJECTED = "rejected"


@dataclass(frozen=True)
class StoreGeneration:
    """The store root as a worker target, numbered anew after each delete.

    A worker keeps the store object it opened for each target, so a new
    generation makes every worker (and the probe process) call
    ``store_factory`` again, with the same root. Deliberately not
    `os.PathLike`: the workers would map a path-like target to the key of the
    plain path, and so reuse the store object of the deleted store.
    """

    root: str
    number: int

    def __repr__(self) -> str:
        return f"{self.root!r} (generation {self.number})"


class GenerationFactory:
    """Call *store_factory* with the root of a `StoreGeneration` target."""

    def __init__(self, store_factory: Callable[[Any], Any]) -> None:
        self.store_factory = store_factory

    def __call__(self, target: Any) -> Any:
        if isinstance(target, StoreGeneration):
            target = target.root
        return self.store_factory(target)


class DeletableStoreMachine(StoreMachine):
    """A `StoreMachine` whose store can be deleted and then used again.

    Commands name the store by ``self.target``. After a rule deletes the store
    it calls `_open_next_generation`, which creates the root directory again
    (so ``store_factory`` gets an existing, empty directory, as at the start)
    and moves every worker and the probe to a new store object. The other
    workers' objects of the deleted store are never used again, because a
    backend may legitimately reject every call on them.
    """

    worker_ids = StoreMachine.worker_ids

    def __init__(self) -> None:
        super().__init__()
        self.target = StoreGeneration(self.root, 0)

    def _factory(self) -> Any:
        return GenerationFactory(super()._factory())

    def _open_next_generation(self) -> None:
        try:
            os.mkdir(self.root, 0o700)
            created = True
        except FileExistsError:
            created = False
        if not created:
            fail(
                f"the store directory {self.root} still exists after delete(), "
                f"which must remove the store's directory tree"
            )
        self.target = StoreGeneration(self.root, self.target.number + 1)

    def _restart_worker(self, index: int) -> None:
        """SIGKILL worker *index* and start a new one in its place."""
        worker = self._worker(index)
        worker.kill()
        worker.restart()

    def _probe_states(self, items: Iterable[Item]) -> dict:
        self._start_pool()
        return self.prober.states(self.target, tuple(items))


class TokenBookkeepingMachine(DeletableStoreMachine):
    """Check token issue, rejection and release between worker processes.

    The class attributes of `StoreMachine` apply, and these switch rules off
    for a backend that lacks a feature:

    - ``worker_deaths`` (default True): the ``kill_worker`` rule.
    - ``fork_checks`` (default True): the ``fork_child_unlock`` rule, which
      calls ``os.fork`` in a worker. The worker calls ``store_factory`` again
      for the root before it forks, so the backend must return the store
      object that the worker already uses (as `vcstore.open` does) for the
      child to reach the parent's tokens.
    - ``descriptor_checks`` (default True): the count of each worker's open
      file descriptors, read from ``/proc/<pid>/fd``, so it needs Linux (it is
      skipped where that directory is missing). Turn it off for a backend
      whose tokens are not one descriptor each.
    - ``deletes`` (default True): the ``delete`` rule, which runs only while
      the deleting worker, and no other, holds tokens.

    ``death_spacing`` (default 3) lets ``kill_worker`` and
    ``fork_child_unlock`` run only on steps whose number is a multiple of
    it, because each starts a new process.
    """

    worker_ids = DeletableStoreMachine.worker_ids
    held_tokens = Bundle("token")
    released_tokens = Bundle("released_token")

    fork_checks: bool = True
    descriptor_checks: bool = True
    deletes: bool = True
    death_spacing: int = 3

    def __init__(self) -> None:
        super().__init__()
        self.model = LockModel()
        # Every token ever returned, by any worker, and who got it first.
        self.issued: dict[Any, str] = {}
        # Open descriptors of each worker process once it has opened the store.
        self.baselines: dict[int, int] = {}
        # What the invariant checks after the current step.
        self.touched_items: set[Item] = set()
        self.touched_workers: set[int] = set()

    # --- taking and releasing --------------------------------------------------

    @rule(target=held_tokens, worker=worker_ids, item=st.sampled_from(Item), exclusive=st.booleans())
    def item_lock(self, worker: int, item: Item, exclusive: bool):
        self.steps += 1
        # LockExclusivityMachine probes the lock states after each lock. Here
        # the descriptor count shows whether a lock was taken or leaked.
        self.touched_workers.add(worker)

        acting = self._acting_worker(worker)
        token = self.model.try_lock(acting, self.target, worker, item, exclusive)
        if token is None:
            return multiple()
        self._check_unique(token)
        self.model.add(token)
        return token

    @rule(target=released_tokens, token=consumes(held_tokens))
    def item_unlock(self, token: ModelToken):
        self.steps += 1

        # A death or a delete released the token already, so it is unknown now.
        if not self.model.holds(token):
            self._expect_rejected(token.worker, token.item, token.value, f"released {token.describe()}")
            return token

        self.touched_workers.add(token.worker)
        try:
            self._acting_worker(token.worker).item_unlock(self.target, token.item, token.value)
            rejection = None
        except UnknownTokenError as error:
            rejection = str(error)
        if rejection is not None:
            fail(f"worker {token.worker} could not unlock its held {token.describe()}: {rejection}")
        self.model.remove(token)
        return token

    # --- unlocks that must be rejected -----------------------------------------

    @rule(
        worker=worker_ids,
        item=st.sampled_from(Item),
        token=st.one_of(st.uuids().map(str), st.text(max_size=40)),
    )
    def unlock_unknown_token(self, worker: int, item: Item, token: str):
        self.steps += 1
        # A string that the backend issued as a token is a known one.
        if token in self.issued:
            return
        self._expect_rejected(worker, item, token, f"the unknown token {token!r}")

    @precondition(lambda self: self.workers > 1)
    @rule(worker=worker_ids, token=held_tokens)
    def unlock_foreign_token(self, worker: int, token: ModelToken):
        self.steps += 1
        # Only another worker's token is foreign, so the token's own worker skips.
        if worker == token.worker:
            return
        self._touch(token.worker, [])
        self._expect_rejected(worker, token.item, token.value, token.describe())

    @rule(token=held_tokens, item=st.sampled_from(Item))
    def unlock_wrong_item(self, token: ModelToken, item: Item):
        self.steps += 1
        # The token's own item makes a correct unlock, which item_unlock checks.
        if item is token.item:
            return
        self._expect_rejected(
            token.worker, item, token.value, f"{token.describe()}, given for {item!r}"
        )

    @rule(token=held_tokens)
    def unlock_sibling_item(self, token: ModelToken):
        """Unlock a DEVICES token as DEVICE_IDS, or the other way round.

        The two items share a lock file, but a token belongs to the item it
        was taken for. Tokens of other items have no sibling and skip.
        """
        self.steps += 1
        sibling = SIBLINGS.get(token.item)
        if sibling is None:
            return
        self._expect_rejected(
            token.worker, sibling, token.value, f"{token.describe()}, given for {sibling!r}"
        )

    @rule(token=released_tokens)
    def unlock_released_token(self, token: ModelToken):
        self.steps += 1
        self._expect_rejected(token.worker, token.item, token.value, f"released {token.describe()}")

    # --- fork, death, store, delete --------------------------------------------

    @precondition(lambda self: self.fork_checks and self.steps % self.death_spacing == 0)
    @rule(token=held_tokens)
    def fork_child_unlock(self, token: ModelToken):
        """Fork the token's worker, whose child must fail to unlock the token."""
        self.steps += 1
        self._touch(token.worker, [token.item])

        outcome = self._acting_worker(token.worker).run(
            unlock_in_forked_child, type(self).store_factory, self.root, token.item, token.value
        )
        if outcome != CHILD_REJECTED:
            fail(
                f"a child forked by worker {token.worker} called item_unlock with a token "
                f"of its parent ({token.describe()}): expected UnknownTokenError, but it "
                f"{outcome}"
            )

    @precondition(
        lambda self: self.worker_deaths
        and self.steps % self.death_spacing == 0
        and bool(self.model.tokens)
    )
    @rule(worker=worker_ids)
    def kill_worker(self, worker: int):
        """SIGKILL the worker and start a new one. The kernel drops its locks."""
        self.steps += 1
        self.touched_items.update(token.item for token in self.model.drop_worker(worker))
        self.baselines.pop(worker, None)
        self._restart_worker(worker)

    # A store matters here while tokens are held: it replaces a data file,
    # which must hold no lock, and it must leak no descriptor.
    @precondition(lambda self: bool(self.model.tokens))
    @rule(worker=worker_ids, item=st.sampled_from(DATA_ITEMS))
    def store(self, worker: int, item: Item):
        self.steps += 1
        self.touched_workers.add(worker)
        self.touched_items.add(item)
        self._acting_worker(worker).store(self.target, item, {"step": self.steps})

    @precondition(lambda self: self.deletes and len({t.worker for t in self.model.tokens}) == 1)
    @rule(worker=worker_ids)
    def delete(self, worker: int):
        """Delete the store, which must release the deleting worker's tokens."""
        self.steps += 1
        # Another worker's token would outlive its store (see the class docstring).
        if self.model.tokens[0].worker != worker:
            return
        self._touch(worker, Item)
        self._acting_worker(worker).delete(self.target)
        self.model.clear()
        self._open_next_generation()

    # --- the checks after each step --------------------------------------------

    @invariant()
    def locks_and_descriptors_match_model(self) -> None:
        items, self.touched_items = self.touched_items, set()
        workers, self.touched_workers = self.touched_workers, set()
        if self.pool is None:
            return

        if items:
            self._check_lock_states(items)
        for worker in sorted(workers):
            self._check_descriptors(worker)

    def _check_lock_states(self, items: Iterable[Item]) -> None:
        found = self._probe_states(items)
        wrong = []
        stricter = False
        for item, state in found.items():
            expected = self.model.expected_state(item)
            if state != expected:
                wrong.append(
                    f"{item!r} is {state}, expected {expected} ({self.model.holders_text(item)})"
                )
                stricter |= LOCK_STATES.index(state) > LOCK_STATES.index(expected)
        if not wrong:
            return

        message = "lock states found by the probe differ from the model: " + "; ".join(wrong)
        if stricter:
            # The probe locks and unlocks through the backend under test.
            message += (
                ". A lock held beyond the model may be one that item_unlock did "
                "not release, possibly one of the probe's own"
            )
        fail(message)

    def _check_descriptors(self, worker: int) -> None:
        baseline = self.baselines.get(worker)
        if baseline is None:
            return
        held = self.model.of_worker(worker)
        expected = baseline + len(held)
        found = count_descriptors(self.pool[worker].pid)
        if found != expected:
            fail(
                f"worker {worker} has {found} open file descriptors, expected {expected}: "
                f"{baseline} after it first opened the store, plus one for each of its "
                f"{len(held)} held tokens"
            )

    # --- helpers -----------------------------------------------------------------

    def _acting_worker(self, index: int) -> Worker:
        """Return worker *index*, with its descriptor baseline taken."""
        worker = self._worker(index)
        if index not in self.baselines and self._counts_descriptors():
            # An empty probe opens the store and does nothing else.
            worker.probe(self.target, ())
            self.baselines[index] = count_descriptors(worker.pid)
        return worker

    def _counts_descriptors(self) -> bool:
        return self.descriptor_checks and os.path.isdir("/proc/self/fd")

    def _touch(self, worker: int, items: Iterable[Item]) -> None:
        """Make the invariant check *worker*, *items* and every item *worker* holds."""
        self.touched_workers.add(worker)
        self.touched_items.update(items)
        self.touched_items.update(token.item for token in self.model.of_worker(worker))

    def _check_unique(self, token: ModelToken) -> None:
        key = token.value
        try:
            hash(key)
        except TypeError:
            key = ("unhashable", repr(key))
        first = self.issued.get(key)
        if first is not None:
            fail(
                f"worker {token.worker} got token {token.value!r} for {token.item!r}, "
                f"which item_lock returned before, to {first}"
            )
        self.issued[key] = f"worker {token.worker} for {token.item!r}"

    def _expect_rejected(self, worker: int, item: Item, value: Any, what: str) -> None:
        # A wrong unlock that releases something can only release one of the
        # worker's own tokens: the invariant probes their items.
        self._touch(worker, [item])
        worker_process = self._acting_worker(worker)
        try:
            worker_process.item_unlock(self.target, item, value)
            outcome = " without an error"
        except UnknownTokenError:
            return
        except WorkerError:
            raise
        except Exception as error:
            outcome = f", which raised {error!r}"
        fail(
            f"worker {worker} unlocked {item!r} with {what}{outcome}: "
            f"expected UnknownTokenError"
        )


def count_descriptors(pid: int) -> int:
    """Return how many file descriptors process *pid* has open (Linux only)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def unlock_in_forked_child(
    store_factory: Callable[[Any], Any], root: str, item: Item, token: Any
) -> str:
    """Fork, unlock *token* in the child, and return the child's outcome.

    Runs inside a worker that holds *token*. Returns `CHILD_REJECTED` when the
    child's ``item_unlock`` raised `UnknownTokenError`, else a description of
    what it did instead, such as "returned without an error".
    """
    store = store_factory(root)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        _report_child_unlock(store, item, token, read_end, write_end)

    os.close(write_end)
    try:
        report = _read_until_eof(read_end, FORK_CHILD_TIMEOUT)
    finally:
        os.close(read_end)
    if report is None:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if report is None:
        return f"did not finish within {FORK_CHILD_TIMEOUT:g} s"
    return report or "exited without a report"


def _report_child_unlock(store: Any, item: Item, token: Any, read_end: int, write_end: int) -> None:
    # The child never returns into the worker's code: os._exit skips the
    # parent's atexit handlers and finalisers, which are not the child's to run.
    try:
        os.close(read_end)
        try:
            store.item_unlock(item, token)
            report = "returned without an error"
        except UnknownTokenError:
            report = CHILD_REJECTED
        except BaseException as error:  # noqa: BLE001 - every outcome is reported
            report = f"raised {error!r}"
        os.write(write_end, report.encode("utf-8", "replace")[: select.PIPE_BUF])
    finally:
        os._exit(0)


def _read_until_eof(fd: int, timeout: float) -> str | None:
    """Read *fd* until end-of-file, or return None if that takes over *timeout* seconds."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks).decode("utf-8", "replace")
        chunks.append(chunk)
