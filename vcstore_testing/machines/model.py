"""The model of held tokens that the machines share, and the lock states it implies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vcstore import Item, LockTimeoutError

from .base import fail

__all__ = ["LockModel", "ModelToken", "article"]


@dataclass(eq=False)
class ModelToken:
    """A token that ``item_lock`` returned to a worker."""

    worker: int
    item: Item
    exclusive: bool
    # The token object that the backend's item_lock returned.
    value: Any

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        return f"worker {self.worker}'s {kind} token {self.value!r} for {self.item!r}"

    def describe_holder(self) -> str:
        """Describe the token as a clause: ``worker 1 holds ...``."""
        kind = "exclusive" if self.exclusive else "shared"
        return f"worker {self.worker} holds {article(kind)} token {self.value!r} for {self.item!r}"


def article(kind: str) -> str:
    """Return "an exclusive" or "a shared"."""
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


class LockModel:
    """The tokens that the workers hold now, and the lock states they imply.

    Each token is its own open file description on the item's lock file, so an
    exclusive request conflicts with every token on that file (the requesting
    worker's own included), and a shared request with every exclusive one.
    """

    def __init__(self) -> None:
        self.tokens: list[ModelToken] = []

    def holds(self, token: ModelToken) -> bool:
        return token in self.tokens

    def add(self, token: ModelToken) -> None:
        self.tokens.append(token)

    def remove(self, token: ModelToken) -> None:
        self.tokens.remove(token)

    def of_worker(self, worker: int) -> list[ModelToken]:
        return [token for token in self.tokens if token.worker == worker]

    def drop_worker(self, worker: int) -> list[ModelToken]:
        """Forget and return *worker*'s tokens, which its death or restart released."""
        dropped = self.of_worker(worker)
        self.tokens = [token for token in self.tokens if token.worker != worker]
        return dropped

    def clear(self) -> list[ModelToken]:
        dropped, self.tokens = self.tokens, []
        return dropped

    def on_same_file(self, item: Item) -> list[ModelToken]:
        return [token for token in self.tokens if token.item.lock_name == item.lock_name]

    def conflicts(self, item: Item, exclusive: bool) -> list[ModelToken]:
        """Return the held tokens that make a lock request on *item* fail."""
        return [token for token in self.on_same_file(item) if exclusive or token.exclusive]

    def expected_state(self, item: Item) -> str:
        holders = self.on_same_file(item)
        if any(token.exclusive for token in holders):
            return "exclusive"
        if holders:
            return "shared"
        return "free"

    def holders_text(self, item: Item) -> str:
        holders = self.on_same_file(item)
        if not holders:
            return "the model holds no token on its lock file"
        return "; ".join(token.describe_holder() for token in holders)

    def try_lock(self, acting: Any, target: Any, worker: int, item: Item, exclusive: bool) -> ModelToken | None:
        """Try-lock *item* through worker process *acting* and check the outcome.

        The request (``timeout=0``) must fail exactly when a held token
        conflicts with it. Returns the new token, which the caller adds to
        the model, or None when the lock was held, as predicted.
        """
        kind = article("exclusive" if exclusive else "shared")
        conflicts = self.conflicts(item, exclusive)
        try:
            value = acting.item_lock(target, item, exclusive, timeout=0)
        except LockTimeoutError:
            value = LockTimeoutError

        if value is LockTimeoutError:
            if not conflicts:
                fail(
                    f"worker {worker} could not take {kind} lock on {item!r} with "
                    f"timeout=0, but no token conflicts with it ({self.holders_text(item)})"
                )
            return None

        # Two holders where one is exclusive: the bug that every lock check hunts.
        if conflicts:
            fail(
                f"worker {worker} took {kind} lock on {item!r} although "
                + "; ".join(conflict.describe_holder() for conflict in conflicts)
                + " on the same lock file"
            )
        return ModelToken(worker, item, exclusive, value)
