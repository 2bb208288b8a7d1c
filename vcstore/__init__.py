"""vcstore: a crash-safe port of the Kata Containers virtcontainers store.

Stores are addressed by URL, items are JSON files, raw files sit beside them,
and any item can be locked shared or exclusive with flock(2)::

    import vcstore
    from vcstore import Item

    store = vcstore.open("file:///run/vc/sbs/abc")
    with store.locked(Item.LOCK):
        store.store(Item.STATE, {"state": "running"})
    store.load(Item.STATE)
"""

import logging

from .errors import (
    CorruptItemError,
    DeadlockError,
    InvalidIdError,
    InvalidUrlError,
    InvalidValueError,
    ItemNotFoundError,
    LockTimeoutError,
    LockUnsupportedError,
    StoreDeletedError,
    StoreError,
    StoreNotFoundError,
    UnknownItemError,
    UnknownTokenError,
    UnsafePathError,
    UnsupportedSchemeError,
)
from . import vc
from .filesystem import FilesystemStore
from .items import Item
from .registry import delete_all, open, register_backend
from .store import Store

# A library logs only where the application has configured logging.
logging.getLogger("vcstore").addHandler(logging.NullHandler())

__all__ = [
    "CorruptItemError",
    "DeadlockError",
    "FilesystemStore",
    "InvalidIdError",
    "InvalidUrlError",
    "InvalidValueError",
    "Item",
    "ItemNotFoundError",
    "LockTimeoutError",
    "LockUnsupportedError",
    "Store",
    "StoreDeletedError",
    "StoreError",
    "StoreNotFoundError",
    "UnknownItemError",
    "UnknownTokenError",
    "UnsafePathError",
    "UnsupportedSchemeError",
    "delete_all",
    "open",
    "register_backend",
    "vc",
]
