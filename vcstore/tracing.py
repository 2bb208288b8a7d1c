"""Optional OpenTelemetry spans: used when `opentelemetry-api` is installed.

Without it nothing is imported and each traced call costs one function call
that returns a shared no-op context manager. With the API installed but no
tracer provider configured, spans would record nothing, so none are started:
the API's no-op spans cost several times a lock's own system calls.
"""

import contextlib
import importlib.util

_NO_SPAN = contextlib.nullcontext()
_MISSING = object()
_tracer = None
_trace_api = None
_checked = False


def _load() -> None:
    global _tracer, _trace_api, _checked
    _checked = True
    # find_spec looks on disk without importing, so a missing API costs nothing later.
    if importlib.util.find_spec("opentelemetry") is None:
        return
    try:
        from opentelemetry import trace
    except ImportError:
        return
    _trace_api = trace
    _tracer = trace.get_tracer("vcstore")


def _recording() -> bool:
    # Until the application sets a provider, the API's default is a proxy that
    # records nothing. get_tracer_provider() reads the environment on each call
    # until then, so the global it sets is read directly where it exists.
    provider = getattr(_trace_api, "_TRACER_PROVIDER", _MISSING)
    if provider is None:
        return False
    if provider is _MISSING:
        provider = _trace_api.get_tracer_provider()
    return not isinstance(provider, (_trace_api.ProxyTracerProvider, _trace_api.NoOpTracerProvider))


def preload() -> None:
    """Import the tracing API now, if it is installed.

    A process that forks workers calls this first: the children inherit the
    import instead of each paying for it on its first traced call.
    """
    if not _checked:
        _load()


def recording() -> bool:
    """Return whether spans are recorded now, so that a hot path can skip `span`."""
    if _trace_api is None:
        if _checked:
            return False
        _load()
        if _trace_api is None:
            return False
    return _recording()


def span(name: str, path: str, item=None):
    """Return a context manager for a span ``name`` with vcstore's attributes."""
    if not recording():
        return _NO_SPAN

    attributes = {"vcstore.path": path}
    if item is not None:
        attributes["vcstore.item"] = item.name
    return _tracer.start_as_current_span(name, attributes=attributes)
