"""The virtcontainers layout: where Kata's sandboxes and containers keep their stores.

Each sandbox ``s`` has two stores. Its configuration store, under
``<prefix>/var/lib/vc/sbs/s``, survives reboots. Its runtime store, under
``<prefix>/run/vc/sbs/s``, keeps every other item. A container ``c`` of that
sandbox has the same pair one level deeper (``.../sbs/s/c``), so its directories
sit inside the sandbox's store directories.

``<prefix>`` is ``""`` unless `set_prefix` or the ``VCSTORE_PREFIX`` environment
variable points the whole layout somewhere else, a test's temporary directory
for example.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import posixpath
from typing import Any, Iterator

from .errors import InvalidIdError, InvalidUrlError, UnknownItemError
from .items import Item
from .names import validate_id

__all__ = [
    "PREFIX_ENVIRONMENT_VARIABLE",
    "VCStore",
    "config_storage_path",
    "container_configuration_root",
    "container_configuration_root_path",
    "container_runtime_root",
    "container_runtime_root_path",
    "get_prefix",
    "run_storage_path",
    "run_vm_storage_path",
    "sandbox_configuration_item_path",
    "sandbox_configuration_root",
    "sandbox_configuration_root_path",
    "sandbox_exists",
    "sandbox_runtime_item_path",
    "sandbox_runtime_root",
    "sandbox_runtime_root_path",
    "set_prefix",
]

logger = logging.getLogger(__name__)

PREFIX_ENVIRONMENT_VARIABLE = "VCSTORE_PREFIX"

# The storage directories below the prefix, as Kata's virtcontainers names them.
_CONFIG_STORAGE = "var/lib/vc/sbs"
_RUN_STORAGE = "run/vc/sbs"
_RUN_VM_STORAGE = "run/vc/vm"

# A container's directories live inside the sandbox's store directories, so a
# container id must not be a name that the sandbox store uses for itself: its raw
# directory, its item files and their lock files. Temporary files start with "."
# and are already excluded by the id rule.
_SANDBOX_STORE_NAMES = frozenset(
    {"raw"}
    | {item.file_name for item in Item}
    | {item.lock_name for item in Item}
)

# The prefix that set_prefix set last, validated and normalised. None means that
# the environment variable decides.
_prefix_override: str | None = None


# --- The prefix ---------------------------------------------------------------


def set_prefix(path: str | os.PathLike[str] | None) -> str | None:
    """Point the whole layout at *path*, or with ``None`` back at the default.

    The prefix set here wins over ``VCSTORE_PREFIX``. ``set_prefix("")`` selects
    the real locations (``/var/lib/vc/sbs``...) even when the variable is set,
    and ``set_prefix(None)`` goes back to reading the variable at each call.
    A non-empty prefix must be an absolute path. It is normalised the way store
    URLs are, so ``/tmp/vc/`` and ``/tmp/vc`` are the same prefix.

    Returns the override that was in effect before, so that a caller can restore
    it. Raises `InvalidUrlError` (a `ValueError`) for a relative path or a path
    containing NUL, and `TypeError` for something that is not a path.

    Example::

        previous = vcstore.vc.set_prefix("/tmp/test-root")
        vcstore.vc.run_storage_path()      # '/tmp/test-root/run/vc/sbs'
        vcstore.vc.set_prefix(previous)
    """
    global _prefix_override
    previous = _prefix_override
    if path is None:
        _prefix_override = None
    else:
        _prefix_override = _normalise_prefix(path, "prefix given to vcstore.vc.set_prefix")
    return previous


def get_prefix() -> str:
    """Return the prefix in effect now: `set_prefix`'s, else ``VCSTORE_PREFIX``'s, else ``""``.

    The environment variable is read at each call, and an empty value counts as
    unset. Raises `InvalidUrlError` when the variable is a relative path.

    Example::

        vcstore.vc.get_prefix()            # '' unless a prefix was set
    """
    if _prefix_override is not None:
        return _prefix_override
    value = os.environ.get(PREFIX_ENVIRONMENT_VARIABLE, "")
    return _normalise_prefix(value, f"{PREFIX_ENVIRONMENT_VARIABLE} environment variable")


def _normalise_prefix(path: str | os.PathLike[str], source: str) -> str:
    value = os.fspath(path)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if value == "":
        return ""
    if "\0" in value:
        raise InvalidUrlError(f"invalid {source} {value!r}: the path contains a NUL byte")
    if not value.startswith("/"):
        raise InvalidUrlError(
            f"invalid {source} {value!r}: the prefix must be an absolute path "
            f"such as '/tmp/vc-root', or empty for the real locations"
        )

    # Normalise as vcstore.open does, so that a root's path equals its store's path.
    value = posixpath.normpath(value)
    if value.startswith("//"):
        value = "/" + value.lstrip("/")
    return "" if value == "/" else value


# --- Storage paths and roots -----------------------------------------------------


def config_storage_path() -> str:
    """Return the directory of all sandbox configuration stores.

    Example::

        vcstore.vc.config_storage_path()   # '/var/lib/vc/sbs' with no prefix
    """
    return f"{get_prefix()}/{_CONFIG_STORAGE}"


def run_storage_path() -> str:
    """Return the directory of all sandbox runtime stores.

    Example::

        vcstore.vc.run_storage_path()      # '/run/vc/sbs' with no prefix
    """
    return f"{get_prefix()}/{_RUN_STORAGE}"


def run_vm_storage_path() -> str:
    """Return the directory where Kata keeps its virtual machines' runtime files.

    Example::

        vcstore.vc.run_vm_storage_path()   # '/run/vc/vm' with no prefix
    """
    return f"{get_prefix()}/{_RUN_VM_STORAGE}"


def sandbox_configuration_root_path(sandbox_id: str) -> pathlib.Path:
    """Return the directory of sandbox *sandbox_id*'s configuration store.

    Raises `InvalidIdError` for an invalid id.

    Example::

        vcstore.vc.sandbox_configuration_root_path("sb1")   # Path('/var/lib/vc/sbs/sb1')
    """
    validate_id(sandbox_id, "sandbox id")
    return pathlib.Path(config_storage_path(), sandbox_id)


def sandbox_configuration_root(sandbox_id: str) -> str:
    """Return the URL of sandbox *sandbox_id*'s configuration store.

    The URL is percent-encoded, so a prefix with a space survives `vcstore.open`.

    Example::

        vcstore.vc.sandbox_configuration_root("sb1")   # 'file:///var/lib/vc/sbs/sb1'
    """
    return sandbox_configuration_root_path(sandbox_id).as_uri()


def sandbox_runtime_root_path(sandbox_id: str) -> pathlib.Path:
    """Return the directory of sandbox *sandbox_id*'s runtime store.

    Raises `InvalidIdError` for an invalid id.

    Example::

        vcstore.vc.sandbox_runtime_root_path("sb1")    # Path('/run/vc/sbs/sb1')
    """
    validate_id(sandbox_id, "sandbox id")
    return pathlib.Path(run_storage_path(), sandbox_id)


def sandbox_runtime_root(sandbox_id: str) -> str:
    """Return the URL of sandbox *sandbox_id*'s runtime store.

    Example::

        vcstore.vc.sandbox_runtime_root("sb1")         # 'file:///run/vc/sbs/sb1'
    """
    return sandbox_runtime_root_path(sandbox_id).as_uri()


def container_configuration_root_path(sandbox_id: str, container_id: str) -> pathlib.Path:
    """Return the directory of container *container_id*'s configuration store.

    Raises `InvalidIdError` for an invalid id, and for a container id that names
    a file or directory of the sandbox's own store (``raw``, ``lock``,
    ``state.json``...).

    Example::

        vcstore.vc.container_configuration_root_path("sb1", "c1")
        # Path('/var/lib/vc/sbs/sb1/c1')
    """
    _validate_container_id(container_id)
    return sandbox_configuration_root_path(sandbox_id) / container_id


def container_configuration_root(sandbox_id: str, container_id: str) -> str:
    """Return the URL of container *container_id*'s configuration store.

    Example::

        vcstore.vc.container_configuration_root("sb1", "c1")
        # 'file:///var/lib/vc/sbs/sb1/c1'
    """
    return container_configuration_root_path(sandbox_id, container_id).as_uri()


def container_runtime_root_path(sandbox_id: str, container_id: str) -> pathlib.Path:
    """Return the directory of container *container_id*'s runtime store.

    Raises `InvalidIdError` as `container_configuration_root_path` does.

    Example::

        vcstore.vc.container_runtime_root_path("sb1", "c1")   # Path('/run/vc/sbs/sb1/c1')
    """
    _validate_container_id(container_id)
    return sandbox_runtime_root_path(sandbox_id) / container_id


def container_runtime_root(sandbox_id: str, container_id: str) -> str:
    """Return the URL of container *container_id*'s runtime store.

    Example::

        vcstore.vc.container_runtime_root("sb1", "c1")        # 'file:///run/vc/sbs/sb1/c1'
    """
    return container_runtime_root_path(sandbox_id, container_id).as_uri()


def sandbox_configuration_item_path(sandbox_id: str, item: Item) -> pathlib.Path:
    """Return the path of *item*'s file in sandbox *sandbox_id*'s configuration store.

    Raises `UnknownItemError` when *item* is not an `Item`.

    Example::

        vcstore.vc.sandbox_configuration_item_path("sb1", Item.CONFIGURATION)
        # Path('/var/lib/vc/sbs/sb1/config.json')
    """
    _check_item(item)
    return sandbox_configuration_root_path(sandbox_id) / item.file_name


def sandbox_runtime_item_path(sandbox_id: str, item: Item) -> pathlib.Path:
    """Return the path of *item*'s file in sandbox *sandbox_id*'s runtime store.

    Raises `UnknownItemError` when *item* is not an `Item`.

    Example::

        vcstore.vc.sandbox_runtime_item_path("sb1", Item.STATE)
        # Path('/run/vc/sbs/sb1/state.json')
    """
    _check_item(item)
    return sandbox_runtime_root_path(sandbox_id) / item.file_name


def sandbox_exists(sandbox_id: str) -> bool:
    """Return whether sandbox *sandbox_id* has a configuration or a runtime directory.

    Only the disk is checked, and nothing is created or opened.

    Example::

        if not vcstore.vc.sandbox_exists("sb1"):
            store = vcstore.vc.VCStore.for_sandbox("sb1")
    """
    return (
        sandbox_configuration_root_path(sandbox_id).is_dir()
        or sandbox_runtime_root_path(sandbox_id).is_dir()
    )


def _validate_container_id(container_id: str) -> None:
    validate_id(container_id, "container id")
    if container_id in _SANDBOX_STORE_NAMES:
        raise InvalidIdError(
            f"invalid container id {container_id!r}: the sandbox's store uses this "
            f"name for its own files; choose an id other than "
            f"{', '.join(sorted(_SANDBOX_STORE_NAMES))}"
        )


def _check_item(item: object) -> None:
    if not isinstance(item, Item):
        raise UnknownItemError(
            f"unknown item {item!r}: expected a vcstore.Item such as Item.STATE"
        )


# --- The pair of stores -------------------------------------------------------------


def _open_store(target: Any, create: bool) -> Any:
    # Imported here because vcstore/__init__.py imports this module.
    from . import Store, open as open_store

    if isinstance(target, Store):
        return target
    return open_store(target, create=create)


class VCStore:
    """The configuration store and the runtime store of one sandbox or container.

    `load` and `store` send `Item.CONFIGURATION` to the configuration store,
    which survives reboots, and every other item to the runtime store. `raw`
    and the locks use the runtime store: `lock` and `rlock` take its
    `Item.LOCK`, which is the ``<runtime store>/lock`` file that Kata's tools
    lock too.

    *config_url* and *state_url* are each a store URL, an absolute path, or an
    already opened `vcstore.Store`, which is used as given regardless of *create*.

    Example::

        sandbox = VCStore.for_sandbox("sb1")
        token = sandbox.lock()
        try:
            sandbox.store(Item.STATE, {"state": "ready"})
        finally:
            sandbox.unlock(token)

    Attributes:
        config_store: the `vcstore.Store` that keeps `Item.CONFIGURATION`.
        state_store: the `vcstore.Store` that keeps every other item, the raw
            files and the sandbox or container lock.
    """

    def __init__(self, config_url: Any, state_url: Any, *, create: bool = True) -> None:
        """Open both stores. With ``create=False``, a missing directory raises `StoreNotFoundError`."""
        self.config_store = _open_store(config_url, create)
        self.state_store = _open_store(state_url, create)

    @classmethod
    def for_sandbox(cls, sandbox_id: str, create: bool = True) -> VCStore:
        """Open sandbox *sandbox_id*'s stores at their `vcstore.vc` locations.

        With ``create=False``, raises `StoreNotFoundError` when either directory
        is missing.

        Example::

            sandbox = VCStore.for_sandbox("sb1", create=False)
        """
        return cls(
            sandbox_configuration_root(sandbox_id),
            sandbox_runtime_root(sandbox_id),
            create=create,
        )

    @classmethod
    def for_container(cls, sandbox_id: str, container_id: str, create: bool = True) -> VCStore:
        """Open the stores of container *container_id* in sandbox *sandbox_id*.

        With ``create=False``, raises `StoreNotFoundError` when either directory
        is missing.

        Example::

            container = VCStore.for_container("sb1", "c1")
            container.store(Item.PROCESS, {"pid": 42})
        """
        return cls(
            container_configuration_root(sandbox_id, container_id),
            container_runtime_root(sandbox_id, container_id),
            create=create,
        )

    def __repr__(self) -> str:
        return f"VCStore({self.config_store.url!r}, {self.state_store.url!r})"

    def _store_for(self, item: Item) -> Any:
        _check_item(item)
        if item is Item.CONFIGURATION:
            return self.config_store
        return self.state_store

    def load(self, item: Item) -> Any:
        """Return *item*'s value from the store that keeps it.

        Raises what `Store.load` raises, such as `ItemNotFoundError` for an item
        that was never stored.

        Example::

            sandbox.load(Item.CONFIGURATION)
        """
        return self._store_for(item).load(item)

    def store(self, item: Item, value: Any) -> None:
        """Store *value* as *item*, atomically and durably, in the store that keeps it.

        Example::

            sandbox.store(Item.CONFIGURATION, {"hypervisor": "qemu"})
        """
        self._store_for(item).store(item, value)

    def raw(self, id: str | None = None) -> str:
        """Return the URL of raw file *id* in the runtime store, or of a new unique one.

        Example::

            sandbox.raw("disk0")
        """
        return self.state_store.raw(id)

    def lock(self, timeout: float | None = None) -> str:
        """Take an exclusive token on the runtime store's `Item.LOCK` and return it.

        *timeout* is as in `Store.item_lock`: ``None`` blocks, ``0`` tries once,
        and `LockTimeoutError` is raised when it runs out.

        Example::

            token = sandbox.lock(timeout=5.0)
        """
        return self.state_store.item_lock(Item.LOCK, exclusive=True, timeout=timeout)

    def rlock(self, timeout: float | None = None) -> str:
        """Take a shared token on the runtime store's `Item.LOCK` and return it.

        Example::

            token = sandbox.rlock()
        """
        return self.state_store.item_lock(Item.LOCK, exclusive=False, timeout=timeout)

    def unlock(self, token: str) -> None:
        """Release a token taken by `lock` or `rlock`. Any other token raises `UnknownTokenError`.

        Example::

            sandbox.unlock(token)
        """
        self.state_store.item_unlock(Item.LOCK, token)

    @contextlib.contextmanager
    def locked(self, exclusive: bool = True, timeout: float | None = None) -> Iterator[str]:
        """Hold a token on the runtime store's `Item.LOCK` for the ``with`` block.

        Example::

            with sandbox.locked(exclusive=False, timeout=5.0):
                state = sandbox.load(Item.STATE)
        """
        token = self.state_store.item_lock(Item.LOCK, exclusive=exclusive, timeout=timeout)
        try:
            yield token
        finally:
            self.state_store.item_unlock(Item.LOCK, token)

    def delete(self) -> None:
        """Delete the configuration store, then the runtime store.

        The runtime store goes last because deleting it releases the tokens of
        `lock` and `rlock`, so a waiter wakes up to a fully deleted sandbox. It is
        deleted even when deleting the configuration store fails, and then the
        configuration store's error is raised. When both fail, the second error
        is logged and attached to the first as a note.

        Example::

            sandbox.delete()
        """
        failures = []
        for store in (self.config_store, self.state_store):
            try:
                store.delete()
            except Exception as error:
                failures.append((store, error))

        if not failures:
            return
        first_error = failures[0][1]
        for store, error in failures[1:]:
            logger.error(
                "deleting store %s failed after an earlier failure: %r",
                store.url,
                error,
                extra={"subsystem": "vc", "backend": type(store).__name__, "path": str(store.url)},
            )
            # BaseException.add_note exists from Python 3.11 on.
            add_note = getattr(first_error, "add_note", None)
            if add_note is not None:
                add_note(f"deleting store {store.url} failed too: {error!r}")
        raise first_error
