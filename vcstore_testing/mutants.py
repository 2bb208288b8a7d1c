"""Deliberately broken store backends, one per known bug kind.

Each mutant is a ``store_factory``: a callable that takes a root directory (or
a ``file://`` URL) and returns an object with the store API. Like
`vcstore.open`, a factory returns the same object for the same directory
within a process, until that store is deleted. Each store class below is the
real `vcstore.filesystem.FilesystemStore` with one bug put back in. The
bugs are the ones the real backend guards against, most of them bugs of Kata's
original Go store. Point a machine, `vcstore verify --factory
vcstore_testing.mutants:NAME` or the stress mode at a mutant to see that the
check can fail::

    from vcstore_testing.mutants import MUTANTS

    class NoLockMachine(LockExclusivityMachine):
        store_factory = MUTANTS["no_lock"]

`MUTANTS` maps each stable name to its factory. A factory's docstring names
the bug and the check that should catch it.

NOTE: the store classes override private methods of `FilesystemStore`, so a
change of the real backend's internals can silently turn a mutant into the
real backend. tests/testing/test_mutants.py checks that every overridden
method still exists and that every mutant is still caught.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from vcstore import DeadlockError, Item
from vcstore.filesystem import FILE_MODE, FilesystemStore
from vcstore.tokens import TOKENS, HeldLock, TokenTable, current_thread_key
from vcstore.urls import FILE_SCHEME, split_target

__all__ = [
    "MUTANTS",
    "colliding_tokens",
    "data_file_lock",
    "fork_blind_tokens",
    "in_place_store",
    "kept_lock",
    "leaky_try_lock",
    "no_identity_recheck",
    "no_lock",
    "unguarded_tokens",
    "unlinked_lock_file",
]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_LOCK_FLAGS = os.O_RDONLY | _NOFOLLOW | os.O_CLOEXEC

# Bytes per write() of the in-place store. Small pieces keep the file partial
# for long enough that a concurrent load nearly always sees it, so a failure
# that hypothesis found fails again when it replays it.
_PIECE = 1024


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _stat_identity(io_seam: Any, path: str) -> tuple[int, int] | None:
    try:
        return _identity(io_seam.stat(path))
    except FileNotFoundError:
        return None


def _release(io_seam: Any, held: HeldLock) -> None:
    try:
        io_seam.flock(held.fd, fcntl.LOCK_UN)
    finally:
        io_seam.close(held.fd)


# ----------------------------------------------------------------------------
# Store classes, one bug each


class NoLockStore(FilesystemStore):
    """`item_lock` returns a token without calling flock, so it locks nothing."""

    def _flock(self, fd: int, exclusive: bool, deadline: float | None, lock_path: str) -> bool:
        return True


class KeptLockStore(FilesystemStore):
    """`item_unlock` drops the token but keeps its descriptor, and so its lock."""

    def _unlock(self, item: Item, token: str) -> None:
        TOKENS.pop(self, item, token, self._dir)


class InPlaceStore(FilesystemStore):
    """`store` truncates the item's file, then writes the value in pieces (Kata's store)."""

    def _write(self, item: Item, data: bytes) -> None:
        self._check_dir()
        path = f"{self._dir}/{item.file_name}"
        try:
            fd = self._io.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        except FileNotFoundError:
            self._check_dir()
            raise
        try:
            for start in range(0, len(data), _PIECE):
                piece = memoryview(data)[start : start + _PIECE]
                while piece:
                    piece = piece[self._io.write(fd, piece) :]
        finally:
            self._io.close(fd)


class DataFileLockStore(FilesystemStore):
    """`item_lock` locks the item's data file once it exists, as Kata did.

    `store` replaces the data file with a new inode, so a holder keeps its
    lock on the old inode while the next locker locks the new one. Before the
    first store, and for Item.LOCK, the dedicated lock file is locked.
    """

    def _open_lock_file(self, item: Item, lock_path: str) -> int:
        if item is not Item.LOCK:
            self._check_dir()
            try:
                return self._io.open(f"{self._dir}/{item.file_name}", _LOCK_FLAGS)
            except FileNotFoundError:
                pass
        return super()._open_lock_file(item, lock_path)

    def _is_lock_file(self, fd: int, item: Item, lock_path: str) -> bool:
        if item is Item.LOCK:
            return super()._is_lock_file(fd, item, lock_path)

        # The identity check stays, applied to whichever file was opened.
        held = _identity(self._io.fstat(fd))
        if held == _stat_identity(self._io, f"{self._dir}/{item.file_name}"):
            return True
        if held == _stat_identity(self._io, lock_path):
            return super()._is_lock_file(fd, item, lock_path)
        # The data file was replaced since it was opened, or the store was deleted.
        self._check_dir()
        return False


class UnlinkedLockFileStore(FilesystemStore):
    """`item_unlock` removes the lock file, then releases the lock.

    Another token on the old inode (a shared holder, or a waiter) then no
    longer excludes a locker that creates a new lock file at the path.
    """

    def _unlock(self, item: Item, token: str) -> None:
        held = TOKENS.pop(self, item, token, self._dir)
        try:
            self._io.unlink(held.lock_path)
        except FileNotFoundError:
            pass
        _release(self._io, held)


class NoIdentityRecheckStore(FilesystemStore):
    """`item_lock` skips the check that the file it locks is still the lock file at its path.

    The real backend checks before and after flock; this mutant checks
    neither time. A waiter that `delete` wakes up then holds a lock on the
    removed lock file, which excludes no process that opens the store again.
    """

    def _is_lock_file(self, fd: int, item: Item, lock_path: str) -> bool:
        return True


# Token numbers restart at 1 in every process, so processes hand out equal tokens.
_token_numbers = itertools.count(1)


class CollidingTokensStore(FilesystemStore):
    """Tokens are ``token-1``, ``token-2``...: unique in a process, equal across processes.

    A token that another process issued is then accepted by `item_unlock`
    and releases this process's lock of the same name.
    """

    def _lock(self, item: Item, exclusive: bool, timeout: float | None) -> str:
        unique = super()._lock(item, exclusive, timeout)
        held = TOKENS.pop(self, item, unique, self._dir)
        token = f"token-{next(_token_numbers)}"
        TOKENS.add(dataclasses.replace(held, token=token))
        return token


class LeakyTryLockStore(FilesystemStore):
    """A lock attempt that times out leaves one descriptor of the lock file open.

    Models an error path without ``close``: the real backend closes the
    descriptor, and this mutant keeps a duplicate of it for good.
    """

    def _flock(self, fd: int, exclusive: bool, deadline: float | None, lock_path: str) -> bool:
        acquired = super()._flock(fd, exclusive, deadline, lock_path)
        if not acquired:
            os.dup(fd)
        return acquired


class _OwnTokenTableStore(FilesystemStore):
    """The real backend, keeping its tokens in ``token_table`` instead of the shared table.

    Subclasses set ``token_table`` to a table with one defect. The shared
    table (`vcstore.tokens.TOKENS`) drops the parent's tokens in a forked
    child and takes a mutex around every access.
    """

    token_table: TokenTable

    def _lock(self, item: Item, exclusive: bool, timeout: float | None) -> str:
        lock_path = f"{self._dir}/{item.lock_name}"
        if timeout is None:
            blocker = self.token_table.blocks_own_thread(lock_path, exclusive)
            if blocker is not None:
                raise DeadlockError(
                    f"locking {item!r} of {self._dir} would wait forever: this thread holds "
                    f"token {blocker.token!r} for {blocker.item!r} on the same lock file; "
                    f"unlock it first, or pass a timeout"
                )
        token = super()._lock(item, exclusive, timeout)
        self.token_table.add(TOKENS.pop(self, item, token, self._dir))
        return token

    def _unlock(self, item: Item, token: str) -> None:
        _release(self._io, self.token_table.pop(self, item, token, self._dir))

    def _delete(self) -> None:
        self._remove_tree()
        for held in self.token_table.pop_owner(self):
            _release(self._io, held)

    @contextlib.contextmanager
    def locked(self, item: Item, exclusive: bool = True, timeout: float | None = None):
        token = self.item_lock(item, exclusive, timeout)
        try:
            yield token
        finally:
            if self.token_table.holds(self, token):
                self.item_unlock(item, token)


class ForkBlindTokensStore(_OwnTokenTableStore):
    """A forked child keeps its parent's tokens, and their descriptors.

    The child's `item_unlock` of a parent's token then runs LOCK_UN on the
    open file description it shares with the parent, which releases the
    parent's lock.
    """

    # A plain TokenTable: nothing registers it with os.register_at_fork.
    token_table = TokenTable()


class UnguardedTokenTable(TokenTable):
    """The real token table without its mutex.

    `time.sleep(0)` lets other threads run where the mutex would have kept
    them out: between the look-up and the removal of a token in `pop`, and
    between the entries of the loops over the table. Two threads that
    unlock one token at once then both pass the check, and a thread that
    adds a token while another loops over the table breaks that loop.
    """

    def __init__(self) -> None:
        super().__init__()
        self._mutex = contextlib.nullcontext()

    def pop(self, owner: object, item: Item, token: object, where: str) -> HeldLock:
        held = self._held.get(token) if isinstance(token, str) else None
        if held is not None and held.owner is owner and held.item is item:
            time.sleep(0)
            return self._held.pop(token)
        return super().pop(owner, item, token, where)

    def pop_owner(self, owner: object) -> list[HeldLock]:
        mine = []
        for held in self._held.values():
            time.sleep(0)
            if held.owner is owner:
                mine.append(held)
        for held in mine:
            del self._held[held.token]
        return mine

    def blocks_own_thread(self, lock_path: str, exclusive: bool) -> HeldLock | None:
        thread = current_thread_key()
        for held in self._held.values():
            time.sleep(0)
            if held.thread is thread and held.lock_path == lock_path:
                if exclusive or held.exclusive:
                    return held
        return None

    def forget_after_fork(self) -> None:
        for held in self._held.values():
            try:
                os.close(held.fd)
            except OSError:
                pass
        self._held.clear()


class UnguardedTokensStore(_OwnTokenTableStore):
    """Token bookkeeping without a mutex; only threads inside one process see it."""

    token_table = UnguardedTokenTable()


# Fork handling stays right, so that this mutant differs only in its mutex.
os.register_at_fork(after_in_child=UnguardedTokensStore.token_table.forget_after_fork)


# ----------------------------------------------------------------------------
# Factories


# One store object per (class, directory) in this process, as vcstore.open keeps.
_stores: dict[tuple[type, str], FilesystemStore] = {}
_stores_mutex = threading.Lock()


def _reset_mutex_after_fork() -> None:
    # A thread of the parent may have held the mutex at fork time; it never runs here.
    global _stores_mutex
    _stores_mutex = threading.Lock()


os.register_at_fork(after_in_child=_reset_mutex_after_fork)


def _open(cls: type, root: Any) -> FilesystemStore:
    _, path = split_target(root, {FILE_SCHEME})
    with _stores_mutex:
        store = _stores.get((cls, path))
        # A deleted store is replaced by a new one, as vcstore.open does.
        if store is None or not store._is_current():
            store = cls(path)
            _stores[(cls, path)] = store
        return store


def no_lock(root: Any) -> FilesystemStore:
    """Open a store whose lock locks nothing: `item_lock` never calls flock.

    Caught by `LockExclusivityMachine`: the probe finds a held item free, and
    a second exclusive lock succeeds. The stress mode finds overlapping
    exclusive windows and lost counter updates.
    """
    return _open(NoLockStore, root)


def kept_lock(root: Any) -> FilesystemStore:
    """Open a store whose unlock keeps the lock: `item_unlock` drops the token, not the descriptor.

    Caught by `LockExclusivityMachine`: after an unlock the probe finds the
    item still locked. `TokenBookkeepingMachine` finds the same, and more
    descriptors than tokens.
    """
    return _open(KeptLockStore, root)


def in_place_store(root: Any) -> FilesystemStore:
    """Open a store that rewrites the item's file in place: truncate, then write in pieces.

    Caught by `RoundTripMachine`: a load that runs while another worker
    stores a large value reads an empty or partial file.
    """
    return _open(InPlaceStore, root)


def data_file_lock(root: Any) -> FilesystemStore:
    """Open a store that locks the data file, which `store` replaces with a new inode.

    Caught by `TokenBookkeepingMachine`: after a store to a locked item, the
    probe finds the item free. The stress mode, which stores the counter in
    the item it locks, finds overlapping windows and lost updates.
    """
    return _open(DataFileLockStore, root)


def unlinked_lock_file(root: Any) -> FilesystemStore:
    """Open a store that unlinks the lock file on release.

    Caught by `LockExclusivityMachine`: with two shared holders, the first
    unlock removes the lock file, so the probe finds the item free while the
    second shared token is held. A waiter blocked on the removed file wakes
    up to `StoreDeletedError`.
    """
    return _open(UnlinkedLockFileStore, root)


def no_identity_recheck(root: Any) -> FilesystemStore:
    """Open a store that skips the identity re-check after flock.

    The bug shows only together with `delete`: a blocking exclusive lock
    that the deleting worker's release wakes up returns a token instead of
    raising `StoreDeletedError`, and holds a lock on a removed file that
    excludes no process that opens the store again. `LockExclusivityMachine`
    checks exactly that, when it deletes the store while a waiter is pending.
    """
    return _open(NoIdentityRecheckStore, root)


def colliding_tokens(root: Any) -> FilesystemStore:
    """Open a store whose tokens come from a per-process counter, so workers issue equal tokens.

    Caught by `TokenBookkeepingMachine`: tokens are not unique across
    workers, and a worker's unlock with another worker's token releases its
    own lock of the same name instead of raising `UnknownTokenError`.
    """
    return _open(CollidingTokensStore, root)


def leaky_try_lock(root: Any) -> FilesystemStore:
    """Open a store that leaks a descriptor at each failed lock attempt (``timeout=0`` on a busy lock).

    Caught by `TokenBookkeepingMachine`: a worker's open descriptors grow
    beyond the tokens it holds.
    """
    return _open(LeakyTryLockStore, root)


def fork_blind_tokens(root: Any) -> FilesystemStore:
    """Open a store without fork handling, so a forked child's unlock releases its parent's lock.

    The child's token table keeps the parent's tokens, and its unlock runs
    LOCK_UN on the open file description it shares with the parent. Caught
    by `TokenBookkeepingMachine`: the child's unlock of a parent's token
    succeeds instead of raising `UnknownTokenError`.
    """
    return _open(ForkBlindTokensStore, root)


def unguarded_tokens(root: Any) -> FilesystemStore:
    """Open a store whose token table has no mutex, a bug that only threads inside one process show.

    Caught by the stress mode, whose workers run several threads: a blocking
    lock that loops over the table while another thread adds a token fails
    with "dictionary changed size during iteration". Two threads that unlock
    one token at once would both pass the check, and the second would fail
    with `KeyError` instead of `UnknownTokenError`.
    """
    return _open(UnguardedTokensStore, root)


MUTANTS: dict[str, Callable[[Any], FilesystemStore]] = {
    factory.__name__: factory
    for factory in (
        no_lock,
        kept_lock,
        in_place_store,
        data_file_lock,
        unlinked_lock_file,
        no_identity_recheck,
        colliding_tokens,
        leaky_try_lock,
        fork_blind_tokens,
        unguarded_tokens,
    )
}
