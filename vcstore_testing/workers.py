"""Worker processes that compete for stores, driven by commands from the parent.

A `WorkerPool` starts *size* `multiprocess` processes. Each `Worker` opens the
targets it is given (a store URL or path) with the pool's *store_factory*,
keeps the store object for the next call, and mirrors the store API with the
target first::

    with WorkerPool(2) as pool:
        token = pool[0].item_lock(path, Item.LOCK, exclusive=True)
        waiter = pool[1].submit("item_lock", path, Item.LOCK, True)
        assert not waiter.wait(0.2)          # still blocked
        pool[0].item_unlock(path, Item.LOCK, token)
        pool[1].item_unlock(path, Item.LOCK, waiter.result(timeout=5))

`multiprocess` pickles with dill, so a factory, a `run` callable and their
arguments may be lambdas or closures, under the fork and the spawn start
methods alike.

Threads inside a worker: synchronous calls run one at a time on the worker's
main thread. A call made with `Worker.submit` runs on a new thread of its own,
so the worker keeps serving synchronous calls while it waits. That thread is
not the one that took the worker's other tokens. So a submitted blocking lock
that conflicts with a token of the same worker does not raise `DeadlockError`:
it blocks until a synchronous `item_unlock` releases that token, because flock
locks belong to open file descriptions, not to threads.
"""

from __future__ import annotations

import importlib
import os
import pickle
import reprlib
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import multiprocess
from multiprocess.connection import wait as wait_for_objects
from multiprocess.reduction import ForkingPickler

import vcstore
import vcstore.tracing

__all__ = [
    "Pending",
    "RemoteTraceback",
    "Worker",
    "WorkerDiedError",
    "WorkerError",
    "WorkerPool",
    "WorkerTimeoutError",
]

# Default bound, in seconds, on the wait for each reply from a worker.
DEFAULT_CALL_TIMEOUT = 10.0

# Seconds that close() gives a worker to exit after SIGTERM before SIGKILL.
TERMINATE_GRACE = 2.0

# Commands that mirror the store API; their first argument is the target.
STORE_COMMANDS = ("load", "store", "raw", "item_lock", "item_unlock", "delete")

# Every command a worker accepts. "probe" serves `vcstore_testing.probe.Prober`.
COMMANDS = STORE_COMMANDS + ("run", "probe")

# Maximum length of a command's description in messages.
_MAX_DESCRIPTION = 300

# The parent's end of every open worker pipe in this process. A child made by
# fork inherits copies of them all and closes them first: a stray copy would
# keep another worker's pipe open after the parent died, so that worker would
# never see end-of-file and would outlive its parent.
_PARENT_ENDS: set = set()


class WorkerError(Exception):
    """Base class of the errors about a worker itself (not about its command)."""


class WorkerTimeoutError(WorkerError, TimeoutError):
    """A worker that sent no reply to a command within the bounded wait."""


class WorkerDiedError(WorkerError):
    """A worker process that is dead or was restarted, so it cannot reply."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised inside a worker.

    On Python 3.10, which lacks `BaseException.add_note`, it becomes the
    ``__cause__`` of the exception re-raised in the parent.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


# ----------------------------------------------------------------------------
# The parent side


class WorkerPool:
    """Start *size* worker processes that open stores with *store_factory*.

    *store_factory* takes a target (a store URL or path) and returns an object
    with the store API; each worker calls it once per target and keeps the
    result.
    *start_method* is a `multiprocess` start method ("fork", "spawn" or
    "forkserver"). *call_timeout* bounds, in seconds, the wait for each reply.

    The pool is indexable (``pool[1]``), iterable and sized, and is a context
    manager whose exit calls `close`. Workers that are still running when the
    pool is garbage collected or the interpreter exits are reaped then.
    """

    def __init__(
        self,
        size: int = 3,
        store_factory: Callable[[Any], Any] = vcstore.open,
        start_method: str = "fork",
        *,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"invalid worker pool size {size!r}: expected an int >= 1")
        if not callable(store_factory):
            raise TypeError(
                f"invalid store_factory {store_factory!r}: expected a callable that "
                f"takes a store URL or path and returns a store"
            )
        if call_timeout <= 0:
            raise ValueError(f"invalid call_timeout {call_timeout!r}: expected seconds > 0")

        # Forked workers inherit what this process imported: load the optional
        # tracing API once here rather than once in each worker.
        vcstore.tracing.preload()

        self.store_factory = store_factory
        self.start_method = start_method
        self.call_timeout = call_timeout
        self._context = multiprocess.get_context(start_method)

        # Shared with the finaliser, which must not refer to the pool itself.
        self._processes: list = []
        self._finalizer = weakref.finalize(self, _reap, self._processes, os.getpid())
        self._workers: list[Worker] = []
        try:
            for index in range(size):
                self._processes.append(None)
                self._workers.append(Worker(self, index))
        except BaseException:
            self.close()
            raise

    def __getitem__(self, index: int) -> Worker:
        return self._workers[index]

    def __iter__(self) -> Iterator[Worker]:
        return iter(self._workers)

    def __len__(self) -> int:
        return len(self._workers)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pids {[w.pid for w in self._workers]}"
        return f"<WorkerPool size={len(self._workers)} {self.start_method} {state}>"

    @property
    def closed(self) -> bool:
        """Whether `close` ran (or the finaliser did)."""
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop every worker: SIGTERM, then SIGKILL after a bound, then join.

        Calling it again does nothing.
        """
        for worker in self._workers:
            worker._mark_dead("was stopped by WorkerPool.close()")
        self._finalizer()
        for worker in self._workers:
            worker._close_connection()


class Worker:
    """One worker process of a `WorkerPool`; see the module docstring.

    Every call waits at most the pool's *call_timeout* (plus the lock timeout
    for `item_lock`) and then raises `WorkerTimeoutError`. An exception raised
    in the worker is raised again in the parent with the same type and the
    worker's formatted traceback attached: as a note on Python 3.11+ and as
    ``__cause__`` on 3.10, and as the ``worker_traceback`` attribute on both.
    A dead worker raises `WorkerDiedError` until `restart` replaces it.
    """

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self._io_lock = threading.RLock()
        self._connection = None
        self._process = None
        self._generation = 0
        self._start()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "dead"
        return f"<Worker {self.index} pid={self.pid} {state}>"

    @property
    def pid(self) -> int:
        """Process id of the current worker process."""
        return self._pid

    @property
    def alive(self) -> bool:
        """Whether the worker process runs and takes calls."""
        return self._dead_reason is None and self._process.is_alive()

    @property
    def name(self) -> str:
        """The worker as messages name it: ``worker 1 (pid 4242)``."""
        return f"worker {self.index} (pid {self.pid})"

    # --- the store API, target first -----------------------------------------

    def load(self, target: Any, item: vcstore.Item) -> Any:
        return self._call("load", (target, item), {})

    def store(self, target: Any, item: vcstore.Item, value: Any) -> None:
        return self._call("store", (target, item, value), {})

    def raw(self, target: Any, id: str | None = None) -> str:
        return self._call("raw", (target, id), {})

    def item_lock(
        self,
        target: Any,
        item: vcstore.Item,
        exclusive: bool,
        timeout: float | None = None,
    ) -> str:
        """Take a lock in the worker and return its token.

        With ``timeout=None`` a lock that stays blocked makes this call raise
        `WorkerTimeoutError` after the call timeout: use `submit` for a lock
        that is meant to block.
        """
        extra_wait = timeout if timeout is not None else 0.0
        return self._call(
            "item_lock",
            (target, item),
            {"exclusive": exclusive, "timeout": timeout},
            extra_wait=extra_wait,
        )

    def item_unlock(self, target: Any, item: vcstore.Item, token: str) -> None:
        return self._call("item_unlock", (target, item, token), {})

    def delete(self, target: Any) -> None:
        """Delete the store, and drop the worker's store object for *target*."""
        return self._call("delete", (target,), {})

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)`` in the worker and return its result."""
        return self._call("run", (fn, *args), kwargs)

    def probe(self, target: Any, items: tuple[vcstore.Item, ...]) -> dict:
        """Return each item's lock state as this worker finds it; see `probe`."""
        return self._call("probe", (target, tuple(items)), {})

    # --- calls left waiting --------------------------------------------------

    def submit(self, name: str, *args: Any, **kwargs: Any) -> Pending:
        """Start command *name* on a new worker thread and return at once.

        *name* is a method name of this class (``"item_lock"``, ``"run"``...)
        and the arguments are that method's. The worker keeps serving other
        calls while the command runs; `Pending.result` collects its outcome.
        """
        if name not in COMMANDS:
            raise ValueError(
                f"unknown worker command {name!r}: expected one of {', '.join(COMMANDS)}"
            )
        with self._io_lock:
            call_id = self._send(name, args, kwargs, detached=True)
            return Pending(self, call_id, self._generation, _describe(name, args, kwargs))

    # --- process control ------------------------------------------------------

    def kill(self) -> None:
        """Kill the worker with SIGKILL and wait for it; the kernel drops its locks."""
        if self.pool.closed:
            return
        self._mark_dead("was killed by Worker.kill()")
        self._process.kill()
        self._process.join(TERMINATE_GRACE)

    def restart(self) -> None:
        """Replace the worker with a new process that holds no store and no token.

        Calls still pending on the old process raise `WorkerDiedError`.
        """
        with self._io_lock:
            if self.pool.closed:
                raise WorkerError(f"{self.name}: cannot restart, its pool is closed")
            self._mark_dead("was restarted")
            self._process.kill()
            self._process.join(TERMINATE_GRACE)
            self._process.close()
            self._close_connection()
            self._start()

    # --- internals -------------------------------------------------------------

    def _start(self) -> None:
        context = self.pool._context
        parent_end, child_end = context.Pipe()
        _PARENT_ENDS.add(parent_end)
        process = context.Process(
            target=_serve,
            args=(child_end, self.pool.store_factory),
            name=f"vcstore-worker-{self.index}",
            daemon=True,
        )
        try:
            process.start()
        finally:
            child_end.close()

        self._connection = parent_end
        self._process = process
        self._pid = process.pid
        self.pool._processes[self.index] = process
        self._generation += 1
        self._next_call_id = 0
        self._replies: dict[int, tuple] = {}
        self._awaited: set[int] = set()
        self._dead_reason: str | None = None

    def _close_connection(self) -> None:
        if self._connection is not None:
            _PARENT_ENDS.discard(self._connection)
            self._connection.close()

    def _mark_dead(self, reason: str) -> None:
        if self._dead_reason is None:
            self._dead_reason = reason

    def _died_error(self) -> WorkerDiedError:
        return WorkerDiedError(
            f"{self.name} {self._dead_reason}; call restart() to start a new worker"
        )

    def _call(
        self,
        name: str,
        args: tuple,
        kwargs: dict,
        extra_wait: float = 0.0,
    ) -> Any:
        with self._io_lock:
            call_id = self._send(name, args, kwargs, detached=False)
            description = _describe(name, args, kwargs)
            wait = self.pool.call_timeout + extra_wait
            if not self._wait_for(call_id, wait):
                self._awaited.discard(call_id)
                raise WorkerTimeoutError(
                    f"{self.name}: timed out after {wait:g} s waiting for the reply to {description}. "
                    f"The worker may still be running it (a blocked lock?): use "
                    f"submit() for a call that may block, or restart() the worker"
                )
            return self._unpack_reply(self._replies.pop(call_id), description)

    def _send(self, name: str, args: tuple, kwargs: dict, *, detached: bool) -> int:
        if self._dead_reason is not None:
            raise self._died_error()
        payload = _dumps((args, kwargs))
        call_id = self._next_call_id
        self._next_call_id += 1
        self._awaited.add(call_id)
        try:
            self._connection.send_bytes(pickle.dumps((call_id, name, payload, detached)))
        except (BrokenPipeError, ConnectionResetError):
            self._awaited.discard(call_id)
            self._mark_dead(self._exit_description())
            raise self._died_error() from None
        return call_id

    def _wait_for(self, call_id: int, timeout: float) -> bool:
        """Read replies until the one for *call_id* is in; return False on timeout."""
        deadline = time.monotonic() + timeout
        while call_id not in self._replies:
            remaining = deadline - time.monotonic()
            received = self._receive(max(remaining, 0.0))
            if not received and remaining <= 0:
                return False
        return True

    def _receive(self, timeout: float) -> bool:
        """Wait at most *timeout* s for one reply and file it by call id.

        Returns whether a reply came. Raises `WorkerDiedError` if the
        process died instead.
        """
        if self._dead_reason is not None:
            raise self._died_error()
        ready = wait_for_objects([self._connection, self._process.sentinel], timeout)
        if not ready:
            return False

        # Read the pipe first, because a worker may reply and then die.
        if self._connection in ready or self._connection.poll():
            try:
                call_id, ok, payload = pickle.loads(self._connection.recv_bytes())
            except (EOFError, ConnectionResetError):
                self._process.join(TERMINATE_GRACE)
                self._mark_dead(self._exit_description())
                raise self._died_error() from None
            if call_id in self._awaited:
                self._awaited.discard(call_id)
                self._replies[call_id] = (ok, payload)
            return True

        self._process.join(TERMINATE_GRACE)
        self._mark_dead(self._exit_description())
        raise self._died_error()

    def _exit_description(self) -> str:
        code = self._process.exitcode
        if code is None:
            return "closed its pipe"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"

    def _unpack_reply(self, reply: tuple, description: str) -> Any:
        ok, payload = reply
        try:
            value = _loads(payload)
        except Exception as exc:
            raise WorkerError(
                f"{self.name}: failed to unpickle the reply to {description}: {exc!r}"
            ) from exc
        if ok:
            return value

        error, text = value
        if isinstance(error, tuple):
            error = _rebuild_exception(*error)
        header = f"Traceback in {self.name}, running {description}:\n"
        _attach_traceback(error, header + text)
        raise error


class Pending:
    """A command started with `Worker.submit`, whose reply may not be in yet."""

    def __init__(self, worker: Worker, call_id: int, generation: int, description: str):
        self.worker = worker
        self.description = description
        self._call_id = call_id
        self._generation = generation
        self._reply: tuple | None = None

    def __repr__(self) -> str:
        state = "done" if self._reply is not None else "pending"
        return f"<Pending {self.description} on {self.worker.name}: {state}>"

    def done(self) -> bool:
        """Return whether the reply is in, without waiting.

        A pending call of a worker that died or was restarted is done.
        """
        return self.wait(0)

    def wait(self, timeout: float) -> bool:
        """Wait at most *timeout* seconds for the reply and return whether it is in."""
        if self._reply is not None:
            return True
        worker = self.worker
        with worker._io_lock:
            if self._generation != worker._generation:
                return True
            # Another call may have read this reply off the pipe already.
            if self._call_id in worker._replies:
                self._reply = worker._replies.pop(self._call_id)
                return True
            if worker._dead_reason is not None:
                return True
            try:
                arrived = worker._wait_for(self._call_id, timeout)
            except WorkerDiedError:
                return True
            if arrived:
                self._reply = worker._replies.pop(self._call_id)
            return arrived

    def result(self, timeout: float | None = None) -> Any:
        """Return the command's result, or raise its exception.

        Waits at most *timeout* seconds (None: the pool's call timeout), then
        raises `WorkerTimeoutError` and stays pending, so it can be asked again.
        Raises `WorkerDiedError` if the worker died or was restarted first.
        """
        worker = self.worker
        if timeout is None:
            timeout = worker.pool.call_timeout
        if not self.wait(timeout):
            raise WorkerTimeoutError(
                f"{worker.name}: timed out after {timeout:g} s waiting for the reply to "
                f"submitted {self.description}, which is still pending"
            )
        if self._reply is None:
            if self._generation != worker._generation:
                raise WorkerDiedError(
                    f"worker {worker.index} was restarted before it replied to "
                    f"submitted {self.description}"
                )
            raise worker._died_error()
        return worker._unpack_reply(self._reply, self.description)


def _reap(processes: list, owner_pid: int) -> None:
    """Terminate, then kill, then join every process of a pool."""
    # A forked child has copies of its parent's pools, which it must not reap.
    if os.getpid() != owner_pid:
        return
    live = [p for p in processes if p is not None]
    for process in live:
        process.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE
    for process in live:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in live:
        if process.is_alive():
            process.kill()
            process.join()
    for process in live:
        process.close()


def _describe(name: str, args: tuple, kwargs: dict) -> str:
    """Return a short text for a command, such as ``load('/s', Item.STATE)``."""
    parts = [_short_repr(arg) for arg in args]
    parts += [f"{key}={_short_repr(value)}" for key, value in kwargs.items()]
    if name == "run" and args:
        parts[0] = getattr(args[0], "__qualname__", parts[0])
    text = f"{name}({', '.join(parts)})"
    if len(text) > _MAX_DESCRIPTION:
        text = text[: _MAX_DESCRIPTION - 4] + "...)"
    return text


# reprlib stops early in large containers: a full repr of a 1 MB value before
# cutting it took milliseconds on every call.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _short_repr(value: Any) -> str:
    text = _REPR.repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return text


def _attach_traceback(error: BaseException, text: str) -> None:
    try:
        error.worker_traceback = text
    except AttributeError:
        pass
    if hasattr(error, "add_note"):
        error.add_note(text)
    elif error.__cause__ is None:
        error.__cause__ = RemoteTraceback(text)


def _rebuild_exception(module: str, qualname: str, message: str) -> BaseException:
    """Make an exception of the class that *module* and *qualname* name.

    Used for an exception that cannot be pickled. The class keeps its identity
    and the message becomes its only argument. A `WorkerError` replaces it
    when the class cannot be imported in the parent.
    """
    try:
        cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            error = cls.__new__(cls)
            error.args = (message,)
            return error
    except Exception:
        pass
    return WorkerError(f"{module}.{qualname}: {message}")


# ----------------------------------------------------------------------------
# The worker side


def _serve(connection: Any, store_factory: Callable[[Any], Any]) -> None:
    """Run a worker, which serves commands from *connection* until it closes."""
    # The parent reaps its workers, so a Ctrl-C sent to the terminal's process
    # group must not kill them first, each with a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for inherited in list(_PARENT_ENDS):
        inherited.close()
    _PARENT_ENDS.clear()

    _Server(connection, store_factory).serve_forever()


def probe_lock_state(store: Any, item: vcstore.Item) -> str:
    """Return "free", "shared" or "exclusive": how *item*'s lock is held now.

    Found by non-blocking attempts through the store's own API, each released
    at once. The result is accurate only while no other process locks or
    unlocks the item.
    """
    try:
        token = store.item_lock(item, exclusive=True, timeout=0)
    except vcstore.LockTimeoutError:
        pass
    else:
        store.item_unlock(item, token)
        return "free"

    try:
        token = store.item_lock(item, exclusive=False, timeout=0)
    except vcstore.LockTimeoutError:
        return "exclusive"
    store.item_unlock(item, token)
    return "shared"


class _Server:
    def __init__(self, connection: Any, store_factory: Callable[[Any], Any]) -> None:
        self.connection = connection
        self.store_factory = store_factory
        self.stores: dict[Any, Any] = {}
        self.stores_lock = threading.Lock()
        self.send_lock = threading.Lock()

    def serve_forever(self) -> None:
        while True:
            try:
                message = self.connection.recv_bytes()
            except (EOFError, OSError):
                return
            call_id, name, payload, detached = pickle.loads(message)
            if detached:
                thread = threading.Thread(
                    target=self.execute,
                    args=(call_id, name, payload),
                    name=f"vcstore-submitted-{call_id}",
                    daemon=True,
                )
                thread.start()
            else:
                self.execute(call_id, name, payload)

    def execute(self, call_id: int, name: str, payload: bytes) -> None:
        try:
            args, kwargs = _loads(payload)
            result = self.dispatch(name, args, kwargs)
        except BaseException as error:
            self.reply(call_id, False, _pack_exception(error))
            return
        try:
            reply = _dumps(result)
        except Exception as error:
            failure = TypeError(f"the result of {name}() cannot be pickled: {error!r}")
            self.reply(call_id, False, _pack_exception(failure))
            return
        self.reply(call_id, True, reply)

    def reply(self, call_id: int, ok: bool, payload: bytes) -> None:
        with self.send_lock:
            try:
                self.connection.send_bytes(pickle.dumps((call_id, ok, payload)))
            except OSError:
                pass  # The parent is gone; serve_forever ends at its next recv.

    def dispatch(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name == "run":
            fn, *rest = args
            return fn(*rest, **kwargs)

        target, *rest = args
        store = self.open(target)
        if name == "probe":
            (items,) = rest
            return {item: probe_lock_state(store, item) for item in items}
        if name == "delete":
            try:
                return store.delete(*rest, **kwargs)
            finally:
                with self.stores_lock:
                    self.stores.pop(_target_key(target), None)
        if name in STORE_COMMANDS:
            return getattr(store, name)(*rest, **kwargs)
        raise ValueError(f"unknown worker command {name!r}: expected one of {COMMANDS}")

    def open(self, target: Any) -> Any:
        key = _target_key(target)
        with self.stores_lock:
            store = self.stores.get(key)
            if store is None:
                store = self.store_factory(target)
                self.stores[key] = store
            return store


def _dumps(value: Any) -> bytes:
    """Pickle *value* with the standard pickler, or with dill if it must.

    dill (which `multiprocess` uses) also pickles lambdas and closures, but
    is an order of magnitude slower on the plain values of most calls.
    """
    try:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        return bytes(ForkingPickler.dumps(value))


def _loads(payload: bytes) -> Any:
    # dill's loads reads both kinds of pickle.
    return ForkingPickler.loads(payload)


def _target_key(target: Any) -> Any:
    return os.fspath(target) if isinstance(target, os.PathLike) else target


def _pack_exception(error: BaseException) -> bytes:
    """Pickle *error* and its formatted traceback for the parent.

    An exception that does not survive a pickle round trip (say, its
    constructor needs arguments that ``args`` does not hold) is sent as its
    class's module, name and message instead.
    """
    # Leave out this module's own frames, which every traceback would share.
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = _format_traceback(error, tb)
    try:
        payload = _dumps((error, text))
        _loads(payload)
    except Exception:
        cls = type(error)
        substitute = (cls.__module__, cls.__qualname__, str(error))
        payload = _dumps((substitute, text))
    return payload



def _format_traceback(error: BaseException, tb: Any) -> str:
    """Format *error*, its traceback *tb* and its chain as the interpreter prints them.

    On Python 3.11, `traceback.format_exception` parses each source line to
    place its ``^^^`` markers, which more than doubles the cost of every
    error that a worker sends back, expected ones such as
    `vcstore.LockTimeoutError` included. This leaves the markers out.
    """
    chain = []
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if error.__cause__ is not None:
            link, following = error.__cause__, _CAUSE_LINE
        elif error.__context__ is not None and not error.__suppress_context__:
            link, following = error.__context__, _CONTEXT_LINE
        else:
            link, following = None, ""
        chain.append((error, tb, following))
        error = link
        tb = None if link is None else link.__traceback__

    lines = []
    for error, tb, following in reversed(chain):
        if following:
            lines.append(following)
        if tb is not None:
            lines.append("Traceback (most recent call last):\n")
            for frame in traceback.extract_tb(tb):
                lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}\n')
                if frame.line:
                    lines.append(f"    {frame.line.strip()}\n")
        lines.extend(traceback.format_exception_only(type(error), error))
    return "".join(lines)


_CAUSE_LINE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT_LINE = "\nDuring handling of the above exception, another exception occurred:\n\n"
