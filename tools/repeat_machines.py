"""Run every machine against the real backend many times and report any failure or Flaky error.

Run from the repository root::

    python tools/repeat_machines.py            # 20 runs of each machine
    python tools/repeat_machines.py --runs 5 --load 2

Each run uses the size of the plugin's ``vcstore-fast`` profile with a new
random seed, as a developer's run outside CI does, with shrinking on, so that
a failure whose replay passes shows up as hypothesis's Flaky error. ``--load
N`` keeps N busy processes running meanwhile, since timing faults show under
load. Exit status 1 if any run raised.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import sys
import tempfile
import time

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

import vcstore
from vcstore_testing import machines
from vcstore_testing.plugin import FAST_PROFILE

MACHINES = ("LockExclusivityMachine", "TokenBookkeepingMachine", "RoundTripMachine", "CrashSafetyMachine")


def spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def run_once(name: str) -> str | None:
    """Run machine *name* once; return None if it passed, else the error's first line."""
    directory = tempfile.mkdtemp(prefix="vcstore-repeat-")
    machine = type(name, (getattr(machines, name),), {"store_factory": vcstore.open, "parent_directory": directory})
    run_settings = settings(
        settings.get_profile(FAST_PROFILE),
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    try:
        run_state_machine_as_test(machine, settings=run_settings)
    except BaseException as error:  # noqa: BLE001 - every outcome is reported
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--load", type=int, default=0, help="busy processes to run meanwhile")
    args = parser.parse_args()

    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.load)]
    for process in spinners:
        process.start()

    failures = 0
    try:
        for name in MACHINES:
            started = time.monotonic()
            outcomes = [run_once(name) for _ in range(args.runs)]
            bad = [outcome for outcome in outcomes if outcome is not None]
            failures += len(bad)
            print(
                f"{name:24} {args.runs - len(bad):3d} of {args.runs} runs passed "
                f"in {time.monotonic() - started:6.1f} s",
                flush=True,
            )
            for outcome in bad:
                print(f"    {outcome}", flush=True)
    finally:
        stop.set()
        for process in spinners:
            process.join()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
