"""A hypothesis state machine that checks that every JSON value round-trips.

Worker processes store hypothesis-generated JSON values of every kind (big
integers, unicode beyond the Basic Multilingual Plane, deep nesting, empty
containers, ``-0.0``) and load them back, each in any worker. The model is the
value last stored in each item file, and a load must return exactly that
value: ``-0.0`` keeps its sign, ``1`` stays an int and ``1.0`` a float, ``True``
stays a bool. An item never stored raises `vcstore.ItemNotFoundError`.
DEVICES and DEVICE_IDS share one file, so storing one changes both.

While one worker stores a large value, every other worker loads the item
again and again (with a single worker, a second thread of it does). Each
load must return the old value or the new one, never a partial file and
never `vcstore.CorruptItemError`. The store starts only once the loads run, and the
readers sleep briefly between loads, so that the scheduler runs them during
the store. Whether a load lands inside a short torn write still depends on
scheduling. When the replay of a failing program tears at another step, or
not at all, hypothesis reports a `hypothesis.errors.Flaky` error
(`FlakyFailure` or `FlakyStrategyDefinition`) instead of the AssertionError.

Item locks are mixed in and never stop a load or a store, because data files
are never locked. Deletes (which empty the store) and worker deaths are
mixed in too.

A downstream project checks its own backend by subclassing::

    class TestMyRoundTrip(RoundTripMachine):
        store_factory = my_backend.open_store   # takes a root directory

    TestMyRoundTrip = TestMyRoundTrip.TestCase
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import Bundle, consumes, invariant, multiple, precondition, rule

from vcstore import Item, ItemNotFoundError

from ..workers import Pending
from .base import fail
from .model import LockModel, ModelToken
from .token_bookkeeping import DATA_ITEMS, DeletableStoreMachine

__all__ = ["RoundTripMachine", "json_leaves", "json_values", "large_value", "same_json"]

# Python raises ValueError when it converts an int with more digits to str
# (and so to JSON), by default since 3.11 and 3.10.7 (sys.get_int_max_str_digits).
MAX_INT_DIGITS = 4300
MAX_INT = 10**MAX_INT_DIGITS - 1

# Nesting depth of the deepest values generated.
MAX_DEPTH = 50

# Bytes of JSON in the value of store_during_loads when large_values is off.
SMALL_VALUE_SIZE = 16 * 1024

# Seconds between checks for the file that shows the loads have started.
READY_POLL_INTERVAL = 0.0002

# Seconds that each reader of store_during_loads sleeps between two loads.
LOAD_PAUSE = 0.0001

# Minimum number of steps from one large store to the next.
LARGE_STEP_SPACING = 15

# Bounds on the loads of store_during_loads: it stops at the first load that
# returns the new value, and after these many loads or seconds at the latest.
MAX_CONCURRENT_LOADS = 10_000
MAX_CONCURRENT_SECONDS = 5.0

# Integers at the edges that backends get wrong: beyond float precision, at
# the 64-bit limits, and the longest that Python converts to text.
EDGE_INTEGERS = (2**53 + 1, -(2**63) - 1, 2**64, MAX_INT, -MAX_INT)


def json_leaves() -> st.SearchStrategy:
    """Return a strategy for JSON scalars and empty containers."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-MAX_INT, max_value=MAX_INT),
        st.sampled_from(EDGE_INTEGERS),
        st.floats(allow_nan=False, allow_infinity=False),
        st.just(-0.0),
        st.text(),
        # Characters beyond U+FFFF, which JSON escapes as surrogate pairs.
        st.text(st.characters(min_codepoint=0x10000), min_size=1),
        st.just([]),
        st.just({}),
    )


def nest(leaf: Any, depth: int) -> Any:
    """Wrap *leaf* in *depth* containers, lists and dicts in turn."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 == 0 else {"nested": value}
    return value


def json_values(max_leaves: int = 27) -> st.SearchStrategy:
    """Return a strategy for JSON values of every kind.

    The values are those that strict JSON can represent and Python can
    encode. Scalars are None, bools, ints of up to `MAX_INT_DIGITS` digits,
    finite floats (``-0.0`` included) and text with any character except a
    lone surrogate. Containers are lists and dicts with str keys, empty ones
    included, mixed up to three levels deep, or wrapped up to `MAX_DEPTH`
    deep around one scalar. *max_leaves* bounds the scalars in one value.
    """
    leaves = json_leaves()

    # Three fixed levels, rather than st.recursive, which costs hypothesis
    # about five times as much per value drawn.
    width = max(1, round(max_leaves ** (1 / 3)))
    while width**3 > max_leaves and width > 1:
        width -= 1
    values = leaves
    for _ in range(3):
        values = st.one_of(
            leaves,
            st.lists(values, max_size=width),
            st.dictionaries(st.text(max_size=12), values, max_size=width),
        )
    deep = st.builds(nest, leaves, st.integers(min_value=1, max_value=MAX_DEPTH))

    # The repr of the nested strategy repeats the leaves' 15 times (over 50
    # kB), and hypothesis warns when it builds it. A deferred one is short.
    return st.deferred(lambda: st.one_of(values, deep))


def large_value(marker: int, size: int) -> dict:
    """Return a JSON value of about *size* bytes, distinct for each *marker*."""
    unit = f"{marker:06d}-"
    return {"marker": marker, "text": unit * max(1, size // len(unit))}


def same_json(a: Any, b: Any) -> bool:
    """Return whether *a* and *b* are the same JSON value.

    Stricter than ``==``: a bool differs from an int, an int from a float
    (``1`` from ``1.0``) and ``0.0`` from ``-0.0``, as their JSON texts do.
    Dict key order is ignored, and a tuple counts as a list.
    """
    if isinstance(a, tuple):
        a = list(a)
    if isinstance(b, tuple):
        b = list(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[key], b[key]) for key in a)
    return a == b


class RoundTripMachine(DeletableStoreMachine):
    """Check that loads return exactly what was stored, across worker processes.

    The class attributes of `StoreMachine` apply, and these switch rules off
    for a backend that lacks a feature:

    - ``worker_deaths`` (default True): the ``kill_worker`` rule.
    - ``large_values`` (default True): values of ``large_value_size`` bytes
      (default 1 MiB) in ``store_during_loads``, otherwise 16 KiB. With
      ``concurrent_readers`` off, the ``store_large`` rule stores them.
    - ``concurrent_readers`` (default True): the ``store_during_loads`` rule.
    - ``deletes`` (default True): the ``delete`` rule.

    ``death_spacing`` (default 3) lets ``kill_worker`` run only on steps
    whose number is a multiple of it, because each death starts a new
    worker process. A smaller ``large_value_size`` makes the machine
    faster but the torn-write check weaker: the shorter a torn write lasts,
    the likelier it is that no load lands inside it, or that the replay of
    a failure misses it (a Flaky error). With a store that rewrites the
    file in place, on a 2-core machine at load 2, runs at 256 KiB ended in
    a Flaky error 5 times in 8, and runs at 1 MiB reported the failure 8
    times in 8.

    Large values are built, stored and compared inside the workers, which
    call ``store_factory`` again for the root to get the store, and so does
    the check after each store. A backend that returns a new object per call
    must therefore let several objects of one store work side by side.
    """

    worker_ids = DeletableStoreMachine.worker_ids
    held_tokens = Bundle("token")

    large_values: bool = True
    concurrent_readers: bool = True
    deletes: bool = True
    large_value_size: int = 1 << 20
    death_spacing: int = 3

    def __init__(self) -> None:
        super().__init__()
        # The value last stored in each item file, by file name.
        self.model: dict[str, Any] = {}
        # (marker, size) of the files whose value is a large_value().
        self.large: dict[str, tuple[int, int]] = {}
        self.locks = LockModel()
        # Items stored by the current step, with the worker that stored them.
        self.stored: list[tuple[Item, int]] = []
        # The step that stored a large value last.
        self.last_large_step = -LARGE_STEP_SPACING

    # --- stores and loads ----------------------------------------------------

    @rule(worker=worker_ids, item=st.sampled_from(DATA_ITEMS), value=json_values())
    def store(self, worker: int, item: Item, value: Any):
        self.steps += 1
        self._worker(worker).store(self.target, item, value)
        self._remember(item, value, worker)

    @rule(
        worker=worker_ids,
        item=st.sampled_from(DATA_ITEMS),
        depth=st.integers(min_value=MAX_DEPTH - 5, max_value=MAX_DEPTH),
        leaf=json_leaves(),
    )
    def store_deep(self, worker: int, item: Item, depth: int, leaf: Any):
        """Store *leaf* nested *depth* containers deep."""
        self.steps += 1
        value = nest(leaf, depth)
        self._worker(worker).store(self.target, item, value)
        self._remember(item, value, worker)

    # store_during_loads stores large values too, and runs loads besides.
    @precondition(
        lambda self: self.large_values
        and not self.concurrent_readers
        and self.steps >= self.last_large_step + LARGE_STEP_SPACING
    )
    @rule(worker=worker_ids, item=st.sampled_from(DATA_ITEMS), marker=st.integers(0, 999))
    def store_large(self, worker: int, item: Item, marker: int):
        """Store a value of ``large_value_size`` bytes."""
        self.steps += 1
        self.last_large_step = self.steps
        size = self.large_value_size
        factory = type(self).store_factory
        self._worker(worker).run(store_large_value, factory, self.root, item, marker, size)
        self._remember(item, large_value(marker, size), worker, large=(marker, size))

    @rule(worker=worker_ids, item=st.sampled_from(DATA_ITEMS))
    def load(self, worker: int, item: Item):
        self.steps += 1
        # A large value is compared in the worker rather than sent back.
        if item.file_name in self.large:
            problem = self._worker(worker).run(
                check_load, type(self).store_factory, self.root, item, self._description(item)
            )
            if problem is not None:
                fail(
                    f"worker {worker} loaded {item!r} and got {problem}: expected "
                    f"{_preview(self.model[item.file_name])}, the value stored last"
                )
            return

        expected = self.model.get(item.file_name, _MISSING)
        try:
            value = self._worker(worker).load(self.target, item)
        except ItemNotFoundError as error:
            value = _MISSING
            not_found = str(error)
        if value is _MISSING:
            if expected is _MISSING:
                return
            fail(
                f"worker {worker} found no value for {item!r}, expected "
                f"{_preview(expected)}: {not_found}"
            )

        if expected is _MISSING:
            fail(
                f"worker {worker} loaded {_preview(value)} from {item!r}, which was "
                f"never stored (or was deleted): expected ItemNotFoundError"
            )
        if not same_json(value, expected):
            fail(
                f"worker {worker} loaded {_preview(value)} from {item!r}, expected "
                f"{_preview(expected)}, the value stored last"
            )

    # A large store with loads costs as much as twenty other steps, so at
    # most one step in LARGE_STEP_SPACING is one.
    @precondition(
        lambda self: self.concurrent_readers
        and self.steps >= self.last_large_step + LARGE_STEP_SPACING
    )
    @rule(writer=worker_ids, item=st.sampled_from(DATA_ITEMS), marker=st.integers(0, 999))
    def store_during_loads(self, writer: int, item: Item, marker: int):
        """Store a large value while every other worker loads the item in a loop.

        With a single worker, the loads run on another thread of the writer.
        """
        self.steps += 1
        self.last_large_step = self.steps
        size = self.large_value_size if self.large_values else SMALL_VALUE_SIZE
        factory = type(self).store_factory
        readers = [index for index in range(self.workers) if index != writer] or [writer]

        # A load of a large old value takes about as long as a torn write of
        # the new one lasts, so such loads would rarely land inside it. A small
        # old value keeps the loads dense.
        if item.file_name in self.large:
            self._worker(writer).store(self.target, item, marker)
            self._remember(item, marker, writer)
        old = self._description(item)
        new = ("large", marker, size)

        # The store starts only once the loads run, so that it overlaps them
        # whatever the scheduling. Several readers make it likelier that one
        # of them runs while a short torn write lasts, on a busy machine too.
        loads = {}
        for reader in readers:
            ready_path = self._ready_path(reader)
            loads[reader] = self._worker(reader).submit(
                "run", load_repeatedly, factory, self.root, item, old, new, ready_path
            )
        for reader, pending in loads.items():
            self._wait_for_loads(pending, reader)
        self._worker(writer).run(store_large_value, factory, self.root, item, marker, size)
        timeout = MAX_CONCURRENT_SECONDS + self.pool.call_timeout
        outcomes = {reader: pending.result(timeout=timeout) for reader, pending in loads.items()}
        self._remember(item, large_value(marker, size), writer, large=(marker, size))

        # A load that returned the new value already did what the invariant would.
        if any(outcome["new"] for outcome in outcomes.values()):
            self.stored.clear()

        # Either value is fine. Anything else is a partial or torn file.
        for reader, outcome in outcomes.items():
            if outcome["bad"] is not None:
                fail(
                    f"worker {reader} loaded {item!r} while worker {writer} stored a "
                    f"{size}-byte value, and after {outcome['old']} loads of the old "
                    f"value and {outcome['new']} of the new one it got {outcome['bad']}"
                )

    # --- locks, deletes, deaths --------------------------------------------------

    @rule(target=held_tokens, worker=worker_ids, item=st.sampled_from(Item), exclusive=st.booleans())
    def item_lock(self, worker: int, item: Item, exclusive: bool):
        self.steps += 1
        token = self.locks.try_lock(self._worker(worker), self.target, worker, item, exclusive)
        if token is None:
            return multiple()
        self.locks.add(token)
        return token

    @rule(token=consumes(held_tokens))
    def item_unlock(self, token: ModelToken):
        self.steps += 1
        # Tokens that a death or a delete released are TokenBookkeepingMachine's to check.
        if not self.locks.holds(token):
            return
        self._worker(token.worker).item_unlock(self.target, token.item, token.value)
        self.locks.remove(token)

    # Deleting an empty store shows nothing that a load would not.
    @precondition(lambda self: self.deletes and bool(self.model))
    @rule(worker=worker_ids)
    def delete(self, worker: int):
        """Delete the store: afterwards no item has a value."""
        self.steps += 1
        self._worker(worker).delete(self.target)
        self.model.clear()
        self.large.clear()
        # The other workers' tokens stay with the removed lock files, which
        # no lock on the new store's files conflicts with.
        self.locks.clear()
        self._open_next_generation()

    @precondition(
        lambda self: self.worker_deaths
        and self.steps % self.death_spacing == 0
        and bool(self.locks.tokens)
    )
    @rule(worker=worker_ids)
    def kill_worker(self, worker: int):
        """SIGKILL the worker and start a new one. Stored values stay."""
        self.steps += 1
        self._restart_worker(worker)
        self.locks.drop_worker(worker)

    # --- the check after each store ------------------------------------------------

    @invariant()
    def stored_value_loads_back(self) -> None:
        """Load what the step stored in the next worker, which must get it exactly."""
        stored, self.stored = self.stored, []
        for item, writer in stored:
            reader = (writer + 1) % self.workers
            problem = self._worker(reader).run(
                check_load, type(self).store_factory, self.root, item, self._description(item)
            )
            if problem is not None:
                fail(
                    f"worker {reader} loaded {item!r} right after worker {writer} stored "
                    f"{_preview(self.model[item.file_name])} in it, and got {problem}: "
                    f"expected the value stored last"
                )

    # --- helpers -----------------------------------------------------------------

    def _ready_path(self, reader: int) -> str:
        # Beside the store's directory, which belongs to the backend alone.
        return f"{self.root}.loads-started-{reader}"

    def _wait_for_loads(self, loads: Pending, reader: int) -> None:
        """Wait until *reader*'s loads have created its ready file, or have ended."""
        ready_path = self._ready_path(reader)
        deadline = time.monotonic() + self.pool.call_timeout
        while not os.path.exists(ready_path) and not loads.done():
            if time.monotonic() > deadline:
                fail(
                    f"worker {reader} did not start loading within "
                    f"{self.pool.call_timeout:g} s"
                )
            time.sleep(READY_POLL_INTERVAL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ready_path)

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            for reader in range(self.workers):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._ready_path(reader))

    # --- the model ---------------------------------------------------------------

    def _remember(
        self, item: Item, value: Any, writer: int, large: tuple[int, int] | None = None
    ) -> None:
        self.stored.append((item, writer))
        self.model[item.file_name] = value
        if large is None:
            self.large.pop(item.file_name, None)
        else:
            self.large[item.file_name] = large

    def _description(self, item: Item) -> tuple:
        """Describe *item*'s value for `load_repeatedly`, without copying a large value."""
        name = item.file_name
        if name not in self.model:
            return ("missing",)
        if name in self.large:
            return ("large", *self.large[name])
        return ("value", self.model[name])


class _Missing:
    def __repr__(self) -> str:
        return "<no value>"


_MISSING = _Missing()


def _preview(value: Any, limit: int = 200) -> str:
    text = repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text)} characters)"
    return text


def _expected_value(description: tuple) -> Any:
    if description[0] == "missing":
        return _MISSING
    if description[0] == "large":
        return large_value(description[1], description[2])
    return description[1]


def store_large_value(
    store_factory: Callable[[Any], Any], root: str, item: Item, marker: int, size: int
) -> None:
    """Store ``large_value(marker, size)`` in *item*.

    Runs in a worker, which builds the value itself: sending a megabyte
    through the worker's pipe would cost more than the store.
    """
    store_factory(root).store(item, large_value(marker, size))


def check_load(
    store_factory: Callable[[Any], Any], root: str, item: Item, expected: tuple
) -> str | None:
    """Load *item* and compare it with the value that *expected* describes.

    Runs in a worker, so that a large value is compared where it is loaded
    instead of being sent back. *expected* is as for `load_repeatedly`.
    Returns None if the loaded value is the expected one, else what was found.
    """
    expected_value = _expected_value(expected)
    try:
        value = store_factory(root).load(item)
    except ItemNotFoundError as error:
        if expected_value is _MISSING:
            return None
        return f"ItemNotFoundError: {error}"
    if expected_value is _MISSING:
        return f"the value {_preview(value)} instead of ItemNotFoundError"
    if not same_json(value, expected_value):
        return f"the value {_preview(value)}"
    return None


def load_repeatedly(
    store_factory: Callable[[Any], Any],
    root: str,
    item: Item,
    old: tuple,
    new: tuple,
    ready_path: str,
) -> dict:
    """Load *item* until it has the new value, and classify every load.

    Runs in a worker while another stores the new value, and creates the
    file *ready_path* after the first load. *old* and *new* describe the
    values: ``("missing",)``, ``("value", value)`` or ``("large", marker,
    size)`` for `large_value`. Returns ``{"old": count, "new": count, "bad":
    None or a description of the first load that returned neither}``. Stops
    at the first new value, the first bad load, or after
    `MAX_CONCURRENT_LOADS` loads or `MAX_CONCURRENT_SECONDS` seconds.
    """
    store = store_factory(root)
    old_value = _expected_value(old)
    new_value = _expected_value(new)
    counts = {"old": 0, "new": 0, "bad": None}
    deadline = time.monotonic() + MAX_CONCURRENT_SECONDS

    for _ in range(MAX_CONCURRENT_LOADS):
        try:
            value = store.load(item)
        except ItemNotFoundError as error:
            if old_value is not _MISSING:
                counts["bad"] = f"ItemNotFoundError: {error}"
                return counts
            counts["old"] += 1
        except Exception as error:  # noqa: BLE001 - any error is the finding
            counts["bad"] = f"{type(error).__name__}: {error}"
            return counts
        else:
            if same_json(value, new_value):
                counts["new"] += 1
                return counts
            if old_value is _MISSING or not same_json(value, old_value):
                counts["bad"] = f"the value {_preview(value)}"
                return counts
            counts["old"] += 1
        if counts["old"] == 1:
            with open(ready_path, "w"):
                pass
        if time.monotonic() > deadline:
            break
        # A reader that sleeps between loads is woken, and scheduled, while
        # the writer runs; one that spins may wait out the whole store.
        time.sleep(LOAD_PAUSE)
    return counts
