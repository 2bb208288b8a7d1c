"""`Store`, the public API every backend offers, with the checks they share."""

import contextlib
import json
import math

from . import tracing
from .errors import CorruptItemError, InvalidValueError, StoreError, UnknownItemError
from .items import Item
from .names import validate_id
from .tokens import TOKENS


class DataItemError(StoreError, ValueError):
    """`load` or `store` of `Item.LOCK`, which holds no data."""


class Store:
    """A store of items at one URL.

    Subclasses implement `_read`, `_write`, `_raw`, `_lock`, `_unlock` and
    `_delete`; this class checks the arguments, encodes values as strict JSON
    and traces each call. Stores come from `vcstore.open`, which returns one
    object per URL.
    """

    def __init__(self, url: str, path) -> None:
        self.url = url
        self.path = path
        self._where = str(path)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    def load(self, item: Item):
        """Return the JSON value last stored for *item*.

        Raises `ItemNotFoundError` if it was never stored, `CorruptItemError`
        if its file is empty or not JSON, `StoreDeletedError` if the store is gone.
        """
        _check_data_item(item, "load")
        with tracing.span("vcstore.load", self._where, item):
            try:
                data = self._read(item)
            except StoreError:
                raise
            except OSError as error:
                raise _named(error, f"cannot load {item!r} from {self._where}") from error
        return _decode(data, item, self._item_where(item))

    def store(self, item: Item, value) -> None:
        """Replace *item*'s value with *value*, atomically and durably.

        *value* must be strict JSON (dicts with `str` keys, lists, str, int,
        finite float, bool, None; tuples are stored as lists). Anything else
        raises `TypeError` or `ValueError` before the disk is touched.
        """
        _check_data_item(item, "store")
        data = _encode(value, item)
        with tracing.span("vcstore.store", self._where, item):
            try:
                self._write(item, data)
            except StoreError:
                raise
            except OSError as error:
                raise _named(error, f"cannot store {item!r} in {self._where}") from error

    def raw(self, id: str | None = None) -> str:
        """Return the URL of raw file *id*, creating an empty one if missing.

        Without *id* a new file with a unique name is created. Ids are 1 to 255
        characters from ``[A-Za-z0-9_.-]`` starting with a letter or digit.
        """
        if id is not None:
            validate_id(id, "raw file id")
        with tracing.span("vcstore.raw", self._where):
            try:
                return self._raw(id)
            except StoreError:
                raise
            except OSError as error:
                raise _named(error, f"cannot create raw file {id!r} in {self._where}") from error

    def item_lock(self, item: Item, exclusive: bool = True, timeout: float | None = None) -> str:
        """Lock *item* and return the token that `item_unlock` takes.

        ``timeout=None`` blocks, ``0`` tries once, a positive number waits at
        most that many seconds; then `LockTimeoutError`. A blocking call that
        the calling thread's own tokens would block forever raises
        `DeadlockError` at once.
        """
        if item.__class__ is not Item:
            _check_item(item)
        if timeout is not None:
            timeout = _check_timeout(timeout)

        # Locks are the hottest path: without a tracer, a no-op span would still
        # cost about 0.3 µs per call, a few percent of a lock and unlock.
        if not tracing.recording():
            return self._named_lock(item, bool(exclusive), timeout)
        with tracing.span("vcstore.lock", self._where, item):
            return self._named_lock(item, bool(exclusive), timeout)

    def _named_lock(self, item: Item, exclusive: bool, timeout: float | None) -> str:
        try:
            return self._lock(item, exclusive, timeout)
        except StoreError:
            raise
        except OSError as error:
            raise _named(error, f"cannot lock {item!r} of {self._where}") from error

    def item_unlock(self, item: Item, token: str) -> None:
        """Release *token*, taken by `item_lock` on this store for *item*.

        Raises `UnknownTokenError`, releasing nothing, for any other token.
        """
        if item.__class__ is not Item:
            _check_item(item)

        if not tracing.recording():
            self._unlock(item, token)
            return
        with tracing.span("vcstore.unlock", self._where, item):
            self._unlock(item, token)

    @contextlib.contextmanager
    def locked(self, item: Item, exclusive: bool = True, timeout: float | None = None):
        """Hold a lock on *item* for a ``with`` block, which gets the token.

        The block may delete the store: the lock is then already released.
        """
        token = self.item_lock(item, exclusive, timeout)
        try:
            yield token
        finally:
            if TOKENS.holds(self, token):
                self.item_unlock(item, token)

    def delete(self) -> None:
        """Remove the store's tree, then release its tokens, then forget it."""
        with tracing.span("vcstore.delete", self._where):
            self._delete()
        from . import registry

        registry.forget(self)

    def _item_where(self, item: Item) -> str:
        return f"{self.path}/{item.file_name}"

    def _is_current(self) -> bool:
        """Return whether `vcstore.open` may hand this object out again."""
        return True


def _named(error: OSError, context: str) -> OSError:
    """Return *error* again, with a message naming the store and the operation.

    The type and errno stay, so ``except OSError`` and errno checks still work.
    """
    filename = error.filename if isinstance(error.filename, str) and error.filename.startswith("/") else None
    return type(error)(error.errno, f"{context}: {error.strerror}", filename)


def _check_item(item) -> None:
    if not isinstance(item, Item):
        names = ", ".join(member.name for member in Item)
        raise UnknownItemError(f"unknown item {item!r}: pass a vcstore.Item ({names})")


def _check_data_item(item, action: str) -> None:
    _check_item(item)
    if item is Item.LOCK:
        raise DataItemError(
            f"cannot {action} Item.LOCK: it holds no data and is only locked; "
            f"use item_lock(Item.LOCK, ...) or store the value in another item"
        )


def _check_timeout(timeout):
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(
            f"invalid timeout {timeout!r}: pass None to block, 0 to try once, "
            f"or a number of seconds"
        )
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(
            f"invalid timeout {timeout!r}: pass None to block, 0 to try once, "
            f"or a positive number of seconds"
        )
    if math.isinf(timeout):
        return None
    return float(timeout)


def _encode(value, item: Item) -> bytes:
    try:
        # allow_nan=False rejects NaN and infinity; dumps also rejects cycles,
        # sets and other objects.
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except RecursionError:
        raise InvalidValueError(
            f"cannot store {item!r}: the value is nested too deeply to encode; flatten it"
        ) from None
    except (TypeError, ValueError) as error:
        raise InvalidValueError(
            f"cannot store {item!r}: {error}; store only strict JSON values "
            f"(dict with str keys, list, str, int, finite float, bool, None)"
        ) from None
    _check_keys(value, item)
    # ensure_ascii (the default) escapes lone surrogates, so every str round-trips.
    return text.encode("ascii")


def _check_keys(value, item: Item) -> None:
    # json.dumps turns int, float, bool and None keys into strings, so the value
    # loaded back would differ from the value stored.
    if not isinstance(value, _CONTAINERS):
        return
    pending = [value]
    push = pending.append
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            for key in node:
                # The type test first: it is the common case, and cheaper than isinstance.
                if type(key) is not str and not isinstance(key, str):
                    raise InvalidValueError(
                        f"cannot store {item!r}: dict key {key!r} has type {type(key).__name__}; "
                        f"strict JSON allows only str keys, so convert it with str() first"
                    )
            children = node.values()
        else:
            children = node
        for child in children:
            kind = type(child)
            if kind is dict or kind is list:
                push(child)
            elif kind not in _SCALARS and isinstance(child, _CONTAINERS):
                push(child)


# Types that hold no dict, tested by identity before the slower isinstance.
_SCALARS = frozenset((str, int, float, bool, type(None)))
_CONTAINERS = (dict, list, tuple)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not strict JSON")


# One decoder for every load: json.loads with keyword arguments builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _decode(data: bytes, item: Item, where: str):
    if not data:
        raise CorruptItemError(
            f"item {item!r} at {where} is empty: store a new value, or remove the file"
        )
    try:
        return _DECODER.decode(data.decode(json.detect_encoding(data), "surrogatepass"))
    except RecursionError:
        raise CorruptItemError(
            f"item {item!r} at {where} is nested too deeply to decode: store a flatter value"
        ) from None
    except ValueError as error:
        raise CorruptItemError(
            f"item {item!r} at {where} is not valid JSON ({error}): "
            f"store a new value, or remove the file"
        ) from None
