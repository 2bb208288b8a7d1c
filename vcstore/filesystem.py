"""The filesystem backend: a store is a directory, items are JSON files in it.

Every file-system call goes through the I/O seam (`vcstore.fsio`). Directory
layout::

    <store>/               0750
    <store>/lock           0640, locked for Item.LOCK, created with the store
    <store>/<item file>    one JSON file per stored item
    <store>/<item file>.lock   locked for the other items, created on first lock
    <store>/raw/           0750, raw files
"""

import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
import time
from pathlib import Path

from .errors import (
    DeadlockError,
    InvalidUrlError,
    ItemNotFoundError,
    LockTimeoutError,
    LockUnsupportedError,
    StoreDeletedError,
    StoreError,
    StoreNotFoundError,
    UnsafePathError,
)
from .fsio import DEFAULT_IO
from .items import Item
from .store import Store, _named
from .tokens import TOKENS, HeldLock, current_thread_key, new_token
from .urls import FILE_SCHEME, path_to_url, split_target

DIR_MODE = 0o750
FILE_MODE = 0o640
RAW_DIR = "raw"

# O_NOFOLLOW: a symbolic link planted inside a store is refused, never followed.
# O_NONBLOCK: opening a planted FIFO returns at once instead of waiting for a writer.
_NOFOLLOW = os.O_NOFOLLOW
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_LOCK_FLAGS = _READ_FLAGS

# flock errors that mean the file system cannot lock at all, not that it is busy.
_UNSUPPORTED_ERRNOS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}

# Polling interval bounds for a lock with a timeout (blocking locks sleep in flock).
_MIN_POLL = 0.0005
_MAX_POLL = 0.02

_log = logging.getLogger("vcstore.filesystem")


class FilesystemStore(Store):
    """A store in a local directory. Use `vcstore.open` to get one.

    Constructing one directly (``FilesystemStore(path, io=...)``) makes a
    store outside `vcstore.open`'s registry, for tests that inject faults
    through the I/O seam.
    """

    scheme = FILE_SCHEME

    def __init__(self, target, *, create: bool = True, io=None) -> None:
        _, path = split_target(target, {FILE_SCHEME})
        super().__init__(path_to_url(path), Path(path))
        self._dir = path
        self._io = io if io is not None else DEFAULT_IO
        self._log_fields = {"subsystem": "store", "backend": "filesystem", "path": path}
        self._dir_slash = path + "/"
        # Identity of each lock file this object has verified at its path. Lock
        # files are never replaced while the store exists, so a later lock whose
        # descriptor shows the same, still linked file needs no path lookup.
        self._lock_files: dict[str, tuple[int, int]] = {}
        try:
            self._identity = self._initialize(create)
        except StoreError:
            raise
        except OSError as error:
            raise _named(error, f"cannot open store {path}") from error
        _log.debug("opened store %s", path, extra=self._log_fields)

    # -- creation and identity ------------------------------------------------

    def _initialize(self, create: bool) -> tuple[int, int]:
        """Create whatever of the layout is missing; return the directory's identity."""
        for _ in range(10):
            try:
                dir_fd = self._io.open(self._dir, _DIR_FLAGS)
            except FileNotFoundError:
                if not create:
                    raise StoreNotFoundError(
                        f"store {self._dir} does not exist: open it with create=True to create it"
                    ) from None
                self._make_dirs(self._dir)
                continue
            except NotADirectoryError:
                raise InvalidUrlError(
                    f"cannot open store {self._dir}: it, or one of its parents, is not a "
                    f"directory; a store's own directory must not be a symbolic link"
                ) from None
            except OSError as error:
                raise _unsafe_or(error, self._dir, "the store directory") from None

            try:
                identity = _identity(self._io.fstat(dir_fd))
                self._complete_layout(dir_fd)
                return identity
            except FileNotFoundError:
                # Another process deleted the directory while we completed it: start again.
                continue
            finally:
                self._io.close(dir_fd)
        raise StoreDeletedError(
            f"cannot create store {self._dir}: another process deletes it each time; "
            f"stop the competing delete and retry"
        )

    def _make_dirs(self, path: str) -> None:
        # os.makedirs gives the parents the default mode; every level here gets 0750.
        missing = []
        while True:
            try:
                self._io.mkdir(path, DIR_MODE)
                break
            except FileExistsError:
                break
            except FileNotFoundError:
                missing.append(path)
                path = os.path.dirname(path)
        for path in reversed(missing):
            try:
                self._io.mkdir(path, DIR_MODE)
            except FileExistsError:
                pass

    def _complete_layout(self, dir_fd: int) -> None:
        # Two processes creating one store at once: EEXIST means the other won.
        try:
            self._io.mkdir(RAW_DIR, DIR_MODE, dir_fd=dir_fd)
        except FileExistsError:
            pass
        try:
            fd = self._io.open(Item.LOCK.lock_name, _LOCK_FLAGS | os.O_CREAT, FILE_MODE, dir_fd=dir_fd)
        except FileNotFoundError:
            raise
        except OSError as error:
            raise _unsafe_or(error, f"{self._dir}/{Item.LOCK.lock_name}", "the lock file") from None
        try:
            _require_regular(self._io.fstat(fd), f"{self._dir}/{Item.LOCK.lock_name}", "the lock file")
        except BaseException:
            _close_quietly(self._io, fd)
            raise
        self._io.close(fd)

    def _open_dir(self) -> int:
        """Open the store's directory, raising `StoreDeletedError` unless it is ours."""
        try:
            dir_fd = self._io.open(self._dir, _DIR_FLAGS)
        except (FileNotFoundError, NotADirectoryError):
            raise self._deleted() from None
        except OSError as error:
            # A symbolic link has replaced the directory, so this is not our store.
            if error.errno == errno.ELOOP:
                raise self._deleted() from None
            raise
        try:
            if _identity(self._io.fstat(dir_fd)) != self._identity:
                raise self._deleted()
        except BaseException:
            self._io.close(dir_fd)
            raise
        return dir_fd

    def _check_dir(self) -> None:
        try:
            # Not following links: a link planted in place of the directory has another identity.
            st = self._io.stat(self._dir, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            raise self._deleted() from None
        # A directory with another identity is a new store at the same path.
        if _identity(st) != self._identity:
            raise self._deleted()

    def _deleted(self) -> StoreDeletedError:
        return StoreDeletedError(
            f"store {self._dir} was deleted: open it again with vcstore.open({self.url!r}) "
            f"to create a new one"
        )

    def _is_current(self) -> bool:
        try:
            self._check_dir()
        except StoreDeletedError:
            return False
        return True

    # -- load and store -------------------------------------------------------

    def _read(self, item: Item) -> bytes:
        self._check_dir()
        path = self._dir_slash + item.file_name
        try:
            fd = self._io.open(path, _READ_FLAGS)
        except FileNotFoundError:
            self._check_dir()
            raise ItemNotFoundError(
                f"item {item!r} was never stored in {self._dir}: store it first"
            ) from None
        except OSError as error:
            raise _unsafe_or(error, path, f"the file of {item!r}") from None
        try:
            st = self._io.fstat(fd)
            _require_regular(st, path, f"the file of {item!r}")

            # Item files are replaced, never rewritten in place, so one read of the
            # size plus one byte returns the whole file. The loop covers a file
            # that another program grew meanwhile.
            chunks = []
            want = st.st_size + 1
            while True:
                chunk = self._io.read(fd, want)
                chunks.append(chunk)
                if len(chunk) < want:
                    break
                want = 1 << 20
        finally:
            self._io.close(fd)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _write(self, item: Item, data: bytes) -> None:
        dir_fd = self._open_dir()
        try:
            self._remove_stale_temps(dir_fd, item)
            temp_name, fd = self._create_temp(dir_fd, item)
            try:
                _write_all(self._io, fd, data)
                self._io.fsync(fd)
                self._replace(temp_name, item, dir_fd)
            except BaseException:
                # A failed store leaves the previous value and no temporary file.
                _unlink_quietly(self._io, temp_name, dir_fd)
                raise
            finally:
                self._io.close(fd)
            # The rename is durable only once the directory entry is on disk.
            self._io.fsync(dir_fd)
        finally:
            self._io.close(dir_fd)

    def _replace(self, temp_name: str, item: Item, dir_fd: int) -> None:
        try:
            self._io.replace(temp_name, item.file_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except (IsADirectoryError, NotADirectoryError) as error:
            path = f"{self._dir}/{item.file_name}"
            raise UnsafePathError(
                error.errno,
                f"cannot store {item!r}: {path} is a directory, not an item file; "
                f"remove it by hand if it does not belong there",
                path,
            ) from None

    def _create_temp(self, dir_fd: int, item: Item) -> tuple[str, int]:
        """Create and lock a new temporary file for *item*; return its name and descriptor."""
        while True:
            name = f".{item.file_name}.{secrets.token_hex(8)}.tmp"
            try:
                fd = self._io.open(name, _TEMP_FLAGS, FILE_MODE, dir_fd=dir_fd)
            except FileExistsError:
                continue
            try:
                self._io.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A cleaner locked the new file before we did and unlinks it: use another name.
                linked = self._io.fstat(fd).st_nlink > 0
            except BlockingIOError:
                linked = False
            except BaseException as error:
                # Interrupted or failed between open and lock: leave no file and no descriptor.
                _close_quietly(self._io, fd)
                _unlink_quietly(self._io, name, dir_fd)
                if isinstance(error, OSError):
                    raise self._lock_error(error, f"{self._dir}/{name}") from error
                raise
            if linked:
                return name, fd
            self._io.close(fd)

    def _remove_stale_temps(self, dir_fd: int, item: Item) -> None:
        prefix = f".{item.file_name}."
        stale = []
        for name in self._io.listdir(dir_fd):
            if not (name.startswith(prefix) and name.endswith(".tmp")):
                continue
            try:
                fd = self._io.open(name, _LOCK_FLAGS, dir_fd=dir_fd)
            except OSError:
                # Gone already, or a planted link or special file that is not ours to remove.
                continue
            try:
                # A directory or special file with a temporary file's name is not ours to remove.
                if not stat.S_ISREG(self._io.fstat(fd).st_mode):
                    raise IsADirectoryError(errno.EISDIR, "not a regular file", name)
                # A live writer holds its temporary file locked; only a dead one's is free.
                self._io.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._io.close(fd)
                continue
            try:
                self._io.unlink(name, dir_fd=dir_fd)
                stale.append(name)
            except FileNotFoundError:
                pass
            finally:
                self._io.close(fd)
        if stale:
            _log.warning(
                "removed stale temporary files of %r left by dead writers: %s",
                item,
                ", ".join(stale),
                extra=self._log_fields,
            )

    # -- raw files ------------------------------------------------------------

    def _raw(self, id: str | None) -> str:
        dir_fd = self._open_dir()
        try:
            raw_fd = self._open_raw_dir(dir_fd)
        except BaseException:
            _close_quietly(self._io, dir_fd)
            raise
        _close_keeping(self._io, dir_fd, raw_fd)

        try:
            while True:
                name = id if id is not None else f"raw-{secrets.token_hex(8)}"
                path = f"{self._dir}/{RAW_DIR}/{name}"
                flags = _READ_FLAGS | os.O_CREAT
                if id is None:
                    flags |= os.O_EXCL
                try:
                    fd = self._io.open(name, flags, FILE_MODE, dir_fd=raw_fd)
                except FileExistsError:
                    continue
                except OSError as error:
                    raise _unsafe_or(error, path, "the raw file") from None
                try:
                    _require_regular(self._io.fstat(fd), path, "the raw file")
                finally:
                    self._io.close(fd)
                return path_to_url(path)
        finally:
            self._io.close(raw_fd)

    def _open_raw_dir(self, dir_fd: int) -> int:
        path = f"{self._dir}/{RAW_DIR}"
        for _ in range(2):
            try:
                return self._io.open(RAW_DIR, _DIR_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                # raw/ was removed by hand: complete the layout, as opening does.
                self._complete_layout(dir_fd)
            except OSError as error:
                raise _unsafe_or(error, path, "the raw directory") from None
        raise StoreDeletedError(f"cannot create {path}: it disappears as soon as it is made")

    # -- locks ----------------------------------------------------------------

    def _lock(self, item: Item, exclusive: bool, timeout: float | None) -> str:
        lock_path = self._dir_slash + item.lock_name
        if timeout is None:
            blocker = TOKENS.blocks_own_thread(lock_path, exclusive)
            if blocker is not None:
                kind = "exclusive" if blocker.exclusive else "shared"
                raise DeadlockError(
                    f"locking {item!r} of {self._dir} would wait forever: this thread holds "
                    f"{kind} token {blocker.token!r} for {blocker.item!r} on the same lock file; "
                    f"unlock it first, or pass a timeout"
                )

        debug = _log.isEnabledFor(logging.DEBUG)
        started = time.monotonic() if debug or timeout is not None else 0.0
        deadline = None if timeout is None else started + timeout
        while True:
            fd = self._open_lock_file(item, lock_path)
            try:
                # Checked before flock too, so that a link planted in place of the
                # store directory never makes us lock, or wait on, a file outside it.
                if self._is_lock_file(fd, item, lock_path):
                    if not self._flock(fd, exclusive, deadline, lock_path):
                        raise self._timeout_error(item, exclusive, timeout, lock_path)
                    if self._is_lock_file(fd, item, lock_path):
                        break
            except BaseException:
                _close_quietly(self._io, fd)
                raise
            # The lock file was replaced while we waited: lock the file that is there now.
            self._io.close(fd)
            _log.warning("lock file %s changed while waiting; retrying", lock_path, extra=self._log_fields)

        token = new_token()
        TOKENS.add(HeldLock(token, self, item, lock_path, fd, exclusive, current_thread_key()))
        if debug:
            _log.debug(
                "locked %r %s after %.6f s",
                item,
                "exclusive" if exclusive else "shared",
                time.monotonic() - started,
                extra=self._log_fields,
            )
        return token

    def _timeout_error(self, item: Item, exclusive: bool, timeout: float, lock_path: str) -> LockTimeoutError:
        kind = "exclusive" if exclusive else "shared"
        message = f"timed out after {timeout} s waiting for the {kind} lock on {item!r} of {self._dir}"
        own = TOKENS.blocks_own_thread(lock_path, exclusive)
        if own is not None:
            # Waiting longer cannot help when the caller itself holds the conflicting token.
            return LockTimeoutError(
                f"{message}: this thread holds token {own.token!r} for {own.item!r} on the "
                f"same lock file; unlock it first"
            )
        return LockTimeoutError(f"{message}: another token holds it; retry later or raise the timeout")

    def _open_lock_file(self, item: Item, lock_path: str) -> int:
        # The directory check keeps a link planted in place of the store directory
        # from making us open anything outside it.
        # NOTE: a link swapped in between this check and the open below can still
        # make the open reach outside. The flock cannot, because _lock checks the
        # file before flock. Opening through a directory descriptor would close
        # that window at two more system calls per lock.
        self._check_dir()
        try:
            return self._io.open(lock_path, _LOCK_FLAGS)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise _unsafe_or(error, lock_path, "the lock file") from None

        # Item lock files are made on first use. Creating one through a descriptor
        # of our own directory cannot resurrect a deleted store: creating a file in
        # a removed directory fails.
        dir_fd = self._open_dir()
        try:
            fd = self._io.open(item.lock_name, _LOCK_FLAGS | os.O_CREAT, FILE_MODE, dir_fd=dir_fd)
        except BaseException as error:
            _close_quietly(self._io, dir_fd)
            if isinstance(error, FileNotFoundError):
                raise self._deleted() from None
            if isinstance(error, OSError):
                raise _unsafe_or(error, lock_path, "the lock file") from None
            raise
        _close_keeping(self._io, dir_fd, fd)
        return fd

    def _flock(self, fd: int, exclusive: bool, deadline: float | None, lock_path: str) -> bool:
        operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            if deadline is None:
                self._io.flock(fd, operation)
                return True
            delay = _MIN_POLL
            while True:
                try:
                    self._io.flock(fd, operation | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    time.sleep(min(delay, remaining))
                    delay = min(delay * 2, _MAX_POLL)
        except OSError as error:
            raise self._lock_error(error, lock_path) from error

    def _is_lock_file(self, fd: int, item: Item, lock_path: str) -> bool:
        """Check that *fd* is this store's lock file for *item*, still at its path.

        Returns False when the path now names another file, to lock that one.
        """
        held = self._io.fstat(fd)
        known = self._lock_files.get(item.lock_name)
        # An unlinked file (st_nlink 0) is what a delete leaves to its waiters.
        if held.st_nlink and known == (held.st_dev, held.st_ino):
            return True

        _require_regular(held, lock_path, "the lock file")
        try:
            at_path = self._io.stat(lock_path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            # Lock files live as long as the store: a missing one means delete()
            # ran while we waited, and its lock must not count as ours.
            raise self._deleted() from None
        # A store deleted and created again at the same path, or a link planted
        # in place of its directory, is not this store.
        self._check_dir()
        if _identity(at_path) != _identity(held):
            return False
        self._lock_files[item.lock_name] = _identity(held)
        return True

    def _lock_error(self, error: OSError, path: str) -> OSError:
        if error.errno in _UNSUPPORTED_ERRNOS:
            return LockUnsupportedError(
                error.errno,
                f"flock(2) is not supported on the file system of {path} "
                f"({os.strerror(error.errno)}): put the store on a local file system "
                f"such as ext4, xfs, btrfs or tmpfs",
                path,
            )
        return error

    def _unlock(self, item: Item, token: str) -> None:
        held = TOKENS.pop(self, item, token, self._dir)
        _release(self._io, held)
        _log.debug("unlocked %r", item, extra=self._log_fields)

    # -- delete ---------------------------------------------------------------

    def _delete(self) -> None:
        self._remove_tree()

        # Released after the tree is gone, so that a waiter wakes up to a
        # deleted store rather than to a lock it could take.
        for held in TOKENS.pop_owner(self):
            _release(self._io, held)
        _log.debug("deleted store", extra=self._log_fields)

    def _remove_tree(self) -> None:
        parent = os.path.dirname(self._dir)
        try:
            if _identity(self._io.stat(self._dir, follow_symlinks=False)) != self._identity:
                return
        except (FileNotFoundError, NotADirectoryError):
            return

        # Renaming first removes the path in one step: from then on no process
        # can open, lock or create anything in it by path.
        # The name stays short, so a store name of 255 characters can be deleted too.
        grave = f"{parent}/.vcstore-deleted-{secrets.token_hex(8)}"
        try:
            self._io.replace(self._dir, grave)
        except FileNotFoundError:
            return

        for _ in range(10):
            try:
                self._remove_contents(grave)
                self._io.rmdir(grave)
                return
            except FileNotFoundError:
                return
            except OSError as error:
                # A process that opened the directory before the rename added an entry.
                if error.errno != errno.ENOTEMPTY:
                    raise
        self._io.rmdir(grave)

    def _remove_contents(self, path: str, dir_fd: int | None = None) -> None:
        fd = self._io.open(path, _DIR_FLAGS | _NOFOLLOW, dir_fd=dir_fd)
        try:
            for name in self._io.listdir(fd):
                try:
                    mode = self._io.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
                    if stat.S_ISDIR(mode):
                        self._remove_contents(name, fd)
                        self._io.rmdir(name, dir_fd=fd)
                    else:
                        self._io.unlink(name, dir_fd=fd)
                except FileNotFoundError:
                    pass
        finally:
            self._io.close(fd)


def _identity(st) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


# open(2) errors that mean a path inside the store is not the kind of file it should be.
_UNSAFE_KINDS = {
    errno.ELOOP: "a symbolic link",
    errno.EISDIR: "a directory",
    errno.ENXIO: "a socket or a device",
    errno.ENOTDIR: "not a directory (a symbolic link or a file)",
}
_UNSAFE_ERRNOS = set(_UNSAFE_KINDS)


def _unsafe_or(error: OSError, path: str, what: str) -> OSError:
    """Turn an open(2) error on a planted link or special file into `UnsafePathError`."""
    if error.errno not in _UNSAFE_ERRNOS:
        return error
    kind = _UNSAFE_KINDS[error.errno]
    return UnsafePathError(
        error.errno,
        f"refusing to use {what} {path}: it is {kind}, which vcstore never follows or uses; "
        f"remove it if it does not belong there",
        path,
    )


def _require_regular(st, path: str, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(
            errno.EINVAL,
            f"refusing to use {what} {path}: it is not a regular file "
            f"(mode {stat.filemode(st.st_mode)}); remove it if it does not belong there",
            path,
        )


def _write_all(io, fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = io.write(fd, view)
        view = view[written:]


def _close_quietly(io, fd: int) -> None:
    # Used while another error propagates, which matters more than a failed close.
    try:
        io.close(fd)
    except OSError:
        pass


def _close_keeping(io, fd: int, result_fd: int) -> None:
    """Close *fd*; if that fails, close *result_fd* too, so the caller's error leaks nothing."""
    try:
        io.close(fd)
    except BaseException:
        _close_quietly(io, result_fd)
        raise


def _unlink_quietly(io, name: str, dir_fd: int) -> None:
    try:
        io.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _release(io, held: HeldLock) -> None:
    try:
        io.flock(held.fd, fcntl.LOCK_UN)
    finally:
        # Closing the last descriptor of the open file description releases it too.
        io.close(held.fd)
