"""Helpers for the core store tests: peer processes, forks, tree snapshots, I/O faults.

Only the standard library and `vcstore` are used here, so that a peer process
(`python -c "import helpers; helpers.serve_peer()"`) starts quickly and the core
tests do not depend on `vcstore_testing`.
"""

import errno
import fcntl
import json
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import vcstore
from vcstore.fsio import OsIO

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# How long a test waits for something that should happen (a reply, a wake-up).
# Generous, because the machine is shared. It bounds a hang and is never asserted.
REPLY_SECONDS = 10.0

# How long a test waits to decide that a call is still blocked.
BLOCKED_SECONDS = 0.3


# ---------------------------------------------------------------------------
# File descriptors, umask, directory trees


def fd_count() -> int:
    """Return the number of file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def fds_open_on(path) -> list:
    """Return the descriptors of this process that refer to *path*."""
    target = os.fspath(path)
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                found.append(int(name))
        except OSError:
            # The descriptor that listdir used is already closed.
            continue
    return found


def current_umask() -> int:
    """Return the process umask without changing it (Linux 4.7 and later)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    raise RuntimeError("/proc/self/status has no Umask line")


def snapshot(root) -> dict:
    """Return every entry under *root* (names, types, modes, contents) for equality checks.

    A missing *root* gives an empty dict. Symbolic links are recorded, not followed.
    """
    root = os.fspath(root)
    if not os.path.lexists(root):
        return {}
    entries = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = os.path.normpath(os.path.join(directory, name))
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as file:
                    content = file.read()
            else:
                content = None
            entries[os.path.relpath(path, root)] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), content)
    return entries


def temp_files(store_path, item) -> list:
    """Return the names of the temporary files of *item* in a store's directory."""
    prefix = f".{item.file_name}."
    return sorted(name for name in os.listdir(store_path) if name.startswith(prefix) and name.endswith(".tmp"))


def wait_blocked_in_flock(pid: int, seconds: float = REPLY_SECONDS) -> bool:
    """Return True once /proc/locks shows process *pid* waiting for a flock(2) lock.

    A waiting request is listed as ``N: -> FLOCK ... <pid> ...``. Returns False if
    none appears within *seconds*.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "->" and fields[2] == "FLOCK" and fields[5] == str(pid):
                    return True
        time.sleep(0.01)
    return False


# ---------------------------------------------------------------------------
# Running code elsewhere: a daemon thread, a forked child


class StillBlocked(AssertionError):
    """A call that was expected to return did not return in time."""


def run_in_thread(function, *args, seconds: float = REPLY_SECONDS, **kwargs):
    """Call *function* in a daemon thread and return its result or raise its exception.

    Raises `StillBlocked` if it has not returned after *seconds*; the thread is then
    left behind, blocked, which is harmless because it is a daemon.
    """
    outcome = {}

    def target():
        try:
            outcome["result"] = function(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise StillBlocked(f"{function.__name__} did not return within {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class Background:
    """A call running in a daemon thread, for a test that checks it is still blocked.

    ``Background(store.item_lock, Item.LOCK, True)`` starts the call at once.
    """

    def __init__(self, function, *args, **kwargs):
        self._outcome = {}
        self._thread = threading.Thread(target=self._run, args=(function, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, function, args, kwargs):
        try:
            self._outcome["result"] = function(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised by result()
            self._outcome["error"] = error

    @property
    def ident(self) -> int:
        return self._thread.ident

    def is_blocked(self, seconds: float = BLOCKED_SECONDS) -> bool:
        """Return True if the call has not returned after *seconds*."""
        self._thread.join(seconds)
        return self._thread.is_alive()

    def result(self, seconds: float = REPLY_SECONDS):
        """Return the call's result or raise its exception; `StillBlocked` after *seconds*."""
        if self.is_blocked(seconds):
            raise StillBlocked(f"background call still blocked after {seconds} s")
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["result"]


def run_in_fork(function, *args):
    """Call *function* in an `os.fork` child and return its result, which must be JSON.

    The child always ends with `os._exit`, so no pytest code runs twice. An exception
    in the child is raised here as an AssertionError carrying the child's traceback.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.close(read_fd)
            try:
                message = {"result": function(*args)}
            except BaseException:  # noqa: BLE001 - reported to the parent
                message = {"error": traceback.format_exc()}
            data = json.dumps(message).encode()
            while data:
                data = data[os.write(write_fd, data):]
        except BaseException:  # noqa: BLE001 - a child must never return into pytest
            status = 1
        finally:
            os._exit(status)

    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as reader:
        chunks.append(reader.read())
    _, wait_status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if not data:
        raise AssertionError(f"forked child {pid} sent nothing (wait status {wait_status})")
    message = json.loads(data)
    if "error" in message:
        raise AssertionError(f"forked child {pid} failed:\n{message['error']}")
    return message["result"]


# ---------------------------------------------------------------------------
# I/O seams: counting, failing, hanging


SEAM_METHODS = (
    "open", "close", "read", "write", "fsync", "replace", "flock",
    "stat", "fstat", "mkdir", "unlink", "rmdir", "listdir",
)


class CountingIO(OsIO):
    """The real I/O seam, recording each call as ``(method, detail)`` in `calls`.

    The detail of `fsync` is ``"directory"`` or ``"file"``, found with fstat before
    the call; for the other methods it is the positional arguments.
    """

    def __init__(self):
        super().__init__()
        self.calls = []
        self._calls_lock = threading.Lock()

    def record(self, method, detail):
        with self._calls_lock:
            self.calls.append((method, detail))

    def names(self) -> list:
        """Return the recorded method names, in call order."""
        with self._calls_lock:
            return [method for method, _ in self.calls]

    def fsync(self, fd):
        kind = "directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        self.record("fsync", kind)
        return super().fsync(fd)


def _recording_method(name):
    def method(self, *args, **kwargs):
        self.record(name, args)
        return getattr(super(CountingIO, self), name)(*args, **kwargs)

    method.__name__ = name
    return method


for _name in SEAM_METHODS:
    if _name != "fsync":
        setattr(CountingIO, _name, _recording_method(_name))
del _name


def failing_io(method: str, error_number: int, *, when=None) -> OsIO:
    """Return an I/O seam whose *method* raises ``OSError(error_number)`` once.

    *when*, if given, is called with the method's arguments and the fault is raised
    only on the first call for which it returns True. No fault is raised while the
    seam's `armed` is False (set it after a setup that must succeed). Every call is
    still recorded as in `CountingIO`, and the seam's `faults` counts the faults raised.
    """

    def faulty(self, *args, **kwargs):
        if self.armed and self.faults == 0 and (when is None or when(*args, **kwargs)):
            self.faults += 1
            self.record(method, ("fault", errno.errorcode.get(error_number, error_number)))
            raise OSError(error_number, os.strerror(error_number))
        return getattr(super(seam_class, self), method)(*args, **kwargs)

    seam_class = type(f"Failing_{method}_IO", (CountingIO,), {method: faulty, "faults": 0, "armed": True})
    return seam_class()


def is_flock_request(fd, operation) -> bool:
    """Return True for a flock call that takes a lock (not LOCK_UN)."""
    return not operation & fcntl.LOCK_UN


class HangingFsyncIO(OsIO):
    """An I/O seam whose first fsync calls *notify* and then sleeps until the process dies.

    It leaves a writer stopped in the middle of `store`, with its temporary file
    written and locked, ready to be killed with SIGKILL.
    """

    def __init__(self, notify):
        super().__init__()
        self._notify = notify

    def fsync(self, fd):
        self._notify()
        while True:
            time.sleep(60)


# ---------------------------------------------------------------------------
# Peer processes


class NoReply(AssertionError):
    """A peer process that did not reply in time."""


class Peer:
    """Another Python process that runs store calls, one at a time, and replies.

    Stores are named by path and items by member name, so that every argument is
    JSON. ``peer.call("lock", path, "LOCK", True, 0)`` runs
    ``item_lock(Item.LOCK, True, timeout=0)`` on the peer's store at *path* and
    returns the token. An exception in the peer is raised here with the same type
    when vcstore or builtins has it. ``send`` and ``reply`` split a call that is
    expected to block. Commands are the ``_command_*`` functions below.
    """

    def __init__(self):
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS_DIR, environment.get("PYTHONPATH")]))
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import helpers; helpers.serve_peer()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=environment,
        )
        self.pid = self.process.pid
        self._buffer = b""
        self._pending = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def send(self, command: str, *args):
        """Start *command* in the peer without waiting for its reply."""
        if self._pending is not None:
            raise AssertionError(f"peer {self.pid} is still running {self._pending}")
        self._pending = command
        line = json.dumps({"command": command, "args": list(args)}) + "\n"
        self.process.stdin.write(line.encode())
        self.process.stdin.flush()

    def is_blocked(self, seconds: float = BLOCKED_SECONDS) -> bool:
        """Return True if the pending command has not replied after *seconds*."""
        return not self._wait_for_line(seconds)

    def reply(self, seconds: float = REPLY_SECONDS):
        """Return the pending command's result, or raise its exception or `NoReply`."""
        if not self._wait_for_line(seconds):
            raise NoReply(f"peer {self.pid} did not reply to {self._pending} within {seconds} s{self._stderr_tail()}")
        line, self._buffer = self._buffer.split(b"\n", 1)
        command, self._pending = self._pending, None
        message = json.loads(line)
        if "error" in message:
            raise _peer_exception(message["error"], f"in peer {self.pid} running {command}: {message['message']}")
        return message["result"]

    def call(self, command: str, *args, seconds: float = REPLY_SECONDS):
        """Run *command* in the peer and return its result."""
        self.send(command, *args)
        return self.reply(seconds)

    def probe(self, store_path, item_name: str) -> str:
        """Return "free", "shared" or "exclusive": the state of an item lock seen from the peer."""
        return self.call("probe", os.fspath(store_path), item_name)

    def kill(self):
        """Kill the peer with SIGKILL and reap it; the kernel drops its locks."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def close(self):
        self.kill()
        self.process.stdin.close()
        self.process.stdout.close()
        self._stderr.close()

    def _wait_for_line(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            # With seconds=0 this still polls once.
            remaining = max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return False
            chunk = os.read(fd, 65536)
            if not chunk:
                raise NoReply(f"peer {self.pid} exited (status {self.process.wait()}){self._stderr_tail()}")
            self._buffer += chunk
        return True

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")[-2000:]
        return f"\npeer stderr:\n{text}" if text else ""


def _peer_exception(type_name: str, message: str) -> BaseException:
    import builtins

    error_class = getattr(vcstore, type_name, None) or getattr(builtins, type_name, None)
    if isinstance(error_class, type) and issubclass(error_class, BaseException):
        try:
            return error_class(message)
        except TypeError:
            pass
    return RuntimeError(f"{type_name}: {message}")


# The commands below run inside the peer process.

_held_flocks = {}
_stores = {}
_reply_lock = threading.Lock()


def _reply(message: dict):
    with _reply_lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def _item(name: str):
    return vcstore.Item[name]


def _store(path):
    """Return the peer's `Store` object for *path*, opened on first use and kept.

    Keeping it makes the peer behave like a program that holds on to its store:
    after another process deletes the store, this object stays the deleted one.
    """
    if path not in _stores:
        _stores[path] = vcstore.open(path)
    return _stores[path]


def _command_open(path, create=True):
    _stores[path] = vcstore.open(path, create=create)
    return _stores[path].url


def _command_store(path, item, value):
    _store(path).store(_item(item), value)


def _command_load(path, item):
    return _store(path).load(_item(item))


def _command_raw(path, raw_id=None):
    store = _store(path)
    return store.raw() if raw_id is None else store.raw(raw_id)


def _command_lock(path, item, exclusive, timeout=None):
    return _store(path).item_lock(_item(item), exclusive=exclusive, timeout=timeout)


def _command_unlock(path, item, token):
    _store(path).item_unlock(_item(item), token)


def _command_delete(path):
    _store(path).delete()
    del _stores[path]


def _command_open_each(paths):
    """Open every store in *paths* in order (for two processes creating the same stores)."""
    return [vcstore.open(path).url for path in paths]


def _command_probe(path, item):
    """Return "free", "shared" or "exclusive" for the store now at *path*, by try-locks."""
    store = vcstore.open(path)
    for exclusive, state in ((True, "free"), (False, "shared")):
        try:
            token = store.item_lock(_item(item), exclusive=exclusive, timeout=0)
        except vcstore.LockTimeoutError:
            continue
        store.item_unlock(_item(item), token)
        return state
    return "exclusive"


def _command_flock(file_path, exclusive, blocking=False):
    """Take a plain flock(2) lock on *file_path*, held until `flock_release`; False if busy."""
    fd = os.open(file_path, os.O_RDONLY | os.O_CLOEXEC)
    operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    if not blocking:
        operation |= fcntl.LOCK_NB
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        os.close(fd)
        return False
    _held_flocks.setdefault(file_path, []).append(fd)
    return True


def _command_flock_release(file_path):
    for fd in _held_flocks.pop(file_path, []):
        os.close(fd)


def _command_flock_probe(file_path):
    """Return "free", "shared" or "exclusive" for *file_path*, found with plain flock(2)."""
    if _command_flock(file_path, True):
        _command_flock_release(file_path)
        return "free"
    if _command_flock(file_path, False):
        _command_flock_release(file_path)
        return "shared"
    return "exclusive"


def _command_load_loop(path, item, count):
    """Load *item* *count* times; return how many loads saw each kind and how many were torn.

    A value is ``{"kind": K, "fill": K * n}``; a torn value is one whose fill is not
    made of its own kind only.
    """
    store = _store(path)
    kinds = {}
    torn = 0
    for _ in range(count):
        value = store.load(_item(item))
        kind = value["kind"]
        kinds[kind] = kinds.get(kind, 0) + 1
        if value["fill"].strip(kind):
            torn += 1
    return {"kinds": kinds, "torn": torn}


def _command_store_loop(path, item, count, tag):
    """Store ``[tag, n]`` for each n below *count*, then return *count*."""
    store = _store(path)
    for number in range(count):
        store.store(_item(item), [tag, number])
    return count


def _command_store_hanging(path, item, value):
    """Start a `store` that stops forever in its first fsync; reply "in fsync" from there."""
    from vcstore.filesystem import FilesystemStore

    seam = HangingFsyncIO(lambda: _reply({"result": "in fsync"}))
    FilesystemStore(path, io=seam).store(_item(item), value)


def serve_peer():
    """Run commands read as JSON lines from stdin until stdin closes (the peer's main)."""
    for line in sys.stdin:
        request = json.loads(line)
        command = globals()[f"_command_{request['command']}"]
        try:
            message = {"result": command(*request["args"])}
        except Exception as error:  # noqa: BLE001 - every error goes back to the test
            message = {"error": type(error).__name__, "message": str(error)}
            traceback.print_exc()
        _reply(message)
