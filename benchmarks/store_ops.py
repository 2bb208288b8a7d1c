"""Side-by-side costs of vcstore's locks, stores and loads, the bare system calls, and peers.

Run from the repository root, after ``pip install -e '.[bench]'``::

    python benchmarks/store_ops.py              # every group, about two minutes
    python benchmarks/store_ops.py lock store   # only the named groups

Every figure is the median of several rounds of a timed loop, in microseconds
per operation, and each ratio divides two figures measured in the same run.
Peers that are not installed are listed as missing, not skipped silently.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc

import vcstore
from vcstore import Item

ROUNDS = 7


def median_us(operation, count: int, rounds: int = ROUNDS) -> float:
    """Return the median over *rounds* of the time per call of *operation*, in µs."""
    operation()
    samples = []
    for _ in range(rounds):
        gc.disable()
        started = time.perf_counter_ns()
        for _ in range(count):
            operation()
        elapsed = time.perf_counter_ns() - started
        gc.enable()
        samples.append(elapsed / count / 1000)
    return statistics.median(samples)


# -- uncontended lock and unlock ----------------------------------------------


def bench_lock(root: str) -> list[tuple[str, float, str]]:
    count = 20000
    lock_path = os.path.join(root, "bare.lock")
    os.close(os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o640))

    def bare():
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    store = vcstore.open(os.path.join(root, "store"))

    def exclusive():
        store.item_unlock(Item.LOCK, store.item_lock(Item.LOCK, True))

    def shared():
        store.item_unlock(Item.LOCK, store.item_lock(Item.LOCK, False))

    def exclusive_try():
        store.item_unlock(Item.LOCK, store.item_lock(Item.LOCK, True, timeout=0))

    base = median_us(bare, count)
    rows = [("bare open+flock+unlock+close", base, "")]
    for name, operation in [
        ("vcstore item_lock exclusive", exclusive),
        ("vcstore item_lock shared", shared),
        ("vcstore item_lock exclusive timeout=0", exclusive_try),
    ]:
        rows.append((name, median_us(operation, count), "bare"))
    rows += _peer_locks(root, count)
    return [(name, value, _ratio(value, base) if ref else "1.00") for name, value, ref in rows]


def _peer_locks(root: str, count: int) -> list[tuple[str, float, str]]:
    rows = []
    try:
        import fasteners
    except ImportError:
        rows.append(("fasteners (not installed)", float("nan"), "bare"))
    else:
        process_lock = fasteners.InterProcessLock(os.path.join(root, "fasteners.lock"))

        def fasteners_lock():
            process_lock.acquire()
            process_lock.release()

        reader_writer = fasteners.InterProcessReaderWriterLock(os.path.join(root, "fasteners-rw.lock"))

        def fasteners_write():
            reader_writer.acquire_write_lock()
            reader_writer.release_write_lock()

        def fasteners_read():
            reader_writer.acquire_read_lock()
            reader_writer.release_read_lock()

        rows.append(("fasteners InterProcessLock", median_us(fasteners_lock, count), "bare"))
        rows.append(("fasteners ReaderWriterLock write", median_us(fasteners_write, count), "bare"))
        rows.append(("fasteners ReaderWriterLock read", median_us(fasteners_read, count), "bare"))

    try:
        import filelock
    except ImportError:
        rows.append(("filelock (not installed)", float("nan"), "bare"))
    else:
        file_lock = filelock.FileLock(os.path.join(root, "filelock.lock"))

        def filelock_lock():
            file_lock.acquire()
            file_lock.release()

        rows.append(("filelock FileLock", median_us(filelock_lock, count), "bare"))

    try:
        import portalocker
    except ImportError:
        rows.append(("portalocker (not installed)", float("nan"), "bare"))
    else:
        portal = portalocker.Lock(os.path.join(root, "portalocker.lock"), fail_when_locked=False)

        def portalocker_lock():
            portal.acquire()
            portal.release()

        rows.append(("portalocker Lock", median_us(portalocker_lock, count // 4), "bare"))
    return rows


# -- durable store and load ---------------------------------------------------


def bench_store(root: str) -> list[tuple[str, float, str]]:
    rows = []
    for label, value, count in [("200 B", _value(200), 300), ("1 MB", _value(1_000_000), 20)]:
        directory = os.path.join(root, f"bare-{len(label)}")
        os.makedirs(directory, exist_ok=True)
        encoded = json.dumps(value, separators=(",", ":")).encode()

        def bare_store():
            temp = os.path.join(directory, ".state.json.tmp")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, json.dumps(value, separators=(",", ":")).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, os.path.join(directory, "state.json"))
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

        def bare_load():
            with open(os.path.join(directory, "state.json"), "rb") as item_file:
                return json.loads(item_file.read())

        store = vcstore.open(os.path.join(root, f"store-{len(label)}"))

        def store_value():
            store.store(Item.STATE, value)

        def load_value():
            return store.load(Item.STATE)

        bare = median_us(bare_store, count, rounds=5)
        ours = median_us(store_value, count, rounds=5)
        rows.append((f"bare durable store {label}", bare, "1.00"))
        rows.append((f"vcstore store {label}", ours, _ratio(ours, bare)))

        load_count = count * 20
        bare = median_us(bare_load, load_count)
        ours = median_us(load_value, load_count)
        rows.append((f"bare read+json.loads {label}", bare, "1.00"))
        rows.append((f"vcstore load {label}", ours, _ratio(ours, bare)))
        del encoded
    return rows


def _value(size: int) -> dict:
    entry = {"id": "container-0001", "state": "running", "pid": 12345}
    per_entry = len(json.dumps(entry, separators=(",", ":"))) + 1
    return {"containers": [dict(entry) for _ in range(max(1, size // per_entry))]}


# -- contended hand-off between two processes ---------------------------------


def bench_handoff(root: str) -> list[tuple[str, float, str]]:
    rows = []
    bare = _handoff(root, "bare", None)
    rows.append(("hand-off bare flock, blocking", bare, "1.00"))
    blocking = _handoff(root, "vcstore", None)
    rows.append(("hand-off vcstore, blocking", blocking, _ratio(blocking, bare)))
    timed = _handoff(root, "vcstore", 5.0)
    rows.append(("hand-off vcstore, timeout=5", timed, _ratio(timed, bare)))
    return rows


def _handoff(root: str, kind: str, timeout, rounds: int = 200) -> float:
    """Median µs from the holder's unlock to the waiter's lock in another process."""
    path = os.path.join(root, f"handoff-{kind}")
    store = vcstore.open(path)
    lock_path = os.path.join(path, "lock")
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    result_read, result_write = os.pipe()

    def take():
        if kind == "bare":
            fd = os.open(lock_path, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            return lambda: (fcntl.flock(fd, fcntl.LOCK_UN), os.close(fd))
        token = store.item_lock(Item.LOCK, True, timeout)
        return lambda: store.item_unlock(Item.LOCK, token)

    child = os.fork()
    if child == 0:
        try:
            for _ in range(rounds):
                os.read(go_read, 1)
                os.write(ready_write, b"w")
                release = take()
                os.write(result_write, time.perf_counter_ns().to_bytes(8, "little"))
                release()
        finally:
            os._exit(0)

    samples = []
    for _ in range(rounds):
        release = take()
        os.write(go_write, b"g")
        os.read(ready_read, 1)
        time.sleep(0.002)  # let the waiter reach flock before the release
        released = time.perf_counter_ns()
        release()
        acquired = int.from_bytes(os.read(result_read, 8), "little")
        samples.append((acquired - released) / 1000)
        # Wait until the child has released before the next round.
        while True:
            try:
                release = take()
                release()
                break
            except vcstore.LockTimeoutError:
                continue
    os.waitpid(child, 0)
    for fd in (ready_read, ready_write, go_read, go_write, result_read, result_write):
        os.close(fd)
    return statistics.median(samples)


# -- many stores under one root -----------------------------------------------


def bench_scale(root: str) -> list[tuple[str, float, str]]:
    rows = []
    base = {}
    for stores in (10, 1000, 10000):
        directory = os.path.join(root, f"scale-{stores}")
        opened = [vcstore.open(os.path.join(directory, f"sandbox-{index:05d}")) for index in range(stores)]
        for store in opened:
            store.store(Item.STATE, {"state": "running"})
        sample = opened[:: max(1, stores // 10)]
        reopen_urls = [store.url for store in sample]

        def open_lock_load():
            for url in reopen_urls:
                store = vcstore.open(url)
                token = store.item_lock(Item.LOCK, True, 0)
                store.load(Item.STATE)
                store.item_unlock(Item.LOCK, token)

        value = median_us(open_lock_load, 200) / len(reopen_urls)
        base.setdefault("first", value)
        rows.append((f"open+lock+load+unlock, {stores} stores", value, _ratio(value, base["first"])))
        for store in opened:
            vcstore.registry.forget(store)
    return rows


# -- memory per held token ----------------------------------------------------


def bench_memory(root: str) -> list[tuple[str, float, str]]:
    store = vcstore.open(os.path.join(root, "memory"))
    count = 500
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    tokens = [store.item_lock(Item.LOCK, False) for _ in range(count)]
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    for token in tokens:
        store.item_unlock(Item.LOCK, token)
    return [("memory per held token (bytes, plus 1 descriptor)", grown / count, "")]


GROUPS = {
    "lock": bench_lock,
    "store": bench_store,
    "handoff": bench_handoff,
    "scale": bench_scale,
    "memory": bench_memory,
}


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base == base and value == value else "-"


def main(argv: list[str]) -> int:
    chosen = argv or list(GROUPS)
    unknown = [name for name in chosen if name not in GROUPS]
    if unknown:
        print(f"unknown group {unknown[0]!r}: choose from {', '.join(GROUPS)}", file=sys.stderr)
        return 2

    print(f"# {platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
          f"temporary directory {tempfile.gettempdir()}")
    print(f"{'operation':52} {'median µs':>10} {'ratio':>7}")
    with tempfile.TemporaryDirectory(prefix="vcstore-bench-") as root:
        for name in chosen:
            for row_name, value, ratio in GROUPS[name](root):
                print(f"{row_name:52} {value:10.2f} {ratio:>7}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
