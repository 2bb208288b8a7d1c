"""A hypothesis state machine that checks who may hold an item lock, and when.

Worker processes take and release item locks on one store with ``timeout=0``.
The model is the set of tokens each worker holds, and it predicts every
outcome exactly, because each token is its own open file description:

- an exclusive request fails while any token is held on the same lock file,
  the requesting worker's own tokens included;
- a shared request fails while an exclusive token is held on that file;
- DEVICES and DEVICE_IDS share one lock file, so they conflict with each other.

After every step an invariant probes every item's lock from a separate process
and compares "free", "shared" or "exclusive" with the model. Worker deaths
(SIGKILL) are mixed in: the kernel must drop a dead worker's locks.

A downstream project checks its own backend by subclassing::

    class TestMyLocks(LockExclusivityMachine):
        store_factory = my_backend.open_store   # takes a root directory

    TestMyLocks = TestMyLocks.TestCase
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import Bundle, consumes, invariant, multiple, precondition, rule

from vcstore import Item, LockTimeoutError

from ..probe import LOCK_STATES
from .base import StoreMachine

__all__ = ["HeldToken", "LockExclusivityMachine"]


@dataclass(frozen=True)
class HeldToken:
    """A token that worker *worker* holds, according to the model."""

    worker: int
    item: Item
    exclusive: bool
    # The token that the backend's item_lock returned.
    backend_token: Any

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return f"worker {self.worker} holds a {kind} token on {self.item!r}"


class LockExclusivityMachine(StoreMachine):
    """Check item-lock exclusion between worker processes against a model.

    The class attributes of `StoreMachine` (``store_factory``, ``workers``,
    ``start_method``, ``parent_directory``, ``worker_deaths``) apply; with
    ``worker_deaths`` the ``kill_worker`` rule runs.
    """

    # A class body cannot see its base's names; the bundle itself is shared.
    worker_ids = StoreMachine.worker_ids
    held_tokens = Bundle("token")

    def __init__(self) -> None:
        super().__init__()
        self.model: list[HeldToken] = []

    @rule(target=held_tokens, worker=worker_ids, item=st.sampled_from(Item), exclusive=st.booleans())
    def item_lock(self, worker: int, item: Item, exclusive: bool):
        self.steps += 1
        kind = "exclusive" if exclusive else "shared"
        conflicts = self._conflicts(item, exclusive)

        try:
            token = self._worker(worker).item_lock(self.root, item, exclusive, timeout=0)
        except LockTimeoutError:
            if not conflicts:
                raise AssertionError(
                    f"worker {worker} could not take a {kind} lock on {item!r} with "
                    f"timeout=0, but no token conflicts with it "
                    f"({self._holders_text(item)})"
                ) from None
            return multiple()

        # Two holders where one is exclusive: the bug this machine hunts.
        if conflicts:
            raise AssertionError(
                f"worker {worker} took a {kind} lock on {item!r} although "
                + "; ".join(conflict.describe() for conflict in conflicts)
                + " on the same lock file"
            )
        held_token = HeldToken(worker, item, exclusive, token)
        self.model.append(held_token)
        return held_token

    @rule(token=consumes(held_tokens))
    def item_unlock(self, token: HeldToken):
        self.steps += 1

        # The token died with its worker (kill_worker), so nothing is left to release.
        if token not in self.model:
            return

        self._worker(token.worker).item_unlock(self.root, token.item, token.backend_token)
        self.model.remove(token)

    @precondition(lambda self: self.worker_deaths and bool(self.model))
    @rule(worker=worker_ids)
    def kill_worker(self, worker: int):
        """SIGKILL the worker and start a new one; its tokens are gone."""
        self.steps += 1
        self._worker(worker).kill()
        self._worker(worker).restart()
        self.model = [token for token in self.model if token.worker != worker]

    @invariant()
    def lock_states_match_model(self) -> None:
        # No worker has started, so nothing of this test case can hold a lock.
        if self.prober is None:
            return
        found = self.prober.states(self.root, tuple(Item))
        wrong = []
        stricter = False
        for item in Item:
            expected = self._expected_state(item)
            if found[item] != expected:
                wrong.append(
                    f"{item!r} is {found[item]}, expected {expected} "
                    f"({self._holders_text(item)})"
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
        raise AssertionError(message)

    # --- the model -------------------------------------------------------------

    def _on_same_file(self, item: Item) -> list[HeldToken]:
        return [token for token in self.model if token.item.lock_name == item.lock_name]

    def _conflicts(self, item: Item, exclusive: bool) -> list[HeldToken]:
        """Return the held tokens that make a lock request on *item* fail."""
        return [
            token for token in self._on_same_file(item) if exclusive or token.exclusive
        ]

    def _expected_state(self, item: Item) -> str:
        holders = self._on_same_file(item)
        if any(token.exclusive for token in holders):
            return "exclusive"
        if holders:
            return "shared"
        return "free"

    def _holders_text(self, item: Item) -> str:
        holders = self._on_same_file(item)
        if not holders:
            return "the model holds no token on its lock file"
        return "; ".join(token.describe() for token in holders)
