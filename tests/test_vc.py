"""Tests of vcstore.vc, the virtcontainers layout, on real stores under a temporary prefix."""

import contextlib
import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import pytest

import vcstore
from vcstore import Item, vc
from vcstore.filesystem import FilesystemStore
from vcstore.fsio import OsIO

SANDBOX = "sb1"
CONTAINER = "c1"

DATA_ITEMS = [item for item in Item if item is not Item.LOCK]
RUNTIME_ITEMS = [item for item in DATA_ITEMS if item is not Item.CONFIGURATION]

INVALID_IDS = ["", ".", "..", "../x", "a/b", ".hidden", "-x", "a b", "a\0b", "x" * 256, None, 7]

# Every name that the sandbox's store keeps in its own directory: the raw
# directory, the item files and their lock files.
SANDBOX_STORE_NAMES = [
    "raw",
    "lock",
    "config.json",
    "state.json",
    "network.json",
    "hypervisor.json",
    "agent.json",
    "process.json",
    "mounts.json",
    "devices.json",
    "config.json.lock",
    "state.json.lock",
    "network.json.lock",
    "hypervisor.json.lock",
    "agent.json.lock",
    "process.json.lock",
    "mounts.json.lock",
    "devices.json.lock",
]

# Exits 0 if the lock file at argv[1] can be flocked at once with argv[2]
# (LOCK_EX or LOCK_SH) from this separate process, 3 if another holder prevents it.
FLOCK_PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.flock(fd, getattr(fcntl, sys.argv[2]) | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(3)
sys.exit(0)
"""

# Holds an exclusive flock on argv[1], as Kata's tools lock <store>/lock, until stdin closes.
FLOCK_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def root(tmp_path, monkeypatch):
    """Point the layout at a fresh directory for each test, and restore it afterwards."""
    monkeypatch.delenv(vc.PREFIX_ENVIRONMENT_VARIABLE, raising=False)
    root = tmp_path / "root"
    previous = vc.set_prefix(root)
    yield root
    vc.set_prefix(previous)


def can_flock(path, operation: str) -> bool:
    """Return whether another process can take *operation* on *path* without waiting."""
    result = subprocess.run([sys.executable, "-c", FLOCK_PROBE, str(path), operation], timeout=60)
    assert result.returncode in (0, 3), f"probe failed with exit code {result.returncode}"
    return result.returncode == 0


@contextlib.contextmanager
def locked_by_other_process(path):
    """Hold an exclusive flock on *path* from another process for the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", FLOCK_HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        holder.stdout.close()


@contextlib.contextmanager
def undeletable(directory: pathlib.Path):
    """Make the entries of *directory* impossible to remove or rename, for real."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield
        finally:
            directory.chmod(0o750)
        return

    # root ignores permissions, but not the immutable attribute.
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("running as root without chattr: cannot make a directory undeletable")
    result = subprocess.run([chattr, "+i", str(directory)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"chattr +i failed here (no CAP_LINUX_IMMUTABLE?): {result.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(directory)], check=True)


class FailingDeleteIO(OsIO):
    """The real system calls, except that rmdir fails with *error_number*."""

    def __init__(self, error_number: int) -> None:
        self.error_number = error_number

    def rmdir(self, path, *, dir_fd=None):
        raise OSError(self.error_number, os.strerror(self.error_number), path)


# --- The prefix ---------------------------------------------------------------


def test_storage_paths_default():
    vc.set_prefix(None)

    assert vc.config_storage_path() == "/var/lib/vc/sbs"
    assert vc.run_storage_path() == "/run/vc/sbs"
    assert vc.run_vm_storage_path() == "/run/vc/vm"


def test_storage_paths_under_prefix(root):
    assert vc.config_storage_path() == f"{root}/var/lib/vc/sbs"
    assert vc.run_storage_path() == f"{root}/run/vc/sbs"
    assert vc.run_vm_storage_path() == f"{root}/run/vc/vm"


def test_storage_paths_are_str():
    assert type(vc.config_storage_path()) is str
    assert type(vc.run_storage_path()) is str
    assert type(vc.run_vm_storage_path()) is str


def test_prefix_environment_read_at_call_time(tmp_path, monkeypatch):
    vc.set_prefix(None)
    monkeypatch.setenv("VCSTORE_PREFIX", str(tmp_path / "env"))

    assert vc.run_storage_path() == f"{tmp_path}/env/run/vc/sbs"

    monkeypatch.setenv("VCSTORE_PREFIX", str(tmp_path / "other"))

    assert vc.run_storage_path() == f"{tmp_path}/other/run/vc/sbs"


def test_prefix_environment_places_stores(tmp_path, monkeypatch):
    vc.set_prefix(None)
    monkeypatch.setenv("VCSTORE_PREFIX", str(tmp_path / "env"))

    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    assert sandbox.config_store.path == tmp_path / "env/var/lib/vc/sbs" / SANDBOX
    assert sandbox.state_store.path == tmp_path / "env/run/vc/sbs" / SANDBOX
    assert (tmp_path / "env/run/vc/sbs" / SANDBOX).is_dir()


def test_prefix_environment_empty_means_default(monkeypatch):
    vc.set_prefix(None)
    monkeypatch.setenv("VCSTORE_PREFIX", "")

    assert vc.config_storage_path() == "/var/lib/vc/sbs"


def test_prefix_set_wins_over_environment(root, tmp_path, monkeypatch):
    monkeypatch.setenv("VCSTORE_PREFIX", str(tmp_path / "env"))

    assert vc.run_storage_path() == f"{root}/run/vc/sbs"


def test_prefix_set_empty_ignores_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VCSTORE_PREFIX", str(tmp_path / "env"))
    vc.set_prefix("")

    assert vc.run_storage_path() == "/run/vc/sbs"


def test_prefix_none_resets_to_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VCSTORE_PREFIX", str(tmp_path / "env"))
    vc.set_prefix(None)

    assert vc.run_storage_path() == f"{tmp_path}/env/run/vc/sbs"


def test_prefix_none_resets_to_default():
    vc.set_prefix(None)

    assert vc.get_prefix() == ""


def test_set_prefix_returns_previous(root, tmp_path):
    assert vc.set_prefix(tmp_path / "other") == str(root)
    assert vc.set_prefix(None) == f"{tmp_path}/other"
    assert vc.set_prefix(root) is None


def test_prefix_normalised(tmp_path):
    vc.set_prefix(f"{tmp_path}//x/./y/")

    assert vc.get_prefix() == f"{tmp_path}/x/y"


def test_prefix_root_directory_is_default():
    vc.set_prefix("/")

    assert vc.config_storage_path() == "/var/lib/vc/sbs"


@pytest.mark.parametrize("prefix", ["relative", "./x", "~/x", "x/../y"])
def test_prefix_relative_rejected(root, prefix):
    with pytest.raises(vcstore.InvalidUrlError, match="absolute path") as raised:
        vc.set_prefix(prefix)

    assert repr(prefix) in str(raised.value)
    assert vc.get_prefix() == str(root)


def test_prefix_with_nul_rejected():
    with pytest.raises(vcstore.InvalidUrlError, match="NUL"):
        vc.set_prefix("/tmp/a\0b")


def test_prefix_not_a_path_rejected():
    with pytest.raises(TypeError):
        vc.set_prefix(42)


def test_prefix_environment_relative_rejected(monkeypatch):
    vc.set_prefix(None)
    monkeypatch.setenv("VCSTORE_PREFIX", "relative/dir")

    with pytest.raises(vcstore.InvalidUrlError, match="VCSTORE_PREFIX") as raised:
        vc.run_storage_path()

    assert "'relative/dir'" in str(raised.value)


# --- Roots and item paths ---------------------------------------------------------


def test_sandbox_roots(root):
    config = root / "var/lib/vc/sbs" / SANDBOX
    runtime = root / "run/vc/sbs" / SANDBOX

    assert vc.sandbox_configuration_root(SANDBOX) == config.as_uri()
    assert vc.sandbox_configuration_root_path(SANDBOX) == config
    assert vc.sandbox_runtime_root(SANDBOX) == runtime.as_uri()
    assert vc.sandbox_runtime_root_path(SANDBOX) == runtime


def test_container_roots(root):
    config = root / "var/lib/vc/sbs" / SANDBOX / CONTAINER
    runtime = root / "run/vc/sbs" / SANDBOX / CONTAINER

    assert vc.container_configuration_root(SANDBOX, CONTAINER) == config.as_uri()
    assert vc.container_configuration_root_path(SANDBOX, CONTAINER) == config
    assert vc.container_runtime_root(SANDBOX, CONTAINER) == runtime.as_uri()
    assert vc.container_runtime_root_path(SANDBOX, CONTAINER) == runtime


def test_roots_types():
    assert type(vc.sandbox_configuration_root(SANDBOX)) is str
    assert type(vc.sandbox_runtime_root(SANDBOX)) is str
    assert type(vc.container_configuration_root(SANDBOX, CONTAINER)) is str
    assert type(vc.container_runtime_root(SANDBOX, CONTAINER)) is str
    assert isinstance(vc.sandbox_configuration_root_path(SANDBOX), pathlib.Path)
    assert isinstance(vc.sandbox_runtime_root_path(SANDBOX), pathlib.Path)
    assert isinstance(vc.container_configuration_root_path(SANDBOX, CONTAINER), pathlib.Path)
    assert isinstance(vc.container_runtime_root_path(SANDBOX, CONTAINER), pathlib.Path)
    assert isinstance(vc.sandbox_configuration_item_path(SANDBOX, Item.STATE), pathlib.Path)
    assert isinstance(vc.sandbox_runtime_item_path(SANDBOX, Item.STATE), pathlib.Path)


def test_roots_percent_encoded(tmp_path):
    vc.set_prefix(tmp_path / "a b%c")

    root_url = vc.sandbox_runtime_root(SANDBOX)

    assert "/a%20b%25c/" in root_url
    assert " " not in root_url


def test_roots_with_space_survive_open(tmp_path):
    vc.set_prefix(tmp_path / "a b%c")

    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    assert sandbox.state_store.path == vc.sandbox_runtime_root_path(SANDBOX)
    assert sandbox.state_store.url == vc.sandbox_runtime_root(SANDBOX)
    assert sandbox.config_store.path == vc.sandbox_configuration_root_path(SANDBOX)
    assert (tmp_path / "a b%c/run/vc/sbs" / SANDBOX).is_dir()


ROOT_FUNCTIONS = [
    vc.sandbox_configuration_root,
    vc.sandbox_configuration_root_path,
    vc.sandbox_runtime_root,
    vc.sandbox_runtime_root_path,
    vc.sandbox_exists,
    lambda s: vc.sandbox_configuration_item_path(s, Item.STATE),
    lambda s: vc.sandbox_runtime_item_path(s, Item.STATE),
    lambda s: vc.container_configuration_root(s, CONTAINER),
    lambda s: vc.container_configuration_root_path(s, CONTAINER),
    lambda s: vc.container_runtime_root(s, CONTAINER),
    lambda s: vc.container_runtime_root_path(s, CONTAINER),
    lambda s: vc.VCStore.for_sandbox(s),
    lambda s: vc.VCStore.for_container(s, CONTAINER),
]

CONTAINER_FUNCTIONS = [
    vc.container_configuration_root,
    vc.container_configuration_root_path,
    vc.container_runtime_root,
    vc.container_runtime_root_path,
    vc.VCStore.for_container,
]


@pytest.mark.parametrize("bad_id", INVALID_IDS)
@pytest.mark.parametrize("function", ROOT_FUNCTIONS)
def test_sandbox_id_invalid(function, bad_id):
    with pytest.raises(vcstore.InvalidIdError):
        function(bad_id)


@pytest.mark.parametrize("bad_id", INVALID_IDS)
@pytest.mark.parametrize("function", CONTAINER_FUNCTIONS)
def test_container_id_invalid(function, bad_id):
    with pytest.raises(vcstore.InvalidIdError):
        function(SANDBOX, bad_id)


@pytest.mark.parametrize("name", SANDBOX_STORE_NAMES)
@pytest.mark.parametrize("function", CONTAINER_FUNCTIONS)
def test_container_id_sandbox_store_name(function, name):
    with pytest.raises(vcstore.InvalidIdError) as raised:
        function(SANDBOX, name)

    assert repr(name) in str(raised.value)


def test_invalid_id_message_names_value():
    with pytest.raises(vcstore.InvalidIdError) as raised:
        vc.sandbox_runtime_root("../escape")

    assert "'../escape'" in str(raised.value)


def test_invalid_container_creates_nothing(root):
    with pytest.raises(vcstore.InvalidIdError):
        vc.VCStore.for_container(SANDBOX, "raw")

    assert not root.exists()


def test_sandbox_id_may_match_store_name():
    assert vc.sandbox_runtime_root_path("raw").name == "raw"


def test_id_of_255_characters_accepted():
    long_id = "x" * 255

    sandbox = vc.VCStore.for_container(long_id, long_id)

    assert sandbox.state_store.path.name == long_id


@pytest.mark.parametrize("item", list(Item))
def test_item_paths(item):
    config_path = vc.sandbox_configuration_item_path(SANDBOX, item)
    runtime_path = vc.sandbox_runtime_item_path(SANDBOX, item)

    assert config_path == vc.sandbox_configuration_root_path(SANDBOX) / item.file_name
    assert runtime_path == vc.sandbox_runtime_root_path(SANDBOX) / item.file_name


@pytest.mark.parametrize("not_item", ["state", "state.json", Item.STATE.value, None, 1])
@pytest.mark.parametrize(
    "function", [vc.sandbox_configuration_item_path, vc.sandbox_runtime_item_path]
)
def test_item_path_not_item(function, not_item):
    with pytest.raises(vcstore.UnknownItemError):
        function(SANDBOX, not_item)


def test_item_paths_are_store_files():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    sandbox.store(Item.CONFIGURATION, {"hypervisor": "qemu"})
    sandbox.store(Item.STATE, {"state": "ready"})

    config_file = vc.sandbox_configuration_item_path(SANDBOX, Item.CONFIGURATION)
    state_file = vc.sandbox_runtime_item_path(SANDBOX, Item.STATE)
    assert json.loads(config_file.read_text()) == {"hypervisor": "qemu"}
    assert json.loads(state_file.read_text()) == {"state": "ready"}


def test_lock_item_path_is_store_lock_file():
    vc.VCStore.for_sandbox(SANDBOX)

    assert vc.sandbox_runtime_item_path(SANDBOX, Item.LOCK).is_file()
    assert vc.sandbox_configuration_item_path(SANDBOX, Item.LOCK).is_file()


# --- sandbox_exists and create=False ------------------------------------------------


def test_sandbox_exists_false_creates_nothing(root):
    assert vc.sandbox_exists(SANDBOX) is False
    assert not root.exists()


def test_sandbox_exists_after_for_sandbox():
    vc.VCStore.for_sandbox(SANDBOX)

    assert vc.sandbox_exists(SANDBOX) is True


def test_sandbox_exists_configuration_only():
    vc.sandbox_configuration_root_path(SANDBOX).mkdir(parents=True)

    assert vc.sandbox_exists(SANDBOX) is True


def test_sandbox_exists_runtime_only():
    vc.sandbox_runtime_root_path(SANDBOX).mkdir(parents=True)

    assert vc.sandbox_exists(SANDBOX) is True


def test_sandbox_exists_other_sandbox():
    vc.VCStore.for_sandbox(SANDBOX)

    assert vc.sandbox_exists("sb2") is False


def test_sandbox_exists_after_delete():
    vc.VCStore.for_sandbox(SANDBOX).delete()

    assert vc.sandbox_exists(SANDBOX) is False


def test_for_sandbox_creates_both_directories():
    vc.VCStore.for_sandbox(SANDBOX)

    assert vc.sandbox_configuration_root_path(SANDBOX).is_dir()
    assert vc.sandbox_runtime_root_path(SANDBOX).is_dir()


def test_for_sandbox_missing_without_create(root):
    with pytest.raises(vcstore.StoreNotFoundError):
        vc.VCStore.for_sandbox(SANDBOX, create=False)

    assert not vc.sandbox_configuration_root_path(SANDBOX).exists()
    assert not vc.sandbox_runtime_root_path(SANDBOX).exists()


def test_for_sandbox_runtime_missing_without_create():
    vc.sandbox_configuration_root_path(SANDBOX).mkdir(parents=True)

    with pytest.raises(vcstore.StoreNotFoundError):
        vc.VCStore.for_sandbox(SANDBOX, create=False)

    assert not vc.sandbox_runtime_root_path(SANDBOX).exists()


def test_for_sandbox_configuration_missing_without_create():
    vc.sandbox_runtime_root_path(SANDBOX).mkdir(parents=True)

    with pytest.raises(vcstore.StoreNotFoundError):
        vc.VCStore.for_sandbox(SANDBOX, create=False)

    assert not vc.sandbox_configuration_root_path(SANDBOX).exists()


def test_for_sandbox_without_create_completes_existing():
    vc.sandbox_configuration_root_path(SANDBOX).mkdir(parents=True)
    vc.sandbox_runtime_root_path(SANDBOX).mkdir(parents=True)

    vc.VCStore.for_sandbox(SANDBOX, create=False)

    assert (vc.sandbox_runtime_root_path(SANDBOX) / "lock").is_file()
    assert (vc.sandbox_runtime_root_path(SANDBOX) / "raw").is_dir()
    assert (vc.sandbox_configuration_root_path(SANDBOX) / "lock").is_file()


def test_for_sandbox_without_create_opens_existing():
    created = vc.VCStore.for_sandbox(SANDBOX)
    created.store(Item.STATE, {"state": "ready"})

    opened = vc.VCStore.for_sandbox(SANDBOX, create=False)

    assert opened.load(Item.STATE) == {"state": "ready"}


def test_for_container_missing_without_create():
    vc.VCStore.for_sandbox(SANDBOX)

    with pytest.raises(vcstore.StoreNotFoundError):
        vc.VCStore.for_container(SANDBOX, CONTAINER, create=False)

    assert not vc.container_configuration_root_path(SANDBOX, CONTAINER).exists()
    assert not vc.container_runtime_root_path(SANDBOX, CONTAINER).exists()


# --- VCStore: routing and raw files ------------------------------------------------------


def test_vcstore_stores_are_registry_objects():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    assert sandbox.config_store is vcstore.open(vc.sandbox_configuration_root(SANDBOX))
    assert sandbox.state_store is vcstore.open(vc.sandbox_runtime_root(SANDBOX))


def test_vcstore_from_urls():
    config_url = vc.sandbox_configuration_root(SANDBOX)
    state_url = vc.sandbox_runtime_root(SANDBOX)

    sandbox = vc.VCStore(config_url, state_url)

    assert sandbox.config_store.url == config_url
    assert sandbox.state_store.url == state_url


def test_vcstore_from_store_objects(tmp_path):
    config_store = FilesystemStore(tmp_path / "config")
    state_store = FilesystemStore(tmp_path / "state")

    pair = vc.VCStore(config_store, state_store)

    assert pair.config_store is config_store
    assert pair.state_store is state_store


def test_vcstore_repr_names_urls():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    assert vc.sandbox_runtime_root(SANDBOX) in repr(sandbox)
    assert vc.sandbox_configuration_root(SANDBOX) in repr(sandbox)


def test_vcstore_configuration_in_config_store():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    sandbox.store(Item.CONFIGURATION, {"hypervisor": "qemu"})

    assert vc.sandbox_configuration_item_path(SANDBOX, Item.CONFIGURATION).is_file()
    assert not vc.sandbox_runtime_item_path(SANDBOX, Item.CONFIGURATION).exists()
    assert sandbox.config_store.load(Item.CONFIGURATION) == {"hypervisor": "qemu"}


@pytest.mark.parametrize("item", RUNTIME_ITEMS)
def test_vcstore_item_in_runtime_store(item):
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    sandbox.store(item, [item.name])

    assert vc.sandbox_runtime_item_path(SANDBOX, item).is_file()
    assert not vc.sandbox_configuration_item_path(SANDBOX, item).exists()
    assert sandbox.state_store.load(item) == [item.name]


@pytest.mark.parametrize("item", DATA_ITEMS)
def test_vcstore_load_round_trip(item):
    vc.VCStore.for_sandbox(SANDBOX).store(item, {"item": item.name})

    reopened = vc.VCStore.for_sandbox(SANDBOX, create=False)

    assert reopened.load(item) == {"item": item.name}


def test_vcstore_load_reads_configuration_store():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    sandbox.config_store.store(Item.CONFIGURATION, "from config")
    sandbox.state_store.store(Item.CONFIGURATION, "from state")

    assert sandbox.load(Item.CONFIGURATION) == "from config"


def test_vcstore_load_reads_runtime_store():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    sandbox.config_store.store(Item.STATE, "from config")
    sandbox.state_store.store(Item.STATE, "from state")

    assert sandbox.load(Item.STATE) == "from state"


def test_vcstore_load_missing_item():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    with pytest.raises(vcstore.ItemNotFoundError):
        sandbox.load(Item.CONFIGURATION)


def test_vcstore_lock_item_holds_no_data():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    with pytest.raises(vcstore.StoreError) as raised:
        sandbox.store(Item.LOCK, {})

    assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize("not_item", ["state", "config.json", None])
def test_vcstore_not_item(not_item):
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    with pytest.raises(vcstore.UnknownItemError):
        sandbox.store(not_item, {})
    with pytest.raises(vcstore.UnknownItemError):
        sandbox.load(not_item)


def test_vcstore_raw_in_runtime_store():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    url = sandbox.raw("disk0")

    assert url == vc.sandbox_runtime_root(SANDBOX) + "/raw/disk0"
    assert (vc.sandbox_runtime_root_path(SANDBOX) / "raw/disk0").is_file()
    assert not (vc.sandbox_configuration_root_path(SANDBOX) / "raw/disk0").exists()


def test_vcstore_raw_without_id_unique():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    first = sandbox.raw()
    second = sandbox.raw()

    assert first != second
    assert first.startswith(vc.sandbox_runtime_root(SANDBOX) + "/raw/")


def test_vcstore_raw_invalid_id():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    with pytest.raises(vcstore.InvalidIdError):
        sandbox.raw("../escape")


def test_container_stores_inside_sandbox_directories():
    container = vc.VCStore.for_container(SANDBOX, CONTAINER)

    container.store(Item.PROCESS, {"pid": 42})

    process_file = vc.sandbox_runtime_root_path(SANDBOX) / CONTAINER / "process.json"
    assert json.loads(process_file.read_text()) == {"pid": 42}
    assert container.config_store.path == vc.container_configuration_root_path(SANDBOX, CONTAINER)


def test_container_and_sandbox_items_separate():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    container = vc.VCStore.for_container(SANDBOX, CONTAINER)

    sandbox.store(Item.STATE, "sandbox")
    container.store(Item.STATE, "container")

    assert sandbox.load(Item.STATE) == "sandbox"
    assert container.load(Item.STATE) == "container"


# --- VCStore: locks, checked from other processes -----------------------------------------


def test_lock_excludes_other_process():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    lock_file = sandbox.state_store.path / "lock"

    token = sandbox.lock()
    try:
        assert not can_flock(lock_file, "LOCK_EX")
        assert not can_flock(lock_file, "LOCK_SH")
    finally:
        sandbox.unlock(token)


def test_unlock_frees_lock_for_other_process():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    lock_file = sandbox.state_store.path / "lock"

    sandbox.unlock(sandbox.lock())

    assert can_flock(lock_file, "LOCK_EX")


def test_rlock_shared_with_other_process():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    lock_file = sandbox.state_store.path / "lock"

    token = sandbox.rlock()
    try:
        assert can_flock(lock_file, "LOCK_SH")
        assert not can_flock(lock_file, "LOCK_EX")
    finally:
        sandbox.unlock(token)


def test_rlock_tokens_coexist():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    first = sandbox.rlock(timeout=0)
    second = sandbox.rlock(timeout=0)

    assert first != second
    sandbox.unlock(first)
    sandbox.unlock(second)


def test_lock_leaves_configuration_store_free():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    token = sandbox.lock()
    try:
        assert can_flock(sandbox.config_store.path / "lock", "LOCK_EX")
    finally:
        sandbox.unlock(token)


def test_container_lock_in_container_runtime_store():
    vc.VCStore.for_sandbox(SANDBOX)
    container = vc.VCStore.for_container(SANDBOX, CONTAINER)

    token = container.lock()
    try:
        assert not can_flock(vc.container_runtime_root_path(SANDBOX, CONTAINER) / "lock", "LOCK_EX")
        assert can_flock(vc.sandbox_runtime_root_path(SANDBOX) / "lock", "LOCK_EX")
    finally:
        container.unlock(token)


def test_lock_times_out_on_other_process():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    with locked_by_other_process(sandbox.state_store.path / "lock"):
        with pytest.raises(vcstore.LockTimeoutError):
            sandbox.lock(timeout=0)
        with pytest.raises(vcstore.LockTimeoutError):
            sandbox.rlock(timeout=0.05)


def test_lock_waits_for_other_process():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    tokens = []

    with locked_by_other_process(sandbox.state_store.path / "lock"):
        waiter = threading.Thread(target=lambda: tokens.append(sandbox.lock()))
        waiter.start()
        waiter.join(timeout=0.5)
        # Still blocked while the other process holds the lock.
        assert waiter.is_alive()

    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert len(tokens) == 1
    sandbox.unlock(tokens[0])


def test_lock_negative_timeout():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    with pytest.raises(ValueError):
        sandbox.lock(timeout=-1)


def test_unlock_unknown_token():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    with pytest.raises(vcstore.UnknownTokenError):
        sandbox.unlock("not-a-token")


def test_unlock_twice():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    token = sandbox.lock()
    sandbox.unlock(token)

    with pytest.raises(vcstore.UnknownTokenError):
        sandbox.unlock(token)


def test_unlock_token_of_other_sandbox():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    other = vc.VCStore.for_sandbox("sb2")
    token = other.lock()
    try:
        with pytest.raises(vcstore.UnknownTokenError):
            sandbox.unlock(token)
    finally:
        other.unlock(token)


def test_locked_releases_after_block():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    lock_file = sandbox.state_store.path / "lock"

    with sandbox.locked(exclusive=True, timeout=5.0):
        assert not can_flock(lock_file, "LOCK_SH")

    assert can_flock(lock_file, "LOCK_EX")


def test_locked_shared():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)

    with sandbox.locked(exclusive=False):
        assert can_flock(sandbox.state_store.path / "lock", "LOCK_SH")


# --- VCStore: delete ----------------------------------------------------------------------


def test_delete_removes_both_stores():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    sandbox.store(Item.CONFIGURATION, {})
    sandbox.store(Item.STATE, {})

    sandbox.delete()

    assert not vc.sandbox_configuration_root_path(SANDBOX).exists()
    assert not vc.sandbox_runtime_root_path(SANDBOX).exists()


def test_delete_removes_containers():
    vc.VCStore.for_container(SANDBOX, CONTAINER).store(Item.STATE, {})

    vc.VCStore.for_sandbox(SANDBOX).delete()

    assert not vc.container_runtime_root_path(SANDBOX, CONTAINER).exists()


def test_delete_twice():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    sandbox.delete()

    sandbox.delete()

    assert not vc.sandbox_exists(SANDBOX)


def test_delete_releases_lock():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    token = sandbox.lock()

    sandbox.delete()

    with pytest.raises(vcstore.UnknownTokenError):
        sandbox.unlock(token)


def test_deleted_sandbox_reopens_empty():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    sandbox.store(Item.STATE, "old")
    sandbox.delete()

    reopened = vc.VCStore.for_sandbox(SANDBOX)

    with pytest.raises(vcstore.ItemNotFoundError):
        reopened.load(Item.STATE)


def test_delete_configuration_failure_still_deletes_runtime():
    sandbox = vc.VCStore.for_sandbox(SANDBOX)
    sandbox.store(Item.CONFIGURATION, {})
    config_dir = vc.sandbox_configuration_root_path(SANDBOX)

    with undeletable(config_dir):
        with pytest.raises(OSError) as raised:
            sandbox.delete()

    # Only the configuration store failed, so the error raised must be its own.
    assert raised.value.errno in (errno.EPERM, errno.EACCES)
    assert config_dir.is_dir()
    assert not vc.sandbox_runtime_root_path(SANDBOX).exists()


def test_delete_first_failure_through_seam(tmp_path):
    config_store = FilesystemStore(tmp_path / "config", io=FailingDeleteIO(errno.EBUSY))
    state_store = FilesystemStore(tmp_path / "state")
    pair = vc.VCStore(config_store, state_store)

    with pytest.raises(OSError) as raised:
        pair.delete()

    assert raised.value.errno == errno.EBUSY
    assert not (tmp_path / "state").exists()


def test_delete_second_failure_raised(tmp_path):
    config_store = FilesystemStore(tmp_path / "config")
    state_store = FilesystemStore(tmp_path / "state", io=FailingDeleteIO(errno.EIO))
    pair = vc.VCStore(config_store, state_store)

    with pytest.raises(OSError) as raised:
        pair.delete()

    assert raised.value.errno == errno.EIO
    assert not (tmp_path / "config").exists()


def test_delete_both_failing_raises_first(tmp_path, caplog):
    config_store = FilesystemStore(tmp_path / "config", io=FailingDeleteIO(errno.EBUSY))
    state_store = FilesystemStore(tmp_path / "state", io=FailingDeleteIO(errno.EIO))
    pair = vc.VCStore(config_store, state_store)

    with pytest.raises(OSError) as raised:
        pair.delete()

    assert raised.value.errno == errno.EBUSY
    assert state_store.url in caplog.text


def test_delete_id_of_255_characters():
    long_id = "x" * 255
    sandbox = vc.VCStore.for_sandbox(long_id)

    sandbox.delete()

    assert not vc.sandbox_exists(long_id)
