"""Repository-level pytest configuration for vcstore's own tests."""

import os

import pytest

# Hypothesis profiles come from the vcstore pytest plugin: its default
# "vcstore-fast" applies to these tests unless --vcstore-profile or
# --hypothesis-profile picks another.


def _children(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as status:
                fields = status.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, fields[1] the parent pid; a zombie is already dead.
        if int(fields[1]) != pid or fields[0] == "Z":
            continue
        # multiprocess keeps a resource tracker and a fork server for the whole run.
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:
            continue
        if b"resource_tracker" not in command and b"forkserver" not in command:
            children.append(int(entry))
    return children


@pytest.fixture(autouse=True, scope="session")
def no_leftover_processes():
    """Fail the run if a test leaves a worker or helper process running."""
    yield
    leftovers = _children(os.getpid())
    assert not leftovers, f"processes left running after the tests: {leftovers}"
