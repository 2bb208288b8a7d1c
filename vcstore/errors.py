"""The exceptions vcstore raises. Each is a `StoreError` and a built-in type."""


class StoreError(Exception):
    """Base class of every error that vcstore raises on purpose."""


class InvalidUrlError(StoreError, ValueError):
    """A store URL or path that vcstore cannot use: relative, empty or malformed."""


class UnsupportedSchemeError(StoreError, ValueError):
    """A store URL whose scheme has no registered backend."""


class UnknownItemError(StoreError, ValueError):
    """Something passed as an item that is not a `vcstore.Item`."""


class InvalidIdError(StoreError, ValueError):
    """A raw-file, sandbox or container id that breaks the id rule."""


class InvalidValueError(StoreError, TypeError, ValueError):
    """A value that `store` cannot keep as strict JSON.

    It is both a `TypeError` and a `ValueError`, because what was wrong is
    sometimes the type (a set, a non-str key) and sometimes the value (NaN).
    """


class StoreNotFoundError(StoreError, FileNotFoundError):
    """A store opened with ``create=False`` whose directory does not exist."""


class ItemNotFoundError(StoreError, FileNotFoundError):
    """An item that was never stored, or whose file was removed."""


class CorruptItemError(StoreError, ValueError):
    """An item file that is empty or does not hold valid JSON."""


class LockTimeoutError(StoreError, TimeoutError):
    """An item lock that could not be taken within its timeout."""


class UnknownTokenError(StoreError, LookupError):
    """A token that this process does not hold for this store and item."""


class DeadlockError(StoreError, RuntimeError):
    """A blocking lock that the calling thread itself prevents."""


class StoreDeletedError(StoreError, FileNotFoundError):
    """A call on a store whose directory has been deleted."""


class LockUnsupportedError(StoreError, OSError):
    """A file system on which flock(2) does not work."""


class UnsafePathError(StoreError, OSError):
    """A path inside a store that is a symbolic link or not the expected file type.

    vcstore never follows or uses such a path, so a planted link cannot make
    it read, write or lock anything outside the store.
    """
