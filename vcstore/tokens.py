"""The table of lock tokens this process holds, shared by every store.

Each token owns one open file description with a flock(2) lock on it. The
table is guarded by a mutex, and a forked child starts with an empty table.
"""

import dataclasses
import itertools
import os
import secrets
import threading

from .errors import UnknownTokenError
from .items import Item


@dataclasses.dataclass(slots=True)
class HeldLock:
    """One token: the descriptor behind it and who took it."""

    token: str
    owner: object
    item: Item
    lock_path: str
    fd: int
    exclusive: bool
    thread: object


# Tokens are "<process prefix>-<counter>": unique across processes by the random
# prefix (renewed in a forked child), and cheaper than a uuid4 per lock.
_prefix = secrets.token_hex(8)
_counter = itertools.count(1)


def new_token() -> str:
    """Return a token that no other lock of any process has."""
    # next() on itertools.count is atomic under the GIL, so threads never share a number.
    return f"{_prefix}-{next(_counter)}"


_thread_keys = threading.local()


def current_thread_key() -> object:
    """Return an object unique to the calling thread for as long as any token refers to it.

    Not `threading.get_ident()`: Python reuses an exited thread's ident, and a
    new thread must not get `DeadlockError` for a token that a dead thread took.
    """
    try:
        return _thread_keys.key
    except AttributeError:
        _thread_keys.key = key = object()
        return key


def _renew_prefix() -> None:
    global _prefix
    _prefix = secrets.token_hex(8)


class TokenTable:
    """Tokens held by this process, keyed by token."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: dict[str, HeldLock] = {}

    def add(self, held: HeldLock) -> None:
        with self._mutex:
            self._held[held.token] = held

    def holds(self, owner: object, token: object) -> bool:
        held = self._held.get(token) if isinstance(token, str) else None
        return held is not None and held.owner is owner

    def pop(self, owner: object, item: Item, token: object, where: str) -> HeldLock:
        """Remove and return *token* if *owner* took it for *item*.

        Raises `UnknownTokenError` and keeps the table as it was otherwise:
        a wrong unlock must not release somebody else's lock.
        """
        with self._mutex:
            held = self._held.get(token) if isinstance(token, str) else None
            if held is not None and held.owner is owner and held.item is item:
                return self._held.pop(token)

        if held is None:
            reason = (
                "it was never issued by this process, was already unlocked, "
                "was released by delete(), or belongs to the parent of this forked process"
            )
        elif held.owner is not owner:
            reason = f"it was taken on another store, {held.lock_path}"
        else:
            reason = f"it was taken for {held.item!r}; unlock it with that item"
        raise UnknownTokenError(f"cannot unlock {item!r} of {where} with token {token!r}: {reason}")

    def pop_owner(self, owner: object) -> list[HeldLock]:
        """Remove and return every token that *owner* holds."""
        with self._mutex:
            mine = [held for held in self._held.values() if held.owner is owner]
            for held in mine:
                del self._held[held.token]
        return mine

    def blocks_own_thread(self, lock_path: str, exclusive: bool) -> HeldLock | None:
        """Return a token of the calling thread that a blocking lock would wait on forever."""
        # Reading the dict's size needs no mutex; most processes hold no token here.
        if not self._held:
            return None
        thread = current_thread_key()
        with self._mutex:
            for held in self._held.values():
                if held.thread != thread or held.lock_path != lock_path:
                    continue
                if exclusive or held.exclusive:
                    return held
        return None

    def forget_after_fork(self) -> None:
        """Drop the parent's tokens in a forked child, leaving the parent's locks held.

        Closing the child's copy of a descriptor releases nothing, because the
        parent keeps its own copy of the open file description. An explicit
        LOCK_UN here would release the parent's lock.
        """
        # Another thread may have held the mutex at fork time; it never runs here.
        self._mutex = threading.Lock()
        for held in self._held.values():
            try:
                os.close(held.fd)
            except OSError:
                pass
        self._held.clear()


TOKENS = TokenTable()
os.register_at_fork(after_in_child=TOKENS.forget_after_fork)
os.register_at_fork(after_in_child=_renew_prefix)
