"""`vcstore.open`'s registry, store creation and `vcstore.delete_all`."""

import os
import shutil
import stat
import threading

import pytest

import vcstore
from vcstore import Item
from helpers import Peer, current_umask, run_in_fork, snapshot

THREADS = 16


@pytest.fixture
def root(tmp_path):
    yield tmp_path
    vcstore.delete_all()


@pytest.fixture
def peer():
    with Peer() as process:
        yield process


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------------------
# One object per normalised URL


def test_open_twice_same_object(root):
    assert vcstore.open(root / "s") is vcstore.open(root / "s")


def test_open_other_path_other_object(root):
    assert vcstore.open(root / "s") is not vcstore.open(root / "t")


def test_concurrent_open_one_object(root):
    # Race: find-then-add in the registry lets two threads each create a store.
    barrier = threading.Barrier(THREADS)
    opened, errors = [], []

    def open_store():
        barrier.wait()
        try:
            opened.append(vcstore.open(root / "s"))
        except Exception as error:  # noqa: BLE001 - collected for the assert
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len({id(store) for store in opened}) == 1


def test_concurrent_open_of_spellings_one_object(root):
    # Race: two spellings of one URL normalised and registered at the same time.
    spellings = [str(root / "s"), f"{root}/s/", (root / "s").as_uri(), f"file://localhost{root}/s", root / "s"]
    barrier = threading.Barrier(THREADS)
    opened = []

    def open_store(spelling):
        barrier.wait()
        opened.append(vcstore.open(spelling))

    threads = [threading.Thread(target=open_store, args=(spellings[i % len(spellings)],)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(opened) == THREADS
    assert len({id(store) for store in opened}) == 1


# ---------------------------------------------------------------------------
# Creation


def test_open_creates_layout(root):
    store = vcstore.open(root / "a" / "b" / "s")
    assert sorted(os.listdir(store.path)) == ["lock", "raw"]


def test_open_creates_lock_as_file(root):
    store = vcstore.open(root / "s")
    assert stat.S_ISREG(os.stat(store.path / "lock").st_mode)


def test_open_creates_raw_as_directory(root):
    store = vcstore.open(root / "s")
    assert (store.path / "raw").is_dir()


def test_open_without_create_missing_raises(root):
    with pytest.raises(vcstore.StoreNotFoundError):
        vcstore.open(root / "s", create=False)


def test_store_not_found_is_file_not_found(root):
    with pytest.raises(FileNotFoundError):
        vcstore.open(root / "s", create=False)


def test_open_without_create_creates_nothing(root):
    before = snapshot(root)
    with pytest.raises(vcstore.StoreNotFoundError):
        vcstore.open(root / "a" / "s", create=False)
    assert snapshot(root) == before


def test_open_without_create_missing_not_registered(root):
    with pytest.raises(vcstore.StoreNotFoundError):
        vcstore.open(root / "s", create=False)
    store = vcstore.open(root / "s")
    assert (store.path / "lock").is_file()


def test_open_without_create_completes_existing_directory(root):
    # The Go original skipped the lock file whenever the directory existed.
    (root / "s").mkdir()
    store = vcstore.open(root / "s", create=False)
    assert sorted(os.listdir(store.path)) == ["lock", "raw"]


def test_open_completes_directory_missing_lock(root):
    (root / "s" / "raw").mkdir(parents=True)
    store = vcstore.open(root / "s")
    assert (store.path / "lock").is_file()


def test_open_completes_directory_missing_raw(root):
    (root / "s").mkdir()
    (root / "s" / "lock").touch()
    store = vcstore.open(root / "s")
    assert (store.path / "raw").is_dir()


def test_open_keeps_existing_items(root):
    (root / "s").mkdir()
    (root / "s" / "state.json").write_text('{"state": "running"}')
    store = vcstore.open(root / "s")
    assert store.load(Item.STATE) == {"state": "running"}


def test_open_keeps_existing_lock_content(root):
    # The lock file is never truncated: an older tool may keep something in it.
    (root / "s").mkdir()
    (root / "s" / "lock").write_text("kept")
    vcstore.open(root / "s")
    assert (root / "s" / "lock").read_text() == "kept"


def test_processes_create_same_stores_at_once(root):
    # Race: mkdir, lock file creation and raw/ creation by two processes at once.
    paths = [str(root / "parent" / f"s{number}") for number in range(20)]
    with Peer() as first, Peer() as second:
        first.send("open_each", paths)
        second.send("open_each", paths)
        first_urls = first.reply()
        second_urls = second.reply()

    assert first_urls == second_urls
    for path in paths:
        assert sorted(os.listdir(path)) == ["lock", "raw"]


# ---------------------------------------------------------------------------
# Modes and the umask (checked in forked children, so this process's umask stays)


def _created_modes(root, umask):
    os.umask(umask)
    store = vcstore.open(os.path.join(root, "a", "b", "s"))
    store.store(Item.STATE, {"state": "ready"})
    raw_path = store.raw("disk0")[len("file://"):]
    modes = {
        "parent a": mode_of(os.path.join(root, "a")),
        "parent b": mode_of(os.path.join(root, "a", "b")),
        "store": mode_of(store.path),
        "raw": mode_of(store.path / "raw"),
        "lock": mode_of(store.path / "lock"),
        "item": mode_of(store.path / "state.json"),
        "raw file": mode_of(raw_path),
    }
    return {"modes": modes, "umask after": current_umask()}


@pytest.fixture(scope="module")
def modes_with_umask_0(tmp_path_factory):
    return run_in_fork(_created_modes, str(tmp_path_factory.mktemp("umask0")), 0)


@pytest.fixture(scope="module")
def modes_with_umask_077(tmp_path_factory):
    return run_in_fork(_created_modes, str(tmp_path_factory.mktemp("umask077")), 0o077)


@pytest.mark.parametrize("name", ["parent a", "parent b", "store", "raw"])
def test_directory_mode_0750(modes_with_umask_0, name):
    assert oct(modes_with_umask_0["modes"][name]) == oct(0o750)


@pytest.mark.parametrize("name", ["lock", "item"])
def test_file_mode_0640(modes_with_umask_0, name):
    assert oct(modes_with_umask_0["modes"][name]) == oct(0o640)


def test_raw_file_mode_at_most_0640(modes_with_umask_0):
    assert modes_with_umask_0["modes"]["raw file"] & ~0o640 == 0


@pytest.mark.parametrize("name", ["parent a", "parent b", "store", "raw", "lock", "item", "raw file"])
def test_umask_narrows_mode(modes_with_umask_077, name):
    # A store that set the umask to 0 (or chmod'ed) around creation would ignore it.
    assert modes_with_umask_077["modes"][name] & 0o077 == 0


def test_calls_keep_umask_0(modes_with_umask_0):
    assert modes_with_umask_0["umask after"] == 0


def test_calls_keep_umask_077(modes_with_umask_077):
    assert modes_with_umask_077["umask after"] == 0o077


def test_calls_keep_umask_of_this_process(root):
    before = current_umask()
    store = vcstore.open(root / "a" / "s")
    store.store(Item.STATE, 1)
    store.raw()
    with store.locked(Item.LOCK, exclusive=True):
        pass
    store.delete()
    assert current_umask() == before


# ---------------------------------------------------------------------------
# Deleting


def test_delete_all_deletes_every_opened_store(root):
    stores = [vcstore.open(root / name) for name in ("s", "t", "u")]
    for store in stores:
        store.store(Item.STATE, 1)
    vcstore.delete_all()
    assert [store.path.exists() for store in stores] == [False, False, False]


def test_delete_all_forgets_stores(root):
    store = vcstore.open(root / "s")
    vcstore.delete_all()
    assert vcstore.open(root / "s") is not store


def test_delete_all_with_stores_already_gone(root):
    vcstore.open(root / "s").delete()
    vcstore.open(root / "t")
    shutil.rmtree(root / "t")
    vcstore.delete_all()
    assert os.listdir(root) == []


def test_delete_removes_directory(root):
    store = vcstore.open(root / "s")
    store.store(Item.STATE, 1)
    store.raw("disk0")
    store.delete()
    assert not store.path.exists()


def test_delete_store_with_longest_name(root):
    # A 255-byte directory name is valid; no temporary name derived from it may be longer.
    store = vcstore.open(root / ("s" * 255))
    store.store(Item.STATE, 1)
    store.delete()
    assert os.listdir(root) == []


def test_delete_leaves_nothing_in_parent(root):
    store = vcstore.open(root / "s")
    store.store(Item.STATE, 1)
    store.delete()
    assert os.listdir(root) == []


def test_delete_keeps_parent(root):
    store = vcstore.open(root / "a" / "s")
    store.delete()
    assert (root / "a").is_dir()


def test_delete_twice_is_no_error(root):
    store = vcstore.open(root / "s")
    store.delete()
    store.delete()
    assert not store.path.exists()


def test_open_after_delete_new_store(root):
    store = vcstore.open(root / "s")
    store.delete()
    reopened = vcstore.open(root / "s")
    assert reopened is not store


def test_open_after_delete_creates_layout(root):
    vcstore.open(root / "s").delete()
    reopened = vcstore.open(root / "s")
    assert sorted(os.listdir(reopened.path)) == ["lock", "raw"]


def test_open_after_other_process_deleted_new_store(root, peer):
    store = vcstore.open(root / "s")
    peer.call("delete", str(root / "s"))
    assert vcstore.open(root / "s") is not store


def test_open_after_other_process_deleted_creates_layout(root, peer):
    vcstore.open(root / "s")
    peer.call("delete", str(root / "s"))
    reopened = vcstore.open(root / "s")
    assert sorted(os.listdir(reopened.path)) == ["lock", "raw"]


def test_open_after_other_process_deleted_works(root, peer):
    vcstore.open(root / "s").store(Item.STATE, "old")
    peer.call("delete", str(root / "s"))
    reopened = vcstore.open(root / "s")
    reopened.store(Item.STATE, "new")
    assert reopened.load(Item.STATE) == "new"
