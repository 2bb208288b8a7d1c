"""Optional OpenTelemetry spans: used when `opentelemetry-api` is installed.

Without it nothing is imported and each traced call costs one function call
that returns a shared no-op context manager.
"""

import contextlib
import importlib.util

_NO_SPAN = contextlib.nullcontext()
_tracer = None
_checked = False


def _get_tracer():
    global _tracer, _checked
    if not _checked:
        _checked = True
        # find_spec looks on disk without importing, so a missing API costs nothing later.
        if importlib.util.find_spec("opentelemetry") is not None:
            try:
                from opentelemetry import trace
            except ImportError:
                trace = None
            if trace is not None:
                _tracer = trace.get_tracer("vcstore")
    return _tracer


def preload() -> None:
    """Import the tracing API now, if it is installed.

    A process that forks workers calls this first: the children inherit the
    import instead of each paying for it on its first traced call.
    """
    _get_tracer()


def span(name: str, path: str, item=None):
    """Return a context manager for a span ``name`` with vcstore's attributes."""
    tracer = _get_tracer()
    if tracer is None:
        return _NO_SPAN
    attributes = {"vcstore.path": path}
    if item is not None:
        attributes["vcstore.item"] = item.name
    return tracer.start_as_current_span(name, attributes=attributes)
