"""Operation histories in the shape Jepsen uses, and a checker for lock histories.

Each process appends events to a JSON-lines file of its own::

    {"process": 2, "type": "invoke", "f": "lock", "value": {...}, "time": 1234}

``type`` is ``invoke`` when an operation starts, then ``ok``, ``fail`` or
``info`` (outcome unknown: the process died) when it ends; ``time`` is
`time.monotonic_ns`, which all processes of one machine share.

`check` reads the lock operations (``lock``, ``unlock``) and counter
increments (``increment``) of a merged history, and reports every pair of
holders whose held windows overlap where one of them is exclusive, and every
lost update of a counter kept under the lock.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

EVENT_TYPES = ("invoke", "ok", "fail", "info")


class Recorder:
    """Appends one process's events to ``<directory>/<process>.jsonl``.

    Each event is one ``write`` to a file opened with O_APPEND, so events that
    were written survive a SIGKILL of the process whole.
    """

    def __init__(self, directory, process: int) -> None:
        self.process = process
        self.path = Path(directory) / f"{process}.jsonl"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)

    def record(self, type: str, f: str, value=None) -> None:
        if type not in EVENT_TYPES:
            raise ValueError(f"invalid event type {type!r}: use one of {', '.join(EVENT_TYPES)}")
        event = {"process": self.process, "type": type, "f": f, "value": value, "time": time.monotonic_ns()}
        os.write(self._fd, (json.dumps(event, separators=(",", ":")) + "\n").encode())

    def invoke(self, f: str, value=None) -> None:
        self.record("invoke", f, value)

    def ok(self, f: str, value=None) -> None:
        self.record("ok", f, value)

    def fail(self, f: str, value=None) -> None:
        self.record("fail", f, value)

    def info(self, f: str, value=None) -> None:
        self.record("info", f, value)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_history(directory) -> list[dict]:
    """Return the events of every ``*.jsonl`` file in *directory*, ordered by time.

    A torn last line (its process was killed while writing it) is skipped.
    """
    events = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                if not line.endswith("\n"):
                    break
                events.append(json.loads(line))
    events.sort(key=lambda event: (event["time"], event["process"]))
    return events


@dataclasses.dataclass(frozen=True)
class HeldWindow:
    """A span of time in which *process* certainly held a lock on *item*.

    It starts when the lock call returned and ends when the unlock call began
    (or at the process's last event, if it died holding the lock), so a window
    never claims more than the lock really covered.
    """

    process: int
    item: str
    exclusive: bool
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Overlap:
    """Two held windows on one item that overlap, at least one of them exclusive."""

    first: HeldWindow
    second: HeldWindow

    def __str__(self) -> str:
        kinds = ["exclusive" if window.exclusive else "shared" for window in (self.first, self.second)]
        return (
            f"process {self.first.process} ({kinds[0]}) and process {self.second.process} "
            f"({kinds[1]}) both held {self.first.item} for "
            f"{(min(self.first.end, self.second.end) - max(self.first.start, self.second.start)) / 1e6:.3f} ms"
        )


@dataclasses.dataclass(frozen=True)
class LostUpdate:
    """Increments of a counter that did not all take effect."""

    description: str

    def __str__(self) -> str:
        return self.description


@dataclasses.dataclass
class CheckResult:
    """What `check` found: the held windows, and every violation.

    ``errors`` lists failures that the history cannot show, such as an
    exception raised in a process or a process that never stopped. `check`
    leaves it empty, and the stress mode fills it.
    """

    windows: list[HeldWindow]
    overlaps: list[Overlap]
    lost_updates: list[LostUpdate]
    increments: int
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.overlaps and not self.lost_updates and not self.errors

    def __str__(self) -> str:
        if self.valid:
            return f"valid: {len(self.windows)} held windows, {self.increments} increments"
        lines = [
            f"invalid: {len(self.overlaps)} overlaps, {len(self.lost_updates)} lost updates, "
            f"{len(self.errors)} errors ({len(self.windows)} held windows, "
            f"{self.increments} increments)"
        ]
        lines += [f"  overlap: {overlap}" for overlap in self.overlaps[:20]]
        lines += [f"  lost update: {lost}" for lost in self.lost_updates[:20]]
        lines += [f"  error: {error}" for error in self.errors[:20]]
        return "\n".join(lines)


def held_windows(events: Iterable[dict]) -> list[HeldWindow]:
    """Pair each successful ``lock`` with the ``unlock`` of its token.

    ``lock`` events carry ``{"item", "exclusive"}`` and, on ``ok``, ``"token"``;
    ``unlock`` events carry ``{"item", "token"}``.
    """
    events = list(events)
    last_seen: dict[int, int] = {}
    for event in events:
        last_seen[event["process"]] = event["time"]

    open_windows: dict[tuple[int, str], dict] = {}
    windows = []
    for event in events:
        value = event.get("value") or {}
        if event["f"] == "lock" and event["type"] == "ok":
            open_windows[(event["process"], value["token"])] = {**value, "start": event["time"]}
        elif event["f"] == "unlock" and event["type"] == "invoke":
            held = open_windows.pop((event["process"], value["token"]), None)
            if held is not None:
                windows.append(_window(event["process"], held, event["time"]))

    # A process that died, or a history cut short, still held what it never unlocked.
    for (process, _), held in open_windows.items():
        windows.append(_window(process, held, last_seen[process]))
    return windows


def _window(process: int, held: dict, end: int) -> HeldWindow:
    return HeldWindow(process, str(held["item"]), bool(held["exclusive"]), held["start"], end)


def find_overlaps(windows: Iterable[HeldWindow]) -> list[Overlap]:
    """Return every pair of overlapping windows on one item where one is exclusive."""
    by_item: dict[str, list[HeldWindow]] = {}
    for window in windows:
        by_item.setdefault(window.item, []).append(window)

    overlaps = []
    for item_windows in by_item.values():
        item_windows.sort(key=lambda window: window.start)
        active: list[HeldWindow] = []
        for window in item_windows:
            active = [other for other in active if other.end > window.start]
            for other in active:
                if other.exclusive or window.exclusive:
                    overlaps.append(Overlap(other, window))
            active.append(window)
    return overlaps


def find_lost_updates(
    events: Iterable[dict], final_value: int | None = None, initial_value: int = 0
) -> tuple[list[LostUpdate], int]:
    """Check ``increment`` operations on a counter; return the losses and the ok count.

    An ``ok`` increment's value is ``{"read": n, "wrote": n + 1}``. Under a
    working lock no two increments read the same value. The final value is
    at least *initial_value* plus the number of ``ok`` increments. It is at
    most that plus the increments whose outcome is unknown: those that ended
    with ``info`` and those that never ended (their process died, or the
    history was cut short).
    """
    reads: dict[int, list[int]] = {}
    running: set[int] = set()
    done = unknown = 0
    for event in events:
        if event["f"] != "increment":
            continue
        if event["type"] == "invoke":
            running.add(event["process"])
            continue
        running.discard(event["process"])
        if event["type"] == "ok":
            done += 1
            reads.setdefault(event["value"]["read"], []).append(event["process"])
        elif event["type"] == "info":
            unknown += 1
    unknown += len(running)

    lost = [
        LostUpdate(f"processes {sorted(processes)} all read {value} and wrote {value + 1}")
        for value, processes in sorted(reads.items())
        if len(processes) > 1
    ]
    lowest, highest = initial_value + done, initial_value + done + unknown
    if final_value is not None and not lowest <= final_value <= highest:
        lost.append(
            LostUpdate(
                f"final value {final_value} after {done} completed increments "
                f"and {unknown} of unknown outcome, starting from {initial_value}"
            )
        )
    return lost, done


def check(
    events: Iterable[dict], final_value: int | None = None, initial_value: int = 0
) -> CheckResult:
    """Check a merged history for overlapping holders and lost counter updates.

    *final_value* is the counter's value read after every process stopped,
    and *initial_value* its value before any started. Without *final_value*,
    only increments that read the same value count as lost.
    """
    events = sorted(events, key=lambda event: (event["time"], event["process"]))
    windows = held_windows(events)
    lost, increments = find_lost_updates(events, final_value, initial_value)
    return CheckResult(windows, find_overlaps(windows), lost, increments)
