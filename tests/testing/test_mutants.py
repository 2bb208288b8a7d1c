"""Which check catches each mutant within the fast settings; the real backend passes them all.

`CAUGHT_BY` is the matrix: for each mutant of `vcstore_testing.mutants`, the
check that catches it. Other checks may catch a mutant too; the matrix names
one that must.
"""

import os

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import Flaky
from hypothesis.stateful import run_state_machine_as_test

import vcstore
from vcstore import FilesystemStore, Item
from vcstore_testing import machines
from vcstore_testing.mutants import MUTANTS
from vcstore_testing.stress import run_stress

# The fast profile's size, stopping at the first failure: shrinking it is not the point here.
FAST = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
)

# Passing runs go through every example, so they are kept smaller than FAST.
PASSING = settings(FAST, max_examples=10)

STRESS_SECONDS = 1.0

MACHINES = {
    "lock-exclusivity": "LockExclusivityMachine",
    "token-bookkeeping": "TokenBookkeepingMachine",
    "round-trip": "RoundTripMachine",
    "crash-safety": "CrashSafetyMachine",
}

# mutant -> the check that catches it.
CAUGHT_BY = {
    # The probe finds a held item free.
    "no_lock": "lock-exclusivity",
    # The probe finds an unlocked item still locked.
    "kept_lock": "lock-exclusivity",
    # A load during a large store reads a truncated file.
    "in_place_store": "round-trip",
    # A store replaces the locked data file, and the probe finds the item free.
    "data_file_lock": "token-bookkeeping",
    # Two shared holders: the first unlock removes the file that the second one locks.
    "unlinked_lock_file": "lock-exclusivity",
    # A waiter that a delete wakes up returns a token on the removed lock file.
    "no_identity_recheck": "lock-exclusivity",
    # Two workers get the same token.
    "colliding_tokens": "token-bookkeeping",
    # A worker's descriptors grow after a failed try-lock.
    "leaky_try_lock": "token-bookkeeping",
    # A forked child's unlock of its parent's token succeeds.
    "fork_blind_tokens": "token-bookkeeping",
    # Threads of one worker break each other's loops over the token table.
    "unguarded_tokens": "stress",
}


# Whether a load lands inside a torn write depends on scheduling. When the
# replay of a failing program tears at another step or not at all, hypothesis
# raises a Flaky error instead of the AssertionError, and that is a catch too.
TIMING_CATCHES = {"in_place_store": (AssertionError, Flaky)}


def machine_class(name):
    return getattr(machines, MACHINES[name])


def bound_machine(name, factory, directory):
    attributes = {"store_factory": staticmethod(factory), "parent_directory": str(directory)}
    return type(MACHINES[name], (machine_class(name),), attributes)


def test_matrix_covers_every_mutant():
    assert sorted(CAUGHT_BY) == sorted(MUTANTS)


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_overrides_existing_methods(tmp_path, mutant):
    # An override of a method that the real backend renamed would be dead code,
    # and the mutant would silently be the real backend.
    store_class = type(MUTANTS[mutant](tmp_path / "store"))
    for klass in store_class.__mro__[: store_class.__mro__.index(FilesystemStore)]:
        for name, value in vars(klass).items():
            if callable(value) and name.startswith("_") and not name.startswith("__"):
                assert hasattr(FilesystemStore, name), f"{klass.__name__}.{name}"


@pytest.mark.parametrize(
    "mutant", sorted(name for name, check in CAUGHT_BY.items() if check != "stress")
)
def test_machine_catches_mutant(tmp_path, mutant):
    machine = bound_machine(CAUGHT_BY[mutant], MUTANTS[mutant], tmp_path)

    with pytest.raises(TIMING_CATCHES.get(mutant, AssertionError)):
        run_state_machine_as_test(machine, settings=FAST)


@pytest.mark.parametrize("mutant", sorted(name for name, check in CAUGHT_BY.items() if check == "stress"))
def test_stress_catches_mutant(tmp_path, mutant):
    result = run_stress(tmp_path / "store", seconds=STRESS_SECONDS, store_factory=MUTANTS[mutant])

    assert not result.valid


def delete_while_waiting(machine):
    """Run the steps that tell a lock on a deleted file: hold, wait, delete."""
    holder = machine.item_lock(worker=0, item=Item.STATE, exclusive=True)
    # The waiter is blocked in flock when wait_for_lock returns.
    machine.wait_for_lock(worker=1, holder=holder, exclusive=True)
    machine.waiters_still_blocked()
    machine.delete(worker=0)


needs_proc_locks = pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs Linux /proc/locks")


@needs_proc_locks
def test_delete_while_waiting_catches_no_identity_recheck(tmp_path):
    # The waiter that delete() wakes up must raise StoreDeletedError, not return a token.
    machine = bound_machine("lock-exclusivity", MUTANTS["no_identity_recheck"], tmp_path)()
    try:
        with pytest.raises(AssertionError, match="instead of raising StoreDeletedError"):
            delete_while_waiting(machine)
    finally:
        machine.teardown()


@needs_proc_locks
def test_delete_while_waiting_real_backend_passes(tmp_path):
    machine = bound_machine("lock-exclusivity", vcstore.open, tmp_path)()
    try:
        delete_while_waiting(machine)
    finally:
        machine.teardown()


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_real_backend_passes_machine(tmp_path, name):
    run_state_machine_as_test(bound_machine(name, vcstore.open, tmp_path), settings=PASSING)


def test_real_backend_passes_stress(tmp_path):
    result = run_stress(tmp_path / "store", seconds=STRESS_SECONDS)

    assert result.valid, str(result)


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_factory_returns_one_store_per_directory(tmp_path, mutant):
    # Like vcstore.open: the fork check's child must reach the worker's own store.
    factory = MUTANTS[mutant]

    assert factory(tmp_path / "store") is factory(str(tmp_path / "store"))


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_factory_replaces_deleted_store(tmp_path, mutant):
    factory = MUTANTS[mutant]
    first = factory(tmp_path / "store")
    first.delete()

    assert factory(tmp_path / "store") is not first
