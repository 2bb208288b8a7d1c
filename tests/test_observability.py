"""Logging on the "vcstore" logger, and optional OpenTelemetry spans."""

import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest

import vcstore
from vcstore import Item
from helpers import Background, Peer, wait_blocked_in_flock

SECRET = "s3cr3t-VALUE-do-not-log"

# Attributes that every LogRecord has; anything else came from `extra`.
STANDARD_RECORD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


@pytest.fixture
def store(tmp_path):
    opened = vcstore.open(tmp_path / "store")
    yield opened
    opened.delete()


def records_during(caplog, action):
    """Run *action* and return the "vcstore" records it emitted."""
    caplog.set_level(logging.DEBUG, logger="vcstore")
    start = len(caplog.records)
    action()
    new_records = caplog.records[start:]
    return [record for record in new_records if record.name.split(".")[0] == "vcstore"]


# ---------------------------------------------------------------------------
# Records


def test_open_logs_debug(tmp_path, caplog):
    found = records_during(caplog, lambda: vcstore.open(tmp_path / "s"))
    levels = [record.levelno for record in found if getattr(record, "path", None) == str(tmp_path / "s")]
    assert logging.DEBUG in levels


def test_lock_logs_debug(store, caplog):
    found = records_during(caplog, lambda: store.item_lock(Item.LOCK, exclusive=True))
    assert logging.DEBUG in [record.levelno for record in found]


def has_seconds(record) -> bool:
    """Return True if a record carries a duration: "<n> s" in its text, or a float extra."""
    if re.search(r"\d+(\.\d+)?\s*(s|seconds?)\b", record.getMessage()):
        return True
    extras = [value for key, value in vars(record).items() if key not in STANDARD_RECORD_ATTRIBUTES]
    return any(isinstance(value, float) for value in extras)


def test_lock_log_has_wait_seconds(store, caplog):
    # NOTE: no field name is fixed for the wait, so the text or a float extra both count.
    found = records_during(caplog, lambda: store.item_lock(Item.LOCK, exclusive=True))
    assert [record for record in found if has_seconds(record)] != []


def test_unlock_logs_debug(store, caplog):
    token = store.item_lock(Item.LOCK, exclusive=True)
    found = records_during(caplog, lambda: store.item_unlock(Item.LOCK, token))
    assert logging.DEBUG in [record.levelno for record in found]


def test_stale_temporary_file_logs_warning(store, caplog):
    # A temporary file that no process holds locked was left by a dead writer.
    stale = ".state.json.0123456789abcdef.tmp"
    (store.path / stale).write_text('"half"')
    found = records_during(caplog, lambda: store.store(Item.STATE, 1))
    assert [stale in record.getMessage() for record in found if record.levelno == logging.WARNING] == [True]


def test_lock_file_change_logs_warning(store, caplog):
    caplog.set_level(logging.DEBUG, logger="vcstore")
    with Peer() as peer:
        token = peer.call("lock", str(store.path), "LOCK", True, None)
        waiter = Background(store.item_lock, Item.LOCK, True, None)
        assert wait_blocked_in_flock(os.getpid())
        (store.path / "lock.new").touch()
        os.replace(store.path / "lock.new", store.path / "lock")
        peer.call("unlock", str(store.path), "LOCK", token)
        waiter.result()

    warnings = [record for record in caplog.records if record.name.startswith("vcstore") and record.levelno == logging.WARNING]
    assert len(warnings) == 1


def exercise(store):
    """Call every store operation once, with a value worth hiding."""
    store.store(Item.STATE, {"password": SECRET})
    store.load(Item.STATE)
    store.raw("disk0")
    with store.locked(Item.STATE):
        pass
    (store.path / ".state.json.0123456789abcdef.tmp").write_text(json.dumps(SECRET))
    store.store(Item.STATE, [SECRET])
    store.delete()


@pytest.mark.parametrize("field", ["subsystem", "backend", "path"])
def test_records_carry_field(store, caplog, field):
    found = records_during(caplog, lambda: exercise(store))
    assert found
    assert [record.msg for record in found if not isinstance(getattr(record, field, None), str)] == []


def test_records_path_is_store_path(store, caplog):
    found = records_during(caplog, lambda: exercise(store))
    assert {record.path for record in found} == {str(store.path)}


def test_records_backend_is_filesystem(store, caplog):
    found = records_during(caplog, lambda: exercise(store))
    assert {record.backend for record in found} == {"filesystem"}


def test_values_never_logged(store, caplog):
    caplog.set_level(logging.DEBUG)
    exercise(store)
    assert SECRET not in caplog.text


def test_values_never_in_record_fields(store, caplog):
    found = records_during(caplog, lambda: exercise(store))
    assert [record.msg for record in found if SECRET in repr(vars(record))] == []


def test_library_adds_no_output_handler():
    # A library leaves output to the application: only a NullHandler, if any.
    handlers = logging.getLogger("vcstore").handlers
    assert [handler for handler in handlers if not isinstance(handler, logging.NullHandler)] == []


# ---------------------------------------------------------------------------
# Tracing

OPERATIONS = textwrap.dedent(
    """
    import sys, tempfile
    import vcstore
    from vcstore import Item

    store = vcstore.open(tempfile.mkdtemp() + "/store")
    store.store(Item.STATE, 1)
    store.load(Item.STATE)
    store.raw("disk0")
    token = store.item_lock(Item.LOCK, exclusive=True)
    store.item_unlock(Item.LOCK, token)
    store.delete()
    """
)


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_without_opentelemetry_nothing_imported():
    # The directories that hold opentelemetry are hidden, as if it were not installed.
    hide = textwrap.dedent(
        """
        import os, sys
        sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "opentelemetry"))]
        """
    )
    report = "\nprint(sorted(name for name in sys.modules if name.split('.')[0] == 'opentelemetry'))"
    assert run_python(hide + OPERATIONS + report).strip() == "[]"


def test_without_opentelemetry_operations_work():
    hide = "import sys\nsys.modules['opentelemetry'] = None\n"
    assert run_python(hide + OPERATIONS + "\nprint('ok')").strip() == "ok"


def test_spans_recorded_with_opentelemetry_sdk():
    pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    setup = textwrap.dedent(
        """
        import json
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        """
    )
    report = textwrap.dedent(
        """
        print(json.dumps([[span.name, dict(span.attributes)] for span in exporter.get_finished_spans()]))
        """
    )
    spans = json.loads(run_python(setup + OPERATIONS + report))
    names = [name for name, _ in spans]
    assert names == ["vcstore.store", "vcstore.load", "vcstore.raw", "vcstore.lock", "vcstore.unlock", "vcstore.delete"]
    assert [attributes.get("vcstore.item") for name, attributes in spans if name in ("vcstore.store", "vcstore.load")] == ["STATE", "STATE"]
    assert all(attributes.get("vcstore.path", "").endswith("/store") for _, attributes in spans)
