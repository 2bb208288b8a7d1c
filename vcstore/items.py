"""The items a store keeps, and the names of their files."""

import enum


class Item(enum.Enum):
    """An item of a store: a JSON file, or for LOCK the store's lock file.

    ``Item.X.file_name`` is the file's name inside the store's directory.
    DEVICES and DEVICE_IDS share ``devices.json`` (and so share a lock), as in
    Kata: the first is used in sandbox stores, the second in container stores.
    """

    CONFIGURATION = "configuration"
    STATE = "state"
    NETWORK = "network"
    HYPERVISOR = "hypervisor"
    AGENT = "agent"
    PROCESS = "process"
    LOCK = "lock"
    MOUNTS = "mounts"
    DEVICES = "devices"
    DEVICE_IDS = "device_ids"

    @property
    def file_name(self) -> str:
        return _FILE_NAMES[self]

    @property
    def lock_name(self) -> str:
        """Name of the file that `item_lock` locks for this item.

        LOCK locks ``lock`` itself, the path Kata used, so older tools that lock
        ``<store>/lock`` interoperate. Every other item locks ``<file>.lock``:
        the data file is replaced by each store, so a lock on it would not hold.
        """
        if self is Item.LOCK:
            return self.file_name
        return self.file_name + ".lock"

    def __repr__(self) -> str:
        return f"Item.{self.name}"


_FILE_NAMES = {
    Item.CONFIGURATION: "config.json",
    Item.STATE: "state.json",
    Item.NETWORK: "network.json",
    Item.HYPERVISOR: "hypervisor.json",
    Item.AGENT: "agent.json",
    Item.PROCESS: "process.json",
    Item.LOCK: "lock",
    Item.MOUNTS: "mounts.json",
    Item.DEVICES: "devices.json",
    Item.DEVICE_IDS: "devices.json",
}
