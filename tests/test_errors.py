"""The error hierarchy, and what representative messages contain."""

import errno

import pytest

import vcstore
import vcstore.errors
from vcstore import Item
from vcstore.filesystem import FilesystemStore
from helpers import Peer, failing_io, is_flock_request, run_in_thread

HIERARCHY = [
    ("InvalidUrlError", ValueError),
    ("UnsupportedSchemeError", ValueError),
    ("UnknownItemError", ValueError),
    ("InvalidIdError", ValueError),
    ("StoreNotFoundError", FileNotFoundError),
    ("ItemNotFoundError", FileNotFoundError),
    ("CorruptItemError", ValueError),
    ("LockTimeoutError", TimeoutError),
    ("UnknownTokenError", LookupError),
    ("DeadlockError", RuntimeError),
    ("StoreDeletedError", FileNotFoundError),
    ("LockUnsupportedError", Exception),
]
NAMES = [name for name, _ in HIERARCHY]


@pytest.mark.parametrize("name", NAMES)
def test_error_is_store_error(name):
    assert issubclass(getattr(vcstore, name), vcstore.StoreError)


@pytest.mark.parametrize(("name", "builtin"), HIERARCHY, ids=NAMES)
def test_error_is_builtin_type(name, builtin):
    assert issubclass(getattr(vcstore, name), builtin)


@pytest.mark.parametrize("name", NAMES)
def test_error_exported_from_package(name):
    assert getattr(vcstore, name) is getattr(vcstore.errors, name)


def test_store_error_is_exception():
    assert issubclass(vcstore.StoreError, Exception)


def test_store_error_exported():
    assert vcstore.StoreError is vcstore.errors.StoreError


def test_not_found_errors_distinct():
    # One except clause per cause must be possible, even though all are FileNotFoundError.
    classes = {vcstore.StoreNotFoundError, vcstore.ItemNotFoundError, vcstore.StoreDeletedError}
    assert [cls for cls in classes if any(issubclass(cls, other) for other in classes - {cls})] == []


# ---------------------------------------------------------------------------
# Messages name the value, path or item, and what to do


@pytest.fixture
def store(tmp_path):
    opened = vcstore.open(tmp_path / "store")
    yield opened
    opened.delete()


def message_of(error_class, function, *args, **kwargs) -> str:
    with pytest.raises(error_class) as raised:
        function(*args, **kwargs)
    return str(raised.value)


def test_unsupported_scheme_message():
    message = message_of(vcstore.UnsupportedSchemeError, vcstore.open, "ftp://localhost/s")
    assert "ftp://localhost/s" in message


def test_invalid_url_message():
    message = message_of(vcstore.InvalidUrlError, vcstore.open, "not/absolute")
    assert "not/absolute" in message


def test_store_not_found_message_names_path(tmp_path):
    message = message_of(vcstore.StoreNotFoundError, vcstore.open, tmp_path / "missing", create=False)
    assert str(tmp_path / "missing") in message


def test_store_not_found_message_says_create(tmp_path):
    message = message_of(vcstore.StoreNotFoundError, vcstore.open, tmp_path / "missing", create=False)
    assert "create" in message


def test_unknown_item_message(store):
    message = message_of(vcstore.UnknownItemError, store.load, "state-item")
    assert "state-item" in message


def test_invalid_id_message(store):
    message = message_of(vcstore.InvalidIdError, store.raw, "../escape")
    assert "../escape" in message


def test_item_not_found_message_names_path(store):
    message = message_of(vcstore.ItemNotFoundError, store.load, Item.AGENT)
    assert str(store.path) in message


def test_lock_timeout_message_names_item(store):
    with Peer() as peer:
        peer.call("lock", str(store.path), "HYPERVISOR", True, None)
        message = message_of(vcstore.LockTimeoutError, store.item_lock, Item.HYPERVISOR, True, 0)
    assert "HYPERVISOR" in message


def test_unknown_token_message(store):
    message = message_of(vcstore.UnknownTokenError, store.item_unlock, Item.LOCK, "token-123")
    assert "token-123" in message


def test_deadlock_message_names_item_and_fix(store):
    def lock_twice():
        store.item_lock(Item.MOUNTS, exclusive=True)
        store.item_lock(Item.MOUNTS, exclusive=True)

    message = message_of(vcstore.DeadlockError, run_in_thread, lock_twice)
    assert "MOUNTS" in message
    assert "unlock" in message


def test_store_deleted_message_names_path(store):
    store.delete()
    message = message_of(vcstore.StoreDeletedError, store.load, Item.STATE)
    assert str(store.path) in message


def test_lock_unsupported_message_names_path(tmp_path):
    store = FilesystemStore(tmp_path / "store", io=failing_io("flock", errno.ENOLCK, when=is_flock_request))
    message = message_of(vcstore.LockUnsupportedError, store.item_lock, Item.LOCK, True)
    assert str(store.path) in message


def test_lock_item_data_message(store):
    message = message_of(ValueError, store.store, Item.LOCK, {})
    assert "LOCK" in message
