"""A hypothesis state machine that checks who may hold an item lock, and when.

Worker processes take and release item locks on one store with ``timeout=0``.
The model is the set of tokens each worker holds, and it predicts every
outcome exactly, because each token is its own open file description:

- an exclusive request fails while any token is held on the same lock file,
  the requesting worker's own tokens included;
- a shared request fails while an exclusive token is held on that file;
- DEVICES and DEVICE_IDS share one lock file, so they conflict with each other.

After every step an invariant probes, from a separate process, the lock of
each item that the step touched and compares "free", "shared" or "exclusive"
with the model. Mixed in with the try-locks:

- worker deaths (SIGKILL): the kernel must drop a dead worker's locks;
- pending blocking waiters: a blocking ``item_lock`` submitted to a worker
  (`Worker.submit`) that conflicts with a held token stays waiting across
  later steps, while other rules go on. As long as the model predicts that
  it must wait, it must not return. Once an unlock, a death or a delete releases
  every conflicting token, it must return a token (after an unlock or a
  death) or raise `vcstore.StoreDeletedError` (after a delete);
- stores and loads of the locked items: a store replaces the item's data
  file, which must not change who holds the item's lock;
- deletes: a worker deletes the store while others hold tokens and wait
  (one rule deletes only while a waiter waits, since that is where a
  missing check after flock shows). Every other worker then drops its stale
  store object (by deleting the store again, which releases the object's
  tokens and removes nothing), so its next command opens a new store, and
  every waiter must wake up to `vcstore.StoreDeletedError`.

On Linux a new waiter is left to block in the kernel (``/proc/locks`` lists
it) before the next step, so a delete never overtakes it on its way to flock.

A downstream project checks its own backend by subclassing::

    class TestMyLocks(LockExclusivityMachine):
        store_factory = my_backend.open_store   # takes a root directory
        deletes = False                         # if the backend cannot delete

    TestMyLocks = TestMyLocks.TestCase
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import Bundle, consumes, invariant, multiple, precondition, rule

from vcstore import Item, ItemNotFoundError, StoreDeletedError

from ..probe import LOCK_STATES, Prober, kernel_lists_waiters, wait_until_blocked
from ..workers import Pending, Worker, WorkerPool
from .base import StoreMachine, fail
from .model import LockModel, ModelToken

__all__ = [
    "ItemLockMachine",
    "LockExclusivityMachine",
    "Outcome",
    "ReopeningStore",
    "Waiter",
    "fail",
]

# Bound, in seconds, on the wait for a waiter that the model predicts must
# return now. Only a broken backend (or a stalled machine) reaches it.
WAKE_SECONDS = 5.0

# Seconds after which a waiter that must return gets a probe of its lock, so
# that a broken backend usually fails without the whole WAKE_SECONDS wait.
PROMPT_SECONDS = 0.5

# Bound, in seconds, on the wait for a new waiter to block in the kernel.
# Only a backend that waits by polling (then set kernel_waits to False) or a
# stalled machine reaches it.
BLOCK_SECONDS = 2.0

# Seconds that a new waiter gets to return early before the step ends, where
# the kernel does not list waiters. It is not a bound that a correct backend
# must meet: it only makes a broken one fail at the same step on most runs,
# which hypothesis needs to shrink it.
EARLY_REPLY_SECONDS = 0.01

# The items that can store data. Item.LOCK has none and is only locked.
DATA_ITEMS = tuple(item for item in Item if item is not Item.LOCK)


@dataclass(eq=False)
class Waiter:
    """A blocking lock request that worker *worker* submitted and that still waits."""

    worker: int
    item: Item
    exclusive: bool
    pending: Pending

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return f"worker {self.worker}'s blocking {kind} lock request on {self.item!r}"


@dataclass(frozen=True)
class Outcome:
    """The outcome of a submitted call after a bounded wait: blocked, a value or an error."""

    blocked: bool
    value: Any = None
    error: BaseException | None = None

    @classmethod
    def of(cls, pending: Pending, timeout: float) -> Outcome:
        """Wait at most *timeout* seconds for *pending* and return what it did."""
        if not pending.wait(timeout):
            return cls(blocked=True)
        try:
            return cls(blocked=False, value=pending.result(0))
        except Exception as error:
            return cls(blocked=False, error=error)

    def error_text(self) -> str:
        return f"{type(self.error).__name__} ({self.error})"


class ReopeningStore:
    """A store that the probe process opens again after the store was deleted.

    A probe runs after a delete too, when its cached store object is stale.
    Only lock calls are passed on, which is all that a probe makes.
    """

    def __init__(self, store_factory: Any, target: Any) -> None:
        self._store_factory = store_factory
        self._target = target
        self._store = store_factory(target)

    def item_lock(self, item: Item, exclusive: bool = True, timeout: float | None = None) -> Any:
        try:
            return self._store.item_lock(item, exclusive=exclusive, timeout=timeout)
        except StoreDeletedError:
            self._store = self._store_factory(self._target)
            return self._store.item_lock(item, exclusive=exclusive, timeout=timeout)

    def item_unlock(self, item: Item, token: Any) -> None:
        self._store.item_unlock(item, token)


class ItemLockMachine(StoreMachine):
    """Base of the machines that mix try-locks on every item into their rules.

    Its rules are ``item_lock`` (``timeout=0``, outcome predicted by the
    model) and ``item_unlock``, and an invariant probes the items whose lock
    a step touched. It keeps track of the workers that cache a store object
    of the current store (``opened``), so that after a delete each of them
    can drop it.
    """

    # A class body cannot see its base's names; the bundle itself is shared.
    worker_ids = StoreMachine.worker_ids
    held_tokens = Bundle("token")

    # Whether every lock and unlock gets a probe of its item. A machine that
    # checks something else saves those round trips: the outcomes of its
    # try-locks still check exclusion, and a death still gets a probe.
    probe_lock_steps: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.model = LockModel()
        # Workers whose cached store object is the current store's.
        self.opened: set[int] = set()
        # Items whose lock state may have changed since the last probe.
        self.touched: set[Item] = set()

    # Replaces StoreMachine._start_pool to give the probe process a ReopeningStore.
    def _start_pool(self) -> None:
        if self.pool is None:
            self.pool = WorkerPool(self.workers, self._factory(), self.start_method)
            self._start_prober()

    def _start_prober(self) -> None:
        # The probe outlives deletes, which leave its cached store object stale.
        self.prober = Prober(functools.partial(ReopeningStore, self._factory()), self.start_method)

    def _restart_prober(self) -> None:
        """Replace the probe process, which drops any lock that it failed to release."""
        self.prober.close()
        self._start_prober()

    @rule(
        target=held_tokens, worker=worker_ids, item=st.sampled_from(Item), exclusive=st.booleans()
    )
    def item_lock(self, worker: int, item: Item, exclusive: bool):
        self.steps += 1
        if self.probe_lock_steps:
            self.touched.add(item)

        held_token = self.model.try_lock(self._store_worker(worker), self.root, worker, item, exclusive)
        if held_token is None:
            return multiple()
        self.model.add(held_token)
        return held_token

    @rule(target=held_tokens, token=consumes(held_tokens))
    def item_unlock(self, token: ModelToken):
        """Release *token* and return the tokens that this release lets waiters take."""
        self.steps += 1

        # The token died with its worker or its store, so nothing is left to release.
        if not self.model.holds(token):
            return multiple()

        self._store_worker(token.worker).item_unlock(self.root, token.item, token.value)
        self.model.remove(token)
        if self.probe_lock_steps:
            self.touched.add(token.item)
        kind = "exclusive" if token.exclusive else "shared"
        reason = f"worker {token.worker} released its {kind} token on {token.item!r}"
        return multiple(*self._after_release(reason))

    def _after_release(self, reason: str) -> list[ModelToken]:
        """Return the tokens that a release lets blocked requests take.

        This base class submits no blocking request, so it returns none.
        """
        return []

    @invariant()
    def lock_states_match_model(self) -> None:
        # Only a step's own items can change state, so only those are probed.
        if not self.touched or self.prober is None:
            return
        items = tuple(sorted(self.touched, key=list(Item).index))
        self.touched = set()
        found = self.prober.states(self.root, items)
        wrong = []
        stricter = False
        for item in items:
            expected = self.model.expected_state(item)
            if found[item] != expected:
                wrong.append(
                    f"{item!r} is {found[item]}, expected {expected} "
                    f"({self.model.holders_text(item)})"
                )
                stricter |= LOCK_STATES.index(found[item]) > LOCK_STATES.index(expected)
        if not wrong:
            return

        message = "lock states found by the probe differ from the model: " + "; ".join(wrong)
        if stricter:
            # The probe locks and unlocks through the backend under test, so
            # a lock that item_unlock failed to release may be the probe's own.
            message += (
                ". A lock held beyond the model may be one that item_unlock did "
                "not release, possibly one of the probe's own"
            )
        fail(message)

    def _store_worker(self, index: int) -> Worker:
        """Return worker *index* for a store command, which opens the store."""
        self.opened.add(index)
        return self._worker(index)

    def _restart_worker(self, index: int) -> None:
        """Start a new process for worker *index* and drop its tokens from the model."""
        self._worker(index).restart()
        self.opened.discard(index)
        self.touched.update(token.item for token in self.model.drop_worker(index))

    def _drop_stale_stores(self) -> None:
        """Make every worker drop its store object after the store was deleted.

        Deleting a store that is already gone removes nothing and releases
        the tokens that the object holds: the worker drops its cached object
        and opens the store again at its next command.
        """
        for index in sorted(self.opened):
            self._worker(index).delete(self.root)
        self.opened = set()
        self.model.clear()
        # No token is held now, so no lock state is worth a probe.
        self.touched = set()


class LockExclusivityMachine(ItemLockMachine):
    """Check item-lock exclusion between worker processes against a model.

    The class attributes of `StoreMachine` (``store_factory``, ``workers``,
    ``start_method``, ``parent_directory``, ``worker_deaths``) apply; with
    ``worker_deaths`` the ``kill_worker`` rule runs. More class attributes:

    - ``pending_waiters`` (default True): the ``wait_for_lock`` rule, which
      submits blocking lock requests. Set it to False for a backend without
      blocking locks.
    - ``waiter_timeout`` (default None): the timeout that ``wait_for_lock``
      passes to ``item_lock``; None blocks without a bound. A number must be
      far longer than a test case (say 30.0), because a waiter that times out
      is reported as a failure.
    - ``kernel_waits`` (default True where ``/proc/locks`` exists): the
      backend's requests without a timeout wait in flock(2) or fcntl(2), so
      the kernel lists them. Each new waiter then gets to block there before
      the next step, and a delete always finds it waiting. Set it to False
      for a backend that waits by polling. With a ``waiter_timeout`` it does
      not apply, since a wait with a timeout may poll.
    - ``deletes`` (default True): the ``delete`` rule. Set it to False for a
      backend that cannot delete a store.
    - ``death_spacing`` (default 3): ``kill_worker`` runs only on steps whose
      number is a multiple of this, because each death starts a new worker
      process, which costs several times as much as another step. 1 allows a
      death at any step.
    """

    worker_ids = ItemLockMachine.worker_ids
    held_tokens = ItemLockMachine.held_tokens

    pending_waiters: bool = True
    waiter_timeout: float | None = None
    kernel_waits: bool = kernel_lists_waiters()
    deletes: bool = True
    death_spacing: int = 3

    def __init__(self) -> None:
        super().__init__()
        self.waiters: list[Waiter] = []
        # The value of each data file, by file name. A missing name was never stored.
        self.values: dict[str, Any] = {}

    # --- blocking requests left waiting ------------------------------------------

    @precondition(lambda self: self.pending_waiters and bool(self.model.tokens))
    @rule(target=held_tokens, worker=worker_ids, holder=held_tokens, exclusive=st.booleans())
    def wait_for_lock(self, worker: int, holder: ModelToken, exclusive: bool):
        """Submit a blocking lock request on *holder*'s item, left waiting while it conflicts.

        *holder* only picks the item, so that requests often conflict. It may
        be released already. A request that conflicts with no token, such as
        a shared request behind a shared token, must return at once.
        """
        self.steps += 1
        item = holder.item
        conflicts = self.model.conflicts(item, exclusive)

        # With two waiters on one lock file, which one a release lets in
        # depends on timing, so the model allows one.
        if conflicts and any(w.item.lock_name == item.lock_name for w in self.waiters):
            return multiple()

        # The submitted call runs on a new thread of the worker, which takes
        # the worker's cached store object before the worker serves its next
        # command. An empty probe opens that object first: otherwise the
        # thread would open the store itself, and a delete in a later step
        # could come first and let the thread create a new store.
        # NOTE: "before the next command" relies on CPython, which hands the
        # GIL back to the worker's main thread only once the new thread blocks
        # or has run for its 5 ms switch interval. The worker protocol has no
        # handshake that would guarantee it.
        if worker not in self.opened:
            self._store_worker(worker).probe(self.root, ())
        pending = self._worker(worker).submit(
            "item_lock", self.root, item, exclusive, timeout=self.waiter_timeout
        )
        waiter = Waiter(worker, item, exclusive, pending)
        self.touched.add(item)

        if conflicts:
            self._settle(waiter)
            self.waiters.append(waiter)
            return multiple()
        return self._collect_grant(waiter, "it was submitted while no token conflicts with it")

    def _settle(self, waiter: Waiter) -> None:
        """Wait until the new *waiter* has returned or sits blocked in the kernel.

        A delete that comes while a waiter is still on its way to flock
        finds no waiter to wake, so the check would depend on timing.
        """
        # A request that returns without waiting replies within a few
        # milliseconds, so the invariant finds it in this step.
        if not self.kernel_waits or self.waiter_timeout is not None:
            waiter.pending.wait(EARLY_REPLY_SECONDS)
            return

        pid = self._worker(waiter.worker).pid
        count = 1 + sum(1 for other in self.waiters if other.worker == waiter.worker)
        if wait_until_blocked(pid, count, BLOCK_SECONDS, until=waiter.pending.done):
            return
        if not waiter.pending.done():
            fail(
                f"{waiter.describe()} neither returned nor blocked in the kernel "
                f"within {BLOCK_SECONDS:g} s. If the backend waits by polling, set "
                f"kernel_waits = False on the machine"
            )

    @invariant()
    def waiters_still_blocked(self) -> None:
        for waiter in self.waiters:
            if not waiter.pending.done():
                continue
            conflicts = self.model.conflicts(waiter.item, waiter.exclusive)
            holders = "; ".join(token.describe_holder() for token in conflicts)
            outcome = Outcome.of(waiter.pending, 0)
            if outcome.error is not None:
                fail(
                    f"{waiter.describe()} raised {outcome.error_text()} while it must wait, "
                    f"because {holders}"
                )
            # Two holders where one is exclusive, through a blocking request.
            kind = "an exclusive" if waiter.exclusive else "a shared"
            fail(
                f"worker {waiter.worker} took {kind} lock on {waiter.item!r} with a "
                f"blocking request although {holders} on the same lock file"
            )

    def _after_release(self, reason: str) -> list[ModelToken]:
        """Collect the token of every waiter that no held token blocks any more."""
        granted = []
        for waiter in list(self.waiters):
            if self.model.conflicts(waiter.item, waiter.exclusive):
                continue
            self.waiters.remove(waiter)
            granted.append(self._collect_grant(waiter, reason))
        return granted

    def _collect_grant(self, waiter: Waiter, reason: str) -> ModelToken:
        """Wait for the token that *waiter* must return now, and add it to the model."""
        outcome = self._wait_for_waiter(waiter, lambda: self._check_stuck_waiter(waiter, reason))
        if outcome.blocked:
            fail(
                f"{waiter.describe()} is still blocked {PROMPT_SECONDS + WAKE_SECONDS:g} s after "
                f"{reason}, although no token conflicts with it "
                f"({self.model.holders_text(waiter.item)})"
            )
        if outcome.error is not None:
            fail(
                f"{waiter.describe()} raised {outcome.error_text()} after {reason}, "
                f"instead of returning a token"
            )
        held_token = ModelToken(waiter.worker, waiter.item, waiter.exclusive, outcome.value)
        self.model.add(held_token)
        self.touched.add(waiter.item)
        return held_token

    def _wait_for_waiter(
        self, waiter: Waiter, check_stuck: Callable[[], None] | None = None
    ) -> Outcome:
        """Wait for a waiter that the model predicts must return now, and return what it did.

        A waiter still blocked after PROMPT_SECONDS gets *check_stuck*, which
        may fail at once. Then the probe process is replaced before the rest
        of the wait: with a broken item_unlock it may keep a lock that blocks
        the waiter until it ends. Without this, a long wait would be the
        only result, and shrinking a failure would repeat it many times.
        """
        outcome = Outcome.of(waiter.pending, PROMPT_SECONDS)
        if not outcome.blocked:
            return outcome
        if check_stuck is not None:
            check_stuck()
        self._restart_prober()
        return Outcome.of(waiter.pending, WAKE_SECONDS)

    def _check_stuck_waiter(self, waiter: Waiter, reason: str) -> None:
        """Fail at once if a probe proves that *waiter* cannot get its lock now.

        The probe may find the lock free (the waiter has not taken it yet) or
        held in the waiter's kind (it has). Any other state means that a
        token outside the model holds the lock, so waiting longer is futile.
        """
        found = self.prober.states(self.root, (waiter.item,))[waiter.item]
        if found in ("free", "exclusive" if waiter.exclusive else "shared"):
            return
        fail(
            f"{waiter.describe()} is still blocked after {reason}, and the probe finds "
            f"its lock {found}, although no token conflicts with it "
            f"({self.model.holders_text(waiter.item)}). The lock may be one that "
            f"item_unlock did not release, possibly one of the probe's own"
        )

    # --- deaths -----------------------------------------------------------------

    @precondition(
        lambda self: self.worker_deaths
        and self.steps % self.death_spacing == 0
        and bool(self.model.tokens or self.waiters)
    )
    @rule(target=held_tokens, worker=worker_ids)
    def kill_worker(self, worker: int):
        """SIGKILL the worker and start a new one; its tokens and waiters are gone."""
        self.steps += 1
        self._worker(worker).kill()
        self._restart_worker(worker)
        self.waiters = [waiter for waiter in self.waiters if waiter.worker != worker]
        return multiple(*self._after_release(f"worker {worker} was killed"))

    # --- data on the locked items ------------------------------------------------

    @rule(worker=worker_ids, item=st.sampled_from(DATA_ITEMS), value=st.integers(0, 9))
    def store(self, worker: int, item: Item, value: int):
        """Store a value; a later lock request must still see the item's holders."""
        self.steps += 1
        self._store_worker(worker).store(self.root, item, value)
        self.values[item.file_name] = value

    @rule(worker=worker_ids, item=st.sampled_from(DATA_ITEMS))
    def load(self, worker: int, item: Item):
        self.steps += 1
        expected = self.values.get(item.file_name, ItemNotFoundError)
        try:
            found = self._store_worker(worker).load(self.root, item)
        except ItemNotFoundError:
            found = ItemNotFoundError
        if found != expected:
            fail(
                f"worker {worker} loaded {describe_value(found)} from {item!r}, "
                f"expected {describe_value(expected)}"
            )

    # --- deletes ----------------------------------------------------------------

    # Deleting a store that holds no value and no lock adds little, and costs
    # a round trip to every worker.
    @precondition(lambda self: self.deletes and bool(self.model.tokens or self.values))
    @rule(worker=worker_ids)
    def delete(self, worker: int):
        """Delete the store; waiters must wake up to StoreDeletedError."""
        self.steps += 1
        self._worker(worker).delete(self.root)
        self.opened.discard(worker)

        # The deleting worker's tokens were released by the delete. The other
        # holders' tokens lock files of the deleted store: each drops its
        # stale store object, which releases them and wakes every waiter.
        # Each waiter's thread took its store object when it started.
        self._drop_stale_stores()
        for waiter in self.waiters:
            self._expect_store_deleted(waiter)
        self.waiters = []
        self.values = {}

    # The bug it hunts: a waiter that the delete wakes up takes the lock of
    # the removed file. A plain delete seldom comes while a waiter waits.
    @precondition(lambda self: self.deletes and bool(self.waiters))
    @rule(worker=worker_ids)
    def delete_while_waiting(self, worker: int):
        """Delete the store while a blocking request waits in the kernel."""
        self.delete(worker)

    def _expect_store_deleted(self, waiter: Waiter) -> None:
        outcome = self._wait_for_waiter(waiter)
        if isinstance(outcome.error, StoreDeletedError):
            return
        if outcome.blocked:
            fail(
                f"{waiter.describe()} is still blocked {PROMPT_SECONDS + WAKE_SECONDS:g} s "
                f"after the store was deleted and every token was released"
            )
        if outcome.error is not None:
            fail(
                f"{waiter.describe()} raised {outcome.error_text()} after the store was "
                f"deleted, instead of StoreDeletedError"
            )
        # The waiter locked a lock file of the deleted store: its holder
        # shares nothing with the holders of the store created next.
        fail(
            f"{waiter.describe()} returned token {outcome.value!r} after the store was "
            f"deleted, instead of raising StoreDeletedError: the lock it holds is on a "
            f"deleted lock file, so it excludes nobody"
        )


def describe_value(value: Any) -> str:
    """Describe a loaded or expected value for messages; ItemNotFoundError means none."""
    if value is ItemNotFoundError:
        return "nothing (ItemNotFoundError)"
    return repr(value)
