"""Helpers for the reliability tests: step-counting I/O seams, planted files, bounded calls.

They build on the core tests' `helpers` (peers, forks, snapshots) and import only
the standard library and `vcstore`, so that a child process imports them quickly.
"""

import ctypes
import dataclasses
import fcntl
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vcstore
from vcstore.fsio import OsIO

from helpers import SEAM_METHODS, StillBlocked, fds_open_on, run_in_thread

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_DIR = os.path.dirname(TESTS_DIR)

# VCSTORE_LONG=1 runs the load tests for the durations a release check needs;
# by default they run briefly so that CI stays fast.
LONG = os.environ.get("VCSTORE_LONG", "") not in ("", "0")
THREAD_LOAD_SECONDS = 10.0 if LONG else 2.0
PROCESS_LOAD_SECONDS = 30.0 if LONG else 3.0

# How long a call on a local file system may take before a test calls it hung.
# It bounds a hang and is never asserted as a duration.
HANG_SECONDS = 2.0


# ---------------------------------------------------------------------------
# An I/O seam that acts at its N-th call

# Seam methods whose first argument is a path, so that os names it in its errors.
PATH_METHODS = {"open", "stat", "mkdir", "unlink", "rmdir", "replace", "listdir"}


class StepIO(OsIO):
    """The real I/O seam, numbering its calls from 0 once `armed` is True.

    At call number `step`, ``action(method, args)`` runs instead of the real call;
    it raises, or kills the process. A `close` is made first, because Linux frees
    the descriptor even when close(2) fails. `calls` lists ``(method, args)`` of
    every call made while armed, the faulted one included.
    """

    def __init__(self, step=None, action=None):
        super().__init__()
        self.step = step
        self.action = action
        self.armed = False
        self.calls = []

    def names(self) -> list:
        return [method for method, _ in self.calls]

    def _through(self, method, args, kwargs):
        real = getattr(super(), method)
        if self.armed:
            position = len(self.calls)
            self.calls.append((method, args))
            if position == self.step:
                if method == "close":
                    real(*args, **kwargs)
                    self.action(method, args)
                    return None
                self.action(method, args)
        return real(*args, **kwargs)


def _step_method(method):
    def call(self, *args, **kwargs):
        return self._through(method, args, kwargs)

    call.__name__ = method
    return call


for _method in SEAM_METHODS:
    setattr(StepIO, _method, _step_method(_method))
del _method


def os_error(number: int, method: str, args) -> OSError:
    """Return the OSError that `os` raises when *method* fails with *number*.

    Like `os`, it names the path for calls that take one, and no path for calls
    that take a descriptor. ``OSError(errno.EACCES, ...)`` is a PermissionError.
    """
    message = os.strerror(number)
    if method == "replace":
        return OSError(number, message, args[0], None, args[1])
    if method in PATH_METHODS and args and isinstance(args[0], (str, bytes, os.PathLike)):
        return OSError(number, message, args[0])
    return OSError(number, message)


def raise_errno(number: int):
    """Return a `StepIO` action that fails the call with *number*, as os would."""

    def action(method, args):
        raise os_error(number, method, args)

    return action


def kill_self(method, args):
    """A `StepIO` action: SIGKILL this process at the call, before it runs."""
    os.kill(os.getpid(), signal.SIGKILL)
    while True:
        time.sleep(1)


def interrupt(method, args):
    """A `StepIO` action: raise KeyboardInterrupt, as a SIGINT handler does at that point."""
    raise KeyboardInterrupt(f"injected at {method}")


def record_steps(prepare, operation) -> list:
    """Return the seam methods that *operation* calls, in order, in a fresh directory.

    ``prepare(root, seam)`` builds what the operation needs through the unarmed
    *seam* and returns a context; ``operation(context)`` is then run with the seam
    armed. Stores in the context's ``store`` attribute are deleted afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="vcstore-steps-") as root:
        seam = StepIO()
        context = prepare(Path(root), seam)
        seam.armed = True
        operation(context)
        seam.armed = False
        store = getattr(context, "store", None)
        if store is not None:
            store.delete()
        return seam.names()


class NoFlockIO(OsIO):
    """The real I/O seam on a file system whose flock(2) always fails with *number*."""

    def __init__(self, number: int):
        super().__init__()
        self.number = number

    def flock(self, fd, operation):
        raise OSError(self.number, os.strerror(self.number))


class IgnoredFlockIO(OsIO):
    """A broken I/O seam whose flock does nothing: every lock call succeeds at once.

    It shows that a load check catches a lock that does not exclude.
    """

    def flock(self, fd, operation):
        return None


# ---------------------------------------------------------------------------
# Errors, descriptors and locks


def error_chain(error: BaseException) -> list:
    """Return *error* and the exceptions it was raised from, outermost first."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def errno_of(error: BaseException):
    """Return the errno of *error* or of the first exception in its chain that has one."""
    for link in error_chain(error):
        number = getattr(link, "errno", None)
        if number is not None:
            return number
    return None


def is_flock_free(path) -> bool:
    """Return True if no process holds a flock(2) lock on *path*, found with a try-lock.

    The try-lock uses a new open file description, so it also conflicts with
    locks held by this process.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def held_tokens(store) -> list:
    """Return the tokens this process holds on *store*, from the process's token table."""
    from vcstore.tokens import TOKENS

    return [held.token for held in list(TOKENS._held.values()) if held.owner is store]


def tree_changes(before: dict, after: dict) -> list:
    """Return the relative paths whose entry differs between two `snapshot` results."""
    return sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path))


def temp_names(directory) -> list:
    """Return the names of every store temporary file (``.*.tmp``) in *directory*."""
    return sorted(name for name in os.listdir(directory) if name.startswith(".") and name.endswith(".tmp"))


# ---------------------------------------------------------------------------
# Bounded calls


@dataclasses.dataclass
class Outcome:
    """What a bounded call did: its result, or the exception it raised."""

    result: object = None
    error: BaseException = None



def call_bounded(function, *args, fifos=(), seconds: float = HANG_SECONDS) -> Outcome:
    """Run *function* in a thread and return its `Outcome`; raise `StillBlocked` if it hangs.

    A call that has not returned after *seconds* is hung. Before raising, every
    FIFO in *fifos* is opened from both ends and closed, which releases a thread
    blocked opening one, so no thread stays blocked after the test.
    """
    try:
        return Outcome(result=run_in_thread(function, *args, seconds=seconds))
    except StillBlocked:
        release_fifos(fifos)
        raise
    except Exception as error:  # noqa: BLE001 - the exception is the outcome
        return Outcome(error=error)


def release_fifos(paths) -> None:
    """Open each FIFO in *paths* for writing and for reading, without blocking, then close it."""
    for path in paths:
        for flags in (os.O_WRONLY, os.O_RDONLY):
            try:
                fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            os.close(fd)


# ---------------------------------------------------------------------------
# Planted files and a watched outside directory

@dataclasses.dataclass
class Outside:
    """A directory outside every store, with a canary of each kind a planted link can reach.

    ``canary`` is a JSON file, ``fifo`` a FIFO that blocks any reader that opens it,
    ``dir`` an empty directory, ``fake_store`` a directory laid out like a store
    with a JSON canary as ``state.json``. ``missing`` does not exist.
    """

    root: Path

    @property
    def canary(self) -> Path:
        return self.root / "canary.json"

    @property
    def fifo(self) -> Path:
        return self.root / "fifo"

    @property
    def dir(self) -> Path:
        return self.root / "dir"

    @property
    def fake_store(self) -> Path:
        return self.root / "fake-store"

    @property
    def missing(self) -> Path:
        return self.root / "missing"

    def directories(self) -> list:
        return [self.root, self.dir, self.fake_store, self.fake_store / "raw"]

    def lockable(self) -> list:
        """Return the regular files that a test can hold locked while a store works."""
        return [self.canary, self.fake_store / "lock"]

    def fifos(self) -> list:
        return [self.fifo, self.fake_store / "state.json.lock"]


def make_outside(root) -> Outside:
    """Create the `Outside` tree in *root* (which must not exist yet)."""
    outside = Outside(Path(root))
    outside.root.mkdir()
    outside.canary.write_text(json.dumps({"canary": "outside"}))
    os.mkfifo(outside.fifo, 0o640)
    outside.dir.mkdir()
    fake = outside.fake_store
    fake.mkdir()
    (fake / "raw").mkdir()
    (fake / "lock").write_text("")
    (fake / "state.json").write_text(json.dumps({"canary": "fake store"}))
    os.mkfifo(fake / "state.json.lock", 0o640)
    return outside


def plant(path, kind: str, outside: Outside) -> None:
    """Put an entry of *kind* at *path*, which must not exist.

    Links point into *outside*: ``symlink-dir`` to its fake store, so that a link
    followed in place of a store directory finds a whole store there.
    """
    path = os.fspath(path)
    if kind == "symlink-file":
        os.symlink(outside.canary, path)
    elif kind == "symlink-fifo":
        os.symlink(outside.fifo, path)
    elif kind == "symlink-dir":
        os.symlink(outside.fake_store, path)
    elif kind == "symlink-missing":
        os.symlink(outside.missing, path)
    elif kind == "fifo":
        os.mkfifo(path, 0o640)
    elif kind == "socket":
        _bind_socket(path)
    elif kind == "directory":
        os.mkdir(path, 0o750)
    elif kind == "file":
        with open(path, "w") as file:
            file.write(json.dumps({"planted": "file"}))
    else:
        raise ValueError(
            f"unknown kind {kind!r}: use symlink-file, symlink-fifo, symlink-dir, "
            f"symlink-missing, fifo, socket, directory or file"
        )


def _bind_socket(path: str) -> None:
    # A socket path is limited to 108 bytes; the directory's /proc/self/fd alias is short.
    directory = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(f"/proc/self/fd/{directory}/{os.path.basename(path)}")
    finally:
        server.close()
        os.close(directory)


def remove_entry(path) -> None:
    """Remove whatever is at *path* (file, link, special file or directory tree)."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        for directory, dirnames, filenames in os.walk(path, topdown=False):
            for name in filenames:
                os.unlink(os.path.join(directory, name))
            for name in dirnames:
                target = os.path.join(directory, name)
                if os.path.islink(target):
                    os.unlink(target)
                else:
                    os.rmdir(target)
        os.rmdir(path)
    else:
        os.unlink(path)


# inotify(7) event bits: any open, read, write, metadata change, creation, removal or move.
_IN_EVENTS = {
    0x001: "access",
    0x002: "modify",
    0x004: "attrib",
    0x008: "close-write",
    0x010: "close-nowrite",
    0x020: "open",
    0x040: "moved-from",
    0x080: "moved-to",
    0x100: "create",
    0x200: "delete",
    0x400: "delete-self",
    0x800: "move-self",
}
_IN_MASK = sum(_IN_EVENTS)
_IN_EVENT_HEADER = struct.Struct("iIII")


class DirectoryWatch:
    """Record, with inotify(7), every access to the entries of some directories.

    Any open, read, write, change, creation or removal of an entry, or of a
    watched directory itself, is an event, whichever path (a link included) led
    there. flock(2) and stat(2) are not events, but locking needs an open.
    """

    def __init__(self, directories):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._names = {}
        for directory in directories:
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(directory), _IN_MASK)
            if wd < 0:
                number = ctypes.get_errno()
                raise OSError(number, os.strerror(number), os.fspath(directory))
            self._names[wd] = os.fspath(directory)

    def events(self) -> list:
        """Return the events since the last call, as ``"open /path/name"`` strings."""
        found = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _IN_EVENT_HEADER.unpack_from(data, offset)
                offset += _IN_EVENT_HEADER.size
                name = data[offset : offset + length].rstrip(b"\0").decode(errors="replace")
                offset += length
                kinds = [text for bit, text in _IN_EVENTS.items() if mask & bit]
                if kinds:
                    where = os.path.join(self._names.get(wd, "?"), name)
                    found.append(f"{'+'.join(kinds)} {where}")

    def close(self) -> None:
        os.close(self._fd)


def open_descriptors_under(root, ignore=()) -> list:
    """Return the paths under *root* that this process has a descriptor open on.

    Descriptors in *ignore* (the caller's own) are left out.
    """
    root = os.fspath(root)
    found = []
    for name in os.listdir("/proc/self/fd"):
        if int(name) in ignore:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target == root or target.startswith(root + "/"):
            found.append(target)
    return found


# ---------------------------------------------------------------------------
# Child processes


def child_environment(**extra) -> dict:
    """Return an environment in which a child Python imports vcstore and these helpers."""
    environment = dict(os.environ, **extra)
    paths = [TESTS_DIR, PROJECT_DIR, environment.get("PYTHONPATH")]
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return environment


def run_python(code: str, *args, prefix=(), timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
    """Run *code* with *args* as ``sys.argv[1:]`` in a new Python interpreter.

    The command words in *prefix* come first: ``prefix=["setpriv", "--reuid=nobody",
    ...]`` runs it as another user.
    """
    return subprocess.run(
        [*prefix, sys.executable, "-c", code, *map(str, args)],
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def report_from_child(path, token):
    """Report, from a child process, what it can do with its parent's lock on *path*.

    It runs in children made by every multiprocessing start method, so it must
    be importable and return only plain values.
    """
    store = vcstore.open(path)
    report = {"lock fds": fds_open_on(os.path.join(path, "lock"))}
    try:
        store.item_unlock(vcstore.Item.LOCK, token)
        report["unlock"] = "unlocked"
    except vcstore.UnknownTokenError:
        report["unlock"] = "UnknownTokenError"
    try:
        store.item_lock(vcstore.Item.LOCK, exclusive=True, timeout=0)
        report["relock"] = "locked"
    except vcstore.LockTimeoutError:
        report["relock"] = "LockTimeoutError"
    other = store.item_lock(vcstore.Item.NETWORK, exclusive=True, timeout=5)
    store.item_unlock(vcstore.Item.NETWORK, other)
    report["other item"] = "locked and unlocked"
    return report


def put_child_report(queue, path, token):
    """Put `report_from_child` (or the error it raised) on *queue*."""
    try:
        queue.put(report_from_child(path, token))
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        queue.put({"error": f"{type(error).__name__}: {error}"})


def lock_once_in_child(path, seconds: float) -> int:
    """Lock and unlock Item.AGENT of the store at *path* with a timeout; return an exit status."""
    try:
        store = vcstore.open(path)
        token = store.item_lock(vcstore.Item.AGENT, exclusive=True, timeout=seconds)
        store.item_unlock(vcstore.Item.AGENT, token)
    except BaseException:  # noqa: BLE001 - the status reports it
        return 1
    return 0


def file_mode(path) -> int:
    """Return the permission bits of *path*, not following a link."""
    return stat.S_IMODE(os.lstat(path).st_mode)
