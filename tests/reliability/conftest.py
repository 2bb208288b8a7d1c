"""Markers of the reliability tests: faults, crashes, hostile input, load.

Select a group with ``-m``, for example ``python -m pytest tests/reliability -m hostile``.
The load tests run for a few seconds by default; ``VCSTORE_LONG=1`` selects
the full durations (16 threads for 10 s, 8 processes for 30 s)::

    VCSTORE_LONG=1 python -m pytest tests/reliability -m load
"""

MARKERS = {
    "reliability": "faults, crashes, hostile input and load (tests/reliability)",
    "faults": "an I/O error injected at one file-system call through the I/O seam",
    "crash": "a writer killed with SIGKILL at one file-system call",
    "hostile": "a link or special file planted inside a store",
    "fuzz": "hypothesis-generated ids, URLs, items and values",
    "permissions": "file modes under every umask, unprivileged users, tmpfs",
    "load": "threads or processes for a bounded time; VCSTORE_LONG=1 for the full durations",
    "interrupts": "flock failures and KeyboardInterrupt while a lock call waits",
}


def pytest_configure(config):
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
