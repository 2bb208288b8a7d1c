"""Modes under every umask, the umask left alone, unprivileged users, tmpfs and /tmp.

Directories a store creates are never more open than 0750 and files never more
open than 0640, whatever the umask (which may narrow them), and no call
changes the process umask, even for a moment. A subset runs as the
unprivileged user ``nobody`` through setpriv(1), and on tmpfs (/dev/shm) and
the default temporary directory.
"""

import functools
import grp
import json
import os
import pwd
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import pytest

import vcstore
from vcstore import Item
from vcstore.filesystem import FilesystemStore
from vcstore.fsio import OsIO
from helpers import Peer, current_umask, temp_files
from reliability.helpers import file_mode, run_python

pytestmark = [pytest.mark.reliability, pytest.mark.permissions]

UMASKS = [0o000, 0o002, 0o022, 0o027, 0o077]
DIRECTORY_LIMIT = 0o750
FILE_LIMIT = 0o640


class CreatedModesIO(OsIO):
    """The real I/O seam, noting the mode of each file or directory as it is created.

    A temporary file lives only while `store` runs, so its mode is read here,
    right after the open that created it.
    """

    def __init__(self):
        super().__init__()
        self.created = {}

    def open(self, path, flags, mode=0o777, *, dir_fd=None):
        fd = super().open(path, flags, mode, dir_fd=dir_fd)
        if flags & os.O_CREAT:
            self.created[os.readlink(f"/proc/self/fd/{fd}")] = stat.S_IMODE(os.fstat(fd).st_mode)
        return fd

    def mkdir(self, path, mode=0o777, *, dir_fd=None):
        super().mkdir(path, mode, dir_fd=dir_fd)
        where = os.path.join(f"/proc/self/fd/{dir_fd}", path) if dir_fd is not None else path
        self.created[os.path.realpath(where)] = stat.S_IMODE(os.stat(where).st_mode)


def exercise(path, seam=None):
    """Create a store at *path* and every kind of file it makes: items, lock files, raw files."""
    store = FilesystemStore(path, io=seam)
    store.store(Item.STATE, {"value": 1})
    store.store(Item.STATE, {"value": 2})
    store.store(Item.NETWORK, [])
    for item in (Item.LOCK, Item.STATE, Item.AGENT):
        store.item_unlock(item, store.item_lock(item, exclusive=False))
    store.raw("disk0")
    store.raw()
    return store


def modes_under(root) -> dict:
    """Return ``{path: (is directory, mode)}`` for every entry under *root*, root included."""
    found = {}
    for directory, dirnames, filenames in os.walk(root):
        found[directory] = (True, file_mode(directory))
        for name in filenames:
            path = os.path.join(directory, name)
            found[path] = (False, file_mode(path))
    return found


@pytest.fixture(params=UMASKS, ids=lambda umask: f"umask-{umask:03o}")
def umask_run(request, tmp_path, monkeypatch):
    """Run `exercise` under one umask; return what it created and the umask calls seen."""
    umask_calls = []
    real_umask = os.umask

    def watched_umask(mask):
        umask_calls.append(mask)
        return real_umask(mask)

    previous = real_umask(request.param)
    try:
        before = current_umask()
        monkeypatch.setattr(os, "umask", watched_umask)
        seam = CreatedModesIO()
        store = exercise(tmp_path / "parent" / "store", seam)
        after = current_umask()
        monkeypatch.setattr(os, "umask", real_umask)
    finally:
        real_umask(previous)
    yield {
        "tree": modes_under(tmp_path / "parent"),
        "created": seam.created,
        "umask before": before,
        "umask after": after,
        "umask calls": umask_calls,
    }
    store.delete()


def test_directories_at_most_0750(umask_run):
    too_open = {path: oct(mode) for path, (is_dir, mode) in umask_run["tree"].items() if is_dir and mode & ~DIRECTORY_LIMIT}
    assert too_open == {}


def test_files_at_most_0640(umask_run):
    too_open = {path: oct(mode) for path, (is_dir, mode) in umask_run["tree"].items() if not is_dir and mode & ~FILE_LIMIT}
    assert too_open == {}


def test_created_entries_at_most_limits(umask_run):
    # Temporary files included: they exist only while store runs.
    too_open = {
        path: oct(mode)
        for path, mode in umask_run["created"].items()
        if mode & ~(DIRECTORY_LIMIT if os.path.isdir(path) else FILE_LIMIT)
    }
    assert too_open == {}


def test_temporary_files_seen(umask_run):
    # Otherwise the check above would not have covered them.
    assert any(path.endswith(".tmp") for path in umask_run["created"])


def test_umask_unchanged(umask_run):
    assert umask_run["umask after"] == umask_run["umask before"]


def test_umask_never_set(umask_run):
    # Setting it and back is a race with every other thread that creates files.
    assert umask_run["umask calls"] == []


# ---------------------------------------------------------------------------
# As an unprivileged user

SETPRIV = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]

UNPRIVILEGED_SCRIPT = """
import json, os, stat, sys
import vcstore
from vcstore import Item

path = sys.argv[1]
store = vcstore.open(path)
store.store(Item.STATE, {"user": os.getuid()})
value = store.load(Item.STATE)
token = store.item_lock(Item.LOCK, exclusive=True, timeout=5)
try:
    store.item_lock(Item.LOCK, exclusive=True, timeout=0)
    second = "locked twice"
except vcstore.LockTimeoutError:
    second = "LockTimeoutError"
store.item_unlock(Item.LOCK, token)
raw = store.raw("disk0")
entries = {}
for directory, dirnames, filenames in os.walk(path):
    for name in [directory, *(os.path.join(directory, n) for n in filenames)]:
        info = os.lstat(name)
        entries[name] = [info.st_uid, stat.S_IMODE(info.st_mode), stat.S_ISDIR(info.st_mode)]
store.delete()
print(json.dumps({"uid": os.getuid(), "value": value, "second": second, "raw": raw,
                  "entries": entries, "deleted": not os.path.exists(path)}))
"""

DENIED_SCRIPT = """
import json, sys
import vcstore
from vcstore import Item
try:
    vcstore.open(sys.argv[1]).load(Item.STATE)
    print(json.dumps({"error": None}))
except Exception as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
"""


def _nobody():
    try:
        return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    except KeyError:
        return None


@functools.lru_cache(maxsize=None)
def unprivileged_reason():
    """Return why the unprivileged tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to switch to the user nobody (the whole suite already runs unprivileged)"
    if shutil.which("setpriv") is None:
        return "setpriv(1) is not installed"
    if _nobody() is None:
        return "there is no user nobody or group nogroup"
    probe = run_python("import vcstore", prefix=SETPRIV)
    if probe.returncode != 0:
        return f"the user nobody cannot import vcstore with {sys.executable}: {probe.stderr.strip()[-200:]}"
    return None


needs_setpriv = pytest.mark.skipif(unprivileged_reason() is not None, reason=str(unprivileged_reason()))


@pytest.fixture
def nobody_dir():
    """A directory in /tmp owned by nobody (pytest's tmp_path is closed to other users)."""
    uid, gid = _nobody()
    path = tempfile.mkdtemp(prefix="vcstore-nobody-", dir="/tmp")
    os.chown(path, uid, gid)
    yield Path(path)
    shutil.rmtree(path)


@pytest.fixture
def nobody_report(nobody_dir):
    completed = run_python(UNPRIVILEGED_SCRIPT, nobody_dir / "sbs" / "abc", prefix=SETPRIV)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@needs_setpriv
def test_unprivileged_user_runs_store(nobody_report):
    assert nobody_report["uid"] == _nobody()[0]
    assert nobody_report["value"] == {"user": _nobody()[0]}


@needs_setpriv
def test_unprivileged_lock_excludes(nobody_report):
    assert nobody_report["second"] == "LockTimeoutError"


@needs_setpriv
def test_unprivileged_files_owned_by_user(nobody_report):
    owners = {entry[0] for entry in nobody_report["entries"].values()}
    assert owners == {_nobody()[0]}


@needs_setpriv
def test_unprivileged_modes_within_limits(nobody_report):
    too_open = {
        path: oct(mode)
        for path, (_, mode, is_dir) in nobody_report["entries"].items()
        if mode & ~(DIRECTORY_LIMIT if is_dir else FILE_LIMIT)
    }
    assert too_open == {}


@needs_setpriv
def test_unprivileged_delete_removes_store(nobody_report):
    assert nobody_report["deleted"]


@pytest.fixture
def root_store():
    """A store made by root in a directory every user may enter."""
    parent = tempfile.mkdtemp(prefix="vcstore-root-", dir="/tmp")
    os.chmod(parent, 0o755)
    store = vcstore.open(Path(parent) / "store")
    store.store(Item.STATE, {"secret": "root only"})
    yield store
    store.delete()
    shutil.rmtree(parent)


@needs_setpriv
def test_root_store_closed_to_other_users(root_store):
    # 0750 and 0640 with root's group: another user can neither read nor lock it.
    completed = run_python(DENIED_SCRIPT, root_store.path, prefix=SETPRIV)
    assert json.loads(completed.stdout)["error"] == "PermissionError", completed.stdout + completed.stderr


@needs_setpriv
def test_permission_error_names_path(root_store):
    completed = run_python(DENIED_SCRIPT, root_store.path, prefix=SETPRIV)
    assert str(root_store.path) in json.loads(completed.stdout)["message"]


@needs_setpriv
def test_root_store_left_unchanged_by_other_user(root_store):
    before = sorted(os.listdir(root_store.path))
    run_python(DENIED_SCRIPT, root_store.path, prefix=SETPRIV)
    assert sorted(os.listdir(root_store.path)) == before


# ---------------------------------------------------------------------------
# On tmpfs and on the default temporary directory


def _filesystem_type(path) -> str:
    """Return the type of the file system mounted at or above *path*, from /proc/mounts."""
    best, kind = "", "unknown"
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            mount_point = fields[1]
            if os.fspath(path).startswith(mount_point.rstrip("/") + "/") or os.fspath(path) == mount_point:
                if len(mount_point) > len(best):
                    best, kind = mount_point, fields[2]
    return kind


def _base_directories():
    bases = [pytest.param(tempfile.gettempdir(), id="tmpdir")]
    shm = "/dev/shm"
    marks = []
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK):
        marks.append(pytest.mark.skip(reason="/dev/shm is missing or not writable"))
    elif _filesystem_type(shm) != "tmpfs":
        marks.append(pytest.mark.skip(reason=f"/dev/shm is {_filesystem_type(shm)}, not tmpfs"))
    bases.append(pytest.param(shm, id="tmpfs", marks=marks))
    return bases


@pytest.fixture(params=_base_directories())
def base_store(request):
    parent = tempfile.mkdtemp(prefix="vcstore-fs-", dir=request.param)
    store = vcstore.open(Path(parent) / "store")
    yield store
    store.delete()
    shutil.rmtree(parent)


def test_round_trip_on_filesystem(base_store):
    base_store.store(Item.STATE, {"state": "running"})
    assert base_store.load(Item.STATE) == {"state": "running"}


def test_lock_excludes_other_process_on_filesystem(base_store):
    base_store.item_lock(Item.LOCK, exclusive=True)
    with Peer() as peer:
        assert peer.probe(base_store.path, "LOCK") == "exclusive"


def test_dead_writer_file_removed_on_filesystem(base_store):
    # Crash: a writer killed inside store, its temporary file left behind.
    base_store.store(Item.STATE, "before")
    with Peer() as writer:
        assert writer.call("store_hanging", str(base_store.path), "STATE", "lost") == "in fsync"
        writer.kill()
    base_store.store(Item.STATE, "after")
    assert temp_files(base_store.path, Item.STATE) == []


def test_modes_on_filesystem(base_store):
    base_store.store(Item.STATE, 1)
    base_store.raw("disk0")
    tree = modes_under(base_store.path)
    too_open = {path: oct(mode) for path, (is_dir, mode) in tree.items() if mode & ~(DIRECTORY_LIMIT if is_dir else FILE_LIMIT)}
    assert too_open == {}
