"""`vcstore_testing.history` and the stress mode that records histories."""

import json

import pytest

import vcstore
from vcstore import Item
from vcstore_testing.history import Recorder, check, held_windows, read_history
from vcstore_testing.mutants import MUTANTS
from vcstore_testing.stress import run_stress

# Long enough for thousands of operations, short enough for a test.
STRESS_SECONDS = 1.0


def event(process, type, f, value=None, *, time):
    return {"process": process, "type": type, "f": f, "value": value, "time": time}


def locked(process, token, start, end, *, exclusive=True, item="STATE"):
    """Return the events of one lock held from *start* to *end*."""
    request = {"item": item, "exclusive": exclusive}
    return [
        event(process, "invoke", "lock", request, time=start - 1),
        event(process, "ok", "lock", {**request, "token": token}, time=start),
        event(process, "invoke", "unlock", {"item": item, "token": token}, time=end),
        event(process, "ok", "unlock", {"item": item, "token": token}, time=end + 1),
    ]


def increment(process, read, start, *, type="ok"):
    value = {"read": read, "wrote": read + 1} if type == "ok" else None
    return [
        event(process, "invoke", "increment", time=start),
        event(process, type, "increment", value, time=start + 1),
    ]


# ---------------------------------------------------------------------------
# Held windows and overlaps


def test_overlapping_exclusive_windows_reported():
    events = locked(0, "a", 10, 30) + locked(1, "b", 20, 40)

    result = check(events)

    assert len(result.overlaps) == 1
    assert {result.overlaps[0].first.process, result.overlaps[0].second.process} == {0, 1}


def test_shared_and_exclusive_overlap_reported():
    events = locked(0, "a", 10, 30, exclusive=False) + locked(1, "b", 20, 40)

    assert len(check(events).overlaps) == 1


def test_shared_windows_overlap_allowed():
    events = locked(0, "a", 10, 30, exclusive=False) + locked(1, "b", 20, 40, exclusive=False)

    result = check(events)

    assert result.overlaps == []
    assert result.valid


def test_consecutive_windows_valid():
    # The second lock returned after the first unlock began: no overlap.
    events = locked(0, "a", 10, 20) + locked(1, "b", 22, 40)

    assert check(events).valid


def test_windows_on_other_items_valid():
    events = locked(0, "a", 10, 30) + locked(1, "b", 20, 40, item="NETWORK")

    assert check(events).valid


def test_window_spans_lock_ok_to_unlock_invoke():
    (window,) = held_windows(locked(0, "a", 10, 30))

    assert (window.start, window.end) == (10, 30)


def test_dead_holder_window_extends_to_last_event():
    # Process 0 never unlocked: it died holding the lock after its last event.
    request = {"item": "STATE", "exclusive": True}
    events = [
        event(0, "invoke", "lock", request, time=5),
        event(0, "ok", "lock", {**request, "token": "a"}, time=10),
        event(0, "invoke", "increment", time=50),
    ] + locked(1, "b", 40, 60)

    windows = {window.process: window for window in held_windows(events)}

    assert (windows[0].start, windows[0].end) == (10, 50)
    assert len(check(events).overlaps) == 1


def test_overlap_description_names_processes():
    events = locked(3, "a", 10, 30) + locked(4, "b", 20, 40)

    text = str(check(events))

    assert "process 3 (exclusive) and process 4 (exclusive)" in text


# ---------------------------------------------------------------------------
# Lost updates


def test_duplicate_reads_reported_lost():
    # Both read 5 and wrote 6: one increment was lost.
    events = increment(0, 5, 10) + increment(1, 5, 11)

    result = check(events)

    assert len(result.lost_updates) == 1
    assert "all read 5" in str(result.lost_updates[0])


def test_final_value_too_low_reported_lost():
    events = increment(0, 0, 10) + increment(1, 1, 20) + increment(2, 2, 30)

    result = check(events, final_value=2)

    assert len(result.lost_updates) == 1
    assert "final value 2 after 3 completed increments" in str(result.lost_updates[0])


def test_final_value_too_high_reported():
    events = increment(0, 0, 10)

    assert not check(events, final_value=2).valid


def test_final_value_matching_increments_valid():
    events = increment(0, 0, 10) + increment(1, 1, 20)

    result = check(events, final_value=2)

    assert result.valid
    assert result.increments == 2


def test_unknown_increment_may_count():
    events = increment(0, 0, 10) + increment(1, 1, 20, type="info")

    assert check(events, final_value=1).valid
    assert check(events, final_value=2).valid


def test_unfinished_increment_may_count():
    # Process 1 died between its store and its "ok": the outcome is unknown.
    events = increment(0, 0, 10) + [event(1, "invoke", "increment", time=20)]

    assert check(events, final_value=2).valid


def test_failed_increment_never_counts():
    events = increment(0, 0, 10) + increment(1, 1, 20, type="fail")

    assert not check(events, final_value=2).valid


def test_initial_value_offsets_final_value():
    events = increment(0, 7, 10)

    assert check(events, final_value=8, initial_value=7).valid
    assert not check(events, final_value=1, initial_value=7).valid


# ---------------------------------------------------------------------------
# Recording and reading


def test_recorder_round_trip(tmp_path):
    with Recorder(tmp_path, 2) as recorder:
        recorder.invoke("lock", {"item": "STATE", "exclusive": True})
        recorder.ok("lock", {"item": "STATE", "exclusive": True, "token": "t"})

    events = read_history(tmp_path)

    assert [(e["process"], e["type"], e["f"]) for e in events] == [(2, "invoke", "lock"), (2, "ok", "lock")]
    assert events[1]["value"]["token"] == "t"


def test_recorder_rejects_invalid_type(tmp_path):
    with Recorder(tmp_path, 0) as recorder:
        with pytest.raises(ValueError, match="invalid event type"):
            recorder.record("done", "lock")


def test_read_history_merges_by_time(tmp_path):
    for process, times in ((0, (1, 4)), (1, (2, 3))):
        lines = [json.dumps(event(process, "invoke", "read", time=t)) + "\n" for t in times]
        (tmp_path / f"{process}.jsonl").write_text("".join(lines))

    events = read_history(tmp_path)

    assert [e["time"] for e in events] == [1, 2, 3, 4]


def test_torn_last_line_skipped(tmp_path):
    # A process killed while writing its last event leaves half a line.
    whole = json.dumps(event(0, "invoke", "lock", {"item": "STATE"}, time=1)) + "\n"
    torn = json.dumps(event(0, "ok", "lock", {"item": "STATE"}, time=2))[:20]
    (tmp_path / "0.jsonl").write_text(whole + torn)

    events = read_history(tmp_path)

    assert [e["time"] for e in events] == [1]


# ---------------------------------------------------------------------------
# The stress mode


def test_stress_real_backend_valid(tmp_path):
    result = run_stress(tmp_path / "store", seconds=STRESS_SECONDS)

    assert result.valid, str(result)
    assert result.increments > 0


def test_stress_no_lock_overlaps(tmp_path):
    result = run_stress(tmp_path / "store", seconds=STRESS_SECONDS, store_factory=MUTANTS["no_lock"])

    assert result.overlaps


def test_stress_no_lock_loses_updates(tmp_path):
    result = run_stress(tmp_path / "store", seconds=STRESS_SECONDS, store_factory=MUTANTS["no_lock"])

    assert result.lost_updates


def test_stress_counts_from_existing_counter(tmp_path):
    vcstore.open(tmp_path / "store").store(Item.STATE, 1000)

    result = run_stress(tmp_path / "store", seconds=STRESS_SECONDS, workers=2)

    assert result.valid, str(result)


def test_stress_keeps_history_dir(tmp_path):
    history = tmp_path / "history"

    result = run_stress(tmp_path / "store", seconds=STRESS_SECONDS, workers=2, threads=1, history_dir=history)

    assert sorted(path.name for path in history.iterdir()) == ["0.jsonl", "1.jsonl"]
    assert len(check(read_history(history)).windows) == len(result.windows)


def test_stress_rejects_used_history_dir(tmp_path):
    history = tmp_path / "history"
    history.mkdir()
    (history / "0.jsonl").write_text("")

    with pytest.raises(ValueError, match="earlier run"):
        run_stress(tmp_path / "store", seconds=STRESS_SECONDS, history_dir=history)


def test_stress_rejects_lock_item(tmp_path):
    with pytest.raises(ValueError, match="Item.LOCK holds none"):
        run_stress(tmp_path / "store", item=Item.LOCK)


def test_stress_rejects_zero_seconds(tmp_path):
    with pytest.raises(ValueError, match="invalid seconds"):
        run_stress(tmp_path / "store", seconds=0)
