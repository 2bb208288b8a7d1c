"""`vcstore.open`: one `Store` object per normalised URL, and the scheme table."""

import os
import threading

from .errors import StoreError
from .filesystem import FilesystemStore
from .store import Store
from .urls import split_target

_backends: dict = {FilesystemStore.scheme: FilesystemStore}
_stores: dict[tuple[str, str], Store] = {}
_mutex = threading.Lock()


def register_backend(scheme: str, factory) -> None:
    """Make `vcstore.open` accept URLs with *scheme*.

    ``factory(url, create=...)`` returns a `Store`; it is called with the URL as
    given, at most once per URL while the store it made is current.
    """
    if not isinstance(scheme, str) or not scheme.isascii() or not scheme.isalpha():
        raise ValueError(f"invalid scheme {scheme!r}: use letters only, such as 'file'")
    with _mutex:
        _backends[scheme.lower()] = factory


def open(target, *, create: bool = True) -> Store:
    """Return the store at *target*, a URL such as ``file:///run/vc/sbs/abc`` or a path.

    The same normalised URL gives the same object within a process, from any
    thread. With ``create=False`` a missing store raises `StoreNotFoundError`
    and nothing is created. A store deleted meanwhile, by this or another
    process, is replaced by a freshly created one.
    """
    scheme, key = split_target(target, _backends)
    with _mutex:
        store = _stores.get((scheme, key))
        if store is not None and store._is_current():
            return store
        store = _backends[scheme](key, create=create)
        _stores[(scheme, key)] = store
        return store


def delete_all() -> None:
    """Delete every store that `open` returned in this process and that still exists.

    Every store is tried; the first error is raised afterwards.
    """
    with _mutex:
        stores = list(_stores.values())
    first_error = None
    for store in stores:
        try:
            store.delete()
        except (OSError, StoreError) as error:
            first_error = first_error or error
    if first_error is not None:
        raise first_error


def forget(store: Store) -> None:
    """Drop *store* from the registry, if it is the object registered for its URL."""
    with _mutex:
        for key, registered in list(_stores.items()):
            if registered is store:
                del _stores[key]


def _reset_mutex_after_fork() -> None:
    # A thread of the parent may have held the mutex at fork time; it never runs here.
    global _mutex
    _mutex = threading.Lock()


os.register_at_fork(after_in_child=_reset_mutex_after_fork)
