"""The items a store keeps, and the names of their files."""

import enum


class Item(enum.Enum):
    """An item of a store: a JSON file, or for LOCK the store's lock file.

    ``Item.X.file_name`` is the file's name inside the store's directory, and
    ``Item.X.lock_name`` the name of the file that `item_lock` locks for it.
    DEVICES and DEVICE_IDS share ``devices.json`` (and so share a lock), as in
    Kata: the first is used in sandbox stores, the second in container stores.
    """

    CONFIGURATION = ("configuration", "config.json")
    STATE = ("state", "state.json")
    NETWORK = ("network", "network.json")
    HYPERVISOR = ("hypervisor", "hypervisor.json")
    AGENT = ("agent", "agent.json")
    PROCESS = ("process", "process.json")
    LOCK = ("lock", "lock")
    MOUNTS = ("mounts", "mounts.json")
    DEVICES = ("devices", "devices.json")
    DEVICE_IDS = ("device_ids", "devices.json")

    def __init__(self, key: str, file_name: str) -> None:
        # Plain attributes, not properties: they are read on every lock and store.
        self.file_name = file_name

        # LOCK locks ``lock`` itself, the path Kata used, so older tools that lock
        # ``<store>/lock`` interoperate. Every other item locks ``<file>.lock``:
        # the data file is replaced by each store, so a lock on it would not hold.
        self.lock_name = file_name if key == "lock" else file_name + ".lock"

    def __repr__(self) -> str:
        return f"Item.{self.name}"
