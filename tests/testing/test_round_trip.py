"""`RoundTripMachine`: the real backend passes, each broken backend fails."""

import json
import math
import os
import time

import multiprocess
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis.errors import Flaky, FlakyStrategyDefinition
from hypothesis.stateful import run_state_machine_as_test

import vcstore
from vcstore_testing.machines import RoundTripMachine
from vcstore_testing.machines.round_trip import MAX_DEPTH, json_values, same_json

# Small, so the file runs in seconds.
SHORT_RUN = settings(
    max_examples=8,
    stateful_step_count=25,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)

# Finding a failure is enough: shrinking a long failing program is slow.
FIND_ONLY = settings(SHORT_RUN, max_examples=60, phases=[Phase.explicit, Phase.generate])


class WrappedStore:
    """A store that passes every call to the real backend. Each mutant overrides one."""

    def __init__(self, root):
        self._store = vcstore.open(root)

    def __getattr__(self, name):
        return getattr(self._store, name)


class InPlaceStore(WrappedStore):
    """store truncates the item file, then writes it in two halves with a pause between."""

    def store(self, item, value):
        data = json.dumps(value).encode()
        fd = os.open(self._store.path / item.file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            half = len(data) // 2
            os.write(fd, data[:half])
            time.sleep(0.002)
            os.write(fd, data[half:])
        finally:
            os.close(fd)


def rewrite(value, leaf):
    """Return *value* with *leaf* applied to every scalar in it."""
    if isinstance(value, list):
        return [rewrite(child, leaf) for child in value]
    if isinstance(value, dict):
        return {key: rewrite(child, leaf) for key, child in value.items()}
    return leaf(value)


def unsigned_zero(value):
    return 0.0 if isinstance(value, float) and value == 0 else value


def big_int_as_float(value):
    if type(value) is int and 2**53 < abs(value) < 2**1000:
        return float(value)
    return value


class SignLosingStore(WrappedStore):
    """store writes -0.0 as 0.0."""

    def store(self, item, value):
        self._store.store(item, rewrite(value, unsigned_zero))


class BigIntAsFloatStore(WrappedStore):
    """store turns integers beyond 2**53 into floats, as a JSON parser of doubles would."""

    def store(self, item, value):
        self._store.store(item, rewrite(value, big_int_as_float))


def machine_for(factory, directory, **attributes):
    attributes.update(store_factory=staticmethod(factory), parent_directory=str(directory))
    return type("RoundTripMachine", (RoundTripMachine,), attributes)


def test_real_backend_passes(tmp_path):
    run_state_machine_as_test(machine_for(vcstore.open, tmp_path), settings=SHORT_RUN)


def test_real_backend_passes_with_one_worker(tmp_path):
    # The concurrent loads then run on a second thread of the writing worker.
    machine = machine_for(vcstore.open, tmp_path, workers=1)

    run_state_machine_as_test(machine, settings=SHORT_RUN)


def test_run_cleans_up(tmp_path):
    run_state_machine_as_test(machine_for(vcstore.open, tmp_path), settings=SHORT_RUN)

    assert list(tmp_path.iterdir()) == []
    assert multiprocess.active_children() == []


@pytest.mark.parametrize("broken_store", [SignLosingStore, BigIntAsFloatStore])
def test_lossy_store_fails(tmp_path, broken_store):
    machine = machine_for(broken_store, tmp_path)

    # The load right after the store returns 0.0, or a float.
    with pytest.raises(AssertionError, match="expected the value stored last"):
        run_state_machine_as_test(machine, settings=FIND_ONLY)


def test_in_place_store_fails(tmp_path):
    machine = machine_for(InPlaceStore, tmp_path)

    # A load during the pause between the halves reads a torn file. Whether a
    # load lands in that pause depends on scheduling, so hypothesis may find
    # the failure and then report that its replay passed, as a Flaky error.
    with pytest.raises((AssertionError, Flaky)) as caught:
        run_state_machine_as_test(machine, settings=FIND_ONLY)

    if not isinstance(caught.value, FlakyStrategyDefinition):
        assert "CorruptItemError" in messages(caught.value)


def test_in_place_store_passes_without_concurrent_readers(tmp_path):
    # Without loads during a store, no load reads the torn file, so the
    # concurrent-reader rule is what catches it above.
    machine = machine_for(InPlaceStore, tmp_path, concurrent_readers=False)

    run_state_machine_as_test(machine, settings=SHORT_RUN)


def test_failure_prints_readable_steps(tmp_path):
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(machine_for(SignLosingStore, tmp_path), settings=FIND_ONLY)

    steps = "\n".join(caught.value.__notes__)
    assert "state.store" in steps
    assert "worker=worker_" in steps
    assert "item=Item." in steps


@pytest.mark.parametrize(
    ("kind", "condition"),
    [
        ("negative zero", lambda v: isinstance(v, float) and v == 0 and math.copysign(1.0, v) < 0),
        ("int beyond 64 bits", lambda v: type(v) is int and abs(v) > 2**64),
        ("int of 4300 digits", lambda v: type(v) is int and len(str(abs(v))) == 4300),
        ("astral character", lambda v: isinstance(v, str) and any(ord(c) > 0xFFFF for c in v)),
        ("empty list", lambda v: v == [] and type(v) is list),
        ("empty dict", lambda v: v == {} and type(v) is dict),
    ],
)
def test_json_values_generate(kind, condition):
    # Any example will do, so the slow shrinking of huge values is skipped.
    quick = settings(database=None, max_examples=2000, phases=[Phase.generate])

    found = find(json_values(), lambda v: any(map(condition, parts(v))), settings=quick)

    assert any(map(condition, parts(found))), kind


def test_json_values_reach_max_depth():
    quick = settings(database=None, max_examples=2000, phases=[Phase.generate])

    found = find(json_values(), lambda v: depth(v) == MAX_DEPTH, settings=quick)

    assert depth(found) == MAX_DEPTH


def test_json_values_mix_containers():
    quick = settings(database=None, max_examples=2000, phases=[Phase.generate], derandomize=True)

    def mixed(v):
        # A non-empty dict in a list in a dict of two or more keys, which a
        # deeply nested value (one key per dict) is not.
        return any(
            isinstance(x, dict) and len(x) > 1 and any(
                isinstance(y, list) and any(isinstance(z, dict) and z for z in y) for y in x.values()
            )
            for x in parts(v)
        )

    assert mixed(find(json_values(), mixed, settings=quick))


@settings(max_examples=200, database=None, deadline=None)
@given(json_values())
def test_json_values_survive_strict_json(value):
    text = json.dumps(value, allow_nan=False)

    assert same_json(json.loads(text), value)


def messages(error):
    """Return the text of *error* and of every exception grouped in it."""
    texts = [str(error)]
    for inner in getattr(error, "exceptions", ()):
        texts.append(messages(inner))
    return "\n".join(texts)


def parts(value):
    """Yield *value* and every value nested in it."""
    yield value
    if isinstance(value, dict):
        children = value.values()
    elif isinstance(value, list):
        children = value
    else:
        children = ()
    for child in children:
        yield from parts(child)


def depth(value):
    if isinstance(value, list):
        return 1 + max((depth(child) for child in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(child) for child in value.values()), default=0)
    return 0


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (-0.0, 0.0),
        (1, 1.0),
        (True, 1),
        (None, False),
        ([1], [1.0]),
        ({"a": 1}, {"a": 1, "b": 2}),
        ("1", 1),
    ],
)
def test_same_json_tells_apart(a, b):
    assert not same_json(a, b)


def test_same_json_ignores_key_order():
    assert same_json({"a": 1, "b": [2.5, None]}, {"b": [2.5, None], "a": 1})
