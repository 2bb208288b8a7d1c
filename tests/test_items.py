"""Items: the members of `vcstore.Item`, in order, and the files they name."""

import enum

import pytest

from vcstore import Item

FILES = [
    ("CONFIGURATION", "config.json"),
    ("STATE", "state.json"),
    ("NETWORK", "network.json"),
    ("HYPERVISOR", "hypervisor.json"),
    ("AGENT", "agent.json"),
    ("PROCESS", "process.json"),
    ("LOCK", "lock"),
    ("MOUNTS", "mounts.json"),
    ("DEVICES", "devices.json"),
    ("DEVICE_IDS", "devices.json"),
]


def test_item_is_enum():
    assert issubclass(Item, enum.Enum)


def test_item_members_in_order():
    assert [member.name for member in Item] == [name for name, _ in FILES]


@pytest.mark.parametrize(("name", "file_name"), FILES)
def test_item_file_name(name, file_name):
    assert Item[name].file_name == file_name


def test_devices_and_device_ids_share_file():
    assert Item.DEVICES.file_name == Item.DEVICE_IDS.file_name


def test_devices_and_device_ids_distinct_members():
    # Equal enum values would make DEVICE_IDS an alias that iteration skips.
    assert Item.DEVICES is not Item.DEVICE_IDS


def test_lock_item_lock_name_is_lock():
    # Older tools lock <store>/lock, so LOCK must keep that exact name.
    assert Item.LOCK.lock_name == "lock"


@pytest.mark.parametrize("item", [item for item in Item if item is not Item.LOCK], ids=lambda item: item.name)
def test_item_lock_name_is_file_plus_lock(item):
    assert item.lock_name == item.file_name + ".lock"


def test_lock_names_never_name_data_files():
    data_files = {item.file_name for item in Item if item is not Item.LOCK}
    assert not data_files & {item.lock_name for item in Item}
