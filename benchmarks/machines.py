"""What the property checks cost: machine speed, time to catch each mutant, `vcstore verify`.

Run from the repository root::

    python benchmarks/machines.py                 # all three groups, a few minutes
    python benchmarks/machines.py steps catch     # only the named groups
    python benchmarks/machines.py --profile lock-exclusivity   # where a machine's time goes

Groups:

- ``steps``: rule steps per second of each machine against the real backend,
  with 3 fork workers, over `STEP_EXAMPLES` test cases of up to
  `STEP_COUNT` steps. The time includes each test case's setup and teardown
  (starting and stopping the worker and probe processes), because a run pays
  it too. The per-test-case overhead is shown beside it.
- ``catch``: seconds until the fast settings (`FAST`, the size of a CI
  profile) report each mutant of `vcstore_testing.mutants`, with the check
  that tests/testing/test_mutants.py names for it, median over `SEEDS`
  seeds. A stress-mode check runs for a fixed time.
- ``verify``: wall time of ``vcstore verify`` with its default settings, in a
  subprocess, as a user runs it.

Nothing here asserts a speed: the targets are printed beside the figures.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis.errors import StopTest, UnsatisfiedAssumption
from hypothesis.stateful import run_state_machine_as_test

import vcstore
from vcstore_testing import machines
from vcstore_testing.mutants import MUTANTS
from vcstore_testing.stress import run_stress

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))
from tests.testing.test_mutants import CAUGHT_BY, FAST, MACHINES, STRESS_SECONDS  # noqa: E402

# Size of the steps group: enough steps that start-up noise averages out.
STEP_EXAMPLES = 20
STEP_COUNT = 50

SEEDS = 5

# The targets that the benchmark prints beside its figures.
TARGET_STEPS_PER_SECOND = 500
TARGET_CATCH_SECONDS = 10.0
TARGET_VERIFY_SECONDS = 60.0


class Tally:
    """Steps and test cases counted by a machine's teardown."""

    def __init__(self) -> None:
        self.steps = 0
        self.test_cases = 0


def counting_machine(name: str, factory, directory: str, tally: Tally) -> type:
    base = getattr(machines, MACHINES[name])

    def teardown(self) -> None:
        ending = sys.exc_info()[1]
        try:
            base.teardown(self)
        finally:
            tally.steps += self.steps
            if not isinstance(ending, (StopTest, UnsatisfiedAssumption)):
                tally.test_cases += 1

    attributes = {
        "store_factory": staticmethod(factory),
        "parent_directory": directory,
        "workers": 3,
        "start_method": "fork",
        "teardown": teardown,
    }
    return type(MACHINES[name], (base,), attributes)


def available(name: str) -> bool:
    try:
        getattr(machines, MACHINES[name])
    except (ImportError, AttributeError):
        return False
    return True


# -- steps per second ---------------------------------------------------------------


def step_directories() -> list[str]:
    """Return where to measure: the temporary directory, and /dev/shm when it is a tmpfs.

    A store is durable, so each one calls fsync twice. On a disk file system
    that dominates the machines that store, and on tmpfs fsync costs nothing.
    """
    directories = [tempfile.gettempdir()]
    if os.path.isdir("/dev/shm") and _filesystem("/dev/shm") == "tmpfs":
        directories.append("/dev/shm")
    return directories


def bench_steps() -> list[str]:
    # No shrinking: a failure of the real backend is reported, not minimised.
    run_settings = settings(
        max_examples=STEP_EXAMPLES,
        stateful_step_count=STEP_COUNT,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    rows = [
        f"{'machine':18} {'directory':18} {'steps':>6} {'cases':>6} {'seconds':>8} "
        f"{'steps/s':>8} {'ms/case':>8}  target"
    ]
    print(rows[0], flush=True)
    for parent in step_directories():
        where = f"{parent} ({_filesystem(parent)})"
        for name in MACHINES:
            if not available(name):
                rows.append(f"{name:18} {where:18} not available")
                print(rows[-1], flush=True)
                continue
            rows += measure_steps(name, parent, where, run_settings)
    return rows


def measure_steps(name: str, parent: str, where: str, run_settings: settings) -> list[str]:
    directory = tempfile.mkdtemp(prefix="vcstore-bench-", dir=parent)
    tally = Tally()
    machine = counting_machine(name, vcstore.open, directory, tally)
    started = time.perf_counter()
    failure = None
    try:
        run_state_machine_as_test(machine, settings=run_settings)
    except Exception as error:
        # The rate up to the failure is still measured; the failure is shown with it.
        failure = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    seconds = time.perf_counter() - started
    shutil.rmtree(directory, ignore_errors=True)

    # What one test case costs beyond its steps: starting and stopping its processes.
    overhead = measure_case_overhead(name, parent)
    rate = tally.steps / seconds
    rows = [
        f"{name:18} {where:18} {tally.steps:6d} {tally.test_cases:6d} {seconds:8.2f} {rate:8.0f} "
        f"{overhead * 1000:8.1f}  >= {TARGET_STEPS_PER_SECOND} steps/s: "
        f"{'met' if rate >= TARGET_STEPS_PER_SECOND else 'MISSED'}"
    ]
    if failure is not None:
        rows.append(f"{'':18} the real backend FAILED the machine: {failure}")
    print("\n".join(rows), flush=True)
    return rows


def measure_case_overhead(name: str, parent: str, repeats: int = 5) -> float:
    """Return the median seconds to start and stop one test case's processes."""
    base = getattr(machines, MACHINES[name])
    samples = []
    for _ in range(repeats):
        directory = tempfile.mkdtemp(prefix="vcstore-bench-", dir=parent)
        machine = type(MACHINES[name], (base,), {"parent_directory": directory})()
        started = time.perf_counter()
        try:
            machine._start_pool()
        finally:
            machine.teardown()
        samples.append(time.perf_counter() - started)
        shutil.rmtree(directory, ignore_errors=True)
    return statistics.median(samples)


# -- time to catch each mutant ------------------------------------------------------


def time_to_catch(mutant: str, seed_value: int) -> tuple[float, str | None]:
    """Return the seconds until the mutant's check fails, and what it raised (None: it passed)."""
    check = CAUGHT_BY[mutant]
    directory = tempfile.mkdtemp(prefix="vcstore-bench-")
    started = time.perf_counter()
    try:
        if check == "stress":
            result = run_stress(Path(directory) / "store", seconds=STRESS_SECONDS, store_factory=MUTANTS[mutant])
            raised = None if result.valid else "invalid history"
        else:
            machine = seed(seed_value)(counting_machine(check, MUTANTS[mutant], directory, Tally()))
            try:
                run_state_machine_as_test(machine, settings=settings(FAST, derandomize=False))
                raised = None
            except Exception as error:
                # A Flaky error means that hypothesis saw a failure it could not replay.
                raised = type(error).__name__
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return time.perf_counter() - started, raised


def bench_catch() -> list[str]:
    rows = [f"{'mutant':20} {'check':18} {'median s':>8} {'max s':>7} {'caught':>7}  target  raised"]
    print(rows[0], flush=True)
    for mutant in MUTANTS:
        check = CAUGHT_BY[mutant]
        if check != "stress" and not available(check):
            rows.append(f"{mutant:20} {check:18} not available")
            continue
        samples = [time_to_catch(mutant, seed_value) for seed_value in range(SEEDS)]
        seconds = [elapsed for elapsed, _ in samples]
        raised = [name for _, name in samples]
        caught = sum(name is not None for name in raised)
        median = statistics.median(seconds)
        met = median <= TARGET_CATCH_SECONDS and caught == SEEDS
        kinds = ", ".join(f"{raised.count(name)}x {name}" for name in sorted(set(raised), key=str))
        rows.append(
            f"{mutant:20} {check:18} {median:8.2f} {max(seconds):7.2f} {caught:3d}/{SEEDS}  "
            f"<= {TARGET_CATCH_SECONDS:g} s: {'met' if met else 'MISSED'}  {kinds}"
        )
        print(rows[-1], flush=True)
    return rows


# -- vcstore verify -----------------------------------------------------------------


def bench_verify() -> list[str]:
    command = [sys.executable, "-m", "vcstore_testing.cli", "verify"]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - started
    rows = [f"$ vcstore verify   (exit status {finished.returncode})"]
    rows += ["  " + line for line in finished.stdout.splitlines() if line.strip()]
    rows.append(
        f"wall time {seconds:.1f} s  <= {TARGET_VERIFY_SECONDS:g} s: "
        f"{'met' if seconds <= TARGET_VERIFY_SECONDS else 'MISSED'}"
    )
    print("\n".join(rows), flush=True)
    return rows


# -- profile ------------------------------------------------------------------------


def profile_machine(name: str) -> None:
    """Print where the parent process spends a machine run's time."""
    run_settings = settings(
        max_examples=STEP_EXAMPLES,
        stateful_step_count=STEP_COUNT,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    directory = tempfile.mkdtemp(prefix="vcstore-bench-")
    machine = counting_machine(name, vcstore.open, directory, Tally())
    profiler = cProfile.Profile()
    profiler.enable()
    run_state_machine_as_test(machine, settings=run_settings)
    profiler.disable()
    shutil.rmtree(directory, ignore_errors=True)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(35)
    stats.sort_stats("tottime").print_stats(20)
    print(text.getvalue())


def describe_machine() -> str:
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, /tmp on "
        f"{_filesystem(tempfile.gettempdir())}, load average {os.getloadavg()[0]:.2f} at start"
    )


def _filesystem(path: str) -> str:
    from vcstore_testing.cli import filesystem_type

    return filesystem_type(path)


GROUPS = {"steps": bench_steps, "catch": bench_catch, "verify": bench_verify}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "groups", nargs="*", metavar="GROUP", help=f"groups to run: {', '.join(GROUPS)} (default: all)"
    )
    parser.add_argument("--profile", choices=list(MACHINES), help="profile one machine's run instead")
    args = parser.parse_args()
    unknown = [group for group in args.groups if group not in GROUPS]
    if unknown:
        parser.error(f"unknown group {unknown[0]!r}: choose from {', '.join(GROUPS)}")

    print(describe_machine(), flush=True)
    if args.profile:
        profile_machine(args.profile)
        return
    for group in args.groups or list(GROUPS):
        print(f"\n== {group}", flush=True)
        GROUPS[group]()


if __name__ == "__main__":
    main()
