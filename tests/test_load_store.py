"""`store` and `load`: strict JSON, atomic and durable replacement, stale temporary files."""

import errno
import logging
import os

import pytest

import vcstore
from vcstore import Item
from vcstore.filesystem import FilesystemStore
from helpers import CountingIO, Peer, failing_io, fd_count, snapshot, temp_files

DATA_ITEMS = [item for item in Item if item is not Item.LOCK]


@pytest.fixture
def store(tmp_path):
    opened = vcstore.open(tmp_path / "store")
    yield opened
    opened.delete()


@pytest.fixture
def peer():
    with Peer() as process:
        yield process


def item_path(store, item=Item.STATE):
    return store.path / item.file_name


# ---------------------------------------------------------------------------
# Round trip

VALUES = [
    {"state": "running"},
    {"nested": {"list": [1, 2.5, -3, True, False, None], "text": "ünïcødé ✓ \u2028"}},
    [],
    {},
    "plain string",
    "",
    0,
    -(2**70),
    1.5e-300,
    True,
    None,
    "\ud800 lone surrogate",
    {"quote\"back\\slash\n": "\x00\x1f"},
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_round_trip(store, value):
    store.store(Item.STATE, value)
    assert store.load(Item.STATE) == value


@pytest.mark.parametrize("item", DATA_ITEMS, ids=lambda item: item.name)
def test_every_data_item_round_trips(store, item):
    store.store(item, {"item": item.name})
    assert store.load(item) == {"item": item.name}


def test_item_written_to_its_file(store):
    store.store(Item.NETWORK, {"a": 1})
    assert (store.path / "network.json").is_file()


def test_tuple_loads_as_list(store):
    store.store(Item.STATE, (1, (2, 3)))
    assert store.load(Item.STATE) == [1, [2, 3]]


def test_store_replaces_previous_value(store):
    store.store(Item.STATE, "first")
    store.store(Item.STATE, "second")
    assert store.load(Item.STATE) == "second"


def test_devices_and_device_ids_share_value(store):
    # Kata used one file for both items; a store keeps the last value written to it.
    store.store(Item.DEVICES, ["sandbox"])
    store.store(Item.DEVICE_IDS, ["container"])
    assert store.load(Item.DEVICES) == ["container"]


def test_value_written_by_other_process_loads(store, peer):
    peer.call("store", str(store.path), "STATE", {"from": "peer"})
    assert store.load(Item.STATE) == {"from": "peer"}


# ---------------------------------------------------------------------------
# Strict JSON: rejected before the disk is touched


class Opaque:
    pass


NOT_JSON = [
    float("nan"),
    float("inf"),
    float("-inf"),
    [1, float("nan")],
    {"deep": {"deeper": [float("inf")]}},
    {1: "int key"},
    {True: "bool key"},
    {None: "None key"},
    {2.5: "float key"},
    {("a",): "tuple key"},
    {"ok": {3: "nested int key"}},
    [{"ok": 1}, {4: "int key in list"}],
    {1, 2},
    b"bytes",
    Opaque(),
    object(),
    {"fn": print},
]


@pytest.mark.parametrize("value", NOT_JSON, ids=repr)
def test_store_rejects_non_json(store, value):
    with pytest.raises((TypeError, ValueError)):
        store.store(Item.STATE, value)


@pytest.mark.parametrize("value", NOT_JSON, ids=repr)
def test_rejected_value_leaves_disk_untouched(store, value):
    store.store(Item.STATE, "previous")
    before = snapshot(store.path)
    with pytest.raises((TypeError, ValueError)):
        store.store(Item.STATE, value)
    assert snapshot(store.path) == before


def test_rejected_value_writes_nothing(tmp_path):
    seam = CountingIO()
    store = FilesystemStore(tmp_path / "store", io=seam)
    seam.calls.clear()
    with pytest.raises(ValueError):
        store.store(Item.STATE, float("nan"))
    assert [name for name in seam.names() if name in ("open", "write", "replace")] == []


def test_self_referencing_value_rejected(store):
    value = []
    value.append(value)
    with pytest.raises((TypeError, ValueError)):
        store.store(Item.STATE, value)


# ---------------------------------------------------------------------------
# Items that cannot be loaded or stored


def test_store_lock_item_raises(store):
    with pytest.raises(vcstore.StoreError):
        store.store(Item.LOCK, {"a": 1})


def test_store_lock_item_is_value_error(store):
    with pytest.raises(ValueError):
        store.store(Item.LOCK, {"a": 1})


def test_store_lock_item_keeps_lock_file(store):
    before = snapshot(store.path)
    with pytest.raises(ValueError):
        store.store(Item.LOCK, {"a": 1})
    assert snapshot(store.path) == before


def test_load_lock_item_raises(store):
    with pytest.raises(vcstore.StoreError):
        store.load(Item.LOCK)


def test_load_lock_item_is_value_error(store):
    with pytest.raises(ValueError):
        store.load(Item.LOCK)


NOT_ITEMS = ["STATE", "state", "state.json", 1, None, Item.STATE.value]


@pytest.mark.parametrize("item", NOT_ITEMS, ids=repr)
def test_load_unknown_item_raises(store, item):
    with pytest.raises(vcstore.UnknownItemError):
        store.load(item)


@pytest.mark.parametrize("item", NOT_ITEMS, ids=repr)
def test_store_unknown_item_raises(store, item):
    with pytest.raises(vcstore.UnknownItemError):
        store.store(item, 1)


@pytest.mark.parametrize("item", NOT_ITEMS, ids=repr)
def test_store_unknown_item_creates_nothing(store, item):
    before = snapshot(store.path)
    with pytest.raises(vcstore.UnknownItemError):
        store.store(item, 1)
    assert snapshot(store.path) == before


def test_unknown_item_is_value_error(store):
    with pytest.raises(ValueError):
        store.load("state")


# ---------------------------------------------------------------------------
# Missing and corrupt items


def test_load_missing_item_raises(store):
    with pytest.raises(vcstore.ItemNotFoundError):
        store.load(Item.STATE)


def test_item_not_found_is_file_not_found(store):
    with pytest.raises(FileNotFoundError):
        store.load(Item.STATE)


def test_item_not_found_names_item(store):
    with pytest.raises(vcstore.ItemNotFoundError) as raised:
        store.load(Item.STATE)
    assert "STATE" in str(raised.value)


CORRUPT = [b"", b"{", b"not json", b'{"a": 1}{"b": 2}', b"\xff\xfe\x00garbage", b"NaN", b"[Infinity]"]


@pytest.mark.parametrize("content", CORRUPT, ids=repr)
def test_load_corrupt_item_raises(store, content):
    item_path(store).write_bytes(content)
    with pytest.raises(vcstore.CorruptItemError):
        store.load(Item.STATE)


def test_corrupt_item_is_value_error(store):
    item_path(store).write_bytes(b"")
    with pytest.raises(ValueError):
        store.load(Item.STATE)


@pytest.mark.parametrize("content", [b"", b"{"], ids=["empty", "truncated"])
def test_corrupt_item_names_item(store, content):
    item_path(store).write_bytes(content)
    with pytest.raises(vcstore.CorruptItemError) as raised:
        store.load(Item.STATE)
    assert "STATE" in str(raised.value)


@pytest.mark.parametrize("content", [b"", b"{"], ids=["empty", "truncated"])
def test_corrupt_item_names_path(store, content):
    item_path(store).write_bytes(content)
    with pytest.raises(vcstore.CorruptItemError) as raised:
        store.load(Item.STATE)
    assert str(item_path(store)) in str(raised.value)


def test_temporary_file_never_read(store):
    store.store(Item.STATE, "committed")
    (store.path / ".state.json.0123456789abcdef.tmp").write_text('"uncommitted"')
    assert store.load(Item.STATE) == "committed"


def test_temporary_file_alone_is_not_an_item(store):
    (store.path / ".state.json.0123456789abcdef.tmp").write_text('"uncommitted"')
    with pytest.raises(vcstore.ItemNotFoundError):
        store.load(Item.STATE)


# ---------------------------------------------------------------------------
# Atomic replacement


def test_store_replaces_inode(store):
    # A store that truncates and rewrites in place is seen half-written by readers.
    store.store(Item.STATE, "old")
    with open(item_path(store)) as old_file:
        store.store(Item.STATE, "new")
        assert old_file.read() == '"old"'


def test_store_gives_new_inode(store):
    store.store(Item.STATE, "old")
    old_inode = os.stat(item_path(store)).st_ino
    store.store(Item.STATE, "new")
    assert os.stat(item_path(store)).st_ino != old_inode


def test_store_leaves_no_temporary_file(store):
    store.store(Item.STATE, "value")
    assert temp_files(store.path, Item.STATE) == []


def test_reader_never_sees_partial_value(store, peer):
    # Race: a reader opening the item while a writer is halfway through it.
    size = 1 << 20
    values = [{"kind": kind, "fill": kind * size} for kind in "ab"]
    store.store(Item.STATE, values[0])
    peer.send("load_loop", str(store.path), "STATE", 150)

    writes = 0
    while peer.is_blocked(0):
        store.store(Item.STATE, values[writes % 2])
        writes += 1
    summary = peer.reply()

    assert summary["torn"] == 0
    # The loop must really have overlapped writes, or it showed nothing.
    assert writes > 1


# ---------------------------------------------------------------------------
# Durability, checked through the I/O seam


@pytest.fixture
def counted(tmp_path):
    seam = CountingIO()
    store = FilesystemStore(tmp_path / "store", io=seam)
    seam.calls.clear()
    return store, seam


def durability_events(seam) -> list:
    """Return the seam's fsync and replace calls as "fsync file", "fsync directory", "replace"."""
    events = []
    for name, detail in seam.calls:
        if name == "fsync":
            events.append(f"fsync {detail}")
        elif name == "replace":
            events.append("replace")
    return events


def test_store_fsyncs_file_before_replace(counted):
    # Crash: without it a power loss can leave the renamed item empty.
    store, seam = counted
    store.store(Item.STATE, "value")
    events = durability_events(seam)
    assert "fsync file" in events[: events.index("replace")]


def test_store_fsyncs_directory_after_replace(counted):
    # Crash: without it a power loss can bring the previous item back.
    store, seam = counted
    store.store(Item.STATE, "value")
    events = durability_events(seam)
    assert "fsync directory" in events[events.index("replace"):]


def test_store_closes_every_descriptor(counted):
    store, seam = counted
    store.store(Item.STATE, "value")
    assert seam.names().count("open") == seam.names().count("close")


# ---------------------------------------------------------------------------
# Write faults leave the previous value and no temporary file

FAULTS = [
    ("write", errno.ENOSPC),
    ("write", errno.EIO),
    ("fsync", errno.EIO),
    ("replace", errno.EIO),
    ("replace", errno.EXDEV),
]
FAULT_IDS = [f"{method}-{errno.errorcode[number]}" for method, number in FAULTS]


@pytest.fixture
def faulty_store(tmp_path, request):
    method, number = request.param
    # Only the temporary file's fsync fails: a failed directory fsync comes after
    # the replace, when the new value is already in place.
    when = (lambda fd: not os.path.isdir(f"/proc/self/fd/{fd}")) if method == "fsync" else None
    seam = failing_io(method, number, when=when)
    seam.armed = False
    store = FilesystemStore(tmp_path / "store", io=seam)
    store.store(Item.STATE, {"value": "previous"})
    seam.armed = True
    return store, seam, number


@pytest.mark.parametrize("faulty_store", FAULTS, ids=FAULT_IDS, indirect=True)
def test_fault_raises_os_error(faulty_store):
    store, _, number = faulty_store
    with pytest.raises(OSError) as raised:
        store.store(Item.STATE, {"value": "new" * 1000})
    assert raised.value.errno == number


@pytest.mark.parametrize("faulty_store", FAULTS, ids=FAULT_IDS, indirect=True)
def test_fault_keeps_previous_value(faulty_store):
    store, seam, _ = faulty_store
    with pytest.raises(OSError):
        store.store(Item.STATE, {"value": "new" * 1000})
    assert seam.faults == 1
    assert store.load(Item.STATE) == {"value": "previous"}


@pytest.mark.parametrize("faulty_store", FAULTS, ids=FAULT_IDS, indirect=True)
def test_fault_removes_temporary_file(faulty_store):
    store, _, _ = faulty_store
    with pytest.raises(OSError):
        store.store(Item.STATE, {"value": "new" * 1000})
    assert temp_files(store.path, Item.STATE) == []


@pytest.mark.parametrize("faulty_store", FAULTS, ids=FAULT_IDS, indirect=True)
def test_fault_leaks_no_descriptor(faulty_store):
    store, _, _ = faulty_store
    before = fd_count()
    with pytest.raises(OSError):
        store.store(Item.STATE, {"value": "new" * 1000})
    assert fd_count() == before


@pytest.mark.parametrize("faulty_store", FAULTS, ids=FAULT_IDS, indirect=True)
def test_store_after_fault_works(faulty_store):
    store, _, _ = faulty_store
    with pytest.raises(OSError):
        store.store(Item.STATE, "lost")
    store.store(Item.STATE, "kept")
    assert store.load(Item.STATE) == "kept"


# ---------------------------------------------------------------------------
# Temporary files of dead and live writers


@pytest.fixture
def hung_writer(store):
    """A peer stopped for good inside `store` of STATE, its temporary file written and locked."""
    store.store(Item.STATE, "before")
    with Peer() as writer:
        assert writer.call("store_hanging", str(store.path), "STATE", "from the hung writer") == "in fsync"
        yield writer


def test_live_writer_temporary_file_kept(store, hung_writer):
    written = temp_files(store.path, Item.STATE)
    store.store(Item.STATE, "after")
    assert temp_files(store.path, Item.STATE) == written


def test_live_writer_leaves_value_alone(store, hung_writer):
    store.store(Item.STATE, "after")
    assert store.load(Item.STATE) == "after"


def test_killed_writer_leaves_temporary_file(store, hung_writer):
    hung_writer.kill()
    assert len(temp_files(store.path, Item.STATE)) == 1


def test_killed_writer_keeps_previous_value(store, hung_writer):
    # Crash: SIGKILL between writing the temporary file and replacing the item.
    hung_writer.kill()
    assert store.load(Item.STATE) == "before"


def test_next_store_removes_stale_temporary_file(store, hung_writer):
    hung_writer.kill()
    store.store(Item.STATE, "after")
    assert temp_files(store.path, Item.STATE) == []


def test_stale_temporary_file_removal_logged(store, hung_writer, caplog):
    hung_writer.kill()
    (stale,) = temp_files(store.path, Item.STATE)
    with caplog.at_level(logging.WARNING, logger="vcstore"):
        store.store(Item.STATE, "after")
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING and record.name.startswith("vcstore")]
    assert [stale in record.getMessage() for record in warnings] == [True]


def test_concurrent_writers_keep_each_others_files(store, peer):
    # Race: a writer's stale-file cleanup meets another writer's new temporary file.
    with Peer() as other:
        peer.send("store_loop", str(store.path), "STATE", 200, "first")
        other.send("store_loop", str(store.path), "STATE", 200, "second")
        done = [peer.reply(), other.reply()]
    assert done == [200, 200]
    assert store.load(Item.STATE) in (["first", 199], ["second", 199])


def test_concurrent_writers_leave_no_temporary_file(store, peer):
    with Peer() as other:
        peer.send("store_loop", str(store.path), "STATE", 100, "first")
        other.send("store_loop", str(store.path), "STATE", 100, "second")
        peer.reply()
        other.reply()
    assert temp_files(store.path, Item.STATE) == []


# ---------------------------------------------------------------------------
# Descriptors


def test_load_and_store_leak_no_descriptor(store):
    store.store(Item.STATE, 0)
    before = fd_count()
    for number in range(50):
        store.store(Item.STATE, number)
        store.load(Item.STATE)
        with pytest.raises(vcstore.ItemNotFoundError):
            store.load(Item.AGENT)
    assert fd_count() == before
